"""peft_jax.report / sweep.py --report: the papers' tables and figures from sweep directories.

Fake sweeps are written in grid_search's layout (sweep.json, <point>/seed<k>/result.json
shaped like train.py's last line); the expected numbers are computed here independently
(statistics.stdev) and compared with report.json. One slow test runs a real tiny sweep.
"""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from peft_jax import grid_search, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
PNG = b"\x89PNG\r\n\x1a\n"


def make_sweep(root, name, config, runs, sets=None):
  """``runs``: ``[(point overrides, seed, result fields)]``; returns the sweep dir."""
  d = os.path.join(str(root), name)
  grid = {}
  for point, _, _ in runs:
    for k, v in point.items():
      grid.setdefault(k, [])
      if v not in grid[k]:
        grid[k].append(v)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "sweep.json"), "w") as f:
    json.dump({"config": config, "grid": grid, "seeds": sorted({s for _, s, _ in runs}),
               "set": sets or {}}, f)
  for point, seed, res in runs:
    pdir = os.path.join(d, grid_search.point_name(point), f"seed{seed}")
    os.makedirs(pdir, exist_ok=True)
    full = {"untuned": None, "tuned": res.get("best", 0.5), "eval_loss": 1.0, "steps": 20,
            "metric": "rougeL", "best_step": 20, **res, "point": point, "seed": seed,
            "config": config, "seconds": 30.0}
    with open(os.path.join(pdir, "result.json"), "w") as f:
      json.dump(full, f)
  return d


def two_std(vals):
  return 2 * statistics.stdev(vals) if len(vals) > 1 else 0.0


def is_png(path):
  import matplotlib.image
  with open(path, "rb") as f:
    assert f.read(8) == PNG
  img = matplotlib.image.imread(path)         # decodes: a valid PNG, not only a header
  assert img.shape[0] > 100 and img.shape[1] > 100
  return True


def row(rows, **match):
  hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
  assert len(hits) == 1, (match, rows)
  return hits[0]


# ----------------------------------------------------------------------------- score


def test_score_prefers_test_then_best_then_tuned_and_diverged_is_zero():
  base = {"metric": "rougeL", "tuned": 0.3, "best": 0.4}
  assert report.score_of(base) == (0.4, "validation (best)")
  assert report.score_of({"metric": "rougeL", "tuned": 0.3}) == (0.3, "validation (final)")
  assert report.score_of({**base, "test_rougeL": 0.45}) == (0.45, "test")
  assert report.score_of({**base, "test": 0.42}) == (0.42, "test")
  assert report.score_of({**base, "test": {"rougeL": 0.41, "eval_loss": 2.0}}) == (0.41, "test")
  assert report.score_of({**base, "best": float("-inf")}) == (0.3, "validation (final)")
  assert report.score_of({**base, "test_rougeL": 0.45, "diverged": True}) == (0.0, "diverged")


def test_pooled_std_is_sqrt_of_mean_variance():
  a, b = report.stats([1.0, 2.0, 3.0]), report.stats([10.0, 14.0])
  p = report.pooled([a, b])
  assert p["mean"] == pytest.approx((2.0 + 12.0) / 2)
  assert p["pooled_std"] == pytest.approx(math.sqrt((1.0 + 8.0) / 2))
  assert p["two_std"] == pytest.approx(2 * math.sqrt(4.5)) and p["datasets"] == 2


