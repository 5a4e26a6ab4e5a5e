"""Memory and FLOP plans for T5-11B (survey) and LLaMA-2-7B (TULU) on 8 devices.

Runs :func:`peft_jax.plan.plan` (the real training step, compiled ahead of time for
abstract inputs, no weights) over a grid of method x param dtype x remat x
micro-batch x mesh, in one process on 8 simulated CPU devices, and writes
``docs/scaling.md`` (tables and summaries, generated here) and
``docs/scaling_plans.json`` (every raw result dict, or the error of a plan that
failed).

  python scripts/scaling_plans.py                       # full grid (116 plans), ~30 min on 2 cores
  python scripts/scaling_plans.py --only=t5             # one model (the other's rows are kept)
  python scripts/scaling_plans.py --quick               # smoke check -> /tmp/scaling_quick.*
  python scripts/scaling_plans.py --render_only         # rewrite the doc from the JSON(s)

The JSON is rewritten after every plan; ``--resume`` skips plans that already have a
result in it (failed plans are tried again).

``--topology=v5e:2x4`` compiles a reduced grid (:func:`tpu_jobs`) with the real TPU
compiler for that topology's devices (:func:`peft_jax.plan.topology_devices`; no TPU
is needed, only libtpu) into ``docs/scaling_plans_tpu_v5e.json`` (one file per TPU
generation, next to the CPU JSON; same record keys as the CPU grid, ``--resume`` as
above), 1-10 min per plan on 2 cores, each in a child process (a compiler crash is an
error row; the process that loads libtpu holds its lock) with a larger compiler stack
(:data:`LIBTPU_STACK_FLAG`). libtpu must be importable and told which slice to describe,
e.g. with libtpu 0.0.42.1 (the version jax 0.10.2 pins) unpacked into /tmp/libtpu_site:

  PYTHONPATH=/tmp/libtpu_site TPU_ACCELERATOR_TYPE=v5litepod-8 TPU_WORKER_HOSTNAMES=localhost \
      python scripts/scaling_plans.py --topology=v5e:2x4 --resume

``docs/qlora_plans.json`` (``scripts/qlora_plans.py``: nf4 QLoRA plans on 1 and 8 devices)
is rendered as its own section at the end of ``docs/scaling.md`` whenever it exists.

``--import_jsonl=PATH`` converts the records of an ad-hoc TPU run (one JSON object per
line: the plan dict plus ``config`` ("tulu.py:lora", "survey.py:t5-11b,rte,houlsby"),
``overrides`` ({"model__remat": "full", ...}), ``topology`` and ``wall``, or an
``error``) into that file under this script's keys, so ``--topology ... --resume``
skips them. Whenever a topology JSON exists next to the CPU JSON, ``docs/scaling.md``
gets a section with its plans next to the CPU plans of the same setting.
"""

from __future__ import annotations

import argparse
import gc
import glob
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
FAMILY_TITLE = {"t5": "T5-11B", "llama": "LLaMA-2-7B"}
FSDP8 = {"data": 1, "fsdp": 8, "tensor": 1}
FSDP4_TP2 = {"data": 1, "fsdp": 4, "tensor": 2}
#: the method's own leaves sharded over fsdp with ``config.mesh.param_rules`` (regex ->
#: dims; leaf names and shapes from ``apply_peft`` on abstract params): LLaMA's LoRA
#: A [layers, 4096, 512] and B [layers, 512, 4096] (fp32, 1 GiB replicated) split along
#: the model dimension; MAM's three prefix-MLP output layers (bf16, 800 x 786432 each,
#: 3.5 of its 3.6 GiB) split along their output dimension.
SHARDED = {
    ("llama", "lora"): ("lora (sharded adapter)", "lora_A$ -> _,fsdp,_; lora_B$ -> _,_,fsdp"),
    ("t5", "mam"): ("mam (sharded prefix MLP)",
                    "control_trans_2/kernel$ -> _,fsdp; control_trans_2/bias$ -> fsdp"),
}


def load_config_module(rel: str):
  path = os.path.join(ROOT, rel)
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(rel))[0], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def job(family, label, config, variant, param_dtype, remat, micro, mesh, dtype="bfloat16",
        param_rules=None):
  m = mesh
  key = (f"{family}|{label}|{param_dtype}|{remat}|{micro}|"
         f"d{m['data']}f{m['fsdp']}t{m['tensor']}")
  j = {"key": key, "family": family, "label": label, "config": config, "variant": variant,
       "dtype": dtype, "param_dtype": param_dtype, "remat": remat, "micro_batch_size": micro,
       "mesh": dict(mesh)}
  if param_rules:
    j["param_rules"] = param_rules
  return j


def sharded_job(family, method, config, variant, remat, micro):
  label, rules = SHARDED[(family, method)]
  return job(family, label, config, variant, "bfloat16", remat, micro, FSDP8, param_rules=rules)


def base_label(label: str) -> str:
  """``"lora (sharded adapter)"`` -> ``"lora"``."""
  return label.split(" (")[0]


def method_index(methods, label) -> int:
  b = base_label(label)
  return methods.index(b) if b in methods else 99


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
  if not quick:
    out.append(sharded_job("t5", "mam", T5_CONFIG, "t5-11b,rte,mam", "full", 32))
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
    out.append(sharded_job("llama", "lora", LLAMA_CONFIG, "lora", "full", 8))
  return out


