"""Hyper-parameter sweeps over ``train.py`` and their aggregation (seed 000's Figure 1b / Table 1).

Running (see ``sweep.py`` at the repository root for the command line)::

  from peft_jax import grid_search
  grid_search.run_sweep("configs/quickstart.py", "runs/sweep1",
                        grid={"train.learning_rate": ["1e-3", "3e-3"], "peft.r": ["4", "8"]},
                        seeds=[0, 1, 2])

Each grid point x seed runs ``train.py`` in a subprocess with its own workdir
``<workdir>/<point-name>/seed<k>``. On success the last stdout line of train.py (a
JSON object) is written, with the point's overrides and seed, to ``result.json``;
a point whose ``result.json`` exists is skipped on the next run (resumable). A
failed point (non-zero exit, no JSON last line, or an interrupted run) leaves
``failed.json`` with the stderr tail instead and is rerun next time (train.py
itself resumes from the point's checkpoints).

Model selection (seed 000): after a point trains, ``eval.py --checkpoint=<point dir>
--step=best --split=<select_split>`` evaluates the checkpoint that was best on validation
(peft_jax/selection.py) on the test split (``select_split``, default ``test``) and writes
``<point dir>/<split>.json``; it runs once per point (skipped when that file exists, rerun
when it failed: ``eval_failed.json``). The summary reports that test score, with the
validation score of the same checkpoint next to it, never the final step's validation
score. ``select_split="none"`` skips the evaluation; the summary then reports the best
validation score.

Diverged runs count as seed 000 counts them: its figures report diverged runs as scores
near zero, and instability across seeds is one of its findings, so dropping them would
flatter unstable methods. A run that exits with train.py's divergence status (3) gets a
``result.json`` with score 0 and ``diverged: true``; it is not rerun, not dropped, enters
mean and standard deviation as 0, and the summary counts diverged seeds per point.

Aggregating (also on an existing sweep dir)::

  summary = grid_search.aggregate("runs/sweep1")   # summary.json, summary.md, metric_vs_<x>.png

groups results by grid point over seeds and reports mean and 2 sample standard
deviations (ddof=1; a single seed has std 0, ``n`` says how many seeds). The best point
(bold) is chosen by its mean validation score, for the same reason the checkpoint is: the
test score is reported, not selected on.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT_ENV = "PEFT_JAX_SWEEP_TRAIN"
EVAL_SCRIPT_ENV = "PEFT_JAX_SWEEP_EVAL"
#: train.py's exit status for TrainingDiverged (peft_jax/cli.py run_cli)
EXIT_DIVERGED = 3
SEED_KEY = "train.seed"
STDERR_TAIL = 4000


class SweepError(ValueError):
  """A bad sweep specification or an empty sweep directory (one clear line)."""


# ----------------------------------------------------------------------------- grid


def _strip_config_prefix(key: str) -> str:
  key = key.strip()
  return key[len("config."):] if key.startswith("config.") else key


def parse_grid_arg(arg: str) -> Tuple[str, List[str]]:
  """``"train.learning_rate=1e-3,3e-3"`` -> ``("train.learning_rate", ["1e-3", "3e-3"])``."""
  if "=" not in arg:
    raise SweepError(f"--grid {arg!r}: expected KEY=V1,V2,... (e.g. train.learning_rate=1e-3,3e-3)")
  key, _, vals = arg.partition("=")
  key = _strip_config_prefix(key)
  if not key:
    raise SweepError(f"--grid {arg!r}: empty key")
  values = [v.strip() for v in vals.split(",") if v.strip()]
  if not values:
    raise SweepError(f"--grid {arg!r}: empty value list for {key!r}")
  if len(set(values)) != len(values):
    raise SweepError(f"--grid {arg!r}: repeated values")
  return key, values


def parse_set_arg(arg: str) -> Tuple[str, str]:
  """``"config.train.num_steps=20"`` -> ``("train.num_steps", "20")``."""
  if "=" not in arg:
    raise SweepError(f"--set {arg!r}: expected config.FIELD=VALUE")
  key, _, val = arg.partition("=")
  key = _strip_config_prefix(key)
  if not key:
    raise SweepError(f"--set {arg!r}: empty key")
  return key, val


def parse_seeds(arg) -> List[int]:
  if isinstance(arg, (list, tuple)):
    return [int(s) for s in arg]
  try:
    seeds = [int(s) for s in str(arg).split(",") if s.strip()]
  except ValueError:
    raise SweepError(f"--seeds {arg!r}: expected comma separated integers, e.g. 0,1,2") from None
  if not seeds:
    raise SweepError("--seeds: no seeds given")
  if len(set(seeds)) != len(seeds):
    raise SweepError(f"--seeds {arg!r}: repeated seeds")
  return seeds


def format_value(v) -> str:
  """The command-line / name form of a grid value (strings are kept as typed)."""
  if isinstance(v, str):
    return v
  if isinstance(v, bool):
    return "true" if v else "false"
  return repr(v) if isinstance(v, float) else str(v)


def parse_value(s: str):
  """Best-effort typed value of a command-line string: int, float, bool or the string."""
  if not isinstance(s, str):
    return s
  t = s.strip()
  if t.lower() in ("true", "false"):
    return t.lower() == "true"
  try:
    return int(t)
  except ValueError:
    pass
  try:
    return float(t)
  except ValueError:
    return s


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


def point_name(overrides: Dict[str, Any]) -> str:
  """Filesystem-safe directory name of a grid point: ``train.learning_rate=1e-3__peft.r=4``."""
  if not overrides:
    return "base"
  parts = [f"{k}={format_value(v)}" for k, v in overrides.items()]
  return _UNSAFE.sub("_", "__".join(parts))


def expand_grid(grid: Dict[str, Sequence], seeds: Sequence[int]) -> List[Dict[str, Any]]:
  """Cartesian product of the grid (in key order) x seeds: ``[{name, overrides, seed}, ...]``."""
  keys = list(grid)
  for k in keys:
    if not list(grid[k]):
      raise SweepError(f"grid key {k!r} has an empty value list")
  if SEED_KEY in keys:
    raise SweepError(f"{SEED_KEY} is set by --seeds; do not put it in the grid")
  points, names = [], set()
  for combo in itertools.product(*[list(grid[k]) for k in keys]):
    ov = {k: format_value(v) for k, v in zip(keys, combo)}
    name = point_name(ov)
    if name in names:
      raise SweepError(f"two grid points share the directory name {name!r}")
    names.add(name)
    for s in seeds:
      points.append({"name": name, "overrides": ov, "seed": int(s)})
  return points


# ----------------------------------------------------------------------------- config


def split_config_arg(config: str) -> Tuple[str, str]:
  path, _, variant = config.partition(":")
  return path, variant


def load_config_module(config: str):
  """Imports the config file of ``path[:variant]``; returns ``(module, abs_path, variant)``."""
  path, variant = split_config_arg(config)
  if not path or not os.path.isfile(path):
    raise SweepError(f"config file {path!r} does not exist")
  apath = os.path.abspath(path)
  spec = importlib.util.spec_from_file_location("_sweep_config", apath)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except Exception as e:  # a broken config file: say which one
    raise SweepError(f"config file {path!r} failed to import: {type(e).__name__}: {e}") from None
  if not hasattr(mod, "get_config"):
    raise SweepError(f"config file {path!r} has no get_config()")
  return mod, apath, variant


def build_config(mod, variant: str, path: str = ""):
  try:
    return mod.get_config(variant) if variant else mod.get_config()
  except Exception as e:
    raise SweepError(f"config {path}:{variant}: {e}") from None


def _has_field(cfg, key: str) -> bool:
  node = cfg
  for part in key.split("."):
    try:
      if part not in node:
        return False
      node = node[part]
    except TypeError:
      return False
  return True


def config_grid(mod, variant: str, cfg=None) -> Dict[str, list]:
  """The config module's ``GRID`` for the variant's method (or the flat ``GRID``)."""
  grid = getattr(mod, "GRID", None)
  if not grid:
    raise SweepError("--use_config_grid: the config file defines no GRID")
  if all(isinstance(v, dict) for v in grid.values()):
    parts = [p.strip() for p in (variant or "").split(",") if p.strip()]
    hits = [p for p in parts if p in grid]
    if not hits and cfg is not None:   # the defaults: the config's method, then its data set
      for key in ("peft.method", "data.name"):
        m = cfg[key.split(".")[0]][key.split(".")[1]] if _has_field(cfg, key) else None
        if m in grid:
          hits = [m]
          break
    if not hits:
      raise SweepError(f"--use_config_grid: GRID has no entry for variant {variant!r} "
                       f"(methods with a grid: {', '.join(grid)})")
    return {k: list(v) for k, v in grid[hits[0]].items()}
  return {k: list(v) for k, v in grid.items()}


def check_points(config: str, grid: Dict[str, Sequence], seeds: Sequence[int],
                 sets: Dict[str, str]) -> None:
  """Every point's config resolves (fields exist for its method and data set, values fit
  their declared kinds and ranges), before any run starts; else one :class:`SweepError`."""
  from peft_jax import config_lib
  try:
    raw = config_lib.load_file(config)
    for p in expand_grid(grid, seeds[:1]):
      config_lib.resolve(raw, list(sets.items()) + list(p["overrides"].items()))
  except config_lib.ConfigError as e:
    raise SweepError(str(e)) from None


# ----------------------------------------------------------------------------- running


def _default_runner(cmd: List[str], workdir: str):
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("PYTHONUNBUFFERED", "1")
  return subprocess.run(cmd, env=env, capture_output=True, text=True)


def train_command(config: str, workdir: str, overrides: Dict[str, str], seed: int,
                  sets: Dict[str, str], train_script: Optional[str] = None) -> List[str]:
  path, variant = split_config_arg(config)
  cfg_arg = os.path.abspath(path) + (f":{variant}" if variant else "")
  script = train_script or os.environ.get(TRAIN_SCRIPT_ENV) or os.path.join(REPO, "train.py")
  cmd = [sys.executable, script, f"--config={cfg_arg}", f"--workdir={os.path.abspath(workdir)}"]
  for k, v in {**sets, **overrides, SEED_KEY: str(seed)}.items():
    cmd.append(f"--config.{k}={v}")
  return cmd


def eval_command(pdir: str, split: str, eval_script: Optional[str] = None) -> List[str]:
  """eval.py on the point's best-on-validation checkpoint, with the run's own config."""
  script = eval_script or os.environ.get(EVAL_SCRIPT_ENV) or os.path.join(REPO, "eval.py")
  pdir = os.path.abspath(pdir)
  return [sys.executable, script, f"--checkpoint={pdir}", "--step=best", f"--split={split}",
          f"--output={os.path.join(pdir, 'eval_' + split)}"]


def _last_json(stdout: str):
  for line in reversed((stdout or "").strip().splitlines()):
    line = line.strip()
    if not line:
      continue
    try:
      obj = json.loads(line)
    except ValueError:
      return None
    return obj if isinstance(obj, dict) else None
  return None


def _write_json(path: str, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
  os.replace(tmp, path)


def check_split_name(split: Optional[str]) -> str:
  split = (split or "none").strip()
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
    raise SweepError(f"--select_split {split!r}: expected a split name (test, validation, "
                     "...) or none")
  return split


def _run(runner, cmd, pdir):
  t0 = time.time()
  try:
    r = runner(cmd, pdir)
    rc, out, err = r.returncode, r.stdout or "", r.stderr or ""
  except Exception as e:  # the runner itself broke: record, continue
    rc, out, err = -1, "", f"{type(e).__name__}: {e}"
  return rc, out, err, time.time() - t0


def _last_line(err: str) -> str:
  return next((l for l in reversed((err or "").strip().splitlines()) if l.strip()), "")


def run_sweep(config: str, workdir: str, grid: Dict[str, Sequence], seeds: Sequence[int] = (0,),
              sets: Optional[Dict[str, str]] = None,
              runner: Optional[Callable[[List[str], str], Any]] = None,
              train_script: Optional[str] = None, validate: bool = True,
              log: Callable[[str], None] = print, select_split: str = "test",
              eval_script: Optional[str] = None) -> Dict[str, list]:
  """Runs every grid point x seed not already finished, then evaluates each point's best
  checkpoint on ``select_split`` (``"none"``: not at all); returns ``{done, skipped,
  diverged, failed, evaluated}`` (point directories).

  ``runner(cmd, workdir)`` runs one command and returns an object with ``returncode``,
  ``stdout`` and ``stderr`` (default: ``subprocess.run``); ``train_script`` /
  ``eval_script`` (or the ``PEFT_JAX_SWEEP_TRAIN`` / ``PEFT_JAX_SWEEP_EVAL`` environment
  variables) replace ``train.py`` / ``eval.py``.
  """
  sets = dict(sets or {})
  select_split = check_split_name(select_split)
  if validate:
    check_points(config, grid, seeds, sets)
  else:
    split_config_arg(config)
  both = set(grid) & set(sets)
  if both:
    raise SweepError(f"keys both swept and set: {', '.join(sorted(both))}")
  if SEED_KEY in sets:
    raise SweepError(f"{SEED_KEY} is set by --seeds; do not --set it")
  points = expand_grid(grid, seeds)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "sweep.json"),
              {"config": config, "grid": {k: [format_value(v) for v in vs] for k, vs in grid.items()},
               "seeds": list(seeds), "set": sets, "select_split": select_split})
  runner = runner or _default_runner
  status: Dict[str, list] = {"done": [], "skipped": [], "diverged": [], "failed": [],
                             "evaluated": []}
  total = len(points)
  for i, p in enumerate(points, 1):
    tag = f"[{i}/{total}] {p['name']}/seed{p['seed']}"
    pdir = os.path.join(workdir, p["name"], f"seed{p['seed']}")
    rpath = os.path.join(pdir, "result.json")
    if os.path.exists(rpath):
      log(f"{tag}: done already, skipped")
      status["skipped"].append(pdir)
      res = _read_json(rpath)
    else:
      res = _train_point(p, pdir, tag, config, sets, runner, train_script, log, status)
    if res is None or res.get("diverged") or select_split == "none":
      continue
    _evaluate_point(pdir, tag, select_split, res, runner, eval_script, log, status)
  log(f"sweep: {len(status['done'])} run, {len(status['skipped'])} skipped, "
      f"{len(status['diverged'])} diverged, {len(status['failed'])} failed of {total}"
      + (f"; {len(status['evaluated'])} best checkpoint(s) evaluated on {select_split}"
         if select_split != "none" else ""))
  return status


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _train_point(p, pdir, tag, config, sets, runner, train_script, log, status):
  """train.py for one point: its result (written to result.json), or None when it failed."""
  rpath, fpath = os.path.join(pdir, "result.json"), os.path.join(pdir, "failed.json")
  os.makedirs(pdir, exist_ok=True)
  cmd = train_command(config, pdir, p["overrides"], p["seed"], sets, train_script)
  log(f"{tag}: running")
  rc, out, err, dt = _run(runner, cmd, pdir)
  with open(os.path.join(pdir, "stdout.log"), "w") as f:
    f.write(out)
  with open(os.path.join(pdir, "stderr.log"), "w") as f:
    f.write(err)
  last = _last_line(err)
  if rc == EXIT_DIVERGED:
    # seed 000's convention: a diverged run scores (near) zero and stays in the statistics
    res = {"diverged": True, "tuned": 0.0, "best": 0.0, "best_step": None, "metric": None,
           "reason": last.removeprefix("error: "), "returncode": rc, "point": p["overrides"],
           "seed": p["seed"], "config": config, "seconds": round(dt, 2)}
    _write_json(rpath, res)
    if os.path.exists(fpath):
      os.remove(fpath)
    log(f"{tag}: DIVERGED, counted with score 0 ({dt:.1f}s): {last}")
    status["diverged"].append(pdir)
    return res
  res = _last_json(out) if rc == 0 else None
  reason = None
  if rc != 0:
    reason = f"exit status {rc}"
  elif res is None:
    reason = "the last stdout line is not a JSON object"
  elif res.get("interrupted_at"):
    reason = f"interrupted at step {res['interrupted_at']}"
  elif "tuned" not in res:
    reason = "the result has no 'tuned' value"
  if reason:
    _write_json(fpath, {"point": p["overrides"], "seed": p["seed"], "reason": reason,
                        "returncode": rc, "stderr_tail": err[-STDERR_TAIL:], "cmd": cmd,
                        "seconds": round(dt, 2)})
    log(f"{tag}: FAILED ({reason}; {dt:.1f}s){': ' + last if last else ''}")
    status["failed"].append(pdir)
    return None
  res = dict(res)
  res.update({"point": p["overrides"], "seed": p["seed"], "config": config,
              "seconds": round(dt, 2)})
  _write_json(rpath, res)
  if os.path.exists(fpath):
    os.remove(fpath)
  best = res.get("best", res.get("tuned"))
  best_s = f"{best:.4f}" if isinstance(best, (int, float)) else str(best)
  log(f"{tag}: validation {res.get('metric', 'metric')} {best_s} at step "
      f"{res.get('best_step')} ({dt:.1f}s)")
  status["done"].append(pdir)
  return res


def _evaluate_point(pdir, tag, split, res, runner, eval_script, log, status):
  """eval.py on the point's best checkpoint on ``split`` -> ``<pdir>/<split>.json``
  (skipped when it exists; ``eval_failed.json`` when it fails)."""
  spath, fpath = os.path.join(pdir, f"{split}.json"), os.path.join(pdir, "eval_failed.json")
  if os.path.exists(spath):
    return
  metric = res.get("metric")
  cmd = eval_command(pdir, split, eval_script)
  rc, out, err, dt = _run(runner, cmd, pdir)
  got = _last_json(out) if rc == 0 else None
  reason = None
  if rc != 0:
    reason = f"eval.py exit status {rc}"
  elif got is None:
    reason = "eval.py's last stdout line is not a JSON object"
  elif not isinstance(got.get(metric), (int, float)):
    reason = f"eval.py's result has no {metric!r} value"
  if reason:
    last = _last_line(err)
    _write_json(fpath, {"split": split, "reason": reason, "returncode": rc,
                        "stderr_tail": err[-STDERR_TAIL:], "cmd": cmd, "seconds": round(dt, 2)})
    log(f"{tag}: {split} evaluation FAILED ({reason}; {dt:.1f}s){': ' + last if last else ''}")
    status["failed"].append(pdir)
    return
  _write_json(spath, {"split": split, "step": got.get("step"), "chosen": got.get("chosen"),
                      "metric": metric, "score": float(got[metric]),
                      "validation": res.get("best"), "metrics": got, "seconds": round(dt, 2)})
  if os.path.exists(fpath):
    os.remove(fpath)
  log(f"{tag}: {split} {metric} {float(got[metric]):.4f} (best checkpoint, step "
      f"{got.get('step')}; {dt:.1f}s)")
  status["evaluated"].append(pdir)


# ----------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and sample standard deviation (ddof=1); one value: std 0."""
  n = len(values)
  m = sum(values) / n
  if n < 2:
    return m, 0.0
  return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def short_names(keys: Sequence[str]) -> Dict[str, str]:
  """Column names: the last component of each key, the full key where that is ambiguous."""
  last = [k.split(".")[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _sort_key(v):
  pv = parse_value(v)
  return (0, pv, "") if isinstance(pv, (int, float)) else (1, 0, str(v))


def collect(workdir: str) -> Tuple[List[dict], List[dict]]:
  """All ``result.json`` and ``failed.json`` records under a sweep directory."""
  results, failed = [], []
  for path in sorted(glob.glob(os.path.join(workdir, "*", "seed*", "result.json"))):
    with open(path) as f:
      r = json.load(f)
    r.setdefault("point", {})
    r.setdefault("seed", int(os.path.basename(os.path.dirname(path))[4:] or 0))
    r["_dir"] = os.path.dirname(path)
    results.append(r)
  for path in sorted(glob.glob(os.path.join(workdir, "*", "seed*", "failed.json"))):
    if os.path.exists(os.path.join(os.path.dirname(path), "result.json")):
      continue
    with open(path) as f:
      failed.append(json.load(f))
  return results, failed


def _fmt(x: float) -> str:
  return f"{x:.4f}"


def _score_of(r: dict, split: str) -> Tuple[Optional[float], Optional[float], str]:
  """(reported score, validation score of the selected checkpoint, why missing) of a run."""
  if r.get("diverged"):
    return 0.0, 0.0, ""
  val = r.get("best")
  if not isinstance(val, (int, float)):
    val = r.get("tuned")            # a result written before selection was recorded
  val = float(val) if isinstance(val, (int, float)) else None
  if split == "none":
    return val, val, "" if val is not None else "no validation score"
  path = os.path.join(r["_dir"], f"{split}.json")
  if os.path.exists(path):
    with open(path) as f:
      return float(json.load(f)["score"]), val, ""
  why = f"no {split} evaluation of the best checkpoint"
  fpath = os.path.join(r["_dir"], "eval_failed.json")
  if os.path.exists(fpath):
    with open(fpath) as f:
      tail = _last_line(json.load(f).get("stderr_tail", ""))
    why += f" (eval.py failed{': ' + tail if tail else ''})"
  return None, val, why


def aggregate(workdir: str, x: Optional[str] = None, lines: Optional[str] = None,
              logx: Optional[bool] = None, plot: bool = True,
              select_split: Optional[str] = None) -> dict:
  """Writes ``summary.json``, ``summary.md`` and ``metric_vs_<x>.png``; returns the summary.
  ``select_split``: the split whose score of the best checkpoint is reported (default: the
  sweep's, from ``sweep.json``; ``none``: the validation score)."""
  if not os.path.isdir(workdir):
    raise SweepError(f"sweep directory {workdir!r} does not exist")
  results, failed = collect(workdir)
  if not results:
    raise SweepError(f"no results to aggregate in {workdir!r} (no */seed*/result.json)")
  keys: List[str] = []
  spec: dict = {}
  spec_path = os.path.join(workdir, "sweep.json")
  if os.path.exists(spec_path):
    with open(spec_path) as f:
      spec = json.load(f)
    keys = [k for k in spec.get("grid", {})]
  split = select_split or spec.get("select_split") or "none"
  for r in results:
    for k in r["point"]:
      if k not in keys:
        keys.append(k)
  metrics = sorted({str(r["metric"]) for r in results if r.get("metric")}) or ["metric"]
  metric = metrics[0] if len(metrics) == 1 else "/".join(metrics)

  failed = [{"point": f.get("point"), "seed": f.get("seed"), "reason": f.get("reason")}
            for f in failed]
  groups: Dict[tuple, List[dict]] = {}
  for r in results:
    r["_score"], r["_val"], why = _score_of(r, split)
    if r["_score"] is None or r["_val"] is None:
      failed.append({"point": r["point"], "seed": r["seed"], "reason": why})
      continue
    groups.setdefault(tuple(format_value(r["point"].get(k, "")) for k in keys), []).append(r)
  if not groups:
    raise SweepError(f"no run in {workdir!r} has a score to aggregate: "
                     f"{failed[0]['reason'] if failed else 'none finished'}")
  rows = []
  for pt in sorted(groups, key=lambda t: tuple(_sort_key(v) for v in t)):
    rs = sorted(groups[pt], key=lambda r: r["seed"])
    vals, vvals = [r["_score"] for r in rs], [r["_val"] for r in rs]
    m, sd = mean_std(vals)
    vm, vsd = mean_std(vvals)
    row = {"point": {k: parse_value(v) for k, v in zip(keys, pt)},
           "name": point_name(dict(zip(keys, pt))), "n": len(vals),
           "diverged": sum(bool(r.get("diverged")) for r in rs),
           "mean": m, "std": sd, "two_std": 2 * sd, "values": vals,
           "val_mean": vm, "val_std": vsd, "val_two_std": 2 * vsd, "val_values": vvals,
           "seeds": [r["seed"] for r in rs],
           "best_steps": [r.get("best_step") for r in rs]}
    ok = [r for r in rs if not r.get("diverged")]
    losses = [float(r["eval_loss"]) for r in ok if isinstance(r.get("eval_loss"), (int, float))]
    if losses:
      row["eval_loss_mean"] = mean_std(losses)[0]
    untuned = [float(r["untuned"]) for r in ok if isinstance(r.get("untuned"), (int, float))]
    if untuned:
      row["untuned_mean"] = mean_std(untuned)[0]
    rows.append(row)
  # the point is selected on validation, like the checkpoint; ties: the first in grid order
  best = max(range(len(rows)), key=lambda i: (rows[i]["val_mean"], -i))
  summary = {"metric": metric, "split": "validation" if split == "none" else split,
             "select_split": split, "keys": keys, "rows": rows, "best": rows[best]["point"],
             "best_mean": rows[best]["mean"], "best_val_mean": rows[best]["val_mean"],
             "num_results": sum(r["n"] for r in rows),
             "num_diverged": sum(r["diverged"] for r in rows), "failed": failed}
  md = markdown_table(summary)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(md)
  if plot and keys:
    summary["plot"] = plot_summary(summary, workdir, x=x, lines=lines, logx=logx)
  _write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def markdown_table(summary: dict) -> str:
  """One row per grid point: the swept values, ``n``, diverged seeds, the reported score
  (``split`` score of each run's best checkpoint on validation) as ``mean ± 2std`` and,
  when that is not validation, the validation score of the same checkpoints."""
  keys, metric, split = summary["keys"], summary["metric"], summary.get("split", "validation")
  names = short_names(keys)
  scores = [split] + (["validation"] if split != "validation" else [])
  head = ([names[k] for k in keys] + ["n", "diverged"]
          + [f"{s} {metric} (mean ± 2std)" for s in scores])
  out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
  best = summary.get("best")
  for row in summary["rows"]:
    cells = [f"{_fmt(row['mean'])} ± {_fmt(row['two_std'])}"]
    if split != "validation":
      cells.append(f"{_fmt(row['val_mean'])} ± {_fmt(row['val_two_std'])}")
    if row["point"] == best and len(summary["rows"]) > 1:
      cells[0] = f"**{cells[0]}**"
    out.append("| " + " | ".join([format_value(row["point"][k]) for k in keys]
                                 + [str(row["n"]), str(row.get("diverged", 0))] + cells) + " |")
  text = "\n".join(out) + "\n"
  text += (f"\nEach run: the {split} score of its best checkpoint on validation; diverged runs "
           "count as 0. Bold: the point with the best mean validation score.\n")
  if summary.get("failed"):
    text += f"\n{len(summary['failed'])} failed run(s) not included:\n"
    for f in summary["failed"]:
      text += f"- {point_name(f.get('point') or {})} seed {f.get('seed')}: {f.get('reason')}\n"
  return text


def plot_summary(summary: dict, workdir: str, x: Optional[str] = None,
                 lines: Optional[str] = None, logx: Optional[bool] = None) -> str:
  """The metric against one swept axis, one line per value of the others, error bars 2 std."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = summary["keys"]
  if x is not None:
    x = _strip_config_prefix(x)
    if x not in keys:
      raise SweepError(f"plot axis {x!r} is not a swept key ({', '.join(keys)})")
  else:
    lr = [k for k in keys if k.split(".")[-1] == "learning_rate"]
    x = lr[0] if lr else keys[0]
  if lines is not None:
    lines = _strip_config_prefix(lines)
    if lines not in keys or lines == x:
      raise SweepError(f"line axis {lines!r} must be a swept key other than {x!r}")
    line_keys = [lines] + [k for k in keys if k not in (x, lines)]
  else:
    line_keys = [k for k in keys if k != x]
  names = short_names(keys)
  xs_all = [row["point"][x] for row in summary["rows"]]
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
  if logx is None:
    logx = numeric and x.split(".")[-1] == "learning_rate" and all(v > 0 for v in xs_all)
  if logx and not (numeric and all(v > 0 for v in xs_all)):
    raise SweepError(f"log x-axis needs positive numeric values of {x!r}")
  cats = sorted({format_value(v) for v in xs_all}, key=_sort_key)

  series: Dict[tuple, list] = {}
  for row in summary["rows"]:
    series.setdefault(tuple(row["point"][k] for k in line_keys), []).append(row)
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for lk in sorted(series, key=lambda t: tuple(_sort_key(format_value(v)) for v in t)):
    rs = sorted(series[lk], key=lambda r: _sort_key(format_value(r["point"][x])))
    xv = [r["point"][x] if numeric else cats.index(format_value(r["point"][x])) for r in rs]
    label = ", ".join(f"{names[k]}={format_value(v)}" for k, v in zip(line_keys, lk)) or None
    ax.errorbar(xv, [r["mean"] for r in rs], yerr=[r["two_std"] for r in rs], marker="o",
                capsize=3, label=label)
  if logx:
    ax.set_xscale("log")
  if not numeric:
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats)
  ax.set_xlabel(names[x])
  ax.set_ylabel(f"{summary.get('split', 'validation')} {summary['metric']}")
  ns = sorted({r["n"] for r in summary["rows"]})
  ax.set_title(f"{summary.get('split', 'validation')} {summary['metric']} of the best checkpoint "
               f"vs {names[x]}\n(mean ± 2 std, n={'/'.join(map(str, ns))}, diverged runs as 0)",
               fontsize=9)
  if line_keys:
    ax.legend(fontsize=8)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, f"metric_vs_{_UNSAFE.sub('_', names[x])}.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- command line


def build_parser():
  import argparse
  p = argparse.ArgumentParser(
      prog="sweep.py", description="Run train.py over a grid x seeds (resumable) and aggregate.")
  p.add_argument("--config", help="configs/<file>.py[:<variant>]")
  p.add_argument("--workdir", help="sweep directory (one subdir per point/seed)")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                 help="a swept config field and its values (repeatable)")
  p.add_argument("--seeds", default="0", help="comma separated seeds (train.seed), default 0")
  p.add_argument("--set", action="append", default=[], metavar="config.FIELD=VALUE",
                 help="a fixed override for every run (repeatable)")
  p.add_argument("--use_config_grid", action="store_true",
                 help="take the grid from the config file's GRID (for the variant's method)")
  p.add_argument("--select_split", default=None, metavar="SPLIT|none",
                 help="evaluate each point's best checkpoint on validation on this split and "
                 "report that score (default test, seed 000's protocol; with --aggregate_only "
                 "the sweep's own); none: skip, report the best validation score")
  p.add_argument("--aggregate_only", action="store_true",
                 help="do not run; aggregate the results already in --workdir")
  p.add_argument("--dry_run", action="store_true", help="print the points and commands only")
  p.add_argument("--x", default=None, help="plot x axis (default: the learning rate)")
  p.add_argument("--lines", default=None, help="plot: one line per value of this key")
  p.add_argument("--no_plot", action="store_true")
  p.add_argument("--report", default=None, metavar="DIR[,DIR...]",
                 help="do not run; write the papers' tables and figures from finished sweeps "
                      "(peft_jax/report.py)")
  p.add_argument("--report_out", default=None,
                 help="where --report writes report.md/json and PNGs (default: <sweep>/report)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.report is not None:
      from peft_jax import report
      return report.main(args.report, args.report_out)
    if not args.workdir:
      raise SweepError("--workdir is required (the sweep directory), or --report=DIR[,DIR...]")
    if not args.aggregate_only:
      if not args.config:
        raise SweepError("--config is required (configs/<file>.py[:<variant>])")
      mod, _, variant = load_config_module(args.config)
      cfg = build_config(mod, variant, args.config)
      grid: Dict[str, list] = {}
      if args.use_config_grid:
        grid.update(config_grid(mod, variant, cfg))
      for g in args.grid:
        k, vs = parse_grid_arg(g)
        grid[k] = vs
      sets = dict(parse_set_arg(s) for s in args.set)
      seeds = parse_seeds(args.seeds)
      check_points(args.config, grid, seeds, sets)
      split = check_split_name(args.select_split or "test")
      if args.dry_run:
        for p in expand_grid(grid, seeds):
          pdir = os.path.join(args.workdir, p["name"], f"seed{p['seed']}")
          print(" ".join(train_command(args.config, pdir, p["overrides"], p["seed"], sets)))
          if split != "none":
            print(" ".join(eval_command(pdir, split)))
        return 0
      status = run_sweep(args.config, args.workdir, grid, seeds, sets, select_split=split)
      if not status["done"] and not status["skipped"] and not status["diverged"]:
        print(f"error: every run failed; see {args.workdir}/*/seed*/failed.json", file=sys.stderr)
        return 1
    summary = aggregate(args.workdir, x=args.x, lines=args.lines, plot=not args.no_plot,
                        select_split=args.select_split)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(open(os.path.join(args.workdir, "summary.md")).read().rstrip())
  if summary.get("plot"):
    print(f"plot: {summary['plot']}")
  out = {"metric": summary["metric"], "split": summary["split"], "best": summary["best"],
         "best_mean": summary["best_mean"], "best_val_mean": summary["best_val_mean"],
         "num_results": summary["num_results"], "diverged": summary["num_diverged"],
         "failed": len(summary["failed"]),
         "summary": os.path.join(args.workdir, "summary.json")}
  print(json.dumps(out))
  return 1 if summary["failed"] else 0
