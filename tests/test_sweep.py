"""sweep.py / peft_jax.grid_search: grid expansion, resumable runs, aggregation, table, plot, CLI."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from peft_jax import grid_search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = os.path.join(REPO, "configs", "quickstart.py")

# A train.py stand-in: the last stdout line is a JSON result computed from the overrides.
FAKE_TRAIN = textwrap.dedent("""
    import json, math, os, sys
    ov = {}
    for a in sys.argv[1:]:
      if a.startswith("--config."):
        k, _, v = a[len("--config."):].partition("=")
        ov[k] = v
      elif a.startswith("--workdir="):
        wd = a.split("=", 1)[1]
    calls = os.environ.get("FAKE_CALLS")
    if calls:
      with open(calls, "a") as f:
        f.write(wd + "\\n")
    r = ov.get("peft.r", "0")
    if os.environ.get("FAKE_FAIL_R") == r:
      print("Traceback ...\\nRuntimeError: boom r=" + r, file=sys.stderr)
      sys.exit(1)
    lr, seed = float(ov["train.learning_rate"]), int(ov["train.seed"])
    if os.environ.get("FAKE_DIVERGE") == "%s/%d" % (r, seed):
      print("error: training diverged at step 4: the loss or gradient is not finite",
            file=sys.stderr)
      sys.exit(3)
    tuned = 0.5 + 0.01 * int(r) + 0.1 * math.log10(lr) / 3 + 0.01 * seed
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "fake_best.txt"), "w") as f:   # what the fake eval reads
      f.write(str(tuned + 0.05))
    print("tuned exact_match: %.4f" % tuned)
    print(json.dumps({"tuned": tuned, "metric": "exact_match", "eval_loss": 1.0 - tuned,
                      "best": tuned + 0.05, "best_step": 10, "steps": 20, "untuned": None}))
""")

# An eval.py stand-in: the "test" score of the best checkpoint is its validation score - 0.2.
FAKE_EVAL = textwrap.dedent("""
    import json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    calls = os.environ.get("FAKE_EVAL_CALLS")
    if calls:
      with open(calls, "a") as f:
        f.write(args["checkpoint"] + " " + args["split"] + " " + args["step"] + "\\n")
    if os.environ.get("FAKE_EVAL_FAIL"):
      print("error: quickstart: no test split", file=sys.stderr)
      sys.exit(2)
    val = float(open(os.path.join(args["checkpoint"], "fake_best.txt")).read())
    print(json.dumps({"exact_match": val - 0.2, "n": 10, "split": args["split"], "step": 10,
                      "chosen": "best"}))
""")


@pytest.fixture
def fake_train(tmp_path):
  p = tmp_path / "fake_train.py"
  p.write_text(FAKE_TRAIN)
  return str(p)


@pytest.fixture
def fake_eval(tmp_path):
  p = tmp_path / "fake_eval.py"
  p.write_text(FAKE_EVAL)
  return str(p)


def _expected(lr, r, seed):
  """The fake run's final validation score (its best is + 0.05, its test score - 0.15)."""
  return 0.5 + 0.01 * r + 0.1 * math.log10(lr) / 3 + 0.01 * seed


# ----------------------------------------------------------------------------- grid


def test_parse_grid_and_errors():
  assert grid_search.parse_grid_arg("train.learning_rate=1e-3,3e-3") == (
      "train.learning_rate", ["1e-3", "3e-3"])
  assert grid_search.parse_grid_arg("config.peft.r=4, 8") == ("peft.r", ["4", "8"])
  with pytest.raises(grid_search.SweepError, match="expected KEY=V1,V2"):
    grid_search.parse_grid_arg("peft.r")
  with pytest.raises(grid_search.SweepError, match="empty value list"):
    grid_search.parse_grid_arg("peft.r=")
  with pytest.raises(grid_search.SweepError, match="empty value list"):
    grid_search.parse_grid_arg("peft.r=,")
  assert grid_search.parse_set_arg("config.train.num_steps=20") == ("train.num_steps", "20")
  assert grid_search.parse_seeds("0,1,2") == [0, 1, 2]
  with pytest.raises(grid_search.SweepError):
    grid_search.parse_seeds("a,b")