def test_step_clock_leaves_out_compiling_steps_and_pauses():
  """trainer._StepClock: a step with new batch shapes is not timed; stop() pauses the clock
  (evaluation, saving); time between steady steps is counted."""
  import time
  import jax
  import jax.numpy as jnp
  from peft_jax.trainer import _StepClock
  f = jax.jit(lambda p, b: p + b["x"].sum())
  clock, p, compiled = _StepClock(), jnp.zeros(()), []
  for i, n in enumerate([4, 4, 8, 8, 4]):
    b = {"x": jnp.ones((n,))}
    c = clock.step_begins(b, p)
    p = f(p, b)
    clock.step_ends(p, c)
    compiled.append(c)
    if i == 3:
      time.sleep(0.2)          # inside a steady interval: counted
  assert compiled == [True, False, True, False, False] and clock.steps == 3
  clock.stop(p)
  assert clock.seconds >= 0.2
  before = clock.seconds
  time.sleep(0.3)              # an evaluation: the clock is stopped
  b = {"x": jnp.ones((4,))}
  c = clock.step_begins(b, p)
  p = f(p, b)
  clock.step_ends(p, c)
  clock.stop(p)
  assert not c and clock.steps == 4 and clock.seconds - before < 0.3
  assert clock.train_seconds(8) == pytest.approx(clock.seconds / 4 * 8, abs=1e-4)
  assert _StepClock().train_seconds(5) is None


# ----------------------------------------------------------------------------- seed 000


def _superni(tmp_path):
  cfg = os.path.join(CONFIGS, "superni.py")
  # LoRA: rank x learning rate x 3 seeds; r=32 at 1e-3 has a diverged seed
  lora = []
  for r in ("8", "32"):
    for lr in ("1e-4", "1e-3"):
      for s in (0, 1, 2):
        score = 0.30 + 0.001 * int(r) + (0.02 if lr == "1e-4" else 0.0) + 0.01 * s
        res = {"best": score, "trainable_params": 1000 * int(r), "total_params": 1_000_000,
               "train_seconds": 60.0}
        if r == "32" and lr == "1e-3" and s == 2:
          res = {**res, "diverged": True, "best": 0.0}
        lora.append(({"peft.r": r, "train.learning_rate": lr}, s, res))
  adapter = [({"peft.bottleneck_size": b, "train.learning_rate": "1e-4"}, s,
              {"best": 0.25 + 0.002 * int(b) + 0.01 * s, "test_rougeL": 0.2 + 0.002 * int(b) + 0.01 * s,
               "trainable_params": 2000 * int(b), "total_params": 1_000_000})
             for b in ("8", "32") for s in (0, 1, 2)]
  full = [({"train.learning_rate": "1e-5"}, s, {"best": 0.5 + 0.02 * s, "trainable_params": 990_000,
                                                 "total_params": 990_000}) for s in (0, 1)]
  large = [({"peft.r": "8", "train.learning_rate": "1e-4"}, s,
            {"best": 0.2 + 0.01 * s, "trainable_params": 500, "total_params": 400_000}) for s in (0, 1)]
  tasks = [({"peft.r": "8", "train.learning_rate": "1e-4"}, s,
            {"best": 0.1 + 0.01 * s, "trainable_params": 8000, "total_params": 1_000_000}) for s in (0, 1)]
  dirs = [make_sweep(tmp_path, "lora", f"{cfg}:lora", lora),
          make_sweep(tmp_path, "adapter", f"{cfg}:adapter", adapter),
          make_sweep(tmp_path, "full", f"{cfg}:full", full),
          make_sweep(tmp_path, "lora_large", f"{cfg}:lora,large", large),
          make_sweep(tmp_path, "lora_10tasks", f"{cfg}:lora", tasks,
                     sets={"data.num_train_tasks": "10"})]
  return dirs