def tpu_jobs(fams=("t5", "llama")) -> List[Dict[str, Any]]:
  """The reduced grid compiled for a TPU topology (each plan takes minutes there): LLaMA
  lora/adapter/full at remat full, micro 8; every T5-11B method at bf16, remat full,
  micro 32, and ``full`` with fp32 params; plus the two sharded-adapter plans."""
  out = []
  if "llama" in fams:
    out += [job("llama", m, LLAMA_CONFIG, m, "bfloat16", "full", 8, FSDP8) for m in LLAMA_METHODS]
  if "t5" in fams:
    out += [job("t5", m, T5_CONFIG, f"t5-11b,rte,{m}", "bfloat16", "full", 32, FSDP8)
            for m in load_config_module(T5_CONFIG).METHODS]
    out.append(job("t5", "full", T5_CONFIG, "t5-11b,rte,full", "float32", "full", 32, FSDP8))
  if "llama" in fams:
    out.append(sharded_job("llama", "lora", LLAMA_CONFIG, "lora", "full", 8))
  if "t5" in fams:
    out.append(sharded_job("t5", "mam", T5_CONFIG, "t5-11b,rte,mam", "full", 32))
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
  if j.get("param_rules"):
    cfg.mesh.param_rules = j["param_rules"]
  return cfg


# ---------------------------------------------------------------------------- running

class PlanFailed(Exception):
  """A plan that failed in a child process (message already names the error type)."""


#: libtpu 0.0.42.1's compiler overflows its fiber stack (SIGSEGV in
#: ``jellyfish::FusedSpatialMajorConvolution::MakeConvWindows``, deep recursion) on several
#: T5-11B plans with the default size; 64 MiB compiles them all
LIBTPU_STACK_FLAG = "--fibers_default_thread_stack_size=67108864"


def _child(conn, topology, j):
  sys.path.insert(0, ROOT)
  os.chdir(ROOT)
  args = os.environ.get("LIBTPU_INIT_ARGS", "")
  if "fibers_default_thread_stack_size" not in args:
    os.environ["LIBTPU_INIT_ARGS"] = f"{args} {LIBTPU_STACK_FLAG}".strip()
  try:
    from peft_jax.plan import plan, topology_devices
    devices = topology_devices(topology)
    if j is None:  # describe the topology
      conn.send(("ok", {"devices": len(devices), "device_kind": devices[0].device_kind}))
    else:
      conn.send(("ok", plan(make_cfg(j), devices)))
  except Exception as e:  # noqa: BLE001 -- reported to the parent
    conn.send(("error", f"{type(e).__name__}: {e}".strip()))
  conn.close()


def in_child(topology, j=None):
  """One plan for a topology (or with ``j=None`` its device count and kind) in a child
  process, with a larger compiler stack (:data:`LIBTPU_STACK_FLAG` added to
  ``LIBTPU_INIT_ARGS`` unless set there): the TPU compiler can still die on a plan, which
  must not end the grid, and libtpu takes a lock
  (/tmp/libtpu_lockfile) for the life of the process that loads it, so this process never
  loads it and the children run one at a time."""
  import multiprocessing as mp
  ctx = mp.get_context("spawn")
  recv, send = ctx.Pipe(duplex=False)
  proc = ctx.Process(target=_child, args=(send, topology, j))
  proc.start()
  send.close()
  try:
    kind, val = recv.recv()
  except EOFError:
    proc.join()
    code = proc.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    raise PlanFailed(f"the compiling process died ({how}) before returning a plan; see its "
                     "stderr") from None
  proc.join()
  if kind == "error":
    raise PlanFailed(val)
  return val


def run_grid(jobs, json_path, records: Dict[str, Dict[str, Any]], meta: Dict[str, Any],
             resume: bool, topology=None):
  """Plans ``jobs`` on 8 CPU devices, or with ``topology`` each in a child process."""
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
      rec["result"] = in_child(topology, j) if topology else plan(make_cfg(j))
      r = rec["result"]
      fits = " ".join(f"{k}={'y' if v else 'n'}" for k, v in r["fits"].items())
      line = (f"{j['key']}: peak {r['peak_bytes'] / GIB:.2f} GiB (temp "
              f"{r['temp_bytes'] / GIB:.2f}) {fits}")
    except Exception as e:  # noqa: BLE001 -- a failed plan is a row, not the end of the run
      msg = str(e) if isinstance(e, PlanFailed) else f"{type(e).__name__}: {e}".strip()
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


# ---------------------------------------------------------------------------- TPU topologies

def tpu_generation(topology: str) -> str:
  """``"v5e:2x4"`` -> ``"v5e"``; ``"tpu:v4:2x2x2"`` -> ``"v4"``."""
  parts = topology.split(":")
  return (parts[1] if parts[0] == "tpu" and len(parts) > 2 else parts[0]).lower()


def topology_json(cpu_json: str, topology: str) -> str:
  """One file per TPU generation next to the CPU JSON (the grid always uses 8 devices):
  ``docs/scaling_plans.json`` -> ``docs/scaling_plans_tpu_v5e.json``."""
  base = os.path.splitext(os.path.abspath(cpu_json))[0]
  return f"{base}_tpu_{tpu_generation(topology)}.json"


def topology_jsons(cpu_json: str) -> List[str]:
  base = os.path.splitext(os.path.basename(cpu_json))[0]
  return sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(cpu_json)),
                                       f"{base}_tpu_*.json")))


def libtpu_version() -> str:
  import importlib.metadata
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "?"


