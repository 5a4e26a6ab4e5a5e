"""The benchmark's orchestrator: checkpoints, batches, the two worker processes per row,
their turns, and the figures of each row.

For each model: one random-weight Hugging Face checkpoint (``save_pretrained`` by a short
worker process) and ``run.n_batches`` random token batches, shared by every method. For
each (model, method): a peft-jax worker (:mod:`peft_jax.bench.jax_worker`) and a Hugging
Face worker (:mod:`peft_jax.bench.hf_worker`, under AdapterHub's interpreter for the
bottleneck adapters) are started together and kept alive together; the orchestrator sends
the commands in turns, so one side computes while the other waits, and the order of the
two alternates from block to block (a change of load hits both):

1. setup: load the checkpoint, apply the method (peft-jax writes its initial method
   weights, the HF side loads them), the loss of batch 0 without dropout on both sides;
2. training: compile (peft-jax, timed on its own) and ``run.warmup_steps`` untimed steps,
   then ``run.blocks`` blocks of ``run.steps_per_block`` steps per side; the process's
   memory high-water mark after training (device statistics on accelerators);
3. generation: one warm-up call (it compiles on peft-jax) and ``run.infer_blocks`` timed
   calls per side, unmerged, then merged for mergeable methods.

Each turn of a side begins with ``run.block_warmup`` untimed steps (calls): the first
step after the other side's turn is not steady state. Measured on the 2-core virtual
machine of docs/benchmarks.md, T5 full fine-tuning 3.0 s per step back to back, 3.7 s
after 3 s idle: the memory the process freed is faulted in again (the host reclaims
freed guest pages), a cost that steps run back to back, as in training, do not pay.

Throughputs are medians over blocks. While it runs, the load average and the CPU time of
processes other than the workers are sampled (:class:`CpuMonitor`): the cores the rest
of the machine took during the timed blocks.
"""

from __future__ import annotations

import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from peft_jax import host_memory
from peft_jax.bench import config as bench_config

HF_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerError(RuntimeError):
  """A worker failed a command or died (the message names the side and the log)."""


class Worker:
  """A worker process answering JSON-line commands (one at a time)."""

  def __init__(self, name: str, argv: List[str], log_path: str, timeout_s: float,
               env: Optional[Dict[str, str]] = None):
    self.name, self.log_path, self.timeout_s = name, log_path, timeout_s
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, env=env, cwd=REPO, text=True, bufsize=1)

  @property
  def pid(self) -> int:
    return self.proc.pid

  def call(self, op: str, **args) -> Dict[str, Any]:
    try:
      self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
      self.proc.stdin.flush()
    except BrokenPipeError:
      raise WorkerError(self._died(op)) from None
    ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
    if not ready:
      self.close()
      raise WorkerError(f"{self.name}: {op} took longer than run.timeout_s={self.timeout_s:g} s")
    line = self.proc.stdout.readline()
    if not line:
      raise WorkerError(self._died(op))
    reply = json.loads(line)
    if not reply.pop("ok"):
      raise WorkerError(f"{self.name}: {op} failed: {reply.get('error')} (log: {self.log_path}"
                        f"{self._tail()})")
    return reply

  def _tail(self, n: int = 6) -> str:
    """The log's last lines (the log is in a work directory that is removed afterwards)."""
    self.log.flush()
    try:
      tail = open(self.log_path).read()[-1500:].strip().splitlines()[-n:]
    except OSError:
      return ""
    return (": " + " | ".join(tail)) if tail else ""

  def _died(self, op: str) -> str:
    self.proc.wait(timeout=30)
    return (f"{self.name}: the process ended (exit {self.proc.returncode}) during {op}"
            + self._tail() + f" (log: {self.log_path})")

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
      except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()
    self.log.close()


# ----------------------------------------------------------------------------- the machine

