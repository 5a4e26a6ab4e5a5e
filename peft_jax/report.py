"""The papers' tables and figures from finished sweeps: ``sweep.py --report=DIR[,DIR...]``.

Input: one or more sweep directories in :mod:`peft_jax.grid_search`'s layout
(``<sweep>/sweep.json``, ``<sweep>/<point>/seed<k>/result.json``). Each result becomes a
:class:`Run` holding

* its *setting*: the config file's stem and variant, the sweep's ``--set`` values and the
  point's overrides (the seed aside). Runs of one setting are the seeds of one
  experiment, also when they come from several sweep directories;
* its *facts*, what places it in a table (method, model, data set, data size, number of
  training tasks, LoRA rank / adapter size, learning rate): the run's ``config.json``
  (the resolved config the trainer wrote), else the config file itself with the sweep's
  ``--set`` values and the point's overrides. The method's name is the variant's
  (``adapter``, ``lora_qv``, ``lora_drop_qo``: the config file's ``METHODS`` /
  ``ABLATIONS``), else ``peft.method``;
* one score (:func:`score_of`): the test score of the best-on-validation checkpoint when
  the result has one (``test_<metric>`` or ``test``), else the best validation score
  (``best``), else the final validation score (``tuned``). A diverged run
  (``diverged: true``, or a ``failed.json`` whose run exited with train.py's divergence
  status 3) scores 0 and is counted, as seed 000 counts instability; a run that failed
  otherwise is listed, not counted.

Which shapes apply is read from the runs, so one command works on any sweep:

* seed 000 (config ``superni``, or data set ``superni``): Table 1 (the best setting of
  each method, with its searched and best hyper-parameters and % trainable = trainable /
  total parameters); Figure 1a (score vs LoRA rank / adapter size, one line per method,
  the best learning rate at each size) and 1b (LoRA score vs rank, one line per learning
  rate) when a method has two ranks or sizes; Figure 2a/2b (vs model size: per method, and
  LoRA per rank) with two models; Figure 3a/3b (vs ``data.num_train_tasks``) with two
  numbers of training tasks. Table 1 and Figure 1 use the most common (model, number of
  tasks); Figure 2 holds the number of tasks there, Figure 3 the model;
* seed 002 (config ``flan_t5``, or ``data.size`` low/medium/high): per method x data size
  x task, Table 1 (scores), Table 4 (convergence epoch; runtime), Table 5 (score per
  hundred thousand trainable parameters), Table 6 (score per minute of runtime) and
  Figure 1 (runtime relative to full tuning's on the same task and size; absolute seconds
  where a cell has no full tuning). Runtime is the trainer's ``train_seconds`` (steady-
  state step time: no compilation, evaluation or checkpointing; see
  ``trainer._StepClock``); a result without it shows ``-``;
* seed 003 (config ``survey``, or data sets boolq/rte/copa/cnn_dailymail): per-dataset
  scores (method x model x data set) and Table 4: per method and model the mean over data
  sets of the per-dataset mean, ± 2 pooled std, with the **pooled standard deviation**
  ``sqrt(mean_d var_d)``, ``var_d`` the sample variance (ddof=1) over seeds of data set
  ``d`` (the survey's "Euclidean mean of per-dataset variances"; a data set with one seed
  contributes variance 0). A method missing some data sets is marked;
* every report also has the generic table (every setting of every sweep) and, per sweep
  with a grid, a plot; runs of no known shape get only those.

Model selection: a table cell (e.g. one method at one data size on one task) reports the
setting with the highest mean score over seeds, as the papers report the best point of
their learning-rate sweeps. Statistics: mean ± 2 sample standard deviations (ddof=1) over
seeds (one seed: ± 0, n=1); per-seed quantities (score per parameter, per minute, relative
runtime) are computed per seed, then averaged. Plots show the mean with 2-std error bars
and one dot per seed. Scores are the trainer's fractions; seeds 000 and 003 print them x100
(their papers' percent), seed 002 as fractions (as its tables do).

Writes ``report.md``, ``report.json`` (every number in the tables) and the PNGs to
``--report_out`` (default: ``<sweep>/report`` for one sweep, ``<common parent>/report``
for several).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from peft_jax import grid_search
from peft_jax.grid_search import SweepError, format_value, mean_std, parse_value

FAMILIES = {"superni": "000", "flan_t5": "002", "survey": "003"}
SURVEY_TASKS = ("boolq", "rte", "copa", "cnn_dailymail")
SIZES = ("low", "medium", "high")
CAPACITY = {"lora": "peft.r", "adalora": "peft.r"}        # else peft.bottleneck_size
LR = "train.learning_rate"
TASKS_KEY = "data.num_train_tasks"


# ----------------------------------------------------------------------------- scores


def _num(x) -> Optional[float]:
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return None
  return float(x) if math.isfinite(x) else None


def score_of(result: dict) -> Tuple[Optional[float], str]:
  """``(score, source)`` of one result: 0 for a diverged run; else the test score of the
  best-on-validation checkpoint (``test_<metric>``, or ``test`` as a number or a dict
  holding the metric); else the best validation score (``best``); else ``tuned``."""
  if result.get("diverged"):
    return 0.0, "diverged"
  metric = str(result.get("metric", ""))
  test = result.get("test")
  if isinstance(test, dict):
    test = test.get(metric)
  for v in (result.get(f"test_{metric}"), test):
    if _num(v) is not None:
      return _num(v), "test"
  if _num(result.get("best")) is not None:
    return _num(result["best"]), "validation (best)"
  if _num(result.get("tuned")) is not None:
    return _num(result["tuned"]), "validation (final)"
  return None, "none"


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
  sweep: str
  config: str                   # as given to sweep.py: path[:variant]
  stem: str                     # the config file's stem (superni, flan_t5, ...)
  variant: str
  sets: Dict[str, str]
  point: Dict[str, Any]
  seed: int
  facts: Dict[str, Any]         # flattened config values (model.name, peft.r, ...)
  method: str
  result: dict
  score: Optional[float]
  source: str

  @property
  def diverged(self) -> bool:
    return bool(self.result.get("diverged"))

  @property
  def setting(self) -> tuple:
    return (self.stem, self.variant, tuple(sorted(self.sets.items())),
            tuple(sorted((k, format_value(v)) for k, v in self.point.items())))

  def get(self, key, default=None):
    return self.facts.get(key, default)


def _flat(d: dict, prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _config_path(config: str, sweep: str) -> Optional[str]:
  path, _ = grid_search.split_config_arg(config)
  for cand in (path, os.path.join(os.path.dirname(os.path.abspath(sweep)), path),
               os.path.join(grid_search.REPO, path),
               os.path.join(grid_search.REPO, "configs", os.path.basename(path))):
    if cand and os.path.isfile(cand):
      return cand
  return None


_MODULES: Dict[str, Any] = {}


def _module(config: str, sweep: str):
  """The config file's module (cached), or None when it cannot be found or imported."""
  path = _config_path(config, sweep)
  if path is None:
    return None
  if path not in _MODULES:
    try:
      _MODULES[path] = grid_search.load_config_module(path)[0]
    except SweepError:
      _MODULES[path] = None
  return _MODULES[path]


