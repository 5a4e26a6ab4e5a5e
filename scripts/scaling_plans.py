"""Memory and FLOP plans for T5-11B (survey) and LLaMA-2-7B (TULU) on 8 devices.

Runs :func:`peft_jax.plan.plan` (the real training step, compiled ahead of time for
abstract inputs, no weights) over a grid of method x param dtype x remat x
micro-batch x mesh, in one process on 8 simulated CPU devices, and writes
``docs/scaling.md`` (tables and summaries, generated here) and
``docs/scaling_plans.json`` (every raw result dict, or the error of a plan that
failed).

  python scripts/scaling_plans.py                       # full grid (114 plans), ~30 min on 2 cores
  python scripts/scaling_plans.py --only=t5             # one model (the other's rows are kept)
  python scripts/scaling_plans.py --quick               # smoke check -> /tmp/scaling_quick.*
  python scripts/scaling_plans.py --render_only         # rewrite the doc from the JSON

The JSON is rewritten after every plan; ``--resume`` skips plans that already have a
result in it (failed plans are tried again).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8
GIB = 2 ** 30

# ---------------------------------------------------------------------------- grid

T5_CONFIG = "configs/survey.py"
LLAMA_CONFIG = "configs/tulu.py"
T5_MICRO = (8, 16, 32)
T5_REMAT = ("none", "full")
LLAMA_METHODS = ("lora", "adapter", "full")
LLAMA_MICRO = (8, 16)
LLAMA_REMAT = ("full", "dots_no_batch")
#: remat policies from least to most recomputation: the first that fits is preferred
REMAT_ORDER = ("none", "dots", "dots_no_batch", "minimal", "full")
FSDP8 = {"data": 1, "fsdp": 8, "tensor": 1}
FSDP4_TP2 = {"data": 1, "fsdp": 4, "tensor": 2}


def load_config_module(rel: str):
  path = os.path.join(ROOT, rel)
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(rel))[0], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def job(family, label, config, variant, param_dtype, remat, micro, mesh, dtype="bfloat16"):
  m = mesh
  key = (f"{family}|{label}|{param_dtype}|{remat}|{micro}|"
         f"d{m['data']}f{m['fsdp']}t{m['tensor']}")
  return {"key": key, "family": family, "label": label, "config": config, "variant": variant,
          "dtype": dtype, "param_dtype": param_dtype, "remat": remat, "micro_batch_size": micro,
          "mesh": dict(mesh)}


def t5_jobs(quick: bool) -> List[Dict[str, Any]]:
  survey = load_config_module(T5_CONFIG)
  methods = ("lora_qv", "full") if quick else tuple(survey.METHODS)
  out = []
  for label in methods:
    dtypes = ("bfloat16", "float32") if label == "full" else ("bfloat16",)
    for pd in dtypes:
      for remat in (("full",) if quick else T5_REMAT):
        for micro in ((8,) if quick else T5_MICRO):
          out.append(job("t5", label, T5_CONFIG, f"t5-11b,rte,{label}", pd, remat, micro, FSDP8))
  return out


def llama_jobs(quick: bool) -> List[Dict[str, Any]]:
  out = []
  for label in (("lora",) if quick else LLAMA_METHODS):
    dtypes = ("bfloat16", "float32") if label == "full" else ("bfloat16",)
    for pd in dtypes:
      for remat in (("full",) if quick else LLAMA_REMAT):
        for micro in ((8,) if quick else LLAMA_MICRO):
          out.append(job("llama", label, LLAMA_CONFIG, label, pd, remat, micro, FSDP8))
  if not quick:
    for label in ("lora", "full"):
      out.append(job("llama", label, LLAMA_CONFIG, label, "bfloat16", "full", 8, FSDP4_TP2))
  return out


def make_cfg(j: Dict[str, Any]):
  cfg = load_config_module(j["config"]).get_config(j["variant"])
  cfg.model.dtype = j["dtype"]
  cfg.model.param_dtype = j["param_dtype"]
  cfg.model.remat = j["remat"]
  cfg.train.micro_batch_size = j["micro_batch_size"]
  for k, v in j["mesh"].items():
    cfg.mesh[k] = v
  cfg.mesh.num_devices = NUM_DEVICES
  return cfg


# ---------------------------------------------------------------------------- running

def run_grid(jobs, json_path, records: Dict[str, Dict[str, Any]], meta: Dict[str, Any],
             resume: bool):
  import jax
  from tqdm import tqdm
  from peft_jax.plan import plan

  todo = [j for j in jobs if not (resume and j["key"] in records and "result" in records[j["key"]])]
  t_start = time.time()
  bar = tqdm(todo, desc="plans", unit="plan", dynamic_ncols=True)
  for j in bar:
    bar.set_postfix_str(j["key"])
    t0 = time.time()
    rec = dict(j)
    try:
      rec["result"] = plan(make_cfg(j))
      r = rec["result"]
      fits = " ".join(f"{k}={'y' if v else 'n'}" for k, v in r["fits"].items())
      line = (f"{j['key']}: peak {r['peak_bytes'] / GIB:.2f} GiB (temp "
              f"{r['temp_bytes'] / GIB:.2f}) {fits}")
    except Exception as e:  # noqa: BLE001 -- a failed plan is a row, not the end of the run
      msg = f"{type(e).__name__}: {e}".strip()
      rec["error"] = msg[:2000]
      line = f"{j['key']}: ERROR {msg.splitlines()[0][:300]}"
    rec["wall_s"] = round(time.time() - t0, 1)
    records[j["key"]] = rec
    tqdm.write(f"{line} [{rec['wall_s']} s]")
    save_json(json_path, meta, records)
    jax.clear_caches()
    gc.collect()
  return time.time() - t_start


def save_json(path, meta, records):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"meta": meta, "records": list(records.values())}, f, indent=1)
  os.replace(tmp, path)


def load_json(path) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
  if not os.path.exists(path):
    return {}, {}
  with open(path) as f:
    d = json.load(f)
  return d.get("meta", {}), {r["key"]: r for r in d.get("records", [])}


# ---------------------------------------------------------------------------- the doc

HW = (("tpu-v4", "v4 32GB"), ("tpu-v5e", "v5e 16GB"), ("h100", "H100 80GB"))
HW_NAME = {"tpu-v4": "TPU v4 (32 GiB)", "tpu-v5e": "TPU v5e (16 GiB)", "h100": "H100 (80 GiB)"}


def gib(x):
  return f"{x / GIB:.2f}"


def dt(s):
  return {"bfloat16": "bf16", "float32": "fp32"}.get(s, s)


def mesh_str(m):
  parts = [f"{k}={v}" for k, v in m.items() if v != 1 or k == "fsdp"]
  return ",".join(parts)


def shards(m):
  return m["data"] * m["fsdp"]


def per_device(j):
  """``8, 1/device``, or for a mesh with tensor parallelism ``8, 2/shard on fsdp=4,tensor=2``."""
  n = j["micro_batch_size"] // shards(j["mesh"])
  if j["mesh"] == FSDP8:
    return f"{j['micro_batch_size']}, {n}/device"
  return f"{j['micro_batch_size']}, {n}/shard on {mesh_str(j['mesh'])}"


def describe(j):
  return (f"{j['label']}, {dt(j['param_dtype'])} params, remat {j['remat']}, micro "
          f"{per_device(j)}")


def micro_str(j):
  return f"{j['micro_batch_size']} ({j['micro_batch_size'] // shards(j['mesh'])})"


def order_key(rec, methods):
  m = rec["mesh"]
  return (methods.index(rec["label"]) if rec["label"] in methods else 99,
          rec["param_dtype"] != "bfloat16", (m["tensor"], -m["fsdp"]),
          REMAT_ORDER.index(rec["remat"]) if rec["remat"] in REMAT_ORDER else 99,
          rec["micro_batch_size"])


def table(recs, methods):
  head = ["method", "param dtype", "mesh", "remat", "micro-batch (rows/device)",
          "params/device GiB", "optimizer/device GiB", "temporaries GiB", "peak GiB"]
  head += [h for _, h in HW] + ["matmul TFLOPs/step/device"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for rec in sorted(recs, key=lambda r: order_key(r, methods)):
    row = [rec["label"], dt(rec["param_dtype"]), mesh_str(rec["mesh"]), rec["remat"],
           micro_str(rec)]
    if "result" in rec:
      r = rec["result"]
      row += [gib(r["param_bytes_per_device"]), gib(r["opt_bytes_per_device"]),
              gib(r["temp_bytes"]), gib(r["peak_bytes"])]
      row += ["yes" if r["fits"][hw] else "no" for hw, _ in HW]
      row += [f"{r['flops_per_device'] / 1e12:.1f}"]
    else:
      row += ["error"] + [""] * (len(head) - len(row) - 1)
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def fits_summary(recs, methods):
  """Per (method, param dtype) and hardware: the largest micro-batch that fits, with the
  cheapest remat policy (least recomputation) that fits at that micro-batch."""
  from peft_jax.plan import HARDWARE, HEADROOM
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for rec in recs:
    groups.setdefault((rec["label"], rec["param_dtype"]), []).append(rec)
  head = ["method", "param dtype"] + [HW_NAME[hw] for hw, _ in HW]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  keys = sorted(groups, key=lambda k: (methods.index(k[0]) if k[0] in methods else 99,
                                       k[1] != "bfloat16"))
  for label, pd in keys:
    ok = [r for r in groups[(label, pd)] if "result" in r]
    row = [label, dt(pd)]
    for hw, _ in HW:
      cap = HEADROOM * HARDWARE[hw]
      good = [r for r in ok if r["result"]["fits"][hw]]
      if good:
        best = max(good, key=lambda r: (r["micro_batch_size"], -REMAT_ORDER.index(r["remat"]),
                                        r["mesh"] == FSDP8))
        row.append(f"micro {per_device(best)}, remat {best['remat']}, peak "
                   f"{gib(best['result']['peak_bytes'])} GiB")
      elif ok:
        low = min(ok, key=lambda r: r["result"]["peak_bytes"])
        r = low["result"]
        state = r["param_bytes_per_device"] + r["opt_bytes_per_device"]
        txt = (f"does not fit on 8 devices: smallest peak {gib(r['peak_bytes'])} (micro "
               f"{per_device(low)}, remat {low['remat']}) > {gib(cap)} GiB (90%)")
        if state > cap:
          txt += f"; params + optimizer alone {gib(state)} GiB: needs more devices"
        elif state > 0.25 * cap:
          txt += (f"; params + optimizer {gib(state)} GiB: needs more devices or less memory per "
                  "row")
        else:
          txt += "; needs more devices or less activation memory per row"
        base = min(x["result"]["param_bytes_per_device"] for x in recs if "result" in x
                   and x["param_dtype"] == pd)
        if r["param_bytes_per_device"] - base > 0.25 * GIB:
          txt += "; or shard the method's replicated parameters (`mesh.param_rules`)"
        if pd == "float32":
          txt += "; or bf16 params"
        row.append(txt)
      else:
        row.append("error (see Errors)")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


#: why a method stands out, appended to a generated remark that names it (T5 only where said)
EXPLAIN = {
    ("t5", "prefix_tuning"): "on T5 the prefixes sit only in the decoder self-attention (HF "
                             "PEFT's placement, `peft_jax/peft/prefix_tuning.py`), so no gradient "
                             "flows back through the encoder",
}


def _setting(r, *drop):
  keys = ("label", "param_dtype", "remat", "micro_batch_size")
  return tuple(r[k] for k in keys if k not in drop) + (json.dumps(r["mesh"], sort_keys=True),)


def observations(recs, methods, family) -> List[str]:
  """Generated remarks: methods whose state, temporaries or FLOPs stand out, remat that
  does not shrink the peak, peaks that fall as the micro-batch grows."""
  ok = [r for r in recs if "result" in r]
  notes = []

  explained = set()

  def explain(label):
    e = EXPLAIN.get((family, label))
    if not e or label in explained:
      return ""
    explained.add(label)
    return f"; {e}"

  # parameters a method adds: fp32, replicated
  for pd in sorted({r["param_dtype"] for r in ok}):
    rs = [r for r in ok if r["param_dtype"] == pd]
    base = min(r["result"]["param_bytes_per_device"] for r in rs)
    low = min(rs, key=lambda x: x["result"]["param_bytes_per_device"])
    seen, big = set(), []
    for r in sorted(rs, key=lambda r: methods.index(r["label"])):
      extra = r["result"]["param_bytes_per_device"] - base
      if r["label"] in seen or extra < 0.25 * GIB:
        continue
      seen.add(r["label"])
      big.append(f"`{r['label']}` +{gib(extra)} GiB params, "
                 f"{gib(r['result']['opt_bytes_per_device'])} GiB optimizer")
    if big:
      notes.append(f"Per device, over the smallest params/device ({gib(base)} GiB, "
                   f"`{low['label']}`, {dt(pd)}): " + "; ".join(big) + ". The parameters a "
                   "method adds are stored in fp32 and replicated on every device "
                   "(`peft_jax/sharding.py` `param_specs`; `mesh.param_rules` can shard "
                   "them), and so are their optimizer state and, with accumulation, their "
                   "fp32 gradient accumulator.")
  # temporaries / FLOPs far from the median of the other methods at the same setting
  by_setting: Dict[tuple, List[Dict[str, Any]]] = {}
  for r in ok:
    by_setting.setdefault(_setting(r, "label"), []).append(r)
  for field, what, hi, lo in (("temp_bytes", "temporaries", 1.5, None),
                              ("flops", "matmul FLOPs", 1.5, 0.7)):
    ratios: Dict[str, List[float]] = {}
    for rs in by_setting.values():
      if len(rs) < 4:
        continue
      vals = sorted(x["result"][field] for x in rs)
      med = vals[len(vals) // 2]
      for x in rs:
        q = x["result"][field] / med
        if q > hi or (lo is not None and q < lo):
          ratios.setdefault(x["label"], []).append(q)
    for label, qs in sorted(ratios.items(), key=lambda kv: methods.index(kv[0])):
      notes.append(f"`{label}`: {what} {min(qs):.2f}-{max(qs):.2f}x the median of the methods "
                   f"at the same remat / micro-batch ({len(qs)} settings{explain(label)}).")
  # remat that does not shrink the peak
  idx = {_setting(r): r for r in ok}
  flat = []
  for r in sorted(ok, key=lambda r: order_key(r, methods)):
    if r["remat"] != "full":
      continue
    for other in ("none", "dots_no_batch"):
      o = idx.get(_setting(dict(r, remat=other)))
      if o and r["result"]["peak_bytes"] >= 0.95 * o["result"]["peak_bytes"]:
        flat.append(f"`{r['label']}` ({dt(r['param_dtype'])}, micro {per_device(r)}: "
                    f"{gib(r['result']['peak_bytes'])} vs {gib(o['result']['peak_bytes'])} GiB "
                    f"with {other}{explain(r['label'])})")
  if flat:
    notes.append("remat=full lowers the peak by less than 5% for: " + "; ".join(flat) + ".")
  # peak falls as the micro-batch grows
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for r in ok:
    groups.setdefault(_setting(r, "micro_batch_size"), []).append(r)
  falls = []
  for rs in sorted(groups.values(), key=lambda rs: order_key(rs[0], methods)):
    rs = sorted(rs, key=lambda r: r["micro_batch_size"])
    small, big = rs[0], rs[-1]
    if len(rs) > 1 and big["result"]["peak_bytes"] < small["result"]["peak_bytes"]:
      falls.append(f"`{small['label']}` ({dt(small['param_dtype'])}, remat {small['remat']}: "
                   f"{gib(small['result']['peak_bytes'])} GiB at micro {small['micro_batch_size']},"
                   f" {gib(big['result']['peak_bytes'])} GiB at micro {big['micro_batch_size']})")
  if falls:
    notes.append("The peak at the largest micro-batch is below the peak at the smallest for: "
                 + "; ".join(falls) + ". With micro-batch < batch the step carries an fp32 "
                 "gradient accumulator (sharded like the trainable parameters) through the "
                 "accumulation loop; at micro-batch = batch there is none. This matters where "
                 "the trainable parameters are large (full fine-tuning, replicated adapters).")
  # FLOPs across micro-batches (they should not change)
  spread = []
  for rs in groups.values():
    fl = [r["result"]["flops"] for r in rs]
    if len(fl) > 1 and max(fl) > 1.01 * min(fl):
      spread.append(f"`{rs[0]['label']}` ({rs[0]['remat']})")
  if spread:
    notes.append("matmul FLOPs per step change with the micro-batch for: "
                 + ", ".join(sorted(spread)) + ".")
  # other meshes against fsdp=8 at the same micro-batch
  for r in sorted(ok, key=lambda r: order_key(r, methods)):
    if r["mesh"] == FSDP8:
      continue
    o = idx.get(_setting(dict(r, mesh=FSDP8)))
    if o:
      notes.append(f"`{r['label']}` ({dt(r['param_dtype'])}, remat {r['remat']}, micro "
                   f"{r['micro_batch_size']}) on {mesh_str(r['mesh'])}: peak "
                   f"{gib(r['result']['peak_bytes'])} GiB ({r['micro_batch_size'] // shards(r['mesh'])}"
                   f" rows per batch shard) vs {gib(o['result']['peak_bytes'])} GiB on fsdp=8 "
                   f"({o['micro_batch_size'] // shards(o['mesh'])} row per device); temporaries "
                   f"{gib(r['result']['temp_bytes'])} vs {gib(o['result']['temp_bytes'])} GiB.")
  return notes


def render(meta, records) -> str:
  recs = list(records.values())
  t5 = [r for r in recs if r["family"] == "t5"]
  ll = [r for r in recs if r["family"] == "llama"]
  t5_methods = list(load_config_module(T5_CONFIG).METHODS)
  ll_methods = list(LLAMA_METHODS)
  n_ok = sum("result" in r for r in recs)
  errs = [r for r in recs if "error" in r]
  out = []
  w = out.append
  w("# Scaling plans: T5-11B and LLaMA-2-7B on 8 devices\n")
  w("Generated by `scripts/scaling_plans.py` (do not edit by hand: re-running the script "
    "rewrites this file; raw results in `docs/scaling_plans.json`). "
    f"{n_ok} plans, {len(errs)} errors; JAX {meta.get('jax', '?')}, "
    f"{sum(r.get('wall_s', 0) for r in recs) / 60:.0f} min of planning (sum over plans) on "
    f"{meta.get('host_cpus', '?')} CPU cores.\n")
  w("## What plan mode is\n")
  w("`train.py --plan` builds the parameter tree abstractly (`jax.eval_shape`, no weights), "
    "applies the PEFT method, derives the shardings from `config.mesh`, and lowers and "
    "compiles the real training step (same optimizer (AdamW + clipping), gradient "
    "accumulation over micro-batches, remat policy and shardings as `train.py`) for abstract "
    "inputs of the largest bucket. XLA reports per-device argument, output, aliased (donated) "
    "and temporary bytes; peak = arguments + outputs - aliased + temporaries. Matmul FLOPs "
    "are counted from the step's jaxpr. Nothing is loaded and no device memory is used.\n")
  w("## Reproduce\n")
  w("```sh\n"
    "# the whole grid (one process, 8 simulated CPU devices); writes docs/scaling.md and "
    "docs/scaling_plans.json\n"
    "python scripts/scaling_plans.py\n"
    "python scripts/scaling_plans.py --only=llama      # one model; the other's rows are kept\n"
    "python scripts/scaling_plans.py --quick           # smoke check, 4 plans, to /tmp\n"
    "# one plan each\n"
    "python train.py --config=configs/survey.py:t5-11b,rte,lora_qv --plan --cpu_devices=8 \\\n"
    "    --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 \\\n"
    "    --config.model.remat=full --config.train.micro_batch_size=16\n"
    "python train.py --config=configs/tulu.py:lora --plan --cpu_devices=8 \\\n"
    "    --config.model.remat=full --config.train.micro_batch_size=8\n"
    "# tensor parallelism: --config.mesh.fsdp=4 --config.mesh.tensor=2\n"
    "# a real TPU topology where libtpu is installed: --plan_topology=v5e:2x4\n"
    "```\n")
  w("## How to read these numbers\n")
  w("- The step is compiled by XLA:CPU for 8 simulated devices, not by the TPU or GPU "
    "compiler.\n"
    "- Argument and output bytes follow exactly from the shardings, so the params/device and "
    "optimizer/device columns hold for any backend with the same mesh.\n"
    "- Temporaries come from the CPU compiler's buffer assignment and will differ on TPU/GPU: "
    "different fusion and scheduling, no flash-attention kernel on CPU (attention scores are "
    "materialised), bf16 dots may be upcast to fp32 on CPU. Treat the fit columns as a "
    "first-order guide: a plan fits when its peak is at most 90% of the device memory "
    "(v4 32 GiB, v5e 16 GiB, H100 80 GiB).\n"
    "- Two CPU effects seen in the buffer assignment of a T5-11B plan (`ln_tuning`, remat "
    "full, micro 8; `XLA_FLAGS=--xla_dump_to=...`): XLA:CPU converts each bf16 weight stack "
    "(this device's shard of all layers) to fp32 before the layer loop and all-gathers the "
    "layers in fp32. Most of the temporaries that do not grow with the micro-batch are these "
    "fp32 copies, about twice the params/device column. A backend with native bf16 matmuls "
    "should not need them, so for bf16 models these temporaries likely overstate TPU/GPU. "
    "For LLaMA at 4096 tokens the attention scores and probabilities ([heads, 4096, 4096] "
    "per row, fp32) are materialised per layer; a flash-attention kernel would not store "
    "them.\n"
    "- The parameters a method adds (LoRA, adapters, prefixes) are fp32 and replicated on "
    "every device, with their optimizer state; base weights are sharded. With micro-batch < "
    "batch the step also carries an fp32 gradient accumulator for the trainable "
    "parameters.\n"
    "- For exact numbers on a TPU, run the same command with `--plan_topology` (e.g. "
    "`v5e:2x4`) on a machine with libtpu installed.\n"
    "- FLOPs: matmuls only, counted from the jaxpr (scanned layers and accumulation steps "
    "times their length; rematerialised forwards included), for the whole step (global "
    "batch), divided by the number of devices.\n"
    "- micro-batch (rows/device): rows per micro-batch, and rows per data x fsdp shard. The "
    "global batch is fixed; a smaller micro-batch means more accumulation steps.\n"
    "- mesh: `fsdp=8` shards parameters and optimizer state over all 8 devices and splits "
    "the batch 8 ways; `fsdp=4,tensor=2` splits the batch 4 ways and the base "
    "weights 2 ways over heads, MLP width and vocabulary.\n")
  sections = (
      ("t5", "T5-11B", t5, t5_methods,
       "Survey setting (`configs/survey.py`, variant `t5-11b,rte,<method>`): global batch 32, "
       "512 input / 8 target tokens, AdamW; bf16 compute, bf16 params (`full` also with fp32 "
       "master params); mesh fsdp=8; micro-batch 8/16/32 (1/2/4 rows per device); remat "
       "none/full."),
      ("llama", "LLaMA-2-7B", ll, ll_methods,
       "TULU setting (`configs/tulu.py`: `lora` r=512 on q,k; `adapter` Houlsby, bottleneck "
       "512; `full`): global batch 128, 4096 tokens (3072 + 1024), bf16 compute and params "
       "(`full` also with fp32 params); mesh fsdp=8 with micro-batch 8/16 (1/2 rows per "
       "device) and remat full/dots_no_batch; `lora` and `full` also on fsdp=4,tensor=2 at "
       "micro-batch 8 (2 rows per batch shard), remat full."),
  )
  for fam, title, rs, methods, intro in sections:
    w(f"## {title}\n")
    if not rs:
      w("Not run (see `--only`).\n")
      continue
    w(intro + "\n")
    w("### What fits\n")
    w("Largest micro-batch that fits per method and device type, with the least "
      "recomputation (remat order: " + " < ".join(
          p for p in REMAT_ORDER if any(r["remat"] == p for r in rs)) + ") at that micro-batch.\n")
    w(fits_summary(rs, methods) + "\n")
    notes = observations(rs, methods, fam)
    if notes:
      w("### Observations (generated)\n")
      w("\n".join(f"- {n}" for n in notes) + "\n")
    w("### All plans\n")
    w(table(rs, methods) + "\n")
  if errs:
    w("## Errors\n")
    w("| plan | error |\n|---|---|")
    for r in errs:
      msg = r["error"].splitlines()[0].replace("|", "\\|")[:400]
      w(f"| {describe(r)} | {msg} |")
    w("")
  return "\n".join(out)


# ---------------------------------------------------------------------------- main

def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=None,
                  help="markdown output (default docs/scaling.md; --quick: /tmp/scaling_quick.md)")
  ap.add_argument("--json", default=None,
                  help="raw results (default: scaling_plans.json next to --out; --quick: "
                       "/tmp/scaling_quick.json)")
  ap.add_argument("--only", choices=("t5", "llama"), default=None, help="one model only")
  ap.add_argument("--quick", action="store_true", help="a tiny subset (smoke check)")
  ap.add_argument("--resume", action="store_true", help="skip plans already in the JSON")
  ap.add_argument("--render_only", action="store_true", help="rewrite the doc from the JSON")
  a = ap.parse_args(argv)
  out = a.out or ("/tmp/scaling_quick.md" if a.quick else os.path.join(ROOT, "docs/scaling.md"))
  js = a.json or ("/tmp/scaling_quick.json" if a.quick and not a.out else
                  os.path.join(os.path.dirname(os.path.abspath(out)), "scaling_plans.json"))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  os.makedirs(os.path.dirname(os.path.abspath(js)), exist_ok=True)
  sys.path.insert(0, ROOT)
  os.chdir(ROOT)  # config files and their relative paths

  import jax
  jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
  if not a.render_only:
    # before any JAX computation: the plans need 8 CPU devices
    if len(jax.devices()) < NUM_DEVICES:
      sys.exit(f"need {NUM_DEVICES} devices, got {jax.devices()}")

  meta, records = load_json(js)
  if not a.render_only:
    fams = [a.only] if a.only else ["t5", "llama"]
    jobs = (t5_jobs(a.quick) if "t5" in fams else []) + (llama_jobs(a.quick) if "llama" in fams else [])
    keys = {j["key"] for j in jobs}
    # keep the other model's rows (``--only``); drop stale rows of the models being re-run
    records = {k: r for k, r in records.items() if r["family"] not in fams or k in keys}
    meta = {"jax": jax.__version__, "host_cpus": os.cpu_count(), "platform": platform.platform(),
            "devices": NUM_DEVICES}
    print(f"{len(jobs)} plans on {len(jax.devices())} {jax.devices()[0].platform} devices; "
          f"results -> {js}", flush=True)
    wall = run_grid(jobs, js, records, meta, a.resume)
    print(f"grid done in {wall / 60:.1f} min", flush=True)
  with open(out, "w") as f:
    f.write(render(meta, records))
  print(f"wrote {out} ({len(records)} plans) and {js}")


if __name__ == "__main__":
  main()