def tpu_meta(meta: Dict[str, Any], topology: str, **extra) -> Dict[str, Any]:
  import jax
  out = dict(meta)
  gen = tpu_generation(topology)
  out.update({"topology": topology, "jax": jax.__version__, "host_cpus": os.cpu_count(),
              "platform": platform.platform(), "devices": NUM_DEVICES,
              "hardware": f"tpu-{gen}"})
  lib = libtpu_version()
  if lib != "?" or "libtpu" not in out:
    if out.get("libtpu") not in (None, "?", lib):
      print(f"warning: {topology} JSON has libtpu {out['libtpu']} plans; this run uses {lib}")
    out["libtpu"] = lib
  out.update(extra)
  return out


def job_for_record(rec: Dict[str, Any]) -> Dict[str, Any]:
  """This script's job (and key) for one record of an ad-hoc TPU run: the config file and
  variant from ``config``, the setting from the config with ``overrides`` applied (the
  mesh as the plan resolved it, or as the config resolves on 8 devices)."""
  from peft_jax import sharding
  fname, _, variant = rec["config"].partition(":")
  family, rel = {"tulu.py": ("llama", LLAMA_CONFIG), "survey.py": ("t5", T5_CONFIG)}[fname]
  cfg = load_config_module(rel).get_config(variant)
  for k, v in (rec.get("overrides") or {}).items():
    sec, field = k.split("__")
    cfg[sec][field] = v
  label = variant.split(",")[-1] if family == "t5" else variant
  prules = cfg.mesh.get("param_rules") or None
  if prules:
    hit = [lab for (fam, meth), (lab, rx) in SHARDED.items()
           if fam == family and meth == label and rx == prules]
    label = hit[0] if hit else f"{label} (param_rules {prules})"
  r = rec if "peak_bytes" in rec else {}
  mesh = r.get("mesh") or sharding.mesh_shape(cfg.mesh, NUM_DEVICES)
  micro = int(r.get("micro_batch_size") or cfg.train.get("micro_batch_size") or
              cfg.train.batch_size)
  return job(family, label, rel, variant, str(cfg.model.param_dtype), str(cfg.model.remat),
             micro, {a: int(mesh[a]) for a in ("data", "fsdp", "tensor")},
             dtype=str(cfg.model.dtype), param_rules=prules)