def test_expand_grid_cartesian_times_seeds_and_names():
  pts = grid_search.expand_grid({"train.learning_rate": ["1e-3", "3e-3"], "peft.r": [4, 8]}, [0, 1, 2])
  assert len(pts) == 2 * 2 * 3
  names = sorted({p["name"] for p in pts})
  assert names == ["train.learning_rate=1e-3__peft.r=4", "train.learning_rate=1e-3__peft.r=8",
                   "train.learning_rate=3e-3__peft.r=4", "train.learning_rate=3e-3__peft.r=8"]
  assert pts[0] == {"name": "train.learning_rate=1e-3__peft.r=4",
                    "overrides": {"train.learning_rate": "1e-3", "peft.r": "4"}, "seed": 0}
  assert grid_search.point_name({"peft.target_modules": "q,v/x y"}) == "peft.target_modules=q_v_x_y"
  assert grid_search.point_name({}) == "base"
  assert grid_search.expand_grid({}, [0, 1]) == [{"name": "base", "overrides": {}, "seed": 0},
                                           {"name": "base", "overrides": {}, "seed": 1}]
  with pytest.raises(grid_search.SweepError, match="train.seed"):
    grid_search.expand_grid({"train.seed": [1]}, [0])


def test_config_grid_per_method_and_flat():
  mod, _, variant = grid_search.load_config_module(os.path.join(REPO, "configs", "superni.py") + ":adapter")
  g = grid_search.config_grid(mod, variant, grid_search.build_config(mod, variant))
  assert set(g) == {"peft.bottleneck_size", "train.learning_rate"}
  mod, _, variant = grid_search.load_config_module(os.path.join(REPO, "configs", "superni.py"))
  assert set(grid_search.config_grid(mod, variant, grid_search.build_config(mod, variant))) == {
      "train.learning_rate"}  # default method lora (its ranks are variant parts: alpha follows r)
  mod, _, variant = grid_search.load_config_module(os.path.join(REPO, "configs", "survey.py"))
  assert grid_search.config_grid(mod, variant, grid_search.build_config(mod, variant)) == {
      "train.learning_rate": [1e-3, 1e-4, 1e-5]}     # per task; the default task is rte
  mod, _, variant = grid_search.load_config_module(
      os.path.join(REPO, "configs", "survey.py") + ":t5-3b,cnn_dailymail,houlsby")
  assert grid_search.config_grid(mod, variant) == {"train.learning_rate": [1e-3]}  # one rate
  mod, _, variant = grid_search.load_config_module(QS)
  with pytest.raises(grid_search.SweepError, match="no GRID"):
    grid_search.config_grid(mod, variant)
  with pytest.raises(grid_search.SweepError, match="does not exist"):
    grid_search.load_config_module("configs/nope.py:lora")


def test_unknown_field_is_a_clear_error(tmp_path, fake_train):
  with pytest.raises(grid_search.SweepError, match="unknown config field 'peft.rank'"):
    grid_search.run_sweep(QS, str(tmp_path / "s"), {"peft.rank": ["4"]}, [0], train_script=fake_train)


# ----------------------------------------------------------------------------- running


def test_resumable_skips_finished_reruns_failed(tmp_path, fake_train, monkeypatch):
  wd, calls = tmp_path / "s", tmp_path / "calls.txt"
  monkeypatch.setenv("FAKE_CALLS", str(calls))
  monkeypatch.setenv("FAKE_FAIL_R", "8")
  grid = {"train.learning_rate": ["1e-3", "3e-3"], "peft.r": ["4", "8"]}
  logs = []
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1], {"train.num_steps": "20"},
                       train_script=fake_train, log=logs.append, select_split="none")
  assert len(st["done"]) == 4 and len(st["failed"]) == 4 and not st["skipped"]
  assert any("[1/8]" in l for l in logs) and any("FAILED" in l and "boom" in l for l in logs)
  ok = wd / "train.learning_rate=1e-3__peft.r=4" / "seed1"
  res = json.loads((ok / "result.json").read_text())
  assert res["point"] == {"train.learning_rate": "1e-3", "peft.r": "4"} and res["seed"] == 1
  assert res["tuned"] == pytest.approx(_expected(1e-3, 4, 1))
  bad = wd / "train.learning_rate=1e-3__peft.r=8" / "seed0"
  assert not (bad / "result.json").exists()
  fail = json.loads((bad / "failed.json").read_text())
  assert fail["returncode"] == 1 and "boom r=8" in fail["stderr_tail"]
  assert "--config.train.num_steps=20" in fail["cmd"]
  # the summary of a partly failed sweep lists the failures
  s = grid_search.aggregate(str(wd), plot=False)
  assert len(s["rows"]) == 2 and len(s["failed"]) == 4
  assert "4 failed run(s)" in (wd / "summary.md").read_text()

  # second run: finished points skipped, failed ones rerun (and now succeed)
  monkeypatch.delenv("FAKE_FAIL_R")
  calls.write_text("")
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1], {"train.num_steps": "20"},
                       train_script=fake_train, log=lambda s: None, select_split="none")
  assert len(st["skipped"]) == 4 and len(st["done"]) == 4 and not st["failed"]
  rerun = calls.read_text().split()
  assert len(rerun) == 4 and all("peft.r=8" in p for p in rerun)
  assert not (bad / "failed.json").exists() and (bad / "result.json").exists()
  # third run: nothing to do
  calls.write_text("")
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1], train_script=fake_train, log=lambda s: None,
                             select_split="none")
  assert len(st["skipped"]) == 8 and calls.read_text() == ""