def _names(mod, attr: str) -> List[str]:
  v = getattr(mod, attr, None) if mod is not None else None
  return [str(x) for x in v] if isinstance(v, (dict, tuple, list)) else []


def _facts(config: str, sweep: str, run_dir: str, sets: dict, point: dict) -> Dict[str, Any]:
  path = os.path.join(run_dir, "config.json")
  if os.path.isfile(path):
    try:
      with open(path) as f:
        return _flat(json.load(f).get("config", {}))
    except (OSError, ValueError):
      pass
  facts: Dict[str, Any] = {}
  mod = _module(config, sweep)
  if mod is not None:
    _, variant = grid_search.split_config_arg(config)
    try:
      cfg = grid_search.build_config(mod, variant, config)
      facts = _flat(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    except SweepError:
      facts = {}
  for k, v in list(sets.items()) + list(point.items()):
    facts[k] = parse_value(v) if isinstance(v, str) else v
  return facts


def _method(config: str, sweep: str, facts: dict, point: dict) -> str:
  if "peft.method" in point:
    return str(point["peft.method"])
  _, variant = grid_search.split_config_arg(config)
  mod = _module(config, sweep)
  known = _names(mod, "METHODS") + _names(mod, "ABLATIONS")
  for part in (p.strip() for p in variant.split(",")):
    if part in known:
      return part
  return str(facts.get("peft.method") or "?")


def load_runs(sweeps: Sequence[str]) -> Tuple[List[Run], List[dict]]:
  """Every result of the sweeps as a :class:`Run`, and the failed runs' records."""
  runs: List[Run] = []
  failed: List[dict] = []
  for sweep in sweeps:
    if not os.path.isdir(sweep):
      raise SweepError(f"--report: sweep directory {sweep!r} does not exist")
    spec = {}
    spec_path = os.path.join(sweep, "sweep.json")
    if os.path.isfile(spec_path):
      with open(spec_path) as f:
        spec = json.load(f)
    results, fails = grid_search.collect(sweep)
    for f in fails:
      if diverged_failure(f):     # before train.py reports divergence as a result
        results.append({"diverged": True, "point": f.get("point") or {}, "seed": f.get("seed", 0),
                        "config": spec.get("config", ""), "from_failed_json": True,
                        "_dir": os.path.join(sweep, grid_search.point_name(f.get("point") or {}),
                                             f"seed{f.get('seed', 0)}")})
      else:
        failed.append({**f, "sweep": sweep})
    split = spec.get("select_split", "test")
    for r in results:
      # the sweep's evaluation of the best-on-validation checkpoint (grid_search writes
      # <point>/seed<k>/<split>.json): the score the paper reports
      spath = os.path.join(r["_dir"], f"{split}.json")
      if split == "test" and not r.get("diverged") and os.path.isfile(spath):
        with open(spath) as f:
          sel = json.load(f)
        if _num(sel.get("score")) is not None:
          r["test"], r["test_step"] = float(sel["score"]), sel.get("step")
      config = str(r.get("config") or spec.get("config") or "")
      sets = {k: str(v) for k, v in (spec.get("set") or {}).items()}
      point = dict(r.get("point") or {})
      facts = _facts(config, sweep, r["_dir"], sets, point)
      path, variant = grid_search.split_config_arg(config)
      if "metric" not in r and facts.get("eval.metric"):
        r["metric"] = facts["eval.metric"]
      score, source = score_of(r)
      runs.append(Run(sweep=sweep, config=config,
                      stem=os.path.splitext(os.path.basename(path))[0], variant=variant,
                      sets=sets, point=point, seed=int(r.get("seed", 0)), facts=facts,
                      method=_method(config, sweep, facts, point), result=r, score=score,
                      source=source))
  if not runs:
    raise SweepError(f"--report: no results in {', '.join(sweeps)} (no */seed*/result.json)")
  return runs, failed


def diverged_failure(failed: dict) -> bool:
  """A ``failed.json`` of a run that diverged (train.py's exit status 3, "training
  diverged" in its stderr): counted as a diverged seed, not as a failure."""
  return failed.get("returncode") == 3 and "training diverged" in str(failed.get("stderr_tail", ""))


def family(run: Run) -> str:
  """``000``, ``002``, ``003`` (the seed whose shapes apply) or ``""``."""
  if run.stem in FAMILIES:
    return FAMILIES[run.stem]
  data = str(run.get("data.name", ""))
  if data == "superni":
    return "000"
  if str(run.get("data.size", "")) in SIZES:
    return "002"
  if data in SURVEY_TASKS:
    return "003"
  return ""


# ----------------------------------------------------------------------------- statistics


def stats(values: Sequence[float]) -> dict:
  """Mean, sample std (ddof=1), 2 std, n and the values."""
  vals = [float(v) for v in values]
  if not vals:
    return {"mean": None, "std": None, "two_std": None, "n": 0, "values": []}
  m, s = mean_std(vals)
  return {"mean": m, "std": s, "two_std": 2 * s, "n": len(vals), "values": vals}


def pooled(cells: Sequence[dict]) -> dict:
  """Seed 003's aggregate over data sets: the mean of the per-dataset means and the pooled
  std ``sqrt(mean_d var_d)`` (``var_d``: per-dataset sample variance over seeds)."""
  cells = [c for c in cells if c["n"]]
  if not cells:
    return {"mean": None, "pooled_std": None, "two_std": None, "datasets": 0}
  m = sum(c["mean"] for c in cells) / len(cells)
  ps = math.sqrt(sum(c["std"] ** 2 for c in cells) / len(cells))
  return {"mean": m, "pooled_std": ps, "two_std": 2 * ps, "datasets": len(cells)}


def settings(runs: Sequence[Run]) -> List[List[Run]]:
  """Runs grouped by setting (the seeds of one experiment), each sorted by seed."""
  groups: Dict[tuple, List[Run]] = {}
  for r in runs:
    groups.setdefault(r.setting, []).append(r)
  return [sorted(g, key=lambda r: r.seed) for g in groups.values()]


def _scores(group: Sequence[Run]) -> List[float]:
  return [r.score for r in group if r.score is not None]


def best_setting(runs: Sequence[Run]) -> List[Run]:
  """The setting with the highest mean score over seeds (ties: the first in sort order)."""
  groups = [g for g in settings(runs) if _scores(g)]
  if not groups:
    return []
  groups.sort(key=lambda g: g[0].setting)
  return max(groups, key=lambda g: stats(_scores(g))["mean"])


def best_cells(runs: Sequence[Run], methods, key: str, values, tasks) -> Dict[tuple, List[Run]]:
  """``{(method, value of key, task): the runs of its best setting}`` for the cells that
  have runs (``key``: the row's second coordinate, e.g. ``data.size`` or ``model.name``)."""
  cells: Dict[tuple, List[Run]] = {}
  for m in methods:
    for v in values:
      for t in tasks:
        sel = best_setting([r for r in runs if r.method == m and str(r.get(key)) == v
                            and str(r.get("data.name")) == t])
        if sel:
          cells[(m, v, t)] = sel
  return cells


def _diverged(group: Sequence[Run]) -> int:
  return sum(r.diverged for r in group)


def _per_seed(group: Sequence[Run], fn) -> List[float]:
  out = []
  for r in group:
    v = fn(r)
    if v is not None and math.isfinite(v):
      out.append(v)
  return out


def per_100k_params(r: Run) -> Optional[float]:
  p = _num(r.result.get("trainable_params"))
  return None if r.score is None or not p else r.score / (p / 1e5)


def per_minute(r: Run) -> Optional[float]:
  t = _num(r.result.get("train_seconds"))
  return None if r.score is None or not t else r.score / (t / 60.0)


# ----------------------------------------------------------------------------- formatting


def _f(x: Optional[float], scale: float = 1.0, digits: int = 4) -> str:
  if x is None:
    return "-"
  x *= scale
  if x != 0 and abs(x) < 1e-3:
    return f"{x:.3e}"
  return f"{x:.{digits}f}"


def pm(s: dict, scale: float = 1.0, digits: int = 4) -> str:
  if not s or s.get("mean") is None:
    return "-"
  return f"{_f(s['mean'], scale, digits)} ± {_f(s['two_std'], scale, digits)}"


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(out) + "\n"


def _short(key: str) -> str:
  return key.split(".")[-1]


def _scale(runs: Sequence[Run], percent: bool) -> Tuple[float, int]:
  """x100 and 2 decimals for the papers that print percent (when scores are fractions)."""
  if percent and all(r.score is None or r.score <= 1.0 for r in runs):
    return 100.0, 2
  return 1.0, 4


def _order(values, preferred: Sequence[str] = ()) -> list:
  pref = [p for p in preferred if p in values]
  rest = sorted((v for v in values if v not in pref), key=lambda v: grid_search._sort_key(str(v)))
  return pref + rest


def _model_order(runs: Sequence[Run]) -> List[str]:
  sizes: Dict[str, List[float]] = {}
  for r in runs:
    sizes.setdefault(str(r.get("model.name")), []).append(
        _num(r.result.get("total_params")) or 0.0)
  return sorted(sizes, key=lambda m: (sum(sizes[m]) / len(sizes[m]), m))


# ----------------------------------------------------------------------------- plots


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(plt, fig, path: str) -> str:
  """Lays out, writes the PNG and frees the figure; returns its path."""
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def line_plot(path: str, title: str, xlabel: str, ylabel: str,
              series: Dict[str, Dict[Any, List[float]]], xorder: Sequence[Any],
              logx: bool = False, scale: float = 1.0) -> str:
  """One line per series: mean ± 2 std at each x, and one dot per seed. ``xorder``:
  numeric x values (plotted at their value) or labels (plotted in this order)."""
  plt = _plt()
  numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xorder)
  pos = {x: (x if numeric else i) for i, x in enumerate(xorder)}
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for k, (label, pts) in enumerate(series.items()):
    xs = [x for x in xorder if x in pts and pts[x]]
    if not xs:
      continue
    st = [stats(pts[x]) for x in xs]
    line = ax.errorbar([pos[x] for x in xs], [s["mean"] * scale for s in st],
                       yerr=[s["two_std"] * scale for s in st], marker="o", capsize=3,
                       label=label)
    color = line[0].get_color()
    for x in xs:
      jitter = (0.0 if numeric else 0.06 * (k - (len(series) - 1) / 2))
      ax.scatter([pos[x] + jitter] * len(pts[x]), [v * scale for v in pts[x]], s=12,
                 color=color, alpha=0.45, zorder=3)
  if logx and numeric:
    ax.set_xscale("log", base=2)
  if numeric:
    ax.set_xticks(list(xorder))
    ax.set_xticklabels([format_value(x) for x in xorder])
  else:
    ax.set_xticks(range(len(xorder)))
    ax.set_xticklabels([str(x) for x in xorder])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  if len(series) > 1 or any(series):
    ax.legend(fontsize=8)
  ax.grid(True, alpha=0.3)
  return _save(plt, fig, path)