class CpuMonitor:
  """Load averages, and the cores that processes other than ``pids`` used (Linux
  ``/proc``; elsewhere only the load average)."""

  def __init__(self):
    self.load: List[float] = []
    self.others: List[float] = []
    self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    self.start_load = os.getloadavg()

  def _busy(self) -> Optional[float]:
    try:
      with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
      return None
    return float(sum(v) - v[3] - (v[4] if len(v) > 4 else 0))    # all but idle and iowait

  def _proc(self, pid: int) -> float:
    try:
      with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
      return float(int(parts[11]) + int(parts[12]))               # utime + stime
    except (OSError, IndexError, ValueError):
      return 0.0

  def begin(self, pids):
    self._t = time.perf_counter()
    self._b = self._busy()
    self._p = {p: self._proc(p) for p in pids}

  def end(self, pids):
    self.load.append(os.getloadavg()[0])
    b = self._busy()
    if b is None or self._b is None:
      return
    dt = max(time.perf_counter() - self._t, 1e-6)
    ours = sum(self._proc(p) - self._p.get(p, 0.0) for p in pids)
    self.others.append(max(b - self._b - ours, 0.0) / self._hz / dt)

  def summary(self) -> Dict[str, Any]:
    def stats(xs):
      return ({"min": round(min(xs), 2), "median": round(statistics.median(xs), 2),
               "max": round(max(xs), 2)} if xs else None)
    return {"loadavg_start": [round(x, 2) for x in self.start_load],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "loadavg_1min": stats(self.load), "other_processes_cores": stats(self.others)}


def describe_machine() -> Dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem = None
  try:
    with open("/proc/meminfo") as f:
      mem = round(int(f.readline().split()[1]) / 2**20, 1)
  except (OSError, ValueError, IndexError):
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"cpu": cpu, "cores": cores, "memory_gib": mem, "os": platform.platform(),
          "python": platform.python_version()}


# ----------------------------------------------------------------------------- inputs

