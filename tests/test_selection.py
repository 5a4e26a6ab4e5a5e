"""Model selection: the best checkpoint on validation (incl. the final step) is recorded,
kept by the rotation, and evaluated by ``eval.py --checkpoint=<workdir>`` on any split."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from peft_jax import selection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart(**train):
  spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.num_steps = 20
  c.train.eval_at_start = False
  c.train.log_every = 5
  c.data.max_eval_examples = 16
  c.eval.batch_size = 16
  for k, v in train.items():
    c.train[k] = v
  return c


def _scripted(monkeypatch, scores):
  """Trainer.evaluate returns the next of ``scores`` (the validation metric) per call."""
  from peft_jax.trainer import Trainer
  seq = iter(scores)

  def fake(self, params):
    return {"exact_match": next(seq), "eval_loss": 1.0}
  monkeypatch.setattr(Trainer, "evaluate", fake)


def _steps(wd):
  return selection.checkpoint_steps(str(wd))


@pytest.mark.parametrize("scores,best,best_score,kept", [
    ([0.5, 0.9, 0.9, 0.3], 10, 0.9, [10, 20]),   # an intermediate step; a tie: the earlier
    # the final evaluation counts; step 15, best when the final step was saved, is deleted
    # only by a later save (a resumed, longer run)
    ([0.1, 0.2, 0.3, 0.8], 20, 0.8, [15, 20]),
])
def test_best_step_recorded_and_kept_by_the_rotation(tmp_path, monkeypatch, scores, best,
                                                     best_score, kept):
  from peft_jax.trainer import Trainer
  _scripted(monkeypatch, scores)
  wd = tmp_path / "wd"
  res = Trainer(_quickstart(eval_every=5, keep_last=1), str(wd)).train()
  assert res["best_step"] == best and res["best"] == pytest.approx(best_score)
  assert res["tuned"] == pytest.approx(scores[-1])        # the final step's own score
  rec = json.loads((wd / "selection.json").read_text())
  assert rec["best_step"] == best and rec["last_step"] == 20 and rec["split"] == "validation"
  assert [int(s) for s in rec["evaluations"]] == [5, 10, 15, 20]
  assert [v["exact_match"] for v in rec["evaluations"].values()] == pytest.approx(scores)
  # keep_last=1 keeps the final step; the best survives the rotation too
  assert _steps(wd) == kept
  assert selection.resolve_step(str(wd), "best") == (best, "best")
  assert selection.resolve_step(str(wd), "last") == (20, "last")


def test_without_evaluations_the_final_step_is_best(tmp_path, monkeypatch):
  from peft_jax.trainer import Trainer
  _scripted(monkeypatch, [0.25])
  wd = tmp_path / "wd"
  res = Trainer(_quickstart(eval_every=0, save_every=5, keep_last=1), str(wd)).train()
  assert res["best_step"] == 20 and res["best"] == 0.25
  assert json.loads((wd / "selection.json").read_text())["best_step"] == 20
  assert _steps(wd) == [20]


def test_resume_forgets_evaluations_after_the_resumed_step(tmp_path, monkeypatch):
  """An interrupted run resumes at step 10: evaluations recorded after it (a diverged or
  lost continuation) are dropped, the earlier ones still count."""
  from peft_jax.trainer import Trainer
  wd = tmp_path / "wd"
  _scripted(monkeypatch, [0.5, 0.6])
  Trainer(_quickstart(eval_every=5, keep_last=5, stop_at_step=10), str(wd)).train()
  rec = json.loads((wd / "selection.json").read_text())
  assert rec["best_step"] == 10 and rec["last_step"] is None
  rec["evaluations"]["15"] = {"exact_match": 0.99}        # as if written by a lost step 15
  (wd / "selection.json").write_text(json.dumps(rec))
  _scripted(monkeypatch, [0.4, 0.55])
  res = Trainer(_quickstart(eval_every=5, keep_last=5), str(wd)).train()
  assert res["best_step"] == 10 and res["best"] == 0.6
  rec = json.loads((wd / "selection.json").read_text())
  assert sorted(int(s) for s in rec["evaluations"]) == [5, 10, 15, 20]
  assert rec["evaluations"]["15"]["exact_match"] == 0.4


def test_resolve_step_errors(tmp_path):
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  with pytest.raises(selection.SelectionError, match="no best checkpoint is recorded"):
    selection.resolve_step(str(tmp_path), "best")
  with pytest.raises(selection.SelectionError, match="no checkpoint of step 7.*: 5"):
    selection.resolve_step(str(tmp_path), "7")
  with pytest.raises(selection.SelectionError, match="expected best, last or a step number"):
    selection.resolve_step(str(tmp_path), "first")
  (tmp_path / "selection.json").write_text(json.dumps(
      {"evaluations": {"9": {"m": 1.0}}, "best_step": 9}))
  with pytest.raises(selection.SelectionError, match="best step 9 .* has no checkpoint"):
    selection.resolve_step(str(tmp_path), "best")
  assert selection.resolve_step(str(tmp_path), "last") == (5, "last")


# ---------------------------------------------------------------------- eval.py


@pytest.fixture(scope="module")
def run_with_test_split(tmp_path_factory):
  """A real 20-step quickstart run, evaluated every 5 steps, every checkpoint kept, on a
  copy of the data with a 10-row test split."""
  from peft_jax.trainer import Trainer
  root = tmp_path_factory.mktemp("sel")
  data = root / "data"
  shutil.copytree(os.path.join(REPO, "data", "quickstart"), data)
  val = (data / "validation.jsonl").read_text().splitlines()
  (data / "test.jsonl").write_text("\n".join(val[-10:]) + "\n")
  c = _quickstart(eval_every=5, keep_last=5)
  c.data.path = str(data)
  wd = root / "wd"
  res = Trainer(c, str(wd)).train()
  return wd, res, json.loads((wd / "selection.json").read_text())


def test_eval_step_best_last_n_reproduce_the_recorded_scores(run_with_test_split, tmp_path):
  wd, res, rec = run_with_test_split
  assert _steps(wd) == [5, 10, 15, 20]
  best = rec["best_step"]
  assert best == res["best_step"]
  for spec, step in (("best", best), ("last", 20), ("10", 10)):
    out = tmp_path / str(spec)
    out.mkdir()
    got, lines = selection.evaluate_checkpoint(str(wd), step=spec, output=str(out))
    assert got["step"] == step and got["split"] == "validation" and got["n"] == 16
    # the trainer's own validation score of that step, from restored leaves
    assert got["exact_match"] == rec["evaluations"][str(step)]["exact_match"], spec
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["step"] == step and on_disk["split"] == "validation"
    assert lines[0].startswith("split: validation; checkpoint: ") and f"(step {step}, " in lines[0]
  assert rec["evaluations"]["20"]["exact_match"] == res["tuned"]


def test_eval_test_split_with_a_config(run_with_test_split, tmp_path):
  wd, _, rec = run_with_test_split
  qs = os.path.join(REPO, "configs", "quickstart.py")
  data = str(wd.parent / "data")
  got, lines = selection.evaluate_checkpoint(
      str(wd), qs, [("data.path", data), ("data.max_eval_examples", "16")], split="test",
      output=str(tmp_path))
  assert got["split"] == "test" and got["n"] == 10 and got["step"] == rec["best_step"]
  assert json.loads((tmp_path / "eval.json").read_text())["split"] == "test"
  assert (tmp_path / "eval.md").read_text().startswith("split: test; ")
  # a config that disagrees with the run on what the checkpoint depends on
  from peft_jax.inputs import ConfigError
  with pytest.raises(ConfigError, match=r"differs from the config of the run .*peft\.r: 8 -> 4"):
    selection.evaluate_checkpoint(str(wd), qs, [("data.path", data), ("peft.r", "4")])


def test_eval_errors(run_with_test_split, tmp_path):
  from peft_jax.inputs import ConfigError
  from peft_jax.data.common import DataError
  wd, _, rec = run_with_test_split
  with pytest.raises(ConfigError, match=r"--step=7: no checkpoint of step 7 .*: 5, 10, 15, 20"):
    selection.evaluate_checkpoint(str(wd), step="7")
  with pytest.raises(ConfigError, match="--step=3 chooses a checkpoint of a train.py workdir"):
    selection.evaluate_checkpoint(str(wd / "adapter"), step="3")
  with pytest.raises(DataError, match="no dev.jsonl"):
    selection.evaluate_checkpoint(str(wd), split="dev")
  # a damaged step: its manifest is checked before anything is computed
  copy = tmp_path / "wd"
  shutil.copytree(wd, copy, ignore=shutil.ignore_patterns("lock"))
  step_dir = copy / "checkpoints" / str(rec["best_step"])
  victim = next(p for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"
                and p.stat().st_size > 0)
  victim.write_bytes(b"x" * victim.stat().st_size)
  with pytest.raises(ConfigError, match=f"checkpoint step {rec['best_step']} .* is damaged: "
                     ".*fails its SHA-256"):
    selection.evaluate_checkpoint(str(copy))
  (copy / "selection.json").unlink()
  with pytest.raises(ConfigError, match="no best checkpoint is recorded"):
    selection.evaluate_checkpoint(str(copy))


def test_eval_cli_bad_step_one_line(run_with_test_split):
  wd, _, _ = run_with_test_split
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "eval.py", f"--checkpoint={wd}", "--step=99"], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [
      f"error: --step=99: no checkpoint of step 99 (checkpoints in {wd}/checkpoints: 5, 10, 15, 20)"]