def bar_panels(path: str, title: str, ylabels: Dict[str, str],
               panels: Dict[str, Dict[str, Dict[str, List[float]]]], groups: Sequence[str],
               bars: Sequence[str]) -> str:
  """``panels[panel][bar][group]`` per-seed values: grouped bars (mean, 2-std error bar)
  with one dot per seed, one panel each (y label ``ylabels[panel]``)."""
  plt = _plt()
  fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4.2),
                           squeeze=False)
  width = 0.8 / max(len(bars), 1)
  for ax, (pname, data) in zip(axes[0], panels.items()):
    for j, b in enumerate(bars):
      xs, ms, es = [], [], []
      for i, g in enumerate(groups):
        vals = data.get(b, {}).get(g) or []
        if not vals:
          continue
        s = stats(vals)
        x = i - 0.4 + width * (j + 0.5)
        xs.append(x)
        ms.append(s["mean"])
        es.append(s["two_std"])
        ax.scatter([x] * len(vals), vals, s=10, color="k", alpha=0.5, zorder=3)
      if xs:
        ax.bar(xs, ms, width=width * 0.95, yerr=es, capsize=2, label=b)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups))
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_title(pname)
    ax.set_ylabel(ylabels[pname])
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  return _save(plt, fig, path)


# ----------------------------------------------------------------------------- seed 000


