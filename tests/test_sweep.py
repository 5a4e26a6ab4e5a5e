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
      sys.exit(3)
    lr, seed = float(ov["train.learning_rate"]), int(ov["train.seed"])
    tuned = 0.5 + 0.01 * int(r) + 0.1 * math.log10(lr) / 3 + 0.01 * seed
    print("tuned exact_match: %.4f" % tuned)
    print(json.dumps({"tuned": tuned, "metric": "exact_match", "eval_loss": 1.0 - tuned,
                      "best": tuned, "steps": 20, "untuned": None}))
""")


@pytest.fixture
def fake_train(tmp_path):
  p = tmp_path / "fake_train.py"
  p.write_text(FAKE_TRAIN)
  return str(p)


def _expected(lr, r, seed):
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
                       train_script=fake_train, log=logs.append)
  assert len(st["done"]) == 4 and len(st["failed"]) == 4 and not st["skipped"]
  assert any("[1/8]" in l for l in logs) and any("FAILED" in l and "boom" in l for l in logs)
  ok = wd / "train.learning_rate=1e-3__peft.r=4" / "seed1"
  res = json.loads((ok / "result.json").read_text())
  assert res["point"] == {"train.learning_rate": "1e-3", "peft.r": "4"} and res["seed"] == 1
  assert res["tuned"] == pytest.approx(_expected(1e-3, 4, 1))
  bad = wd / "train.learning_rate=1e-3__peft.r=8" / "seed0"
  assert not (bad / "result.json").exists()
  fail = json.loads((bad / "failed.json").read_text())
  assert fail["returncode"] == 3 and "boom r=8" in fail["stderr_tail"]
  assert "--config.train.num_steps=20" in fail["cmd"]
  # the summary of a partly failed sweep lists the failures
  s = grid_search.aggregate(str(wd), plot=False)
  assert len(s["rows"]) == 2 and len(s["failed"]) == 4
  assert "4 failed run(s)" in (wd / "summary.md").read_text()

  # second run: finished points skipped, failed ones rerun (and now succeed)
  monkeypatch.delenv("FAKE_FAIL_R")
  calls.write_text("")
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1], {"train.num_steps": "20"},
                       train_script=fake_train, log=lambda s: None)
  assert len(st["skipped"]) == 4 and len(st["done"]) == 4 and not st["failed"]
  rerun = calls.read_text().split()
  assert len(rerun) == 4 and all("peft.r=8" in p for p in rerun)
  assert not (bad / "failed.json").exists() and (bad / "result.json").exists()
  # third run: nothing to do
  calls.write_text("")
  st = grid_search.run_sweep(QS, str(wd), grid, [0, 1], train_script=fake_train, log=lambda s: None)
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
                       log=lambda s: None)
  assert len(seen) == 3 and seen[0][0][1].endswith("train.py")
  assert len(st["done"]) == 1 and len(st["failed"]) == 2
  reasons = sorted(json.loads(open(os.path.join(p, "failed.json")).read())["reason"]
                   for p in st["failed"])
  assert reasons == ["interrupted at step 5", "the last stdout line is not a JSON object"]


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
  assert md[0] == "| learning_rate | r | n | exact_match (mean ± 2std) |"
  assert md[1] == "|---|---|---|---|"
  assert md[2] == "| 0.001 | 4 | 3 | 0.8000 ± 0.2000 |"
  assert md[3] == "| 0.001 | 8 | 3 | 0.5000 ± 0.2000 |"
  assert md[4] == "| 0.003 | 4 | 1 | 0.7500 ± 0.0000 |"
  assert md[5] == "| 0.003 | 8 | 2 | **0.9000 ± 0.1414** |"  # best row in bold
  assert len(md) == 6


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


def test_cli_with_fake_train(tmp_path, fake_train):
  wd = tmp_path / "s"
  args = ["--config=configs/quickstart.py", f"--workdir={wd}", "--grid",
          "train.learning_rate=1e-3,1e-2", "--grid", "peft.r=4,8", "--seeds=0,1,2",
          "--set", "config.train.num_steps=20"]
  r = _cli(*args, env={grid_search.TRAIN_SCRIPT_ENV: fake_train})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "[12/12]" in r.stdout and "| learning_rate | r | n |" in r.stdout
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["best"] == {"train.learning_rate": 0.01, "peft.r": 8} and out["failed"] == 0
  assert out["best_mean"] == pytest.approx(_expected(1e-2, 8, 1))  # mean over seeds 0,1,2
  assert (wd / "metric_vs_learning_rate.png").exists() and (wd / "summary.json").exists()
  r = _cli(*args, env={grid_search.TRAIN_SCRIPT_ENV: fake_train})
  assert r.returncode == 0 and r.stdout.count("skipped") >= 12
  r = _cli(f"--workdir={wd}", "--aggregate_only")
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/nope.py", "--grid", "peft.r=4"], "config file 'configs/nope.py' does not exist"),
    (["--config=configs/quickstart.py", "--grid", "peft.r"], "expected KEY=V1,V2"),
    (["--config=configs/quickstart.py", "--grid", "peft.r="], "empty value list"),
    (["--config=configs/quickstart.py", "--grid", "peft.rank=4"], "unknown config field 'peft.rank'"),
    (["--config=configs/quickstart.py", "--use_config_grid"], "defines no GRID"),
    (["--aggregate_only"], "does not exist"),
])
def test_cli_errors_one_line(tmp_path, args, expected):
  r = _cli(f"--workdir={tmp_path / 'nowhere'}", *args)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert expected in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_end_to_end_real_train(tmp_path):
  """Two learning rates x one seed of the real quickstart, shortened."""
  wd = tmp_path / "s"
  r = _cli("--config=configs/quickstart.py", f"--workdir={wd}",
           "--grid", "train.learning_rate=1e-3,3e-3", "--seeds=0",
           "--set", "config.train.num_steps=20", "--set", "config.train.eval_at_start=False",
           "--set", "config.data.max_eval_examples=20", "--set", "config.eval.batch_size=20")
  assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
  s = json.loads((wd / "summary.json").read_text())
  assert s["metric"] == "exact_match" and len(s["rows"]) == 2
  assert all(row["n"] == 1 and 0.0 <= row["mean"] <= 1.0 for row in s["rows"])
  res = json.loads((wd / "train.learning_rate=1e-3" / "seed0" / "result.json").read_text())
  assert res["steps"] == 20 and res["seed"] == 0
  assert (wd / "metric_vs_learning_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