def test_injectable_runner_and_bad_output(tmp_path):
  class R:
    def __init__(self, rc, out, err=""):
      self.returncode, self.stdout, self.stderr = rc, out, err

  seen = []

  def runner(cmd, workdir):
    seen.append((cmd, workdir))
    if "--config.peft.r=4" in cmd:
      return R(0, "no json here\n")
    if "--config.peft.r=8" in cmd:
      return R(0, json.dumps({"interrupted_at": 5}) + "\n")
    return R(0, json.dumps({"tuned": 0.25, "metric": "exact_match", "eval_loss": 1.0}) + "\n")

  st = grid_search.run_sweep(QS, str(tmp_path / "s"), {"peft.r": ["2", "4", "8"]}, [0], runner=runner,
                       log=lambda s: None, select_split="none")
  assert len(seen) == 3 and seen[0][0][1].endswith("train.py")
  assert len(st["done"]) == 1 and len(st["failed"]) == 2
  reasons = sorted(json.loads(open(os.path.join(p, "failed.json")).read())["reason"]
                   for p in st["failed"])
  assert reasons == ["interrupted at step 5", "the last stdout line is not a JSON object"]


def test_best_checkpoint_evaluated_on_test_once(tmp_path, fake_train, fake_eval, monkeypatch):
  """After each point trains, eval.py runs on its best checkpoint on test (resumable: not
  again once <split>.json exists; rerun when it failed); the summary reports that test
  score with the validation score of the same checkpoint next to it."""
  wd, calls = tmp_path / "s", tmp_path / "eval_calls.txt"
  monkeypatch.setenv("FAKE_EVAL_CALLS", str(calls))
  monkeypatch.setenv("FAKE_EVAL_FAIL", "1")
  grid = {"train.learning_rate": ["1e-3", "1e-2"], "peft.r": ["4"]}
  kw = dict(train_script=fake_train, eval_script=fake_eval, log=lambda s: None)
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1], **kw)
  assert len(st["done"]) == 4 and len(st["failed"]) == 4 and not st["evaluated"]
  pdir = wd / "train.learning_rate=1e-3__peft.r=4" / "seed1"
  assert "no test split" in json.loads((pdir / "eval_failed.json").read_text())["stderr_tail"]
  with pytest.raises(grid_search.SweepError, match="no test evaluation of the best checkpoint "
                     r"\(eval.py failed: error: quickstart: no test split\)"):
    grid_search.aggregate(str(wd), plot=False)
  # rerun: training skipped, the evaluations run again and succeed
  monkeypatch.delenv("FAKE_EVAL_FAIL")
  calls.write_text("")
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1], **kw)
  assert len(st["skipped"]) == 4 and len(st["evaluated"]) == 4 and not st["failed"]
  assert sorted(calls.read_text().splitlines())[0] == (
      f"{wd / 'train.learning_rate=1e-2__peft.r=4' / 'seed0'} test best")
  assert not (pdir / "eval_failed.json").exists()
  rec = json.loads((pdir / "test.json").read_text())
  assert rec["split"] == "test" and rec["step"] == 10
  assert rec["score"] == pytest.approx(_expected(1e-3, 4, 1) - 0.15)
  assert rec["validation"] == pytest.approx(_expected(1e-3, 4, 1) + 0.05)
  # once more: nothing is run
  calls.write_text("")
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1], **kw)
  assert len(st["skipped"]) == 4 and not st["evaluated"] and calls.read_text() == ""
  s = grid_search.aggregate(str(wd), plot=False)
  assert s["split"] == "test" and not s["failed"]
  row = s["rows"][0]
  assert row["values"] == pytest.approx([_expected(1e-3, 4, k) - 0.15 for k in (0, 1)])
  assert row["val_values"] == pytest.approx([_expected(1e-3, 4, k) + 0.05 for k in (0, 1)])
  md = (wd / "summary.md").read_text().splitlines()
  assert md[0] == ("| learning_rate | r | n | diverged | test exact_match (mean ± 2std) | "
                   "validation exact_match (mean ± 2std) |")
  m, v = _expected(1e-2, 4, 0.5) - 0.15, _expected(1e-2, 4, 0.5) + 0.05
  assert md[3] == f"| 0.01 | 4 | 2 | 0 | **{m:.4f} ± 0.0141** | {v:.4f} ± 0.0141 |"
  # --select_split=none on the same runs: the validation score of the best checkpoint
  s = grid_search.aggregate(str(wd), plot=False, select_split="none")
  assert s["split"] == "validation" and s["rows"][0]["mean"] == pytest.approx(
      _expected(1e-3, 4, 0.5) + 0.05)