def _capacity_key(r: Run) -> Optional[str]:
  key = CAPACITY.get(str(r.get("peft.method")), "peft.bottleneck_size")
  return key if r.get(key) is not None else None


def _mode(values: Sequence[Any]):
  counts: Dict[Any, int] = {}
  for v in values:
    counts[v] = counts.get(v, 0) + 1
  return max(counts, key=lambda v: (counts[v], -list(counts).index(v)))


def _tasks_label(v) -> str:
  return "all" if v in (None, "", 0) else str(v)


def _tasks_order(values) -> list:
  return sorted(values, key=lambda v: (v in (None, "", 0), v if isinstance(v, (int, float)) else 0))


def report_000(runs: List[Run], out: str) -> Tuple[str, dict, List[str]]:
  scale, digits = _scale(runs, percent=True)
  metric = _mode([str(r.result.get("metric", "score")) for r in runs])
  ylabel = f"{metric}{' (x100)' if scale == 100 else ''}"
  mod = _module(runs[0].config, runs[0].sweep)
  methods = _order({r.method for r in runs}, _names(mod, "METHODS"))
  main_model, main_tasks = _mode([(str(r.get("model.name")), r.get(TASKS_KEY)) for r in runs])
  main = [r for r in runs if (str(r.get("model.name")), r.get(TASKS_KEY)) == (main_model, main_tasks)]
  md, data, pngs = [], {}, []
  # Table 1
  rows, table = [], []
  for m in methods:
    mr = [r for r in main if r.method == m]
    if not mr:
      continue
    best = best_setting(mr)
    swept = sorted({k for r in mr for k in r.point})
    searched = "; ".join(f"{_short(k)} ∈ {{{', '.join(_order({format_value(r.point[k]) for r in mr if k in r.point}))}}}"
                         for k in swept) or "-"
    besthp = ", ".join(f"{_short(k)}={format_value(v)}" for k, v in sorted(best[0].point.items())) if best else "-"
    tp = [_num(r.result.get("trainable_params")) for r in best]
    tot = [_num(r.result.get("total_params")) for r in best]
    pct = 100.0 * tp[0] / tot[0] if best and tp[0] and tot[0] else None
    s = stats(_scores(best))
    all_div, all_n = _diverged(mr), len(mr)
    table.append({"method": m, "searched": {k: _order({format_value(r.point[k]) for r in mr if k in r.point}) for k in swept},
                  "best": best[0].point if best else None, "trainable_percent": pct, **s,
                  "diverged": _diverged(best), "diverged_all": all_div, "runs_all": all_n,
                  "settings": len(settings(mr))})
    rows.append([m, searched, besthp, "-" if pct is None else f"{pct:.3g}%", pm(s, scale, digits),
                 str(s["n"]), f"{_diverged(best)}/{len(best)}", f"{all_div}/{all_n}"])
  md.append(f"### Seed 000, Table 1: best setting per method (model {main_model}, "
            f"{_tasks_label(main_tasks)} training tasks)\n\n"
            "Best = highest mean score over seeds; % trainable = trainable / total parameters.\n\n"
            + md_table(["method", "searched", "best", "% trainable", f"best {ylabel} (mean ± 2std)",
                        "n", "diverged (best)", "diverged (all)"], rows))
  data["table1"] = table
  # Figure 1a / 1b
  fig1 = {}
  for m in methods:
    mr = [r for r in main if r.method == m and _capacity_key(r)]
    caps = {r.get(_capacity_key(r)) for r in mr}
    if len(caps) >= 2:
      fig1[m] = {c: _scores(best_setting([r for r in mr if r.get(_capacity_key(r)) == c])) for c in caps}
  if fig1:
    xs = sorted({c for v in fig1.values() for c in v})
    pngs.append(line_plot(os.path.join(out, "seed000_figure1a.png"),
                          "Seed 000 Fig. 1a: score vs LoRA rank / adapter size (best lr each)",
                          "LoRA rank / adapter size", ylabel,
                          {m: v for m, v in fig1.items()}, xs, logx=True, scale=scale))
    data["figure1a"] = {m: {format_value(c): stats(v) for c, v in d.items()} for m, d in fig1.items()}
    lora = [r for r in main if str(r.get("peft.method")) == "lora" and r.get(LR) is not None]
    ranks = sorted({r.get("peft.r") for r in lora})
    if len(ranks) >= 2:
      lrs = sorted({r.get(LR) for r in lora})
      series = {f"lr={format_value(lr)}": {k: _scores(best_setting([r for r in lora if r.get(LR) == lr and r.get("peft.r") == k]))
                                           for k in ranks} for lr in lrs}
      pngs.append(line_plot(os.path.join(out, "seed000_figure1b.png"),
                            "Seed 000 Fig. 1b: LoRA score vs rank, per learning rate",
                            "LoRA rank", ylabel, series, ranks, logx=True, scale=scale))
      data["figure1b"] = {lab: {format_value(k): stats(v) for k, v in d.items()} for lab, d in series.items()}
  # Figure 2 (model size) and 3 (number of training tasks)
  for name, key, fixed_key, fixed, xlabel in (
      ("figure2", "model.name", TASKS_KEY, main_tasks, "model"),
      ("figure3", TASKS_KEY, "model.name", main_model, "training tasks")):
    sub = [r for r in runs if (str(r.get(fixed_key)) if fixed_key == "model.name" else r.get(fixed_key)) == fixed]
    val = (lambda r: str(r.get("model.name"))) if key == "model.name" else (lambda r: r.get(TASKS_KEY))
    xs = _model_order(sub) if key == "model.name" else _tasks_order({val(r) for r in sub})
    if len(xs) < 2:
      continue
    labels = xs if key == "model.name" else [_tasks_label(x) for x in xs]
    series_a = {}
    for m in methods:
      pts = {lab: _scores(best_setting([r for r in sub if r.method == m and val(r) == x]))
             for x, lab in zip(xs, labels)}
      if sum(bool(v) for v in pts.values()) >= 1:
        series_a[m] = pts
    tag = "2" if name == "figure2" else "3"
    pngs.append(line_plot(os.path.join(out, f"seed000_{name}a.png"),
                          f"Seed 000 Fig. {tag}a: score vs {xlabel} per method (best setting each)",
                          xlabel, ylabel, series_a, labels, scale=scale))
    data[f"{name}a"] = {m: {x: stats(v) for x, v in d.items()} for m, d in series_a.items()}
    lora = [r for r in sub if str(r.get("peft.method")) == "lora"]
    ranks = sorted({r.get("peft.r") for r in lora if r.get("peft.r") is not None})
    if lora and ranks:
      series_b = {f"r={k}": {lab: _scores(best_setting([r for r in lora if r.get("peft.r") == k and val(r) == x]))
                             for x, lab in zip(xs, labels)} for k in ranks}
      pngs.append(line_plot(os.path.join(out, f"seed000_{name}b.png"),
                            f"Seed 000 Fig. {tag}b: LoRA score vs {xlabel}, per rank (best lr each)",
                            xlabel, ylabel, series_b, labels, scale=scale))
      data[f"{name}b"] = {k: {x: stats(v) for x, v in d.items()} for k, d in series_b.items()}
  if pngs:
    md.append("Figures: " + ", ".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs) + "\n")
  return "\n".join(md), data, pngs


