"""The config surface: schema-checked fields, method and data-set switching, one error line
for every bad input (exit 2, no traceback), --print_config, schedules, provenance."""
import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from peft_jax import config_lib
from peft_jax.config_lib import ConfigError
from peft_jax.peft import get_method, registered_methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = "configs/quickstart.py"


def _cli(script, *args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  p = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout, p.stderr


# ----------------------------------------------------------------------------- bad input
# (script, args, a fragment the error line must contain)
BAD = [
    ("train.py", [f"--config={QS}", "--config.train.num_step=50"],
     "unknown config field 'train.num_step'; did you mean 'train.num_steps'?"),
    ("train.py", [f"--config={QS}", "--config.model.nam=t5-small"], "did you mean 'model.name'"),
    ("train.py", [f"--config={QS}", "--config.data.num_train_tasks=50"],
     "unknown config field 'data.num_train_tasks' for data set 'quickstart'"),
    ("train.py", [f"--config={QS}", "--config.peft.method=ia3", "--config.peft.r=4"],
     "unknown config field 'peft.r' for method 'ia3'"),
    ("train.py", [f"--config={QS}", "--config.eval.beams=2"], "did you mean 'eval.num_beams'"),
    ("train.py", [f"--config={QS}", "--config.mesh.fsd=2"], "did you mean 'mesh.fsdp'"),
    ("train.py", [f"--config={QS}", "--config.optim.lr=1"], "unknown config field 'optim.lr'"),
    ("train.py", [f"--config={QS}", "--config.learning_rate=1"], "unknown config field 'learning_rate'"),
    ("train.py", [f"--config={QS}", "--config.train.batch_size=0"], "train.batch_size=0 is not an int >= 1"),
    ("train.py", [f"--config={QS}", "--config.train.micro_batch_size=-1"], "train.micro_batch_size=-1"),
    ("train.py", [f"--config={QS}", "--config.train.learning_rate=0"], "train.learning_rate=0.0 is not a number > 0"),
    ("train.py", [f"--config={QS}", "--config.train.learning_rate=abc"], "train.learning_rate: 'abc' is not a number"),
    ("train.py", [f"--config={QS}", "--config.train.schedule=cosin"], "'cosin' is not one of 'linear', 'cosine'"),
    ("train.py", [f"--config={QS}", "--config.train.warmup_ratio=2"], "train.warmup_ratio=2.0"),
    ("train.py", [f"--config={QS}", "--config.train.num_steps=-5"], "train.num_steps=-5 is not an int >= 0"),
    ("train.py", [f"--config={QS}", "--config.train.keep_last=0"], "train.keep_last=0"),
    ("train.py", [f"--config={QS}", "--config.train.seed=x"], "train.seed: 'x' is not an int"),
    ("train.py", [f"--config={QS}", "--config.train.eval_at_start=maybe"], "is not true or false"),
    ("train.py", [f"--config={QS}", "--config.model.dropout_rate=1.0"], "model.dropout_rate=1.0"),
    ("train.py", [f"--config={QS}", "--config.model.dtype=float8"], "model.dtype='float8' is not one of"),
    ("train.py", [f"--config={QS}", "--config.model.remat=everything"], "model.remat='everything'"),
    ("train.py", [f"--config={QS}", "--config.model.attention_impl=flash"],
     "model.attention_impl='flash' is not one of"),
    ("train.py", [f"--config={QS}", "--config.model.name=t5-nope"], "unknown model preset"),
    ("train.py", [f"--config={QS}", "--config.eval.num_beams=0"], "eval.num_beams=0 is not an int >= 1"),
    ("train.py", [f"--config={QS}", "--config.eval.metric=bleu"], "eval.metric='bleu' is not one of"),
    ("train.py", [f"--config={QS}", "--config.eval.max_new_tokens=0"], "eval.max_new_tokens=0"),
    ("train.py", [f"--config={QS}", "--config.mesh.data=0"], "mesh.data=0"),
    ("train.py", [f"--config={QS}", "--config.mesh.num_devices=99"], "mesh.num_devices=99"),
    ("train.py", [f"--config={QS}", "--config.peft.r=0"], "peft.r=0 is not an int >= 1"),
    ("train.py", [f"--config={QS}", "--config.peft.lora_dropout=1.5"], "peft.lora_dropout=1.5"),
    ("train.py", [f"--config={QS}", "--config.peft.method=loraa"], "did you mean 'lora'"),
    ("train.py", [f"--config={QS}", "--config.data.name=nope"], "data.name='nope' is not one of"),
    ("train.py", [f"--config={QS}", "--config.train.batch_size=30", "--config.train.micro_batch_size=8"],
     "must be a multiple of train.micro_batch_size=8"),
    ("train.py", [f"--config={QS}", "--config.train.batch_size"], "--config.train.batch_size needs a value"),
    ("train.py", ["--config=configs/nope.py"], "config file 'configs/nope.py' does not exist"),
    ("train.py", [f"--config={QS}:nope"], "config variant 'nope' is not recognised"),
    ("train.py", ["--config=configs/superni.py:lora,xxl9"], "config variant part 'xxl9' is not recognised"),
    ("train.py", ["--config=configs/survey.py:t5-3b,boolq,nope"], "config variant part 'nope'"),
    ("train.py", [], "--config"),
    ("train.py", [f"--config={QS}", "--dryrun"], "Unknown command line flag 'dryrun'"),
    ("eval.py", [f"--config={QS}", "--checkpoint=/nonexistent/dir"],
     "is neither a train.py workdir"),
    ("eval.py", [f"--config={QS}", "--checkpoint=/tmp", "--config.eval.batch_size=0"],
     "eval.batch_size=0"),
]


@pytest.fixture(scope="module")
def bad_results():
  """All cases at once, four processes at a time (each pays its own imports)."""
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futs = [pool.submit(_cli, script, *args) for script, args, _ in BAD]
    return [f.result() for f in futs]


@pytest.mark.parametrize("i", range(len(BAD)), ids=[" ".join(a)[-60:] for _, a, _ in BAD])
def test_bad_config_gives_one_error_line(bad_results, i):
  script, args, fragment = BAD[i]
  rc, out, err = bad_results[i]
  text = out + err
  errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
  assert rc == 2, (rc, text[-2000:])
  assert "Traceback" not in text, text[-2000:]
  assert len(errors) == 1, text
  assert fragment in errors[0], errors[0]


def test_there_are_enough_bad_cases():
  assert len(BAD) >= 25


# ----------------------------------------------------------------------------- resolution

def test_method_switch_takes_the_new_methods_defaults():
  cfg, notes = config_lib.load(QS, [("peft.method", "ia3"), ("train.learning_rate", "1e-2")])
  assert cfg.peft.method == "ia3" and cfg.train.learning_rate == 1e-2
  assert set(cfg.peft) == {"method"} | set(get_method("ia3").hparams)
  assert notes == ["peft.method: lora -> ia3; dropped lora's fields lora_alpha, r, "
                   "target_modules (ia3's defaults apply)"]
  assert cfg.peft.target_modules == get_method("ia3").defaults["target_modules"]
  # the method's own fields are settable after the switch, typed by its declaration
  cfg, _ = config_lib.load(QS, [("peft.method", "prompt_tuning"),
                                ("peft.num_virtual_tokens", "4")])
  assert cfg.peft.num_virtual_tokens == 4
  cfg, notes = config_lib.load(QS, [("peft.method", "lora")])    # no switch: nothing dropped
  assert not notes and cfg.peft.r == 8 and cfg.peft.lora_alpha == 16


def test_every_method_field_is_settable_and_typed():
  for m in registered_methods():
    for name, f in get_method(m).hparams.items():
      assert f.doc, f"{m}.{name} has no doc"
      f.normalise(f.default)                 # every default passes its own declaration
      text = repr(f.default) if f.kind == "any" else _as_text(f.default)
      cfg, _ = config_lib.load(QS, [("peft.method", m), (f"peft.{name}", text)])
      assert cfg.peft[name] == f.normalise(f.default), (m, name)


def _as_text(v):
  if v is None:
    return "none"
  if isinstance(v, (list, tuple)):
    return ",".join(str(x) for x in v)
  return str(v)


def test_data_knobs_switch_with_the_data_set():
  cfg, _ = config_lib.load("configs/superni.py:lora", [("data.num_train_tasks", "50"),
                                                       ("data.instances_per_task", "10")])
  assert cfg.data.num_train_tasks == 50 and cfg.data.instances_per_task == 10
  with pytest.raises(ConfigError, match="unknown config field 'data.num_train_tasks' for data "
                                        "set 'tulu'"):
    config_lib.load("configs/superni.py:lora", [("data.name", "tulu"),
                                                ("data.num_train_tasks", "50")])
  cfg, notes = config_lib.load("configs/superni.py:lora", [("data.name", "tulu"),
                                                           ("data.validation_size", "5")])
  assert cfg.data.validation_size == 5 and "num_train_tasks" not in cfg.data
  # the superni config set none of superni's own knobs: nothing to drop
  assert notes == ["data.name: superni -> tulu (tulu's defaults apply)"]


def test_data_knobs_match_the_loaders():
  """Each declared knob is a keyword of its loader with the same default, and every
  keyword of a loader (but path/seed/size) is declared."""
  import inspect
  from peft_jax.data import sources, superni, tulu
  loaders = dict(sources.LOADERS, superni=superni.load_superni, tulu=tulu.load_tulu)
  for name, knobs in sources.KNOBS.items():
    fn = loaders[name]
    if name in ("boolq", "rte", "copa"):
      fn = sources._load_superglue
    params = {k: p.default for k, p in inspect.signature(fn).parameters.items()
              if p.kind == p.KEYWORD_ONLY and k not in ("path", "seed", "size")}
    assert set(knobs) == set(params), (name, set(knobs) ^ set(params))
    for k, f in knobs.items():
      assert f.default == params[k], (name, k, f.default, params[k])


def test_sweep_checks_grid_fields_per_method():
  from peft_jax import grid_search
  with pytest.raises(grid_search.SweepError, match="unknown config field 'peft.r' for method 'ia3'"):
    grid_search.check_points(QS, {"peft.r": ["4"]}, [0], {"peft.method": "ia3"})
  grid_search.check_points("configs/superni.py:lora", {"data.num_train_tasks": ["10", "50"]}, [0], {})


def test_print_config_lists_every_field_with_its_doc():
  rc, out, err = _cli("train.py", f"--config={QS}", "--config.peft.method=ia3", "--print_config")
  assert rc == 0, err
  cfg, _ = config_lib.load(QS, [("peft.method", "ia3")])
  fields = config_lib.fields_for(cfg.to_dict())
  for section, fs in fields.items():
    for name, f in fs.items():
      line = next(ln for ln in out.splitlines() if ln.startswith(f"{section}.{name} = "))
      assert f.doc in line, line
  assert "note: peft.method: lora -> ia3" in out


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_warms_up_from_init_and_decays_to_end(schedule):
  from ml_collections import ConfigDict
  from peft_jax.step import make_schedule
  f = make_schedule(ConfigDict(dict(total_steps=100, warmup_ratio=0.1, learning_rate=3e-3,
                                    schedule=schedule, init_learning_rate=3e-4,
                                    end_learning_rate=3e-4)))
  np.testing.assert_allclose([float(f(s)) for s in (0, 5, 10, 100)],
                             [3e-4, 1.65e-3, 3e-3, 3e-4], rtol=1e-5)
  mid = float(f(55))      # half-way through the decay: both land on the midpoint
  np.testing.assert_allclose(mid, 1.65e-3, rtol=1e-3)
  quarter = float(f(10 + 90 // 4))
  expect = (3e-4 + (3e-3 - 3e-4) * (1 + np.cos(np.pi * 22 / 90)) / 2 if schedule == "cosine"
            else 3e-3 - (3e-3 - 3e-4) * 22 / 90)
  np.testing.assert_allclose(quarter, expect, rtol=1e-4)


def test_warmup_steps_overrides_the_ratio():
  from ml_collections import ConfigDict
  from peft_jax.step import make_schedule
  f = make_schedule(ConfigDict(dict(total_steps=100, warmup_ratio=0.5, warmup_steps=4,
                                    learning_rate=1.0, schedule="constant_warmup")))
  assert [float(f(s)) for s in (0, 2, 4, 50)] == [0.0, 0.5, 1.0, 1.0]


# ----------------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", registered_methods())
def test_every_method_trains_from_the_command_line_switch(method, tmp_path):
  """``train.py --config=configs/quickstart.py --config.peft.method=<m>`` plus the method's
  required fields as command-line text (its ``example_hparams``): the config resolves as
  train.py resolves it and a few steps train, evaluate and write the adapter."""
  from peft_jax.trainer import Trainer
  overrides = [("peft.method", method)]
  overrides += [(f"peft.{k}", _as_text(v)) for k, v in get_method(method).example_hparams.items()]
  overrides += [("train.num_steps", "2"), ("train.eval_at_start", "false"),
                ("data.max_eval_examples", "4"), ("train.log_every", "1")]
  cfg, notes = config_lib.load(QS, overrides)
  assert cfg.peft.method == method and (method == "lora" or notes)
  res = Trainer(cfg, str(tmp_path)).train()
  assert res["steps"] == 2 and 0.0 <= res["tuned"] <= 1.0 and np.isfinite(res["eval_loss"])
  saved = json.load(open(tmp_path / "adapter" / "peft_config.json"))
  assert saved["method"] == method and saved["base"]["fingerprint"]
  assert json.load(open(tmp_path / "config.json"))["config"]["peft"]["method"] == method


# ----------------------------------------------------------------------------- provenance

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  """A quickstart run stopped at step 4 of 8 (checkpoint at 4), then finished."""
  wd = tmp_path_factory.mktemp("prov")
  common = [f"--config={QS}", f"--workdir={wd}", "--config.train.num_steps=8",
            "--config.train.save_every=4", "--config.data.max_eval_examples=8"]
  rc, out, err = _cli("train.py", *common, "--config.train.stop_at_step=4")
  assert rc == 0, err[-2000:]
  return wd, common


def test_resume_with_another_method_stops_naming_the_field(short_run):
  wd, common = short_run
  rc, out, err = _cli("train.py", *common, "--config.peft.method=ia3")
  errors = [ln for ln in (out + err).splitlines() if ln.startswith("error:")]
  assert rc == 2 and len(errors) == 1 and "Traceback" not in out + err, out + err
  assert "peft.method: 'lora' -> 'ia3'" in errors[0] and str(wd) in errors[0]
  rc, out, err = _cli("train.py", *common, "--config.train.learning_rate=1e-2")
  assert rc == 2 and "train.learning_rate: 0.003 -> 0.01" in err, err


def test_eval_on_another_base_stops_and_on_the_same_base_runs(short_run):
  wd, common = short_run
  rc, out, err = _cli("train.py", *common)                         # resume and finish
  assert rc == 0, err[-2000:]
  tuned = json.loads(out.strip().splitlines()[-1])["tuned"]
  cfg = json.load(open(wd / "config.json"))
  assert cfg["config"]["train"]["num_steps"] == 8 and cfg["base"]["fingerprint"]
  rc, out, err = _cli("eval.py", f"--config={QS}", f"--checkpoint={wd}",
                      "--config.data.max_eval_examples=8")
  assert rc == 0, err[-2000:]
  assert json.loads(out.strip().splitlines()[-1])["exact_match"] == tuned
  # a workdir: the config must be the run's on what the checkpoints depend on
  rc, out, err = _cli("eval.py", f"--config={QS}", f"--checkpoint={wd}",
                      "--config.data.max_eval_examples=8", "--config.train.seed=1")
  errors = [ln for ln in (out + err).splitlines() if ln.startswith("error:")]
  assert rc == 2 and len(errors) == 1 and "Traceback" not in out + err, out + err
  assert "train.seed: 0 -> 1" in errors[0]
  # its adapter directory: the adapter records its base weights, another base stops
  rc, out, err = _cli("eval.py", f"--config={QS}", f"--checkpoint={wd}/adapter",
                      "--config.data.max_eval_examples=8", "--config.train.seed=1")
  errors = [ln for ln in (out + err).splitlines() if ln.startswith("error:")]
  assert rc == 2 and len(errors) == 1 and "Traceback" not in out + err, out + err
  assert "random weights of train.seed=0" in errors[0] and "train.seed=1" in errors[0]