def make_batches(model: Dict[str, Any], n: int, seed: int, path: str) -> str:
  """``n`` random batches in peft-jax's layout (``peft_jax.data.batching``), saved as
  ``<i>/<key>`` arrays: T5 ``inputs [B, S]``, ``decoder_inputs``/``targets [B, T]``; LLaMA
  one ``[B, S + T]`` sequence, ``targets`` shifted left, loss on the last ``T`` tokens."""
  rng = np.random.default_rng(seed)
  vocab = int(model["hf_config"].get("vocab_size", 32000))
  b, s, t = model["batch_size"], model["source_len"], model["target_len"]
  from peft_jax.models import families
  layout = {f.name: f.layout for f in families()}[model["family"]]
  out = {}
  for i in range(n):
    if layout == "seq2seq":
      start = int(model["hf_config"].get("decoder_start_token_id", 0))
      src = rng.integers(2, vocab, (b, s), dtype=np.int32)
      tgt = rng.integers(2, vocab, (b, t), dtype=np.int32)
      dec = np.concatenate([np.full((b, 1), start, np.int32), tgt[:, :-1]], axis=1)
      arrays = {"inputs": src, "input_mask": np.ones_like(src), "decoder_inputs": dec,
                "targets": tgt, "target_mask": np.ones_like(tgt)}
    else:
      seq = rng.integers(3, vocab, (b, s + t), dtype=np.int32)
      targets = np.concatenate([seq[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
      mask = np.zeros((b, s + t), np.int32)
      mask[:, s - 1: s + t - 1] = 1               # the predictions of the last T tokens
      from peft_jax.data.batching import loss_positions
      arrays = {"inputs": seq, "input_mask": np.ones_like(seq), "targets": targets,
                "target_mask": mask, "loss_positions": loss_positions(mask, t)}
    out.update({f"{i}/{k}": v for k, v in arrays.items()})
  np.savez(path, **out)
  return path


def _env(extra_pythonpath: bool, jax: bool = False, alone: bool = False) -> Dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not (k.startswith(("PYTHON", "VIRTUAL_ENV")) or k == "XLA_FLAGS" and
                 "host_platform_device_count" in v)}
  env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
             TOKENIZERS_PARALLELISM="false")
  if extra_pythonpath:
    env["PYTHONPATH"] = REPO
  if jax:   # JAX takes accelerator memory as it needs it (the HF side may share it) ...
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if alone:  # ... up to 90% of it when it runs alone (not an image's smaller default)
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.9"
    # as train.py runs (peft_jax/host_memory.py); the HF side keeps the caller's environment
    env = host_memory.with_huge_pages(env)
  return env


def make_checkpoint(bench, name: str, work: str, say) -> str:
  model = bench["models"][name]
  out = os.path.join(work, f"ckpt_{name}")
  w = Worker(f"checkpoint {name}", [sys.executable, HF_WORKER],
             os.path.join(work, f"ckpt_{name}.log"), bench["run"]["timeout_s"], _env(False))
  try:
    r = w.call("make_checkpoint", family=model["family"], config=model["hf_config"],
               out_dir=out, seed=bench["run"]["seed"], dtype=bench["run"]["dtype"])
  finally:
    w.close()
  say(f"{name}: random {model['family']} checkpoint, {r['params']:,} parameters")
  return out


# ----------------------------------------------------------------------------- one row

def _median_rate(amount: float, seconds: List[float]) -> Optional[float]:
  return amount / statistics.median(seconds) if seconds else None


def _turns(workers: Dict[str, "Worker"], block: int):
  """``(side, worker)`` pairs in this block's order (alternating from block to block)."""
  ws = list(workers.items())
  return ws if block % 2 == 0 else ws[::-1]


class Row:
  """One (model, method): its settings, the sides' figures, and the phases that fill them."""

  def __init__(self, bench, model_name, method_name, checkpoint, batches, work, monitor, say):
    self.bench, self.run, self.model = bench, bench["run"], bench["models"][model_name]
    self.method = bench["methods"][method_name]
    self.ref, self.why = bench_config.reference(bench, method_name)
    self.checkpoint, self.batches, self.work = checkpoint, batches, work
    self.monitor, self.say = monitor, say
    self.tag = f"{model_name}_{method_name}"
    self.total = (self.run["warmup_steps"] + 1 + self.run["blocks"] *
                  (self.run["steps_per_block"] + self.run["block_warmup"]))
    self.cfg = bench_config.train_config(bench, model_name, method_name, checkpoint, self.total)
    self.export = {"peft": os.path.join(work, f"{self.tag}_adapter"),
                   "adapterhub": os.path.join(work, f"{self.tag}_adapter.npz")}.get(self.ref, "")
    self.row: Dict[str, Any] = {"model": model_name, "method": method_name,
                                "peft_method": self.method["method"], "reference": self.ref,
                                "reference_note": self.why, "peft_jax": {},
                                "hf_peft": {} if self.ref else None}

  def side(self, name: str) -> Dict[str, Any]:
    return self.row[name]

  def start(self, name: str) -> Worker:
    run = self.run
    if name == "peft_jax":
      return Worker("peft-jax", [sys.executable, "-m", "peft_jax.bench.jax_worker"],
                    os.path.join(self.work, f"{self.tag}.jax.log"), run["timeout_s"],
                    _env(True, jax=True, alone=not run["together"]))
    py = bench_config.adapterhub_python(self.bench) if self.ref == "adapterhub" else sys.executable
    return Worker("hf", [py, HF_WORKER], os.path.join(self.work, f"{self.tag}.hf.log"),
                  run["timeout_s"], _env(False))

  # ------------------------------------------------------------------ phases
  def setup(self, ws: Dict[str, Worker]) -> None:
    run, hp = self.run, {k: v for k, v in self.method.items() if k != "method"}
    for name, w in ws.items():     # peft-jax first: it writes the initial method weights
      if name == "peft_jax":
        r = w.call("setup", train_config=self.cfg, family=self.model["family"],
                   batches=self.batches, export_kind=self.ref if self.export else "",
                   export_path=self.export, seed=run["seed"])
      else:
        r = w.call("setup", checkpoint=self.checkpoint, family=self.model["family"],
                   reference=self.ref, batches=self.batches,
                   learning_rate=run["learning_rate"], dtype=run["dtype"],
                   threads=run["hf_threads"],
                   adapter_dir=self.export if self.ref == "peft" else "",
                   adapter_npz=self.export if self.ref == "adapterhub" else "",
                   adapter_class=bench_config.ADAPTERHUB.get(self.method["method"], ""),
                   adapter_kwargs=_jsonable(hp) if self.ref == "adapterhub" else None,
                   seed=run["seed"])
      self.side(name).update(r)

  def train(self, ws: Dict[str, Worker]) -> None:
    run, pids = self.run, [w.pid for w in ws.values()]
    for name, w in ws.items():
      extra = {"total_steps": self.total} if name == "peft_jax" else {}
      self.side(name).update(w.call("compile_train", warmup_steps=run["warmup_steps"], **extra))
    secs = {k: [] for k in ws}
    for blk in range(run["blocks"]):
      for name, w in _turns(ws, blk):
        if run["block_warmup"]:
          w.call("train", steps=run["block_warmup"])
        self.monitor.begin(pids)
        r = w.call("train", steps=run["steps_per_block"])
        self.monitor.end(pids)
        secs[name].append(r["seconds"])
        self.side(name)["last_loss"] = r["loss"]
        self.side(name)["train_steps_done"] = r["steps_done"]
    tokens = self.model["batch_size"] * (self.model["source_len"] + self.model["target_len"])
    for name, w in ws.items():
      s = self.side(name)
      s["train_block_s"] = [round(x, 4) for x in secs[name]]
      s["train_tokens_per_s"] = _median_rate(tokens * run["steps_per_block"], secs[name])
      s["step_s"] = statistics.median(secs[name]) / run["steps_per_block"]
      mem = w.call("memory")
      s["peak_train_mb"] = mem.get("device_peak_mb", mem["maxrss_mb"])
      s["maxrss_train_mb"] = mem["maxrss_mb"]

  def kinds(self) -> List[str]:
    run = self.run
    if not run["infer_blocks"]:
      return []
    return ["unmerged"] + (["merged"] if run["merged"] and _mergeable(self.method["method"])
                           else [])

  def infer(self, ws: Dict[str, Worker]) -> None:
    run, pids = self.run, [w.pid for w in ws.values()]
    for kind in self.kinds():
      # a merged HF side exists for HF PEFT adapters only
      live = {k: w for k, w in ws.items()
              if kind == "unmerged" or k == "peft_jax" or self.ref == "peft"}
      warm = {k: w.call("infer_setup", kind=kind, new_tokens=run["new_tokens"],
                        prompt_len=self.model["source_len"]) for k, w in live.items()}
      secs = {k: [] for k in live}
      for blk in range(run["infer_blocks"]):
        for name, w in _turns(live, blk):
          for _ in range(run["block_warmup"]):
            w.call("infer")
          self.monitor.begin(pids)
          secs[name].append(w.call("infer")["seconds"])
          self.monitor.end(pids)
      key = "infer" if kind == "unmerged" else "infer_merged"
      for name, s in secs.items():
        side, wr = self.side(name), warm[name]
        side[f"{key}_tokens_per_s"] = _median_rate(wr["rows"] * wr["new_tokens"], s)
        side[f"{key}_new_tokens"] = wr["new_tokens"]
        side[f"{key}_warmup_s"] = wr["warmup_s"]
        if name == "peft_jax":    # the warm-up call compiles: its excess over a timed call
          side[f"{key}_compile_s"] = max(wr["warmup_s"] - statistics.median(s), 0.0)
    for name, w in ws.items():
      mem = w.call("memory")
      self.side(name)["peak_total_mb"] = mem.get("device_peak_mb", mem["maxrss_mb"])

  # ------------------------------------------------------------------ the row
  def measure(self) -> Dict[str, Any]:
    """All phases; with ``run.together`` both processes alive and taking turns, else one
    side after the other (accelerators whose memory does not hold both)."""
    sides = ["peft_jax"] + (["hf_peft"] if self.ref else [])
    groups = [sides] if self.run["together"] else [[s] for s in sides]
    try:
      for group in groups:
        ws: Dict[str, Worker] = {}
        try:
          for name in group:
            ws[name] = self.start(name)
          self.setup(ws)
          if "loss0" in self.row["peft_jax"] and self.ref and "loss0" in self.row["hf_peft"]:
            self._say_setup()
          elif not self.ref:
            self.say(f"  setup: trainable {self.row['peft_jax']['trainable_params']:,} "
                     f"(no HF side: {self.why})")
          self.train(ws)
          self.infer(ws)
        finally:
          for w in ws.values():
            w.close()
    except WorkerError as e:
      self.row["error"] = str(e)
      self.say(f"  error: {e}")
    j, h = self.row["peft_jax"], self.row["hf_peft"] or {}
    if "loss0" in j and "loss0" in h:
      self.row["loss_diff"] = abs(j["loss0"] - h["loss0"])
    if "train_tokens_per_s" in j:
      self.say("  train tok/s: " + ", ".join(
          f"{k} {self.row[k]['train_tokens_per_s']:.0f}" for k in ("peft_jax", "hf_peft")
          if self.row[k] and self.row[k].get("train_tokens_per_s")))
    _ratios(self.row, self.run)
    return self.row

  def _say_setup(self):
    j, h = self.row["peft_jax"], self.row["hf_peft"]
    self.say(f"  setup: trainable {j['trainable_params']:,} / HF {h['trainable_params']:,}, "
             f"first loss {j['loss0']:.6f} vs {h['loss0']:.6f}")


def run_row(bench, model_name: str, method_name: str, checkpoint: str, batches: str,
            work: str, monitor: CpuMonitor, say) -> Dict[str, Any]:
  return Row(bench, model_name, method_name, checkpoint, batches, work, monitor, say).measure()


def _mergeable(method: str) -> bool:
  from peft_jax.peft import get_method
  return bool(get_method(method).mergeable) and method != "bitfit"


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def _ratio(a, b):
  return round(a / b, 3) if a and b else None


def _ratios(row, run) -> None:
  """peft-jax / HF for throughputs (> 1: peft-jax faster) and for memory (< 1: less)."""
  j, h = row["peft_jax"], row["hf_peft"] or {}
  row["ratio_train"] = _ratio(j.get("train_tokens_per_s"), h.get("train_tokens_per_s"))
  row["ratio_infer"] = _ratio(j.get("infer_tokens_per_s"), h.get("infer_tokens_per_s"))
  row["ratio_infer_merged"] = _ratio(j.get("infer_merged_tokens_per_s"),
                                     h.get("infer_merged_tokens_per_s"))
  row["ratio_memory"] = _ratio(j.get("peak_train_mb"), h.get("peak_train_mb"))
  plan = (j.get("plan") or {}).get("peak_bytes")
  if plan:
    j["plan_peak_mb"] = plan / 2**20
  flops = j.get("flops_per_step")
  if flops:
    for s in (j, h):
      if s.get("step_s"):
        s["tflops_per_s"] = flops / s["step_s"] / 1e12
        if run["peak_tflops"]:
          s["mfu"] = s["tflops_per_s"] / run["peak_tflops"]


# ----------------------------------------------------------------------------- the run

def run(bench, say: Callable[[str], None] = print, keep: bool = False) -> Dict[str, Any]:
  """Every (model, method) of ``bench`` (a resolved config); returns the results."""
  work = tempfile.mkdtemp(prefix="peftjax_bench_")
  monitor = CpuMonitor()
  t0 = time.time()
  rows = []
  try:
    for name, model in bench["models"].items():
      ckpt = make_checkpoint(bench, name, work, say)
      batches = make_batches(model, bench["run"]["n_batches"], bench["run"]["seed"],
                             os.path.join(work, f"batches_{name}.npz"))
      for method in bench["methods"]:
        say(f"{name} / {method}")
        rows.append(run_row(bench, name, method, ckpt, batches, work, monitor, say))
  finally:
    if keep:
      say(f"kept the work directory {work}")
    else:
      shutil.rmtree(work, ignore_errors=True)
  machine = describe_machine()
  machine["peft_jax_glibc_tunables"] = _env(True, jax=True).get("GLIBC_TUNABLES", "")
  for r in rows:
    for side in ("peft_jax", "hf_peft"):
      s = r.get(side) or {}
      if s.get("device"):
        machine.setdefault(f"{side}_device", s["device"])
      if s.get("versions"):
        who = "peft_jax" if side == "peft_jax" else r["reference"]
        machine.setdefault("versions", {}).setdefault(who, s["versions"])
  return {"rows": rows, "machine": machine, "load": monitor.summary(),
          "run": dict(bench["run"]), "models": _jsonable(bench["models"]),
          "methods": _jsonable(bench["methods"]), "seconds": round(time.time() - t0, 1),
          "date": time.strftime("%Y-%m-%d %H:%M %Z")}