# ----------------------------------------------------------------------------- seed 002


def report_002(runs: List[Run], out: str) -> Tuple[str, dict, List[str]]:
  mod = _module(runs[0].config, runs[0].sweep)
  methods = _order({r.method for r in runs}, _names(mod, "METHODS") + _names(mod, "ABLATIONS"))
  tasks = _order({str(r.get("data.name")) for r in runs}, _names(mod, "TASKS"))
  sizes = _order({str(r.get("data.size")) for r in runs}, SIZES)
  cells = best_cells(runs, methods, "data.size", sizes, tasks)
  row_keys = [(m, z) for z in sizes for m in methods if any((m, z, t) in cells for t in tasks)]

  def table(title, fn, note, fmt=pm):
    rows, data = [], []
    for m, z in row_keys:
      row = [f"{m} ({z})"]
      div = n = 0
      for t in tasks:
        g = cells.get((m, z, t))
        if not g:
          row.append("")
          continue
        s = fn(g)
        div, n = div + _diverged(g), n + len(g)
        row.append(fmt(s))
        data.append({"method": m, "size": z, "task": t, **(s if isinstance(s, dict) else {"value": s}),
                     "diverged": _diverged(g), "seeds": len(g), "point": g[0].point})
      rows.append(row + [f"{n} ({div})"])
    return (f"### Seed 002, {title}\n\n{note}\n\n"
            + md_table(["method (size)"] + tasks + ["seeds (diverged)"], rows)), data

  md, data, pngs = [], {}, []
  t, data["table1"] = table("Table 1: score per method x data size x task", lambda g: stats(_scores(g)),
                            "Mean ± 2 std over seeds of the selected score.")
  md.append(t)

  def conv(g):
    return {"epoch": stats(_per_seed(g, lambda r: _num(r.result.get("convergence_epoch")))),
            "seconds": stats(_per_seed(g, lambda r: _num(r.result.get("train_seconds"))))}

  def conv_fmt(s):
    return f"Ep. {pm(s['epoch'], 1, 1)}; {pm(s['seconds'], 1, 1)} s"

  t, data["table4"] = table("Table 4: convergence epoch; runtime (seconds)", conv,
                            "Epoch (1-based) of the lowest validation loss (early stopping's "
                            "criterion); runtime = train_seconds (steady-state steps, no "
                            "compilation, evaluation or checkpointing).", conv_fmt)
  md.append(t)
  t, data["table5"] = table("Table 5: score per hundred thousand trainable parameters",
                            lambda g: stats(_per_seed(g, per_100k_params)),
                            "score / (trainable_params / 1e5), per seed.")
  md.append(t)
  t, data["table6"] = table("Table 6: score per minute of runtime",
                            lambda g: stats(_per_seed(g, per_minute)),
                            "score / (train_seconds / 60), per seed.")
  md.append(t)
  # Figure 1: runtime relative to full tuning's (a panel per data size, a group per task, a
  # bar per method); a panel where some task lacks full tuning shows seconds instead
  panels: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
  ylabels: Dict[str, str] = {}

  def secs_of(g):
    return _per_seed(g, lambda r: _num(r.result.get("train_seconds")))

  for z in sizes:
    ref: Dict[str, Optional[float]] = {}
    for tk in tasks:
      full = [m for m in methods if (m, z, tk) in cells
              and str(cells[(m, z, tk)][0].get("peft.method")) == "full" and secs_of(cells[(m, z, tk)])]
      ref[tk] = stats(secs_of(cells[(full[0], z, tk)]))["mean"] if full else None
    used = [tk for tk in tasks if any((m, z, tk) in cells for m in methods)]
    relative = all(ref[tk] for tk in used)
    panel: Dict[str, Dict[str, List[float]]] = {}
    for m in methods:
      for tk in used:
        g = cells.get((m, z, tk))
        vals = [v / ref[tk] for v in secs_of(g)] if g and relative else (secs_of(g) if g else [])
        if vals:
          panel.setdefault(m, {})[tk] = vals
    if panel:
      panels[z] = panel
      ylabels[z] = "runtime / full tuning's" if relative else "runtime (s)"
  if panels:
    pngs.append(bar_panels(os.path.join(out, "seed002_figure1.png"),
                           "Seed 002 Fig. 1: runtime (train_seconds) relative to full tuning's "
                           "(mean ± 2 std, dots: seeds)", ylabels, panels, tasks, methods))
    data["figure1"] = {"relative": {z: ylabels[z] != "runtime (s)" for z in panels},
                       "values": {z: {m: {tk: stats(v) for tk, v in d.items()} for m, d in p.items()}
                                  for z, p in panels.items()}}
    md.append("Figure 1: ![seed002_figure1.png](seed002_figure1.png) (runtime relative to full "
              "tuning's on the same task and data size; in seconds for "
              + (", ".join(z for z in panels if ylabels[z] == "runtime (s)") or "no size")
              + ", where a task lacks full tuning)\n")
  return "\n".join(md), data, pngs


