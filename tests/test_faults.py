"""Nothing lost, nothing silently wrong: kills and interrupts resume bitwise, divergence
keeps the last good checkpoint, damaged checkpoints and adapters are caught by their
checksums, one run per workdir, and one ``error:`` line for every bad data or file input.

Faults are injected with ``PEFT_JAX_FAULT=<point>=kill|int`` (``peft_jax.integrity.fault``):
the process sends itself SIGKILL or SIGINT when it reaches that point."""
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = "configs/quickstart.py"
#: a short quickstart run: 3 epochs of 10 steps (160 training rows, batch 16)
SHORT = [f"--config={QS}", "--config.train.num_steps=30", "--config.train.batch_size=16",
         "--config.data.max_train_examples=160", "--config.data.max_eval_examples=20",
         "--config.train.eval_at_start=false", "--config.train.log_every=5"]


def _cli(script, *args, env=None, timeout=600):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env or {}))
  p = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=e,
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout + p.stderr


def _adapter_bytes(wd):
  with open(os.path.join(wd, "adapter", "adapter.safetensors"), "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run every drill must reproduce bitwise."""
  wd = str(tmp_path_factory.mktemp("ref") / "wd")
  rc, out = _cli("train.py", *SHORT, f"--workdir={wd}")
  assert rc == 0, out[-3000:]
  return wd, _adapter_bytes(wd)


# ----------------------------------------------------------------------------- kills

DRILLS = [
    ("step:15=kill", 137, "SIGKILL between saves (mid-epoch)"),
    ("checkpoint:20=kill", 137, "SIGKILL after orbax wrote step 20, before its manifest"),
    ("adapter=kill", 137, "SIGKILL while the adapter is written"),
    ("step:15=int", 130, "SIGINT mid-epoch"),
    ("step:20=int", 130, "SIGINT on an epoch-end save step"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fault,code,what", DRILLS, ids=[d[0] for d in DRILLS])
def test_killed_or_interrupted_run_resumes_bitwise(fault, code, what, reference, tmp_path):
  ref_wd, ref_bytes = reference
  wd = str(tmp_path / "wd")
  rc, out = _cli("train.py", *SHORT, f"--workdir={wd}", env={"PEFT_JAX_FAULT": fault})
  assert rc in (code, -abs(code - 128)), (what, rc, out[-3000:])
  assert "Traceback" not in out, out[-3000:]
  if code == 130:
    assert "interrupted at step" in out and "rerun the same command to resume" in out
  rc, out2 = _cli("train.py", *SHORT, f"--workdir={wd}")
  assert rc == 0, (what, out2[-3000:])
  if fault != "adapter=kill":
    assert "resumed from" in out2, out2[-3000:]
  assert _adapter_bytes(wd) == ref_bytes, f"{what}: the adapter differs from an uninterrupted run"
  steps = [json.loads(l)["step"] for l in open(os.path.join(wd, "metrics.jsonl"))
           if "train/loss" in l]
  assert steps == sorted(set(steps)), f"metrics.jsonl repeats steps: {steps}"
  assert not os.path.exists(os.path.join(wd, "lock"))


# ----------------------------------------------------------------------------- divergence

def _trainer_config(**train):
  from peft_jax import config_lib
  over = [(a[2:].split("=", 1)[0][len("config."):], a.split("=", 1)[1]) for a in SHORT[1:]]
  over += [(f"train.{k}", str(v)) for k, v in train.items()]
  return config_lib.load(os.path.join(REPO, QS), over)[0]


def test_divergence_keeps_the_last_good_checkpoint_and_a_rerun_finishes(tmp_path):
  """20 good steps; a rerun at learning rate 1e30 saving every step diverges at step 21
  (weights blown up to finite but huge values) and saves nothing of it; the rerun at the
  normal learning rate resumes from step 20, with no --allow_changed, and finishes."""
  from peft_jax.peft import flatten
  from peft_jax.trainer import Trainer, TrainingDiverged
  wd = str(tmp_path / "wd")
  res = Trainer(_trainer_config(stop_at_step=20, save_every=10), wd).train()
  assert res["interrupted_at"] == 20
  bad = _trainer_config(learning_rate=1e30, save_every=1)
  with pytest.raises(TrainingDiverged) as e:
    Trainer(bad, wd, allow_changed=["train.learning_rate"]).train()
  msg = str(e.value)
  assert "step 21" in msg and "last good checkpoint, step 20" in msg and "learning rate" in msg
  saved = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
  assert saved[-1] == 20, saved
  assert json.load(open(os.path.join(wd, "config.json")))["config"]["train"]["learning_rate"] == 3e-3
  t = Trainer(_trainer_config(save_every=1), wd)
  res = t.train()
  assert res["steps"] == 30 and np.isfinite(res["eval_loss"])
  assert all(np.isfinite(np.asarray(v)).all() for v in flatten(t.params).values())


def test_non_finite_base_weights_are_named_at_load(tmp_path):
  from peft_jax.builder import build
  from peft_jax.config_lib import ConfigError
  from peft_jax.models import get_preset, init_params
  from peft_jax.checkpoint.hf import save_hf
  import jax
  cfg = get_preset("t5-tiny")
  params = init_params(cfg, jax.random.PRNGKey(0))
  params["encoder"]["final_norm"]["scale"] = params["encoder"]["final_norm"]["scale"].at[0].set(np.inf)
  save_hf(cfg, params, str(tmp_path / "ck"))
  c = _trainer_config()
  c.model.checkpoint = str(tmp_path / "ck")
  with pytest.raises(ConfigError, match="non-finite values in encoder/final_norm/scale"):
    build(c).with_weights()


# ----------------------------------------------------------------------------- checksums

def _step_files(wd, step):
  d = os.path.join(wd, "checkpoints", str(step))
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)


def _flip(path):
  b = bytearray(open(path, "rb").read())
  for i in range(0, len(b), 997):
    b[i] ^= 0xFF
  open(path, "wb").write(bytes(b))


def _truncate(path):
  n = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(max(n // 2, 1) if n > 1 else 0)


@pytest.mark.parametrize("damage", ["flip_largest", "truncate_largest", "truncate_meta",
                                    "truncate_checkpoint-metadata", "truncate_array-metadata",
                                    "truncate_manifest", "delete_manifest"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, tmp_path, capsys):
  from peft_jax.trainer import Trainer
  wd = str(tmp_path / "wd")
  Trainer(_trainer_config(stop_at_step=20, save_every=10), wd).train()
  files = _step_files(wd, 20)
  largest = max(files, key=os.path.getsize)
  target = {"flip_largest": largest, "truncate_largest": largest,
            "truncate_meta": [f for f in files if "/meta/" in f and f.endswith("metadata")][0],
            "truncate_checkpoint-metadata": [f for f in files
                                             if f.endswith("/20/_CHECKPOINT_METADATA")][0],
            "truncate_array-metadata": [f for f in files if f.endswith("/trainable/_METADATA")][0],
            "truncate_manifest": os.path.join(wd, "checkpoints", "20", "MANIFEST.json"),
            "delete_manifest": os.path.join(wd, "checkpoints", "20", "MANIFEST.json")}[damage]
  {"flip": _flip, "truncate": _truncate, "delete": os.remove}[damage.split("_")[0]](target)
  capsys.readouterr()
  t = Trainer(_trainer_config(stop_at_step=25, save_every=10), wd)
  res = t.train()
  out = capsys.readouterr().out
  assert "warning: checkpoint step 20 is damaged" in out, out[-2000:]
  assert os.path.relpath(target, os.path.join(wd, "checkpoints", "20")) in out
  assert "resumed from" in out and "at step 10" in out
  assert res["interrupted_at"] == 25
  aside = os.listdir(os.path.join(wd, "checkpoints.set_aside"))
  assert len(aside) == 1 and aside[0].startswith("20-damaged"), aside   # kept, not deleted


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with an adapter (3 steps)."""
  from peft_jax.trainer import Trainer
  wd = str(tmp_path_factory.mktemp("trained") / "wd")
  Trainer(_trainer_config(num_steps=3), wd).train()
  return wd


def test_adapter_round_trip_verifies_its_manifest(trained, tmp_path):
  from peft_jax.peft import PeftConfigError
  from peft_jax.peft.io import read_adapter
  src = os.path.join(trained, "adapter")
  cfg, arrs = read_adapter(src)
  assert arrs and cfg["method"] == "lora"
  manifest = json.load(open(os.path.join(src, "MANIFEST.json")))["files"]
  assert set(manifest) == {"adapter.safetensors", "peft_config.json"}
  bad = str(tmp_path / "a")
  shutil.copytree(src, bad)
  _flip(os.path.join(bad, "adapter.safetensors"))
  with pytest.raises(PeftConfigError, match="adapter.safetensors fails its SHA-256 checksum"):
    read_adapter(bad)


# ----------------------------------------------------------------------------- one run per workdir

def test_second_run_on_a_workdir_stops_with_one_line_and_the_first_finishes(tmp_path):
  wd = str(tmp_path / "wd")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  first = subprocess.Popen([sys.executable, "train.py", *SHORT, f"--workdir={wd}"], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(wd, "lock")) and time.time() < deadline:
      assert first.poll() is None, first.stdout.read()
      time.sleep(0.2)
    rc, out = _cli("train.py", *SHORT, f"--workdir={wd}")
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert f"pid {first.pid}" in errors[0] and "in use by another run" in errors[0]
    out1, _ = first.communicate(timeout=600)
    assert first.returncode == 0 and "tuned exact_match" in out1, out1[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  assert not os.path.exists(os.path.join(wd, "lock"))


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
  from peft_jax.integrity import acquire_lock, release_lock
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  wd = tmp_path / "wd"
  wd.mkdir()
  import socket
  (wd / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                       "since": "earlier"}))
  acquire_lock(str(wd))
  assert f"taking over the lock of {wd} from process {dead.pid}" in capsys.readouterr().out
  assert json.load(open(wd / "lock"))["pid"] == os.getpid()
  release_lock(str(wd))
  assert not (wd / "lock").exists()


def test_a_full_disk_gives_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
  """A file-size limit (RLIMIT_FSIZE: writes past it fail as on a full disk) while saving
  step 20: one error line, exit 2; step 10 stays intact and a rerun resumes from it."""
  import resource
  from peft_jax.integrity import manifest_problem

  def limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))

  wd = str(tmp_path / "wd")
  rc, out = _cli("train.py", *SHORT, f"--workdir={wd}", "--config.train.stop_at_step=10")
  assert rc == 0, out[-3000:]
  before = _snapshot(os.path.join(wd, "checkpoints", "10"))
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  p = subprocess.run([sys.executable, "train.py", *SHORT, f"--workdir={wd}"], cwd=REPO, env=e,
                     capture_output=True, text=True, timeout=600, preexec_fn=limit)
  text = p.stdout + p.stderr
  errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
  assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
  assert "cannot save checkpoint step 20" in errors[0] and "File too large" in errors[0]
  assert _snapshot(os.path.join(wd, "checkpoints", "10")) == before
  assert manifest_problem(os.path.join(wd, "checkpoints", "10")) is None
  rc, out = _cli("train.py", *SHORT, f"--workdir={wd}")
  assert rc == 0 and "at step 10" in out, out[-3000:]


# ----------------------------------------------------------------------------- bad inputs

GOOD_TRAIN = [{"input": f"review : good {i}", "target": "positive"} for i in range(40)]


def _jsonl(rows):
  return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _data_dir(root, train=None, val=None):
  """A quickstart-format folder; ``train``/``val``: file text, bytes, or None for a good one."""
  d = os.path.join(root, "data")
  os.makedirs(d, exist_ok=True)
  for name, content in (("train.jsonl", train), ("validation.jsonl", val)):
    p = os.path.join(d, name)
    if content == "<absent>":
      continue
    if content == "<dir>":
      os.makedirs(p)
      continue
    if content is None:
      content = _jsonl(GOOD_TRAIN[:10] if name.startswith("val") else GOOD_TRAIN)
    with open(p, "wb") as f:
      f.write(content if isinstance(content, bytes) else content.encode())
  return d


def _data_case(train=None, val=None):
  def make(root):
    return [f"--config.data.path={_data_dir(root, train, val)}"]
  return make


def _jsonl_case(train_file, val_file=None):
  def make(root):
    d = _data_dir(root)
    args = ["--config.data.name=jsonl"]
    if train_file is not None:
      args.append(f"--config.data.train_file={train_file(root, d)}")
    if val_file is not None:
      args.append(f"--config.data.validation_file={val_file(root, d)}")
    return args
  return make


def _hf_checkpoint(root, edit):
  """A tiny HF T5 checkpoint, then ``edit(dir)`` damages it."""
  from peft_jax.checkpoint.hf import save_hf
  from peft_jax.models import get_preset, init_params
  import jax
  cfg = get_preset("t5-tiny")
  d = os.path.join(root, "ck")
  save_hf(cfg, init_params(cfg, jax.random.PRNGKey(0)), d)
  edit(d)
  return d


def _model_case(edit):
  def make(root):
    return [f"--config.model.checkpoint={_hf_checkpoint(root, edit)}"]
  return make


def _edit_json(name, fn):
  def edit(d):
    p = os.path.join(d, name)
    conf = json.load(open(p))
    fn(conf)
    json.dump(conf, open(p, "w"))
  return edit


def _workdir_case(setup):
  def make(root):
    wd = os.path.join(root, "wd")
    setup(wd)
    return [f"--workdir={wd}"]
  return make


def _live_lock(wd):
  os.makedirs(wd)
  import socket
  json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"},
            open(os.path.join(wd, "lock"), "w"))    # this test process: alive


def _bad_run_config(wd):
  os.makedirs(os.path.join(wd, "checkpoints", "10"))
  open(os.path.join(wd, "config.json"), "w").write('{"config": {"tra')


def _adapter_case(damage):
  """eval.py on a damaged copy of the trained adapter."""
  def make(root, trained):
    a = os.path.join(root, "adapter")
    shutil.copytree(os.path.join(trained, "adapter"), a)
    damage(a)
    return [f"--checkpoint={a}"]
  return make


def _in(name, fn):
  return lambda d: fn(os.path.join(d, name))


def _write(text):
  return lambda p: open(p, "w").write(text)


def _rm_manifest_then(fn):
  def f(d):
    os.remove(os.path.join(d, "MANIFEST.json"))
    fn(d)
  return f


def _parquet_path(root):
  p = os.path.join(root, "x.parquet")
  open(p, "wb").write(b"PAR1\x00\x00PAR1")
  return [f"--config.data.path={p}"]


def _output_file(root, trained):
  p = os.path.join(root, "out.txt")
  open(p, "w").write("keep me")
  return [f"--checkpoint={trained}", f"--output={p}"]


# (script, make(root[, trained]) -> extra args, a fragment the error line must contain)
BAD_INPUTS = [
    ("train", _data_case(train="<absent>"), "file not found"),
    ("train", _data_case(val="<absent>"), "validation.jsonl; expected a JSONL file"),
    ("train", _data_case(train=_jsonl(GOOD_TRAIN[:2]) + "\n" + '{"input": "x", "target": \n'),
     "train.jsonl line 4 is not valid JSON"),
    ("train", _data_case(train=_jsonl(GOOD_TRAIN[:3] + [{"input": "no target"}])),
     "train.jsonl line 4 lacks 'target'"),
    ("train", _data_case(train=_jsonl(GOOD_TRAIN[:5]).encode() + b'{"input": "caf\xe9", "target": "x"}\n'),
     "train.jsonl line 6 is not UTF-8 text"),
    ("train", _data_case(val=""), "validation.jsonl has no rows"),
    ("train", _data_case(val="\n\n  \n"), "validation.jsonl has no rows"),
    ("train", _data_case(train=_jsonl(GOOD_TRAIN[:7] + [{"input": "x", "target": 3}])),
     "train.jsonl line 8: 'target' is a int; expected a string"),
    ("train", _data_case(train=_jsonl(GOOD_TRAIN[:1] + ['["input", "target"]'])),
     "train.jsonl line 2 is a JSON list"),
    ("train", _data_case(train=_jsonl(['"just a string"'])), "line 1 is a JSON str"),
    ("train", _data_case(train=_jsonl([{"input": None, "target": "x"}])),
     "'input' is a NoneType"),
    ("train", _data_case(train="<dir>"), "train.jsonl is a directory"),
    ("train", _data_case(train=b"PAR1\x00\x01\x02binary parquet\xff\xfe"), "line 1 is not UTF-8 text"),
    ("train", _parquet_path, "x.parquet is a file"),
    ("train", lambda root: [f"--config.data.path={os.path.join(root, 'nowhere')}"], "is missing"),
    ("train", _jsonl_case(None), "data.name='jsonl' needs data.train_file"),
    ("train", _jsonl_case(lambda r, d: os.path.join(r, "none.jsonl"),
                          lambda r, d: os.path.join(d, "validation.jsonl")),
     "data.train_file: file not found"),
    ("train", _jsonl_case(lambda r, d: os.path.join(d, "train.jsonl"), lambda r, d: d),
     "is a directory"),
    ("train", _model_case(_edit_json("config.json", lambda c: c.pop("d_model"))),
     "config.json lacks 'd_model'"),
    ("train", _model_case(_in("config.json", _write('{"model_type": "t5", "d_mo'))),
     "corrupt config.json"),
    ("train", _model_case(_edit_json("config.json", lambda c: c.update(model_type="bert"))),
     "unsupported architecture"),
    ("train", _model_case(lambda d: os.remove(os.path.join(d, "model.safetensors"))),
     "no weights in"),
    ("train", _model_case(_in("model.safetensors", _truncate)), "cannot read safetensors file"),
    ("train", _model_case(_in("model.safetensors", _write("\x00" * 12))),
     "cannot read safetensors file"),
    ("train", _workdir_case(lambda wd: open(wd, "w").write("a file")), "is a file; expected a directory"),
    ("train", _workdir_case(_live_lock), "is in use by another run"),
    ("train", _workdir_case(_bad_run_config), "config.json is unreadable"),
    ("eval", _adapter_case(_in("adapter.safetensors", _flip)),
     "adapter.safetensors fails its SHA-256 checksum"),
    ("eval", _adapter_case(_in("adapter.safetensors", _truncate)),
     "adapter.safetensors has"),
    ("eval", _adapter_case(_in("peft_config.json", _truncate)), "peft_config.json has"),
    ("eval", _adapter_case(_in("adapter.safetensors", os.remove)),
     "adapter.safetensors is missing"),
    ("eval", _adapter_case(_rm_manifest_then(_in("adapter.safetensors", _truncate))),
     "adapter weights"),
    ("eval", _adapter_case(_rm_manifest_then(_in("peft_config.json", _write('{"meth')))),
     "peft_config.json is unreadable"),
    ("eval", _adapter_case(_rm_manifest_then(_in("adapter.safetensors", os.remove))),
     "has no weights file adapter.safetensors"),
    ("eval", _output_file, "is a file; expected a directory for eval.json"),
]


def _snapshot(root):
  out = {}
  for r, _, fs in os.walk(root):
    for f in fs:
      p = os.path.join(r, f)
      out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def bad_input_results(trained, tmp_path_factory):
  """Every case in its own folder, two processes at a time."""
  cases = []
  for i, (script, make, _) in enumerate(BAD_INPUTS):
    root = str(tmp_path_factory.mktemp(f"bad{i}"))
    args = make(root, trained) if script == "eval" else make(root)
    base = [f"--config={QS}", "--config.train.num_steps=1", "--config.train.eval_at_start=false"]
    if script == "train" and not any(a.startswith("--workdir") for a in args):
      args.append(f"--workdir={os.path.join(root, 'run')}")
    cases.append((f"{script}.py", base + args, root, _snapshot(root)))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futs = [pool.submit(_cli, s, *a) for s, a, _, _ in cases]
    results = [f.result() for f in futs]
  return [(rc, out, root, before) for (rc, out), (_, _, root, before) in zip(results, cases)]


@pytest.mark.parametrize("i", range(len(BAD_INPUTS)), ids=[f"{s}-{frag[:40]}" for s, _, frag in BAD_INPUTS])
def test_bad_input_gives_one_error_line_and_loses_nothing(bad_input_results, i):
  rc, out, root, before = bad_input_results[i]
  fragment = BAD_INPUTS[i][2]
  errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
  assert rc == 2, (rc, out[-3000:])
  assert "Traceback" not in out, out[-3000:]
  assert len(errors) == 1, out[-3000:]
  assert fragment in errors[0], errors[0]
  after = _snapshot(root)
  lost = [p for p, h in before.items() if after.get(p) != h]
  assert not lost, f"files changed or lost: {lost}"


def test_there_are_at_least_30_bad_inputs():
  assert len(BAD_INPUTS) >= 30


def test_data_warnings_one_line_each(tmp_path, capsys):
  """Truncation of more than 10% of the examples and a data set smaller than one batch are
  said in one line each, before training."""
  from peft_jax.trainer import Trainer
  c = _trainer_config(num_steps=1, batch_size=32)
  c.data.path = _data_dir(str(tmp_path), train=_jsonl(GOOD_TRAIN[:5]))
  c.data.max_train_examples = 0
  c.data.max_source_len = 2
  Trainer(c, None)
  out = capsys.readouterr().out
  warns = [ln for ln in out.splitlines() if ln.startswith("warning:")]
  assert any("training inputs" in w and "data.max_source_len=2" in w for w in warns), out
  assert any("fewer than one batch" in w and "5 example(s)" in w for w in warns), out


def test_missing_superni_task_files_are_warned_about(tmp_path, capsys):
  from peft_jax import config_lib, inputs
  root = tmp_path / "ni"
  (root / "tasks").mkdir(parents=True)
  (root / "splits" / "default").mkdir(parents=True)
  names = [f"task{i:03d}_demo" for i in range(6)]
  for n in names[:5]:                     # the last listed task has no file
    (root / "tasks" / f"{n}.json").write_text(json.dumps({
        "Definition": [f"Copy the input ({n})."], "Categories": ["Demo"],
        "Instances": [{"id": f"{n}-{j}", "input": f"x{j}", "output": [f"x{j}"]} for j in range(4)]}))
  (root / "splits" / "default" / "train_tasks.txt").write_text("\n".join(names) + "\n")
  (root / "splits" / "default" / "test_tasks.txt").write_text(names[0] + "\n")
  cfg, _ = config_lib.load(os.path.join(REPO, QS), [
      ("data.name", "superni"), ("data.path", str(root)), ("data.n_validation_tasks", "2")])
  capsys.readouterr()
  inputs.dataset(cfg)
  out = capsys.readouterr().out
  warns = [ln for ln in out.splitlines() if ln.startswith("warning:")]
  assert len(warns) == 1 and "task file(s) named by the split list are missing" in warns[0], out
  assert names[-1] in warns[0]


def test_a_second_signal_exits_at_once(tmp_path):
  """The first SIGINT asks for a stop after the step; a second one exits with 130 at once."""
  code = ("import os, signal, time\n"
          "from peft_jax.trainer import _Signals\n"
          "with _Signals(print) as s:\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n"
          "  time.sleep(0.5)\n"
          "  assert s.received == signal.SIGINT\n"
          "  print('still running', flush=True)\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n"
          "  time.sleep(5)\n"
          "print('not reached')\n")
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == 130, p.stdout + p.stderr
  assert "stopping after this step" in p.stdout and "still running" in p.stdout
  assert "again: exiting now" in p.stdout and "not reached" not in p.stdout