def test_diverged_runs_count_as_zero(tmp_path, fake_train, fake_eval, monkeypatch):
  """A run that exits with the divergence status gets score 0 and diverged: true; it is not
  rerun, not evaluated, and enters the mean and 2 std of its point."""
  wd, calls = tmp_path / "s", tmp_path / "calls.txt"
  monkeypatch.setenv("FAKE_CALLS", str(calls))
  monkeypatch.setenv("FAKE_EVAL_CALLS", str(tmp_path / "eval_calls.txt"))
  monkeypatch.setenv("FAKE_DIVERGE", "8/1")
  grid = {"train.learning_rate": ["1e-3"], "peft.r": ["4", "8"]}
  kw = dict(train_script=fake_train, eval_script=fake_eval)
  logs = []
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1, 2], log=logs.append, **kw)
  bad = wd / "train.learning_rate=1e-3__peft.r=8" / "seed1"
  assert st["diverged"] == [str(bad)] and not st["failed"] and len(st["evaluated"]) == 5
  assert any("DIVERGED" in l and "training diverged at step 4" in l for l in logs)
  res = json.loads((bad / "result.json").read_text())
  assert res["diverged"] is True and res["tuned"] == 0.0 and res["best"] == 0.0
  assert res["reason"].startswith("training diverged at step 4")
  assert not (bad / "failed.json").exists() and not (bad / "test.json").exists()
  assert str(bad) not in (tmp_path / "eval_calls.txt").read_text()
  # not rerun
  calls.write_text("")
  monkeypatch.delenv("FAKE_DIVERGE")
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1, 2], log=lambda s: None, **kw)
  assert calls.read_text() == "" and len(st["skipped"]) == 6
  s = grid_search.aggregate(str(wd), plot=False)
  r8 = next(r for r in s["rows"] if r["point"]["peft.r"] == 8)
  tests = [_expected(1e-3, 8, 0) - 0.15, 0.0, _expected(1e-3, 8, 2) - 0.15]
  assert r8["n"] == 3 and r8["diverged"] == 1 and r8["values"] == pytest.approx(tests)
  m, sd = grid_search.mean_std(tests)
  assert r8["mean"] == pytest.approx(m) and r8["two_std"] == pytest.approx(2 * sd)
  assert s["num_diverged"] == 1 and s["num_results"] == 6
  # r=8 would win on validation without its diverged seed; with it, r=4 does
  assert s["best"] == {"train.learning_rate": 1e-3, "peft.r": 4}
  md = (wd / "summary.md").read_text()
  assert f"| 0.001 | 8 | 3 | 1 | {m:.4f} ± {2 * sd:.4f} |" in md
  assert "diverged runs count as 0" in md


# ----------------------------------------------------------------------------- aggregation


def _write_results(wd, table, metric="exact_match"):
  """table: {(lr, r): [values per seed]} -> result.json files."""
  os.makedirs(wd, exist_ok=True)
  for (lr, r), vals in table.items():
    ov = {"train.learning_rate": lr, "peft.r": r}
    for seed, v in enumerate(vals):
      d = os.path.join(wd, grid_search.point_name(ov), f"seed{seed}")
      os.makedirs(d)
      with open(os.path.join(d, "result.json"), "w") as f:
        json.dump({"tuned": v, "metric": metric, "eval_loss": 1 - v, "best": v, "steps": 10,
                   "untuned": None, "point": ov, "seed": seed}, f)