# ----------------------------------------------------------------------------- seed 003


def report_003(runs: List[Run], out: str) -> Tuple[str, dict, List[str]]:
  scale, digits = _scale(runs, percent=True)
  mod = _module(runs[0].config, runs[0].sweep)
  methods = _order({r.method for r in runs}, _names(mod, "METHODS"))
  tasks = _order({str(r.get("data.name")) for r in runs}, SURVEY_TASKS)
  models = _model_order(runs)
  cells = best_cells(runs, methods, "model.name", models, tasks)
  rows, per_ds = [], []
  for m in methods:
    for mo in models:
      if not any((m, mo, t) in cells for t in tasks):
        continue
      row = [m, mo]
      for t in tasks:
        g = cells.get((m, mo, t))
        s = stats(_scores(g)) if g else None
        row.append(f"{pm(s, scale, digits)} (n={s['n']}, div {_diverged(g)})" if g else "")
        if g:
          per_ds.append({"method": m, "model": mo, "task": t, **s, "diverged": _diverged(g),
                         "point": g[0].point})
      rows.append(row)
  md = [f"### Seed 003, per-dataset scores (mean ± 2 std over seeds; x{scale:g})\n\n"
        + md_table(["method", "model"] + tasks, rows)]
  rows4, table4 = [], []
  for m in methods:
    row = [m]
    div = n = 0
    for mo in models:
      cs = [stats(_scores(cells[(m, mo, t)])) for t in tasks if (m, mo, t) in cells]
      gs = [cells[(m, mo, t)] for t in tasks if (m, mo, t) in cells]
      p = pooled(cs)
      div, n = div + sum(_diverged(g) for g in gs), n + sum(len(g) for g in gs)
      cell = "-" if p["mean"] is None else f"{_f(p['mean'], scale, digits)} ± {_f(p['two_std'], scale, digits)}"
      if p["datasets"] and p["datasets"] < len(tasks):
        cell += f" † ({p['datasets']}/{len(tasks)} data sets)"
      row.append(cell)
      if p["datasets"]:
        table4.append({"method": m, "model": mo, **p})
    rows4.append(row + [f"{n} ({div})"])
  md.append("### Seed 003, Table 4: mean over data sets ± 2 pooled std\n\n"
            "Pooled std = sqrt(mean over data sets of the per-dataset sample variance over "
            "seeds); † = not every data set present.\n\n"
            + md_table(["method"] + models + ["seeds (diverged)"], rows4))
  return "\n".join(md), {"per_dataset": per_ds, "table4": table4}, []