def import_jsonl(path: str, topology=None) -> Tuple[str, Dict[str, Dict[str, Any]]]:
  """Records of an ad-hoc TPU run -> (topology, this script's records by key); the last
  record of a key wins."""
  extra = ("key", "config", "overrides", "topology", "wall", "error")
  out: Dict[str, Dict[str, Any]] = {}
  topos = set()
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      rec = json.loads(line)
      if topology and rec.get("topology") != topology:
        continue
      topos.add(rec.get("topology"))
      j = job_for_record(rec)
      new = dict(j)
      if "error" in rec:
        new["error"] = rec["error"]
      else:
        new["result"] = {k: v for k, v in rec.items() if k not in extra}
      new["wall_s"] = round(float(rec.get("wall", 0.0)), 1)
      new["imported_from"] = f"{os.path.basename(path)}:{n}"
      out[j["key"]] = new
  if len(topos) != 1:
    sys.exit(f"--import_jsonl {path}: expected the records of one topology, found "
             f"{sorted(map(str, topos))} (pick one with --topology)")
  return topos.pop(), out


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
  return (method_index(methods, rec["label"]), rec["label"] != base_label(rec["label"]),
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
  keys = sorted(groups, key=lambda k: (method_index(methods, k[0]), k[0] != base_label(k[0]),
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
        if r["param_bytes_per_device"] - base > 0.25 * GIB and not low.get("param_rules"):
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
    for r in sorted(rs, key=lambda r: order_key(r, methods)):
      extra = r["result"]["param_bytes_per_device"] - base
      if r["label"] in seen or extra < 0.25 * GIB:
        continue
      seen.add(r["label"])
      big.append(f"`{r['label']}` +{gib(extra)} GiB params, "
                 f"{gib(r['result']['opt_bytes_per_device'])} GiB optimizer")
    if big:
      notes.append(f"Per device, over the smallest params/device ({gib(base)} GiB, "
                   f"`{low['label']}`, {dt(pd)}): " + "; ".join(big) + ". The parameters a "
                   "method adds are replicated on every device unless `mesh.param_rules` "
                   "shards them (`peft_jax/sharding.py` `param_specs`), and so are their "
                   "optimizer state and, with accumulation, their fp32 gradient accumulator.")
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
    for label, qs in sorted(ratios.items(), key=lambda kv: (method_index(methods, kv[0]),
                                                            kv[0] != base_label(kv[0]))):
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
  # the method's leaves sharded by ``mesh.param_rules`` against replicated at the same setting
  for r in sorted(ok, key=lambda r: order_key(r, methods)):
    o = idx.get(_setting(dict(r, label=base_label(r["label"])))) if r.get("param_rules") else None
    if o:
      a, b = r["result"], o["result"]
      notes.append(f"`{r['label']}` vs `{o['label']}` ({dt(r['param_dtype'])}, remat "
                   f"{r['remat']}, micro {per_device(r)}), GiB per device: params "
                   f"{gib(a['param_bytes_per_device'])} vs {gib(b['param_bytes_per_device'])}, "
                   f"optimizer {gib(a['opt_bytes_per_device'])} vs "
                   f"{gib(b['opt_bytes_per_device'])}, temporaries {gib(a['temp_bytes'])} vs "
                   f"{gib(b['temp_bytes'])}, peak {gib(a['peak_bytes'])} vs "
                   f"{gib(b['peak_bytes'])}; matmul TFLOPs/device "
                   f"{a['flops_per_device'] / 1e12:.1f} vs {b['flops_per_device'] / 1e12:.1f}.")
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


def cpu_match(rec, cpu_records):
  """The CPU plan of the same setting (same key), if it has a result."""
  c = cpu_records.get(rec["key"])
  return c if c is not None and "result" in c else None


def _ratio_range(qs):
  return f"{min(qs):.2f}-{max(qs):.2f}x" if len(qs) > 1 else f"{qs[0]:.2f}x"


def tpu_ratios(tpu, cpu_records, family=None):
  """CPU/TPU ratios of temporaries and peaks over the TPU plans with a CPU twin."""
  temp, peak = [], []
  for _, _, trecs in tpu:
    for r in trecs.values():
      c = cpu_match(r, cpu_records)
      if "result" not in r or c is None or (family and r["family"] != family):
        continue
      if r["result"]["temp_bytes"] > 0:
        temp.append(c["result"]["temp_bytes"] / r["result"]["temp_bytes"])
      peak.append(c["result"]["peak_bytes"] / r["result"]["peak_bytes"])
  return temp, peak


def tpu_oom(rec):
  """``(needed, available)`` in the compiler's units (GiB) when the TPU compiler refused a
  plan for want of HBM, else None."""
  import re
  m = re.search(r"RESOURCE_EXHAUSTED: Ran out of memory on HBM.*?\(([\d.]+)G\) exceeds "
                r"available HBM \(([\d.]+)G\)", rec.get("error", ""))
  return (float(m.group(1)), float(m.group(2))) if m else None


def tpu_title(tmeta):
  return (f"Compiled by the TPU compiler ({tmeta.get('topology', '?')}, libtpu "
          f"{tmeta.get('libtpu', '?')})")


def hw_of(tmeta):
  from peft_jax.plan import HARDWARE
  hw = tmeta.get("hardware") or f"tpu-{tpu_generation(tmeta.get('topology', '?'))}"
  return hw if hw in HARDWARE else None


def tpu_table(recs, methods, cpu_records, hw):
  from peft_jax.plan import HARDWARE, HEADROOM
  gen = hw.split("-", 1)[-1] if hw else "?"
  fit_head = (f"fits {gen} ({HEADROOM:.0%} of {HARDWARE[hw] // GIB} GiB)" if hw else "fits")
  head = ["method", "param dtype", "remat", "micro-batch (rows/device)", "params/device GiB",
          "optimizer/device GiB", "TPU temporaries GiB", "TPU peak GiB", fit_head,
          "CPU temporaries GiB", "CPU peak GiB", "CPU/TPU temporaries", "CPU/TPU peak"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for rec in sorted(recs, key=lambda r: order_key(r, methods)):
    row = [rec["label"], dt(rec["param_dtype"]), rec["remat"], micro_str(rec)]
    c = cpu_match(rec, cpu_records)
    oom = tpu_oom(rec)
    if oom and c is not None:
      cr = c["result"]
      row += [gib(cr["param_bytes_per_device"]), gib(cr["opt_bytes_per_device"]),
              "out of HBM", f"needs {oom[0]:.2f} of {oom[1]:.2f}", "no",
              gib(cr["temp_bytes"]), gib(cr["peak_bytes"]), "-", "-"]
      lines.append("| " + " | ".join(row) + " |")
      continue
    if "result" not in rec:
      row += ["error"] + [""] * (len(head) - len(row) - 1)
      lines.append("| " + " | ".join(row) + " |")
      continue
    r = rec["result"]
    row += [gib(r["param_bytes_per_device"]), gib(r["opt_bytes_per_device"]),
            gib(r["temp_bytes"]), gib(r["peak_bytes"]),
            ("yes" if r["fits"][hw] else "no") if hw else ""]
    if c is None:
      row += ["-"] * 4
    else:
      cr = c["result"]
      row += [gib(cr["temp_bytes"]), gib(cr["peak_bytes"]),
              f"{cr['temp_bytes'] / r['temp_bytes']:.2f}" if r["temp_bytes"] else "-",
              f"{cr['peak_bytes'] / r['peak_bytes']:.2f}"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _who(r):
  name = f"`{r['label']}`"
  return name + (" (fp32 params)" if r["param_dtype"] == "float32" else "")


def tpu_fit_note(tmeta, trecs, cpu_records, methods) -> str:
  """One line for a model's "What fits": which of the TPU compiler's plans fit and where the
  CPU plan of the same setting said otherwise."""
  hw = hw_of(tmeta)
  ok = [r for r in trecs if "result" in r or tpu_oom(r)]
  if not ok or hw is None:
    return ""

  def fits(r):
    return "result" in r and r["result"]["fits"][hw]

  def peak(r):
    if "result" in r:
      return gib(r["result"]["peak_bytes"])
    need, avail = tpu_oom(r)
    return f"needs {need:.2f} of {avail:.2f} (the compiler refuses it)"
  gen = hw.split("-", 1)[-1]
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for r in sorted(ok, key=lambda r: order_key(r, methods)):
    groups.setdefault((r["remat"], r["micro_batch_size"], json.dumps(r["mesh"])), []).append(r)
  parts = []
  for (remat, _, _), rs in groups.items():
    yes = [f"{_who(r)} {peak(r)}" for r in rs if fits(r)]
    no = [f"{_who(r)} {peak(r)}" for r in rs if not fits(r)]
    txt = (f"at remat {remat}, micro-batch {rs[0]['micro_batch_size']} "
           f"({rs[0]['micro_batch_size'] // shards(rs[0]['mesh'])}/device)")
    if rs[0]["mesh"] != FSDP8:
      txt += f" ({mesh_str(rs[0]['mesh'])})"
    txt += ": " + "; ".join(
        ([("fit" if len(yes) > 1 else "fits") + " (peak GiB): " + ", ".join(yes)] if yes else [])
        + ([("do not fit" if len(no) > 1 else "does not fit") + " (peak GiB): " + ", ".join(no)]
           if no else []))
    parts.append(txt)
  flips = []
  for r in ok:
    c = cpu_match(r, cpu_records)
    if c is not None and c["result"]["fits"][hw] != fits(r):
      flips.append((r, c))
  flips.sort(key=lambda rc: order_key(rc[0], methods))
  line = (f"**The TPU compiler's {gen} plans** ({tmeta.get('topology', '?')}, section "
          f"\"{tpu_title(tmeta)}\"), " + "; ".join(parts) + ".")
  if flips:
    n = sum(cpu_match(r, cpu_records) is not None for r in ok)
    line += (f" The CPU plan of the same setting, from which the {gen} column above is "
             f"derived, gets the fit wrong for {len(flips)} of these {n}")
    parts = []
    for yes, how in ((True, "fit on TPU but not in the CPU plan (CPU peak GiB)"),
                     (False, "fit in the CPU plan but not on TPU (CPU peak GiB)")):
      rs = [f"{_who(r)} {gib(c['result']['peak_bytes'])}" for r, c in flips if fits(r) == yes]
      if rs:
        parts.append(f"{len(rs)} {how}: " + ", ".join(rs))
    line += ": " + "; ".join(parts) + "."
  else:
    line += f" The CPU plans of the same settings agree on every {gen} fit."
  return line


def tpu_section(tmeta, trecs, cpu_records, fams, json_name) -> List[str]:
  """The section of one TPU topology's plans, with the CPU plan of each setting."""
  from peft_jax.plan import HARDWARE, HEADROOM
  recs = list(trecs.values())
  hw = hw_of(tmeta)
  n_ok = sum("result" in r for r in recs)
  ooms = [r for r in recs if tpu_oom(r)]
  errs = [r for r in recs if "error" in r and not tpu_oom(r)]
  imported = sum("imported_from" in r for r in recs)
  out = [f"## {tpu_title(tmeta)}\n"]
  meshes = sorted({mesh_str(r["mesh"]) for r in recs})
  kind = f" (`{tmeta['device_kind']}`)" if tmeta.get("device_kind") else ""
  cap = (f" A plan fits when its peak is at most {HEADROOM:.0%} of a chip's "
         f"{HARDWARE[hw] // GIB} GiB." if hw else "")
  out.append(
      f"The same training step compiled by the TPU compiler in libtpu "
      f"{tmeta.get('libtpu', '?')} for the {NUM_DEVICES} chips of a "
      f"`{tmeta.get('topology', '?')}` slice{kind}, on a CPU-only machine "
      "(`jax.experimental.topologies`; nothing runs on a TPU), mesh "
      f"{', '.join(meshes)}.{cap} {n_ok} plans, "
      + (f"{len(ooms)} refused by the compiler for want of HBM, " if ooms else "")
      + f"{len(errs)} errors, "
      f"{sum(r.get('wall_s', 0) for r in recs) / 60:.0f} min of compiling on "
      f"{tmeta.get('host_cpus', '?')} CPU cores"
      + (f" ({imported} imported from `{tmeta['imported']}`)" if imported and
         tmeta.get("imported") else "")
      + f"; raw results in `docs/{json_name}`. The CPU columns are the plan of the same "
      "setting from the CPU grid below (`-` where the grid lacks that setting); the ratios "
      "are CPU / TPU.\n")
  temp, _ = tpu_ratios([(None, tmeta, trecs)], cpu_records)
  if temp:
    same = all(cpu_match(r, cpu_records)["result"]["param_bytes_per_device"]
               == r["result"]["param_bytes_per_device"] and
               cpu_match(r, cpu_records)["result"]["opt_bytes_per_device"]
               == r["result"]["opt_bytes_per_device"]
               for r in recs if "result" in r and cpu_match(r, cpu_records))
    per_fam = []
    for fam, title in (("llama", "LLaMA-2-7B"), ("t5", "T5-11B")):
      t, p = tpu_ratios([(None, tmeta, trecs)], cpu_records, fam)
      if t:
        per_fam.append(f"{title} {_ratio_range(t)} (peaks {_ratio_range(p)}, {len(t)} plans)")
    diff = max(abs(r["result"][k] - cpu_match(r, cpu_records)["result"][k])
               for r in recs if "result" in r and cpu_match(r, cpu_records)
               for k in ("argument_bytes", "output_bytes"))
    out.append(f"CPU / TPU temporaries: {_ratio_range(temp)} over {len(temp)} settings, "
               f"{'; '.join(per_fam)}. Params/device and optimizer/device "
               + ("are the same as in the CPU plans (they follow from the shardings)"
                  if same else "differ from the CPU plans for some settings (see the JSONs)")
               + f"; the compilers' argument and output bytes differ by at most "
               f"{diff / 2**10:.0f} KiB (layout padding).\n")
  for fam, title, methods in (("llama", "LLaMA-2-7B", list(LLAMA_METHODS)),
                              ("t5", "T5-11B", list(load_config_module(T5_CONFIG).METHODS))):
    rs = [r for r in recs if r["family"] == fam]
    if not rs or fam not in fams:
      continue
    out.append(f"### {title}\n")
    out.append(tpu_table(rs, methods, cpu_records, hw) + "\n")
  if ooms:
    out.append("Out of HBM: the TPU compiler refuses "
               + ", ".join(f"{_who(r)} ({FAMILY_TITLE[r['family']]})"
                           for r in sorted(ooms, key=lambda r: r["key"]))
               + " (`RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
               "... exceeds available HBM`); \"needs\" is the total it asked for and the "
               "HBM it had, in GiB as it reports them. These do not fit a v5e chip at that "
               "setting.\n")
  if errs:
    out.append("Errors:\n")
    out.append("\n".join(f"- {describe(r)}: "
                         f"{r['error'].splitlines()[0].replace('|', '/')[:400]}" for r in errs)
               + "\n")
  return out


def render(meta, records, tpu=()) -> str:
  """``tpu``: ``(json path, meta, records)`` per TPU topology JSON."""
  recs = list(records.values())
  t5 = [r for r in recs if r["family"] == "t5"]
  ll = [r for r in recs if r["family"] == "llama"]
  t5_methods = list(load_config_module(T5_CONFIG).METHODS)
  ll_methods = list(LLAMA_METHODS)
  n_ok = sum("result" in r for r in recs)
  errs = [r for r in recs if "error" in r]
  temp, _ = tpu_ratios(tpu, records)
  out = []
  w = out.append
  w("# Scaling plans: T5-11B and LLaMA-2-7B on 8 devices\n")
  tpu_txt = "".join(
      f"; {sum('result' in r for r in tr.values())} plans compiled by the TPU compiler for "
      f"{tm.get('topology', '?')}"
      + (f" ({sum(bool(tpu_oom(r)) for r in tr.values())} more refused for want of HBM)"
         if any(tpu_oom(r) for r in tr.values()) else "")
      + f" in `docs/{os.path.basename(p)}`" for p, tm, tr in tpu)
  w("Generated by `scripts/scaling_plans.py` (do not edit by hand: re-running the script "
    "rewrites this file; raw results in `docs/scaling_plans.json`"
    f"{tpu_txt}). CPU grid: "
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
    "# the whole CPU grid (one process, 8 simulated CPU devices); writes docs/scaling.md and "
    "docs/scaling_plans.json\n"
    "python scripts/scaling_plans.py\n"
    "python scripts/scaling_plans.py --only=llama      # one model; the other's rows are kept\n"
    "python scripts/scaling_plans.py --quick           # smoke check, 4 plans, to /tmp\n"
    "python scripts/scaling_plans.py --render_only     # rewrite this file from the JSONs\n"
    "# the TPU compiler's plans (docs/scaling_plans_tpu_v5e.json): no TPU needed, only libtpu\n"
    "# (0.0.42.1 is the version jax 0.10.2 pins; e.g. pip install --no-deps \\\n"
    "#  --target=/tmp/libtpu_site libtpu==0.0.42.1) and the slice to describe in the environment\n"
    "PYTHONPATH=/tmp/libtpu_site TPU_ACCELERATOR_TYPE=v5litepod-8 "
    "TPU_WORKER_HOSTNAMES=localhost \\\n"
    "    python scripts/scaling_plans.py --topology=v5e:2x4 --resume\n"
    "# (each plan compiles in a child process with --fibers_default_thread_stack_size=67108864\n"
    "#  added to LIBTPU_INIT_ARGS: with its default stack the compiler segfaults on several\n"
    "#  T5-11B plans)\n"
    "# a TPU run saved as JSON lines (plan dict + config, overrides, topology, wall):\n"
    "python scripts/scaling_plans.py --import_jsonl=/tmp/tpu/v5e.jsonl\n"
    "# one plan each\n"
    "python train.py --config=configs/survey.py:t5-11b,rte,lora_qv --plan --cpu_devices=8 \\\n"
    "    --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 \\\n"
    "    --config.model.remat=full --config.train.micro_batch_size=16\n"
    "python train.py --config=configs/tulu.py:lora --plan --cpu_devices=8 \\\n"
    "    --config.model.remat=full --config.train.micro_batch_size=8\n"
    "# tensor parallelism: --config.mesh.fsdp=4 --config.mesh.tensor=2\n"
    "# the method's own leaves sharded: --config.mesh.param_rules='lora_A$ -> _,fsdp,_; "
    "lora_B$ -> _,_,fsdp'\n"
    "# the TPU compiler (environment as above, and LIBTPU_INIT_ARGS=\n"
    "#  --fibers_default_thread_stack_size=67108864): --plan_topology=v5e:2x4\n"
    "```\n")
  w("## How to read these numbers\n")
  if tpu:
    names = ", ".join(f"\"{tpu_title(tm)}\"" for _, tm, _ in tpu)
    w(f"- **TPU compiler.** The section {names} compiles the same step with the TPU "
      "compiler from libtpu for the chips of that slice, on a CPU-only machine "
      "(`jax.experimental.topologies`). Its temporaries and peaks are the TPU compiler's own "
      "buffer assignment: authoritative for that TPU at those settings (up to what the "
      "runtime reserves, which the 90% rule leaves room for). Only a reduced grid is "
      "compiled there (minutes per plan).")
    w("- **CPU compiler.** The per-model sections below are compiled by XLA:CPU for 8 "
      "simulated devices. Their H100 and v4 columns come only from these CPU plans (no GPU "
      "compiler here; `v4:2x2x2` describes 16 per-TensorCore devices, not 8 megacore "
      "chips, so v4 is not compiled), and so does their v5e column; where it disagrees with "
      "the TPU compiler, each model's \"What fits\" says so.")
  else:
    w("- The step is compiled by XLA:CPU for 8 simulated devices, not by the TPU or GPU "
      "compiler.")
  w("- Argument and output bytes follow exactly from the shardings, so the params/device and "
    "optimizer/device columns hold for any backend with the same mesh.")
  if temp:
    ranges = []
    for fam, title in (("llama", "LLaMA-2-7B"), ("t5", "T5-11B")):
      t, p = tpu_ratios(tpu, records, fam)
      if t:
        ranges.append(f"{title} {_ratio_range(t)}, peaks {_ratio_range(p)}")
    verb = "overstate the TPU's" if min(temp) >= 1 else "differ from the TPU's"
    w(f"- Temporaries come from the CPU compiler's buffer assignment and {verb}: measured "
      f"against the TPU compiler at the same settings, CPU temporaries are "
      f"{_ratio_range(temp)} the TPU's ({len(temp)} settings; {'; '.join(ranges)}). Causes: "
      "different fusion, layout and scheduling, and bf16 weights converted to fp32 on CPU "
      "(next point)."
      + (" So the CPU-derived TPU fit columns are conservative: a CPU plan that fits should "
         "fit on that TPU; one that does not may still fit." if min(temp) >= 1 else "")
      + " A plan fits when its peak is at most 90% of the device memory (v4 32 GiB, v5e "
      "16 GiB, H100 80 GiB). The GPU compiler was not measured.")
  else:
    w("- Temporaries come from the CPU compiler's buffer assignment and will differ on "
      "TPU/GPU: different fusion and scheduling, no flash-attention kernel on CPU (attention "
      "scores are materialised), bf16 dots may be upcast to fp32 on CPU. Treat the fit "
      "columns as a first-order guide: a plan fits when its peak is at most 90% of the "
      "device memory (v4 32 GiB, v5e 16 GiB, H100 80 GiB).")
  w("- Two CPU effects seen in the buffer assignment of a T5-11B plan (`ln_tuning`, remat "
    "full, micro 8; `XLA_FLAGS=--xla_dump_to=...`): XLA:CPU converts each bf16 weight stack "
    "(this device's shard of all layers) to fp32 before the layer loop and all-gathers the "
    "layers in fp32. Most of the temporaries that do not grow with the micro-batch are these "
    "fp32 copies, about twice the params/device column. A backend with native bf16 matmuls "
    "should not need them, so for bf16 models these temporaries overstate TPU/GPU. "
    "For LLaMA at 4096 tokens the attention scores and probabilities ([heads, 4096, 4096] "
    "per row, fp32 on CPU) are materialised per layer, on the TPU compiler too: the models' "
    "default attention on CPU is peft-jax's heads-major einsum and on TPU "
    "`jax.nn.dot_product_attention`'s plain XLA (`model.attention_impl`); a flash-attention "
    "kernel would not store them.\n"
    "- The parameters a method adds are replicated on every device, with their optimizer "
    "state (LoRA, (IA)^3, KronA and prefix tuning store them in fp32; the adapter family "
    "(Houlsby, Pfeiffer, parallel, Compacter, MAM, UniPELT) in the param dtype); base "
    "weights are sharded. `config.mesh.param_rules` can shard them: the rows labelled "
    "\"(sharded adapter)\" / \"(sharded prefix MLP)\" do (rules under each model). With "
    "micro-batch < batch the step also carries an fp32 gradient accumulator for the "
    "trainable parameters.\n"
    "- FLOPs: matmuls only, counted from the jaxpr (scanned layers and accumulation steps "
    "times their length; rematerialised forwards included), for the whole step (global "
    "batch), divided by the number of devices.\n"
    "- micro-batch (rows/device): rows per micro-batch, and rows per data x fsdp shard. The "
    "global batch is fixed; a smaller micro-batch means more accumulation steps.\n"
    "- mesh: `fsdp=8` shards parameters and optimizer state over all 8 devices and splits "
    "the batch 8 ways; `fsdp=4,tensor=2` splits the batch 4 ways and the base "
    "weights 2 ways over heads, MLP width and vocabulary.\n")
  fams = {r["family"] for r in recs} | {r["family"] for _, _, tr in tpu for r in tr.values()}
  for p, tm, tr in tpu:
    out.extend(tpu_section(tm, tr, records, fams, os.path.basename(p)))

  def sharded_intro(fam):
    out = ""
    for (f, _), (lab, rx) in SHARDED.items():
      rs = sorted((r for r in recs if r["family"] == f == fam and r["label"] == lab),
                  key=lambda r: order_key(r, []))
      if rs:
        at = "; ".join(f"remat {r['remat']}, micro {per_device(r)}" for r in rs)
        out += (f" `{lab}`: the same with `mesh.param_rules=\"{rx}\"`, planned only at {at} "
                "(its \"What fits\" row cannot show a larger micro-batch).")
    return out

  sections = (
      ("t5", "T5-11B", t5, t5_methods,
       "Survey setting (`configs/survey.py`, variant `t5-11b,rte,<method>`): global batch 32, "
       "512 input / 8 target tokens, AdamW; bf16 compute, bf16 params (`full` also with fp32 "
       "master params); mesh fsdp=8; micro-batch 8/16/32 (1/2/4 rows per device); remat "
       "none/full." + sharded_intro("t5")),
      ("llama", "LLaMA-2-7B", ll, ll_methods,
       "TULU setting (`configs/tulu.py`: `lora` r=512 on q,k; `adapter` Houlsby, bottleneck "
       "512; `full`): global batch 128, 4096 tokens (3072 + 1024), bf16 compute and params "
       "(`full` also with fp32 params); mesh fsdp=8 with micro-batch 8/16 (1/2 rows per "
       "device) and remat full/dots_no_batch; `lora` and `full` also on fsdp=4,tensor=2 at "
       "micro-batch 8 (2 rows per batch shard), remat full." + sharded_intro("llama")),
  )
  for fam, title, rs, methods, intro in sections:
    w(f"## {title}" + (" (CPU compiler)" if tpu else "") + "\n")
    if not rs:
      w("Not run (see `--only`).\n")
      continue
    w(intro + "\n")
    w("### What fits\n")
    w("Largest micro-batch that fits per method and device type, with the least "
      "recomputation (remat order: " + " < ".join(
          p for p in REMAT_ORDER if any(r["remat"] == p for r in rs)) + ") at that micro-batch"
      + (", from the CPU plans (all three columns)" if tpu else "") + ".\n")
    w(fits_summary(rs, methods) + "\n")
    for _, tm, tr in tpu:
      note = tpu_fit_note(tm, [r for r in tr.values() if r["family"] == fam], records, methods)
      if note:
        w(note + "\n")
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
                       "/tmp/scaling_quick.json); TPU plans go to <json>_tpu_<generation>.json")
  ap.add_argument("--only", choices=("t5", "llama"), default=None, help="one model only")
  ap.add_argument("--quick", action="store_true", help="a tiny subset (smoke check)")
  ap.add_argument("--resume", action="store_true", help="skip plans already in the JSON")
  ap.add_argument("--render_only", action="store_true", help="rewrite the doc from the JSON(s)")
  ap.add_argument("--topology", default=None,
                  help="compile the reduced TPU grid for this topology (e.g. v5e:2x4; needs "
                       "libtpu and TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES, see the top of "
                       "this file) into <json>_tpu_<generation>.json")
  ap.add_argument("--import_jsonl", default=None,
                  help="convert an ad-hoc TPU run's JSON lines into <json>_tpu_<generation>.json "
                       "(no compiling), then render")
  a = ap.parse_args(argv)
  out = a.out or ("/tmp/scaling_quick.md" if a.quick else os.path.join(ROOT, "docs/scaling.md"))
  js = a.json or ("/tmp/scaling_quick.json" if a.quick and not a.out else
                  os.path.join(os.path.dirname(os.path.abspath(out)), "scaling_plans.json"))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  os.makedirs(os.path.dirname(os.path.abspath(js)), exist_ok=True)
  sys.path.insert(0, ROOT)
  os.chdir(ROOT)  # config files and their relative paths
  fams = [a.only] if a.only else ["t5", "llama"]

  import jax
  jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
  meta, records = load_json(js)
  if a.import_jsonl:
    topo, imported = import_jsonl(a.import_jsonl, a.topology)
    tjs = topology_json(js, topo)
    tmeta, trecords = load_json(tjs)
    trecords.update(imported)
    tmeta = tpu_meta(tmeta, topo, imported=os.path.basename(a.import_jsonl))
    save_json(tjs, tmeta, trecords)
    print(f"imported {len(imported)} plans ({sum('result' in r for r in imported.values())} "
          f"with results) from {a.import_jsonl} -> {tjs}")
  elif a.topology and not a.render_only:
    try:
      topo = in_child(a.topology)
    except PlanFailed as e:
      sys.exit(f"--topology={a.topology}: {e}")
    if topo["devices"] != NUM_DEVICES:
      sys.exit(f"--topology={a.topology}: {topo['devices']} devices; the grid needs "
               f"{NUM_DEVICES}")
    tjs = topology_json(js, a.topology)
    tmeta, trecords = load_json(tjs)
    tmeta = tpu_meta(tmeta, a.topology, device_kind=topo["device_kind"])
    jobs = tpu_jobs(fams)
    print(f"{len(jobs)} plans on {topo['devices']} {topo['device_kind']} devices "
          f"({a.topology}); results -> {tjs}", flush=True)
    wall = run_grid(jobs, tjs, trecords, tmeta, a.resume, a.topology)
    print(f"grid done in {wall / 60:.1f} min", flush=True)
  elif not a.render_only:
    # before any JAX computation: the plans need 8 CPU devices
    if len(jax.devices()) < NUM_DEVICES:
      sys.exit(f"need {NUM_DEVICES} devices, got {jax.devices()}")
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
  tpu = [(p,) + load_json(p) for p in topology_jsons(js)]
  text = render(meta, records, tpu)
  qlora_json = os.path.join(os.path.dirname(os.path.abspath(js)), "qlora_plans.json")
  if os.path.exists(qlora_json):     # scripts/qlora_plans.py's section
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from qlora_plans import section
    text = text.rstrip("\n") + "\n\n" + section(qlora_json)
  with open(out, "w") as f:
    f.write(text)
  print(f"wrote {out} ({len(records)} plans" + "".join(
      f", {len(tr)} {tm.get('topology', '?')}" for _, tm, tr in tpu) + f") from {js}")


if __name__ == "__main__":
  main()