def test_seed000_table1_and_figures(tmp_path):
  dirs = _superni(tmp_path)
  rep = report.build_report(dirs, str(tmp_path / "out"))
  assert rep["shapes"] == ["000", "generic"]
  t1 = rep["tables"]["000"]["table1"]
  assert [r["method"] for r in t1] == ["full", "lora", "adapter"]   # the config's METHODS order
  lora = row(t1, method="lora")
  # best: r=32, lr=1e-4 (0.352 + seed); r=32 lr=1e-3 has a diverged seed counted as 0
  assert lora["best"] == {"peft.r": "32", "train.learning_rate": "1e-4"}
  vals = [0.30 + 0.032 + 0.02 + 0.01 * s for s in (0, 1, 2)]
  assert lora["mean"] == pytest.approx(statistics.mean(vals))
  assert lora["two_std"] == pytest.approx(two_std(vals))
  assert lora["n"] == 3 and lora["diverged"] == 0 and lora["diverged_all"] == 1
  assert lora["runs_all"] == 12 and lora["settings"] == 4
  assert lora["trainable_percent"] == pytest.approx(100 * 32000 / 1_000_000)
  assert lora["searched"] == {"peft.r": ["8", "32"], "train.learning_rate": ["1e-4", "1e-3"]}
  # the adapter's results have a test score: it is the one reported
  adapter = row(t1, method="adapter")
  avals = [0.2 + 0.064 + 0.01 * s for s in (0, 1, 2)]
  assert adapter["mean"] == pytest.approx(statistics.mean(avals))
  # figure 1b: LoRA at r=32, lr=1e-3: the diverged seed is a 0 among the points
  f1b = rep["tables"]["000"]["figure1b"]
  v = f1b["lr=0.001"]["32"]
  assert v["n"] == 3 and 0.0 in v["values"]
  assert v["mean"] == pytest.approx((0.332 + 0.342 + 0.0) / 3)
  f1a = rep["tables"]["000"]["figure1a"]
  assert set(f1a) == {"lora", "adapter"} and f1a["lora"]["8"]["mean"] == pytest.approx(0.338)
  # figure 2: models ordered by parameter count; figure 3: 10 tasks then all
  assert list(rep["tables"]["000"]["figure2a"]["lora"]) == ["t5-lm-adapt-large", "t5-lm-adapt-xl"]
  assert rep["tables"]["000"]["figure2a"]["lora"]["t5-lm-adapt-large"]["mean"] == pytest.approx(0.205)
  f3 = rep["tables"]["000"]["figure3a"]["lora"]
  assert list(f3) == ["10", "all"] and f3["10"]["mean"] == pytest.approx(0.105)
  names = sorted(n for n in map(os.path.basename, rep["figures"]) if n.startswith("seed000"))
  assert names == [f"seed000_figure{k}.png" for k in ("1a", "1b", "2a", "2b", "3a", "3b")]
  assert all(is_png(p) for p in rep["figures"])
  # the generic plots: one per sweep with two or more values on its x axis
  assert sorted(n for n in map(os.path.basename, rep["figures"]) if not n.startswith("seed")) == \
      ["adapter_rougeL_vs_bottleneck_size.png", "lora_rougeL_vs_learning_rate.png"]
  md = open(rep["markdown"]).read()
  # percent (x100): 35.20 ± 2.00 for LoRA's best
  assert f"{100 * statistics.mean(vals):.2f} ± {100 * two_std(vals):.2f}" in md
  assert "| lora | r ∈ {8, 32}; learning_rate ∈ {1e-4, 1e-3} | r=32, learning_rate=1e-4 | 3.2% | 36.20 ± 2.00 | 3 | 0/3 | 1/12 |" in md
  assert "1/12" in md and "diverged" in md


# ----------------------------------------------------------------------------- seed 002