# ----------------------------------------------------------------------------- generic


def report_generic(runs: List[Run], out: str) -> Tuple[str, dict, List[str]]:
  """Every setting of each sweep (mean ± 2 std, seeds, diverged, runtime, parameters) and,
  where a swept key varies, the score against the learning rate (else that key)."""
  md, data, pngs = [], {}, []
  for sweep in _order({r.sweep for r in runs}):
    sr = [r for r in runs if r.sweep == sweep]
    keys = sorted({k for r in sr for k in r.point})
    groups = sorted(settings(sr), key=lambda g: tuple(grid_search._sort_key(format_value(g[0].point.get(k, "")))
                                                      for k in keys))
    rows, table = [], []
    for g in groups:
      s = stats(_scores(g))
      secs = stats(_per_seed(g, lambda r: _num(r.result.get("train_seconds"))))
      conv = stats(_per_seed(g, lambda r: _num(r.result.get("convergence_epoch"))))
      tp = _num(g[0].result.get("trainable_params"))
      srcs = sorted({r.source for r in g})
      rows.append([format_value(g[0].point.get(k, "")) for k in keys]
                  + [g[0].method, str(s["n"]), str(_diverged(g)), pm(s), pm(secs, 1, 2),
                     pm(conv, 1, 1), "-" if tp is None else f"{int(tp):,}", ", ".join(srcs)])
      table.append({"config": g[0].config, "point": g[0].point, "method": g[0].method, **s,
                    "diverged": _diverged(g), "train_seconds": secs, "convergence_epoch": conv,
                    "trainable_params": tp, "sources": srcs})
    metric = _mode([str(r.result.get("metric", "score")) for r in sr])
    md.append(f"### All settings: {sweep} ({sr[0].config})\n\n"
              + md_table([_short(k) for k in keys] + ["method", "n", "diverged", f"{metric} (mean ± 2std)",
                                                      "train s", "conv. epoch", "trainable", "score from"], rows))
    name = os.path.basename(os.path.normpath(sweep)) or "sweep"
    data[sweep] = table
    varying = [k for k in keys if len({format_value(r.point.get(k, "")) for r in sr}) > 1]
    if varying:
      lr = [k for k in varying if _short(k) == "learning_rate"]
      x = lr[0] if lr else varying[0]
      others = [k for k in keys if k != x]
      xs = _order({format_value(g[0].point.get(x, "")) for g in groups})
      numeric = all(isinstance(parse_value(v), (int, float)) for v in xs)
      xorder = sorted({parse_value(v) for v in xs}) if numeric else xs
      series: Dict[str, Dict[Any, List[float]]] = {}
      for g in groups:
        lab = ", ".join(f"{_short(k)}={format_value(g[0].point.get(k, ''))}" for k in others) or metric
        xv = format_value(g[0].point.get(x, ""))
        series.setdefault(lab, {})[parse_value(xv) if numeric else xv] = _scores(g)
      logx = numeric and _short(x) == "learning_rate" and all(v > 0 for v in xorder)
      p = os.path.join(out, f"{grid_search._UNSAFE.sub('_', name)}_{metric}_vs_{_short(x)}.png")
      pngs.append(_generic_plot(p, f"{name}: {metric} vs {_short(x)} (mean ± 2 std, dots: seeds)",
                                _short(x), metric, series, xorder, logx))
      md.append(f"Figure: ![{os.path.basename(p)}]({os.path.basename(p)})\n")
  return "\n".join(md), data, pngs