TABLE = {("1e-3", "4"): [0.70, 0.80, 0.90], ("1e-3", "8"): [0.50, 0.60, 0.40],
         ("3e-3", "4"): [0.75], ("3e-3", "8"): [0.95, 0.85]}


def test_aggregate_mean_and_two_sample_std(tmp_path):
  wd = str(tmp_path / "s")
  _write_results(wd, TABLE)
  s = grid_search.aggregate(wd)
  assert s["metric"] == "exact_match" and s["keys"] == ["train.learning_rate", "peft.r"]
  rows = {(r["point"]["train.learning_rate"], r["point"]["peft.r"]): r for r in s["rows"]}
  assert list(rows) == [(1e-3, 4), (1e-3, 8), (3e-3, 4), (3e-3, 8)]
  r = rows[(1e-3, 4)]
  assert r["n"] == 3 and r["mean"] == pytest.approx(0.8)
  assert r["std"] == pytest.approx(0.1) and r["two_std"] == pytest.approx(0.2)  # ddof=1
  assert r["values"] == [0.7, 0.8, 0.9] and r["seeds"] == [0, 1, 2]
  assert rows[(3e-3, 4)]["n"] == 1 and rows[(3e-3, 4)]["two_std"] == 0.0
  assert rows[(3e-3, 8)]["two_std"] == pytest.approx(2 * math.sqrt(0.005))
  assert s["best"] == {"train.learning_rate": 3e-3, "peft.r": 8}
  on_disk = json.loads(open(os.path.join(wd, "summary.json")).read())
  assert on_disk["rows"][0]["mean"] == pytest.approx(0.8)


def test_markdown_table(tmp_path):
  wd = str(tmp_path / "s")
  _write_results(wd, TABLE)
  grid_search.aggregate(wd, plot=False)
  md = open(os.path.join(wd, "summary.md")).read().splitlines()
  # no sweep.json, so no test evaluation: the validation score of the best checkpoint
  assert md[0] == "| learning_rate | r | n | diverged | validation exact_match (mean ± 2std) |"
  assert md[1] == "|---|---|---|---|---|"
  assert md[2] == "| 0.001 | 4 | 3 | 0 | 0.8000 ± 0.2000 |"
  assert md[3] == "| 0.001 | 8 | 3 | 0 | 0.5000 ± 0.2000 |"
  assert md[4] == "| 0.003 | 4 | 1 | 0 | 0.7500 ± 0.0000 |"
  assert md[5] == "| 0.003 | 8 | 2 | 0 | **0.9000 ± 0.1414** |"  # best row in bold
  assert md[6:] == ["", "Each run: the validation score of its best checkpoint on validation; "
                    "diverged runs count as 0. Bold: the point with the best mean validation "
                    "score."]


