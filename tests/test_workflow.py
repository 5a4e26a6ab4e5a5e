"""End to end: the README's main job (shortened), eval.py on its checkpoint, dry runs, errors."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _last_json(out):
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("quickstart")
  r = _run("train.py", "--config=configs/quickstart.py", f"--workdir={wd}",
           "--config.train.num_steps=150")
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, _last_json(r.stdout), r.stdout


def test_quickstart_tuned_far_above_untuned(quickstart_run):
  wd, res, out = quickstart_run
  assert res["untuned"] < 0.2, res
  assert res["tuned"] > 0.8, res
  assert "trainable params" in out  # the accounting table is printed at start
  lines = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  losses = [l["train/loss"] for l in lines if "train/loss" in l]
  assert losses[-1] < losses[0]
  assert any("train/tokens_per_s" in l for l in lines)
  assert os.listdir(wd / "tb")  # TensorBoard event file


def test_eval_reproduces_the_logged_metric(quickstart_run):
  wd, res, _ = quickstart_run
  r = _run("eval.py", "--config=configs/quickstart.py", f"--checkpoint={wd / 'adapter'}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert _last_json(r.stdout)["exact_match"] == res["tuned"]
  assert (wd / "eval.json").exists() and (wd / "eval.md").exists()


def test_dry_run_last_line_is_json():
  r = _run("train.py", "--config=configs/quickstart.py", "--dry_run",
           "--config.model.name=t5-large", "--config.peft.target_modules=q,v")
  assert r.returncode == 0, r.stderr[-3000:]
  info = _last_json(r.stdout)
  assert info["trainable_params"] == 2_359_296
  assert set(info) >= {"total_params", "trainable_params", "changed_params", "trainable_percent"}


@pytest.mark.parametrize("args,expected", [
    (["--config.peft.method=nope"], "unknown PEFT method 'nope'"),
    (["--config.model.name=t5-huge"], "unknown model preset 't5-huge'"),
    (["--config.model.name=", "--config.model.checkpoint=/nonexistent/dir"], "does not exist"),
])
def test_bad_config_one_clear_line(args, expected):
  r = _run("train.py", "--config=configs/quickstart.py", "--dry_run", *args)
  assert r.returncode == 2
  assert expected in r.stderr and "Traceback" not in r.stderr


def _adapter(wd):
  from safetensors.numpy import load_file
  return load_file(str(wd / "adapter" / "adapter.safetensors"))


def test_interrupted_run_resumes_bitwise(tmp_path):
  """40 steps straight vs. 20 steps, stop, restart with the same workdir: the same
  adapter, bitwise; also with gradient accumulation (4 micro-batches of 8)."""
  common = ["train.py", "--config=configs/quickstart.py", "--config.train.num_steps=40",
            "--config.train.save_every=10", "--config.train.eval_at_start=False",
            "--config.train.micro_batch_size=8", "--config.model.dropout_rate=0.1"]
  a, b = tmp_path / "straight", tmp_path / "resumed"
  r = _run(*common, f"--workdir={a}")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _run(*common, f"--workdir={b}", "--config.train.stop_at_step=20")
  assert r.returncode == 0, r.stderr[-3000:]
  assert _last_json(r.stdout)["interrupted_at"] == 20
  assert not (b / "adapter").exists()
  r = _run(*common, f"--workdir={b}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout and "at step 20" in r.stdout
  x, y = _adapter(a), _adapter(b)
  assert x.keys() == y.keys()
  for k in x:
    assert (x[k] == y[k]).all(), k


def test_trainer_runs_method_hooks_adalora(tmp_path):
  """The training loop never names a method; AdaLoRA's hooks (orthogonality regulariser,
  rank pruning every deltaT steps) still run through it: at the end the number of non-zero
  singular values equals the target budget."""
  import importlib.util
  from peft_jax.peft import adalora
  from peft_jax.trainer import Trainer
  spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.peft = {"method": "adalora", "init_r": 6, "target_r": 2, "tinit": 4, "tfinal": 4,
            "deltaT": 2, "total_step": 20}
  c.train.num_steps = 20
  c.train.eval_at_start = False
  c.data.max_eval_examples = 8
  c.eval.batch_size = 8
  import numpy as np
  from peft_jax.peft import flatten
  t = Trainer(c, None)
  es = {k: v for k, v in flatten(t.state.params).items() if k.endswith("/adalora_E")}
  assert es and all(v.shape[-1] == 6 for v in es.values())
  n_mats = sum(int(np.prod(v.shape[:-1])) for v in es.values())
  t.train()
  # the budget falls from init_r * n to target_r * n; E starts at zero, so check the end
  assert adalora.count_nonzero_ranks(t.state, t.params) == 2 * n_mats
  trained = flatten(t.params)
  assert any(np.any(np.asarray(trained[k]) != 0) for k in es)


def test_divergence_from_the_start_saves_nothing_and_says_so(tmp_path):
  """An absurd learning rate from the first step: the blown-up state is never checkpointed
  (the check runs before each save, not one step behind); the message names the step and
  says that no checkpoint was saved. (tests/test_faults.py covers a run that diverges after
  good checkpoints.)"""
  import importlib.util
  from peft_jax.trainer import Trainer, TrainingDiverged
  spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.num_steps = 200
  c.train.learning_rate = 1e30
  c.train.grad_clip = 0.0
  c.train.warmup_ratio = 0.0
  c.train.schedule = "constant"
  c.train.save_every = 1
  c.train.log_every = 1000
  c.train.eval_at_start = False
  t = Trainer(c, str(tmp_path / "wd"))
  with pytest.raises(TrainingDiverged, match=r"training diverged at step 1: the updated .*no "
                     r"checkpoint was saved.*learning rate too high"):
    t.train()
  ck = tmp_path / "wd" / "checkpoints"
  assert not ck.exists() or not [p for p in ck.iterdir() if p.name.isdigit()]


def test_early_stopping_on_validation_loss(tmp_path):
  """With a learning rate far below float32 resolution (learning rates must be > 0) the
  weights and so the validation loss never change: patience 2 stops the run at the third
  evaluation; the best checkpoint by the metric is selected."""
  import importlib.util
  from peft_jax.trainer import Trainer
  spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.num_steps = 100
  c.train.learning_rate = 1e-30
  c.train.eval_every = 5
  c.train.early_stopping_patience = 2
  c.train.eval_at_start = False
  c.data.max_eval_examples = 20
  c.eval.batch_size = 20
  res = Trainer(c, str(tmp_path / "wd")).train()
  assert res["steps"] == 15, res
  assert res["best_step"] == 5