def _generic_plot(path, title, xlabel, ylabel, series, xorder, logx):
  if not logx:
    return line_plot(path, title, xlabel, ylabel, series, xorder)
  plt = _plt()       # a log10 axis for learning rates (line_plot's log axis is base 2)
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for label, pts in series.items():
    xs = [x for x in xorder if pts.get(x)]
    st = [stats(pts[x]) for x in xs]
    line = ax.errorbar(xs, [s["mean"] for s in st], yerr=[s["two_std"] for s in st], marker="o",
                       capsize=3, label=label)
    for x in xs:
      ax.scatter([x] * len(pts[x]), pts[x], s=12, color=line[0].get_color(), alpha=0.45, zorder=3)
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(True, alpha=0.3)
  return _save(plt, fig, path)


# ----------------------------------------------------------------------------- entry point


SHAPES = {"000": report_000, "002": report_002, "003": report_003}


def build_report(sweeps: Sequence[str], out: Optional[str] = None) -> dict:
  """Writes ``report.md``, ``report.json`` and the PNGs to ``out``; returns the report."""
  sweeps = [s for s in sweeps if s]
  if not sweeps:
    raise SweepError("--report: no sweep directory given (--report=DIR[,DIR...])")
  runs, failed = load_runs(sweeps)
  if out is None:
    base = sweeps[0] if len(sweeps) == 1 else os.path.commonpath([os.path.abspath(s) for s in sweeps])
    out = os.path.join(base, "report")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise SweepError(f"--report_out {out!r}: cannot create the directory ({e.strerror})") from None
  by_family: Dict[str, List[Run]] = {}
  for r in runs:
    by_family.setdefault(family(r), []).append(r)
  sources: Dict[str, int] = {}
  for r in runs:
    sources[r.source] = sources.get(r.source, 0) + 1
  md = ["# Report\n",
        f"Sweeps: {', '.join(sweeps)}. {len(runs)} results, "
        f"{sum(r.diverged for r in runs)} diverged (scored 0, counted), {len(failed)} failed "
        "without a result (not counted).\n",
        "Score: " + ", ".join(f"{k}: {v}" for k, v in sorted(sources.items()))
        + " (test score of the best-on-validation checkpoint when present, else the best "
          "validation score, else the final one).\n"]
  report = {"out": out, "sweeps": list(sweeps), "num_results": len(runs), "sources": sources,
            "shapes": [], "tables": {}, "figures": [],
            "failed": [{"sweep": f.get("sweep"), "point": f.get("point"), "seed": f.get("seed"),
                        "reason": f.get("reason")} for f in failed]}
  for fam in sorted(by_family):
    if fam in SHAPES:
      text, data, pngs = SHAPES[fam](by_family[fam], out)
      md.append(f"## Seed {fam}\n\n{text}")
      report["shapes"].append(fam)
      report["tables"][fam] = data
      report["figures"] += pngs
  text, data, pngs = report_generic(runs, out)
  md.append(f"## Every setting\n\n{text}")
  report["shapes"].append("generic")
  report["tables"]["generic"] = data
  report["figures"] += pngs
  if failed:
    md.append("## Failed runs (not counted)\n\n" + "\n".join(
        f"- {f.get('sweep')}: {grid_search.point_name(f.get('point') or {})} seed {f.get('seed')}: "
        f"{f.get('reason')}" for f in failed) + "\n")
  report["markdown"] = os.path.join(out, "report.md")
  with open(report["markdown"], "w") as f:
    f.write("\n".join(md))
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  return report


def main(report_arg: str, out: Optional[str]) -> int:
  """``sweep.py --report=DIR[,DIR...] [--report_out=DIR]``: prints the markdown and, last, a
  JSON line (where the report is, which shapes, the PNGs)."""
  rep = build_report([s.strip() for s in report_arg.split(",")], out)
  with open(rep["markdown"]) as f:
    print(f.read().rstrip())
  print(json.dumps({"report": rep["markdown"], "shapes": rep["shapes"],
                    "figures": rep["figures"], "num_results": rep["num_results"]}))
  return 0