def test_seed002_tables_4_5_6_and_figure1(tmp_path):
  cfg = os.path.join(CONFIGS, "flan_t5.py")
  spec = {  # variant: (trainable params, score per seed, seconds per seed, convergence epochs)
      "cola,low,full": (3_000_000_000, [0.70, 0.72], [100.0, 110.0], [2, 2]),
      "cola,low,lora": (3_538_944, [0.76, 0.77], [300.0, 330.0], [6, 5]),
      "samsum,low,full": (3_000_000_000, [0.38, 0.39], [200.0, 200.0], [3, 3]),
      "samsum,low,lora": (3_538_944, [0.41, 0.0], [600.0, 700.0], [9, 9]),
      "cola,medium,lora": (3_538_944, [0.81, 0.82], [400.0, 380.0], [3, 3]),
  }
  dirs = []
  for variant, (tp, scores, secs, eps) in spec.items():
    runs = []
    for s, (sc, sec, ep) in enumerate(zip(scores, secs, eps)):
      res = {"best": sc, "metric": "accuracy", "trainable_params": tp,
             "total_params": 3_000_000_000 + (0 if tp > 1e9 else tp), "train_seconds": sec,
             "convergence_epoch": ep, "epochs_run": 10}
      if variant == "samsum,low,lora" and s == 1:
        res["diverged"] = True
      runs.append(({}, s, res))
    dirs.append(make_sweep(tmp_path, variant.replace(",", "_"), f"{cfg}:{variant}", runs))
  rep = report.build_report(dirs, str(tmp_path / "out"))
  assert rep["shapes"] == ["002", "generic"]
  t = rep["tables"]["002"]
  lora = row(t["table1"], method="lora", size="low", task="cola")
  assert lora["mean"] == pytest.approx(0.765) and lora["two_std"] == pytest.approx(two_std([0.76, 0.77]))
  div = row(t["table1"], method="lora", size="low", task="samsum")
  assert div["mean"] == pytest.approx(0.205) and div["diverged"] == 1 and div["values"] == [0.41, 0.0]
  t4 = row(t["table4"], method="lora", size="low", task="cola")
  assert t4["epoch"]["mean"] == pytest.approx(5.5) and t4["epoch"]["two_std"] == pytest.approx(two_std([6, 5]))
  assert t4["seconds"]["mean"] == pytest.approx(315.0)
  t5 = row(t["table5"], method="lora", size="low", task="cola")
  per = [0.76 / (3_538_944 / 1e5), 0.77 / (3_538_944 / 1e5)]
  assert t5["mean"] == pytest.approx(statistics.mean(per)) and t5["two_std"] == pytest.approx(two_std(per))
  assert t5["mean"] == pytest.approx(0.0216, abs=1e-4)       # seed 002 Table 5's LoRA CoLA (low)
  t6 = row(t["table6"], method="full", size="low", task="cola")
  per = [0.70 / (100 / 60), 0.72 / (110 / 60)]
  assert t6["mean"] == pytest.approx(statistics.mean(per)) and t6["two_std"] == pytest.approx(two_std(per))
  f1 = t["figure1"]
  assert f1["relative"] == {"low": True, "medium": False}
  rel = f1["values"]["low"]["lora"]["cola"]
  assert rel["values"] == pytest.approx([300 / 105, 330 / 105])
  assert f1["values"]["low"]["full"]["samsum"]["mean"] == pytest.approx(1.0)
  # medium has no full tuning: its panel shows seconds
  assert f1["values"]["medium"]["lora"]["cola"]["values"] == [400.0, 380.0]
  md = open(rep["markdown"]).read()
  assert "| lora (low) |" in md and "Ep. 5.5 ± 1.4; 315.0 ± 42.4 s" in md
  assert is_png(os.path.join(str(tmp_path / "out"), "seed002_figure1.png"))


def test_seed002_figure1_relative_when_every_cell_has_full(tmp_path):
  cfg = os.path.join(CONFIGS, "flan_t5.py")
  dirs = [make_sweep(tmp_path, m, f"{cfg}:cola,low,{m}",
                     [({}, s, {"best": 0.7, "metric": "accuracy", "train_seconds": sec * (s + 1),
                               "trainable_params": 10, "convergence_epoch": 1}) for s in (0, 1)])
          for m, sec in (("full", 10.0), ("bitfit", 30.0))]
  t = report.build_report(dirs, str(tmp_path / "o"))["tables"]["002"]
  f1 = t["figure1"]
  assert f1["relative"] == {"low": True}
  # full's mean is 15 s; bitfit's seeds 30 s and 60 s -> 2 and 4
  assert f1["values"]["low"]["bitfit"]["cola"]["values"] == pytest.approx([2.0, 4.0])


# ----------------------------------------------------------------------------- seed 003


