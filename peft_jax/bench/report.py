"""The benchmark's outputs: markdown tables, a PNG of the ratios, the JSON line, the page.

Ratios are peft-jax / Hugging Face: above 1 peft-jax is faster (throughputs); below 1
it needs less memory. ``n/a`` where a side or a figure is missing (no HF counterpart, a
method that does not merge, a failed row).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

REFERENCE_NAMES = {"peft": "HF PEFT", "adapterhub": "AdapterHub", "torch": "torch", None: "n/a"}


def _f(x, fmt="{:.0f}", none="n/a") -> str:
  return none if x is None else fmt.format(x)


def _mb(x) -> str:
  return "n/a" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def _r(x) -> str:
  return "n/a" if x is None else f"**{x:.2f}**"


def _side(row, side) -> Dict[str, Any]:
  return row.get(side) or {}


def speed_table(result: Dict[str, Any]) -> str:
  head = ("| model | method | HF side | trainable (peft-jax / HF) | first loss, abs. diff | "
          "compile s (peft-jax) | train tok/s peft-jax | HF | ratio | generate tok/s "
          "peft-jax | HF | ratio | merged: peft-jax | HF | ratio |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in result["rows"]:
    j, h = _side(r, "peft_jax"), _side(r, "hf_peft")
    trainable = f"{_f(j.get('trainable_params'), '{:,}')} / {_f(h.get('trainable_params'), '{:,}')}"
    loss = (f"{j['loss0']:.4f}, {_f(r.get('loss_diff'), '{:.1e}')}" if "loss0" in j else "n/a")
    lines.append(
        f"| {r['model']} | {r['method']} | {REFERENCE_NAMES.get(r.get('reference'), 'n/a')} | "
        f"{trainable} | {loss} | {_f(j.get('compile_s'), '{:.1f}')} | "
        f"{_f(j.get('train_tokens_per_s'))} | {_f(h.get('train_tokens_per_s'))} | "
        f"{_r(r.get('ratio_train'))} | {_f(j.get('infer_tokens_per_s'))} | "
        f"{_f(h.get('infer_tokens_per_s'))} | {_r(r.get('ratio_infer'))} | "
        f"{_f(j.get('infer_merged_tokens_per_s'))} | {_f(h.get('infer_merged_tokens_per_s'))} | "
        f"{_r(r.get('ratio_infer_merged'))} |")
  return "\n".join(lines)


def memory_table(result: Dict[str, Any]) -> str:
  head = ("| model | method | peak MiB peft-jax | HF | ratio | peft-jax growth over imports "
          "MiB | plan MiB | plan / growth | load + compile + first step s (peft-jax / HF) | "
          "TFLOP/s (peft-jax / HF) | MFU |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in result["rows"]:
    j, h = _side(r, "peft_jax"), _side(r, "hf_peft")
    growth = None
    if j.get("peak_train_mb") is not None:
      on_cpu = str(j.get("device", "cpu")).startswith("cpu")
      growth = j["peak_train_mb"] - (j.get("rss_base_mb", 0.0) if on_cpu else 0.0)
    plan = j.get("plan_peak_mb")
    err = plan / growth if plan and growth else None
    mfu = j.get("mfu")
    lines.append(
        f"| {r['model']} | {r['method']} | {_mb(j.get('peak_train_mb'))} | "
        f"{_mb(h.get('peak_train_mb'))} | {_r(r.get('ratio_memory'))} | {_mb(growth)} | "
        f"{_mb(plan)} | {_f(err, '{:.2f}')} | "
        f"{_f(j.get('time_to_train_s'), '{:.1f}')} / "
        f"{_f(h.get('time_to_train_s'), '{:.1f}')} | "
        f"{_f(j.get('tflops_per_s'), '{:.3f}')} / {_f(h.get('tflops_per_s'), '{:.3f}')} | "
        f"{_f(mfu, '{:.1%}')} / "
        f"{_f(h.get('mfu'), '{:.1%}')} |")
  return "\n".join(lines)


def errors(result: Dict[str, Any]) -> List[str]:
  return [f"{r['model']} / {r['method']}: {r['error']}" for r in result["rows"] if r.get("error")]


def describe_load(load: Dict[str, Any]) -> str:
  one = load.get("loadavg_1min") or {}
  other = load.get("other_processes_cores") or {}
  s = (f"load average at start {load['loadavg_start']}, at end {load['loadavg_end']}; "
       f"1-minute load during the timed blocks median {one.get('median')} "
       f"(min {one.get('min')}, max {one.get('max')})")
  if other:
    s += (f"; other processes used median {other['median']} cores (min {other['min']}, "
          f"max {other['max']}) during the timed blocks")
  return s


def describe_machine(machine: Dict[str, Any]) -> str:
  s = (f"{machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory_gib')} GiB; "
       f"{machine.get('os')}; Python {machine.get('python')}")
  dev = [f"{k.split('_device')[0]} on {v}" for k, v in machine.items() if k.endswith("_device")]
  if dev:
    s += "; " + ", ".join(dev)
  for who, v in (machine.get("versions") or {}).items():
    s += f"; {who}: " + ", ".join(f"{k} {x}" for k, x in sorted(v.items()))
  if machine.get("peft_jax_glibc_tunables"):   # peft_jax/host_memory.py
    s += f"; peft-jax worker GLIBC_TUNABLES={machine['peft_jax_glibc_tunables']}"
  return s


def plot(result: Dict[str, Any], path: str) -> Optional[str]:
  """Bars of the ratios per row (peft-jax / HF; the line at 1 is parity)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = result["rows"]
  series = [("ratio_train", "training"), ("ratio_infer", "generation"),
            ("ratio_infer_merged", "generation, merged")]
  labels = [f"{r['model']}\n{r['method']}" for r in rows]
  fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2))
  width = 0.8 / len(series)
  for i, (key, name) in enumerate(series):
    xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(rows))]
    ys = [r.get(key) or 0.0 for r in rows]
    bars = ax.bar(xs, ys, width, label=name)
    for b, r in zip(bars, rows):
      if r.get(key) is None:
        ax.text(b.get_x() + b.get_width() / 2, 0.02, "n/a", ha="center", va="bottom",
                fontsize=6, rotation=90)
  ax.axhline(1.0, color="black", linewidth=0.8)
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(labels, fontsize=8)
  ax.set_ylabel("peft-jax / HF (tokens/s)")
  ax.set_title("peft-jax vs Hugging Face, throughput ratio (> 1: peft-jax faster)", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def json_line(result: Dict[str, Any]) -> str:
  """The last line: ``{"rows": [...], "machine": ..., "load": ...}`` (and the run's settings)."""
  return json.dumps(result, sort_keys=False, default=str)


def page(result: Dict[str, Any], command: str, png: Optional[str]) -> str:
  """``docs/benchmarks.md``: the command, machine, date and load, then the tables."""
  run = result["run"]
  models = "; ".join(
      f"**{n}**: {m['family']}, batch {m['batch_size']} x ({m['source_len']} + "
      f"{m['target_len']}), " + ", ".join(f"{k}={v}" for k, v in m["hf_config"].items()
                                          if k in _DIMS)
      for n, m in result["models"].items())
  methods = "; ".join(f"**{n}**: " + ", ".join(f"{k}={v}" for k, v in m.items())
                      for n, m in result["methods"].items())
  parts = [
      "# Efficiency: peft-jax side by side with Hugging Face PEFT",
      "",
      "Generated by `bench.py` (do not edit by hand); regenerate with",
      "",
      "```",
      command,
      "```",
      "",
      f"- date: {result['date']}, {result['seconds']:.0f} s in all",
      f"- machine: {describe_machine(result['machine'])}",
      f"- load: {describe_load(result['load'])}",
      f"- models: {models}",
      f"- methods: {methods}",
      f"- run: {run['dtype']}; {run['warmup_steps']} warm-up step(s), then {run['blocks']} "
      f"blocks of {run['steps_per_block']} training steps per side; generation of "
      f"{run['new_tokens']} new tokens per row (greedy, no EOS stop), "
      f"{run['infer_blocks']} timed calls per side and kind after one warm-up call; each "
      f"turn begins with {run.get('block_warmup', 0)} untimed step(s) (call(s)); medians "
      "over blocks; " + ("the two sides' processes alive together, taking turns, the order "
                         "alternating from block to block" if run.get("together", True) else
                         "one side after the other") +
      f"; torch threads: {run.get('hf_threads') or 'torch default (one per core)'}.",
      "",
      "Ratios are peft-jax / HF: above 1 peft-jax is faster; for memory, below 1 it needs "
      "less. The HF side loads the same random-weight checkpoint and the same initial method "
      "weights (first loss: batch 0 without dropout on both sides). Peak memory on CPU is "
      "each process's resident high-water mark after training (libraries and runtime "
      "included; device statistics on accelerators); \"growth over imports\" subtracts the "
      "peft-jax process's mark before it loaded the weights, and \"plan\" is `--plan`'s "
      "estimate (arguments + outputs - aliased + temporaries of the compiled step). "
      "Timings taken while other processes compete for the cores are noisy, and torch's "
      "OpenMP threads lose more to such competition than XLA's thread pool: read the "
      "ratios with the load line above.",
      "",
      "## Throughput",
      "",
      speed_table(result),
      "",
      "## Memory, start-up, FLOPs",
      "",
      memory_table(result),
      ""]
  if png:
    parts += [f"![ratios]({png})", ""]
  errs = errors(result)
  if errs:
    parts += ["## Failed rows", ""] + [f"- {e}" for e in errs] + [""]
  return "\n".join(parts)


_DIMS = ("d_model", "d_ff", "num_heads", "num_layers", "hidden_size", "intermediate_size",
         "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size")