def test_plot_is_a_png(tmp_path):
  wd = str(tmp_path / "s")
  _write_results(wd, TABLE)
  s = grid_search.aggregate(wd)
  assert s["plot"] == os.path.join(wd, "metric_vs_learning_rate.png")
  with open(s["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # other axis, explicit
  p = grid_search.plot_summary(s, wd, x="peft.r", lines="train.learning_rate")
  assert p.endswith("metric_vs_r.png") and open(p, "rb").read(4) == b"\x89PNG"
  with pytest.raises(grid_search.SweepError, match="not a swept key"):
    grid_search.plot_summary(s, wd, x="train.batch_size")


def test_no_results_is_a_clear_error(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(grid_search.SweepError, match="no results to aggregate"):
    grid_search.aggregate(str(tmp_path / "empty"))
  with pytest.raises(grid_search.SweepError, match="does not exist"):
    grid_search.aggregate(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- command line


def _cli(*args, env=None, timeout=600):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env or {}))
  e.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "sweep.py", *args], cwd=REPO, env=e,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_with_fake_train(tmp_path, fake_train, fake_eval):
  wd = tmp_path / "s"
  args = ["--config=configs/quickstart.py", f"--workdir={wd}", "--grid",
          "train.learning_rate=1e-3,1e-2", "--grid", "peft.r=4,8", "--seeds=0,1,2",
          "--set", "config.train.num_steps=20"]
  fakes = {grid_search.TRAIN_SCRIPT_ENV: fake_train, grid_search.EVAL_SCRIPT_ENV: fake_eval}
  r = _cli(*args, env=fakes)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "[12/12]" in r.stdout and "| learning_rate | r | n | diverged | test exact_match" in r.stdout
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["best"] == {"train.learning_rate": 0.01, "peft.r": 8} and out["failed"] == 0
  assert out["split"] == "test" and out["diverged"] == 0
  # means over seeds 0,1,2: the test score of the best checkpoint, and its validation score
  assert out["best_mean"] == pytest.approx(_expected(1e-2, 8, 1) - 0.15)
  assert out["best_val_mean"] == pytest.approx(_expected(1e-2, 8, 1) + 0.05)
  assert (wd / "metric_vs_learning_rate.png").exists() and (wd / "summary.json").exists()
  r = _cli(*args, env=fakes)
  assert r.returncode == 0 and r.stdout.count("skipped") >= 12
  r = _cli(f"--workdir={wd}", "--aggregate_only")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["split"] == "test"
  r = _cli(f"--workdir={wd}", "--aggregate_only", "--select_split=none")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["best_mean"] == pytest.approx(
      _expected(1e-2, 8, 1) + 0.05)


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/nope.py", "--grid", "peft.r=4"], "config file 'configs/nope.py' does not exist"),
    (["--config=configs/quickstart.py", "--grid", "peft.r"], "expected KEY=V1,V2"),
    (["--config=configs/quickstart.py", "--grid", "peft.r="], "empty value list"),
    (["--config=configs/quickstart.py", "--grid", "peft.rank=4"], "unknown config field 'peft.rank'"),
    (["--config=configs/quickstart.py", "--use_config_grid"], "defines no GRID"),
    (["--aggregate_only"], "does not exist"),
    (["--config=configs/quickstart.py", "--select_split=te st"], "expected a split name"),
])
def test_cli_errors_one_line(tmp_path, args, expected):
  r = _cli(f"--workdir={tmp_path / 'nowhere'}", *args)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert expected in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_end_to_end_real_train_diverged_and_test_eval(tmp_path):
  """The real train.py and eval.py, shortened: a learning rate of 1e30 diverges and counts
  as 0; the other point's best checkpoint on validation is evaluated on a test split."""
  import shutil
  data = tmp_path / "data"
  shutil.copytree(os.path.join(REPO, "data", "quickstart"), data)
  val = (data / "validation.jsonl").read_text().splitlines()
  (data / "test.jsonl").write_text("\n".join(val[-10:]) + "\n")
  wd = tmp_path / "s"
  sets = {"train.num_steps": 10, "train.eval_every": 5, "train.eval_at_start": False,
          "data.max_eval_examples": 16, "eval.batch_size": 16, "data.path": data,
          "train.grad_clip": 0, "train.schedule": "constant", "train.warmup_ratio": 0}
  r = _cli("--config=configs/quickstart.py", f"--workdir={wd}", "--no_plot",
           "--grid", "train.learning_rate=3e-3,1e30", "--seeds=0",
           *[a for k, v in sets.items() for a in ("--set", f"config.{k}={v}")])
  assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["split"] == "test" and out["diverged"] == 1 and out["failed"] == 0
  bad = wd / "train.learning_rate=1e30" / "seed0"
  res = json.loads((bad / "result.json").read_text())
  assert res["diverged"] is True and res["tuned"] == 0.0 and "training diverged" in res["reason"]
  assert not (bad / "test.json").exists()
  good = wd / "train.learning_rate=3e-3" / "seed0"
  res = json.loads((good / "result.json").read_text())
  sel = json.loads((good / "selection.json").read_text())
  test = json.loads((good / "test.json").read_text())
  assert res["steps"] == 10 and res["best_step"] == sel["best_step"] == test["step"]
  assert test["split"] == "test" and test["metrics"]["n"] == 10
  assert test["validation"] == res["best"] == sel["evaluations"][str(sel["best_step"])]["exact_match"]
  s = json.loads((wd / "summary.json").read_text())
  rows = {r["point"]["train.learning_rate"]: r for r in s["rows"]}
  assert rows[1e30]["values"] == [0.0] and rows[1e30]["diverged"] == 1
  assert rows[3e-3]["values"] == [test["score"]] and rows[3e-3]["val_values"] == [res["best"]]