def test_seed003_per_dataset_and_table4_pooled(tmp_path):
  cfg = os.path.join(CONFIGS, "survey.py")
  scores = {  # (method, model, task): {lr: per-seed scores}
      ("lora_qv", "t5-large", "rte"): {"1e-3": [0.60, 0.64, 0.62], "1e-4": [0.70, 0.72, 0.74]},
      ("lora_qv", "t5-large", "boolq"): {"1e-4": [0.80, 0.81, 0.85]},
      ("lora_qv", "t5-3b", "rte"): {"1e-4": [0.75, 0.77]},
      ("lora_qv", "t5-3b", "boolq"): {"1e-4": [0.86, 0.86]},
      ("full", "t5-large", "rte"): {"1e-5": [0.71, 0.73]},
  }
  params = {"t5-large": 737_000_000, "t5-3b": 2_850_000_000}
  dirs = []
  for (m, mo, t), by_lr in scores.items():
    runs = [({"train.learning_rate": lr}, s, {"best": v, "metric": "accuracy",
                                             "total_params": params[mo], "trainable_params": 1})
            for lr, vals in by_lr.items() for s, v in enumerate(vals)]
    dirs.append(make_sweep(tmp_path, f"{m}_{mo}_{t}", f"{cfg}:{mo},{t},{m}", runs))
  rep = report.build_report(dirs, str(tmp_path / "out"))
  assert rep["shapes"] == ["003", "generic"]
  per = rep["tables"]["003"]["per_dataset"]
  rte = row(per, method="lora_qv", model="t5-large", task="rte")
  assert rte["point"] == {"train.learning_rate": "1e-4"}            # the best learning rate
  assert rte["mean"] == pytest.approx(0.72)
  t4 = row(rep["tables"]["003"]["table4"], method="lora_qv", model="t5-large")
  boolq = [0.80, 0.81, 0.85]
  assert t4["mean"] == pytest.approx((0.72 + statistics.mean(boolq)) / 2)
  pooled = math.sqrt((statistics.variance([0.70, 0.72, 0.74]) + statistics.variance(boolq)) / 2)
  assert t4["pooled_std"] == pytest.approx(pooled) and t4["two_std"] == pytest.approx(2 * pooled)
  assert row(rep["tables"]["003"]["table4"], method="lora_qv", model="t5-3b")["two_std"] == \
      pytest.approx(2 * math.sqrt(statistics.variance([0.75, 0.77]) / 2))
  md = open(rep["markdown"]).read()
  assert f"{100 * t4['mean']:.2f} ± {200 * pooled:.2f}" in md
  assert "† (1/2 data sets)" in md                 # full tuning has only rte
  assert md.index("| t5-large | t5-3b |") > 0      # models ordered by size


# ----------------------------------------------------------------------------- generic + CLI


def _quickstart_fake(tmp_path):
  cfg = os.path.join(CONFIGS, "quickstart.py")
  runs = [({"train.learning_rate": lr}, s, {"best": 0.5 + s * 0.1 + (0.1 if lr == "3e-3" else 0),
                                           "metric": "exact_match", "train_seconds": 2.0,
                                           "trainable_params": 18432, "convergence_epoch": 1})
          for lr in ("1e-3", "3e-3") for s in (0, 1)]
  return make_sweep(tmp_path, "qs", cfg, runs)


def _failed(d, point, seed, rc, stderr):
  pdir = os.path.join(d, grid_search.point_name(point), f"seed{seed}")
  os.makedirs(pdir)
  with open(os.path.join(pdir, "failed.json"), "w") as f:
    json.dump({"point": point, "seed": seed, "reason": f"exit status {rc}", "returncode": rc,
               "stderr_tail": stderr}, f)


def test_unknown_shape_falls_back_to_generic(tmp_path):
  d = _quickstart_fake(tmp_path)
  # today a diverged run leaves failed.json (exit status 3): a diverged seed scoring 0;
  # another failure is listed and not counted
  _failed(d, {"train.learning_rate": "3e-3"}, 2, 3,
          "error: training diverged at step 4: the loss or gradient is not finite; ...")
  _failed(d, {"train.learning_rate": "1e-3"}, 2, 2, "error: data.path: not found")
  rep = report.build_report([d])
  assert rep["out"] == os.path.join(d, "report") and rep["shapes"] == ["generic"]
  rows = rep["tables"]["generic"][d]
  r = row(rows, point={"train.learning_rate": "3e-3"})
  assert r["mean"] == pytest.approx(0.65 * 2 / 3) and r["diverged"] == 1 and r["n"] == 3
  assert r["two_std"] == pytest.approx(two_std([0.6, 0.7, 0.0]))
  assert row(rows, point={"train.learning_rate": "1e-3"})["n"] == 2
  assert [f["seed"] for f in rep["failed"]] == [2] and rep["sources"]["diverged"] == 1
  assert r["train_seconds"]["mean"] == 2.0 and r["trainable_params"] == 18432
  assert "data.path: not found" not in open(rep["markdown"]).read()    # the reason is listed
  assert "exit status 2" in open(rep["markdown"]).read()
  assert len(rep["figures"]) == 1 and is_png(rep["figures"][0])


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "sweep.py"), *args], cwd=REPO,
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_report_several_sweeps_and_errors(tmp_path):
  dirs = _superni(tmp_path)[:2] + [_quickstart_fake(tmp_path)]
  out = tmp_path / "rep"
  r = _cli(f"--report={','.join(dirs)}", f"--report_out={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  last = json.loads(r.stdout.strip().splitlines()[-1])
  assert last["shapes"] == ["000", "generic"] and last["num_results"] == 12 + 6 + 4
  assert (out / "report.md").is_file() and (out / "seed000_figure1a.png").is_file()
  assert "Seed 000, Table 1" in r.stdout
  r = _cli(f"--report={tmp_path / 'nowhere'}")
  assert r.returncode == 2 and r.stderr.startswith("error: --report: sweep directory")
  assert "Traceback" not in r.stderr
  (tmp_path / "empty").mkdir()
  r = _cli(f"--report={tmp_path / 'empty'}")
  assert r.returncode == 2 and "no results" in r.stderr and "Traceback" not in r.stderr
  r = _cli("--config=configs/quickstart.py")
  assert r.returncode == 2 and "--workdir is required" in r.stderr


@pytest.mark.slow
def test_real_tiny_sweep_then_report(tmp_path):
  """The quickstart, 2 learning rates x 2 seeds, 12 steps each, then --report on it."""
  wd = tmp_path / "s"
  r = _cli("--config=configs/quickstart.py", f"--workdir={wd}",
           "--grid", "train.learning_rate=1e-3,3e-3", "--seeds=0,1",
           "--set", "config.train.num_steps=12", "--set", "config.train.eval_every=6",
           "--set", "config.train.eval_at_start=False",
           "--set", "config.data.max_eval_examples=16", "--set", "config.eval.batch_size=16",
           "--select_split=none")   # the held-out evaluation: tests/test_seed_pipeline.py
  assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
  res = json.loads((wd / "train.learning_rate=1e-3" / "seed1" / "result.json").read_text())
  # the trainer's new fields: timing excludes the compiling first step, counts at steady rate
  assert res["steps"] == 12 and 1 <= res["timed_steps"] <= 11
  assert 0 < res["train_seconds"] < res["seconds"]
  assert 0 < res["trainable_params"] < res["total_params"]
  assert res["convergence_epoch"] >= 1 and res["epochs_run"] > 0
  r = _cli(f"--report={wd}")
  assert r.returncode == 0, r.stderr[-2000:]
  rep = json.loads((wd / "report" / "report.json").read_text())
  assert rep["shapes"] == ["generic"] and rep["num_results"] == 4
  rows = rep["tables"]["generic"][str(wd)]
  assert len(rows) == 2 and all(x["n"] == 2 and x["diverged"] == 0 for x in rows)
  for x in rows:
    assert x["train_seconds"]["n"] == 2 and x["trainable_params"] == res["trainable_params"]
    assert x["sources"] == ["validation (best)"]
  assert all(is_png(p) for p in rep["figures"]) and len(rep["figures"]) == 1
