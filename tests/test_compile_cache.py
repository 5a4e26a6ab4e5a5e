"""The persistent compilation cache (peft_jax/compile_cache.py): where it lives, how it is
turned off, and that a second identical train.py run loads every program from it (the
same adapter, bitwise); the progress bar's labels; the start-up imports left out
(torch for the tokenizer and TensorBoard, scipy for ROUGE)."""
import json
import os
import subprocess
import sys

import pytest

from peft_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: a short quickstart run: every program of a run (init, untuned and final evaluation,
#: the step, the checkpoint's checks) compiles once
SHORT = ["--config=configs/quickstart.py", "--config.train.num_steps=4",
         "--config.train.batch_size=16", "--config.train.log_every=2",
         "--config.data.max_train_examples=64", "--config.data.max_eval_examples=8",
         "--config.eval.batch_size=8"]


def _run(args, **env):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **env)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=e, capture_output=True,
                        text=True, timeout=600)


def _entries(d):
  return {n for n in os.listdir(d) if n.endswith("-cache")}


# ----------------------------------------------------------------------------- where

@pytest.mark.parametrize("env,expected", [
    ({}, "{xdg}/peft_jax/jax_cache"),
    ({"PEFT_JAX_CACHE_DIR": "/somewhere/c"}, "/somewhere/c"),
    ({"PEFT_JAX_CACHE_DIR": ""}, None),
    ({"PEFT_JAX_COMPILATION_CACHE": "0"}, None),
    ({"PEFT_JAX_COMPILATION_CACHE": "off", "PEFT_JAX_CACHE_DIR": "/somewhere/c"}, None),
    ({"PEFT_JAX_COMPILATION_CACHE": "1", "PEFT_JAX_CACHE_DIR": "/somewhere/c"}, "/somewhere/c"),
])
def test_cache_dir_from_the_environment(monkeypatch, tmp_path, env, expected):
  for k in ("PEFT_JAX_CACHE_DIR", "PEFT_JAX_COMPILATION_CACHE"):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  want = expected.format(xdg=tmp_path) if expected else None
  assert compile_cache.cache_dir() == want


def test_default_dir_is_under_the_home_cache(monkeypatch):
  monkeypatch.delenv("PEFT_JAX_CACHE_DIR", raising=False)
  monkeypatch.delenv("PEFT_JAX_COMPILATION_CACHE", raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  assert compile_cache.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache",
                                                   "peft_jax", "jax_cache")


def test_the_test_session_never_caches_in_the_home():
  """conftest.py: the session's subprocesses share one temporary cache."""
  d = compile_cache.cache_dir()
  assert os.path.basename(d).startswith("peft_jax_test_cache_") and os.path.isdir(d)
  assert not d.startswith(os.path.join(os.path.expanduser("~"), ".cache"))


ENABLE = ("import jax; from peft_jax import compile_cache as c; d = c.enable(); "
          "print(d, jax.config.jax_compilation_cache_dir, "
          "jax.config.jax_persistent_cache_min_compile_time_secs)")


def test_enable_in_a_process(tmp_path):
  """On: JAX's options point at the directory and cache every program; off: untouched; an
  unwritable directory: one warning line and no cache; JAX's own setting wins."""
  d = tmp_path / "c"
  r = _run(["-c", ENABLE], PEFT_JAX_CACHE_DIR=str(d))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == [str(d), str(d), "0.0"] and d.is_dir()
  off = tmp_path / "off"
  r = _run(["-c", ENABLE], PEFT_JAX_CACHE_DIR=str(off), PEFT_JAX_COMPILATION_CACHE="0")
  assert r.stdout.split() == ["None", "None", "1.0"], r.stderr[-2000:]
  assert not off.exists()
  (tmp_path / "file").write_text("")
  r = _run(["-c", ENABLE], PEFT_JAX_CACHE_DIR=str(tmp_path / "file" / "c"))
  assert r.returncode == 0 and r.stdout.split()[:2] == ["None", "None"], r.stderr[-2000:]
  assert "warning: the compilation cache" in r.stderr and "not writable" in r.stderr
  r = _run(["-c", ENABLE], PEFT_JAX_CACHE_DIR=str(d), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "j"))
  assert r.stdout.split()[:2] == [str(tmp_path / "j")] * 2, r.stderr[-2000:]


# ----------------------------------------------------------------------------- hits

def test_second_identical_run_loads_every_program_from_the_cache(tmp_path):
  """The first run compiles and writes its programs; the second, identical, finds every
  one of them (no miss, no new entry) and trains to the same adapter, bitwise."""
  cache = tmp_path / "cache"
  outs = []
  for k in (1, 2):
    r = _run(["train.py", *SHORT, f"--workdir={tmp_path / f'wd{k}'}"],
             PEFT_JAX_CACHE_DIR=str(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    outs.append((json.loads(r.stdout.strip().splitlines()[-1]), _entries(cache), r.stderr))
  (first, after1, err1), (second, after2, _) = outs
  assert first["compilation_cache"]["dir"] == str(cache)
  assert first["compilation_cache"]["misses"] > 0
  assert len(after1) == first["compilation_cache"]["misses"]
  assert second["compilation_cache"]["misses"] == 0, second["compilation_cache"]
  assert second["compilation_cache"]["hits"] >= first["compilation_cache"]["misses"]
  assert after2 == after1
  adapter = lambda k: (tmp_path / f"wd{k}" / "adapter" / "adapter.safetensors").read_bytes()
  assert adapter(1) == adapter(2)
  assert second["tuned"] == first["tuned"] and second["eval_loss"] == first["eval_loss"]
  # the trainer's timing: compiling steps apart, the steady rate over the timed ones
  assert first["compile_seconds"] > 0 and 1 <= first["timed_steps"] <= 3
  assert first["tokens_per_s"] > 0
  # the progress bar says what the run is doing
  labels = {s.split(":")[0].strip() for s in err1.replace("\r", "\n").splitlines()
            if "%|" in s}
  assert {"evaluating", "compiling", "train", "saving"} <= labels, labels


# ----------------------------------------------------------------------------- imports

def test_quickstart_tokenizer_without_torch():
  """The quickstart's tokenizer (a generic tokenizers directory) and TensorBoard's writer
  load without importing torch; ROUGE without scipy."""
  code = ("import sys; from ml_collections import ConfigDict; from peft_jax import inputs, metrics;"
          "from peft_jax.metrics_log import _summary_writer;"
          "t = inputs.tokenizer(ConfigDict({'tokenizer': 'data/quickstart/tokenizer', "
          "'model': {'checkpoint': ''}})); _summary_writer();"
          "s = metrics.rouge_l('the cats are running', 'a cat runs');"
          "print(type(t).__name__, 'torch' in sys.modules, 'scipy' in sys.modules, round(s, 4));"
          "import scipy.stats, torch")      # importable as usual afterwards
  r = _run(["-c", code])
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ["TokenizersBackend", "False", "False", "0.5714"], r.stdout


def test_generic_tokenizer_loads_as_autotokenizer_does():
  from transformers import AutoTokenizer
  from peft_jax import inputs
  path = os.path.join(REPO, "data", "quickstart", "tokenizer")
  cls = inputs._generic_tokenizer_class(path)
  assert cls is not None
  ours, auto = cls.from_pretrained(path), AutoTokenizer.from_pretrained(path)
  assert type(ours) is type(auto)
  rows = [json.loads(l) for l in open(os.path.join(REPO, "data", "quickstart", "validation.jsonl"))]
  for r in rows[:50]:
    for text in (r["input"], r["target"]):
      assert ours(text)["input_ids"] == auto(text)["input_ids"]
  assert (ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
      (auto.eos_token_id, auto.pad_token_id, auto.unk_token_id)


def test_other_tokenizer_directories_go_through_autotokenizer(tmp_path):
  import shutil
  from peft_jax import inputs
  src = os.path.join(REPO, "data", "quickstart", "tokenizer")
  with_config = tmp_path / "with_config"
  shutil.copytree(src, with_config)
  (with_config / "config.json").write_text('{"model_type": "t5"}')
  specific = tmp_path / "specific"
  shutil.copytree(src, specific)
  tc = json.loads((specific / "tokenizer_config.json").read_text())
  (specific / "tokenizer_config.json").write_text(json.dumps(tc | {"tokenizer_class": "T5Tokenizer"}))
  mapped = tmp_path / "auto_map"
  shutil.copytree(src, mapped)
  (mapped / "tokenizer_config.json").write_text(json.dumps(tc | {"auto_map": {"AutoTokenizer": ["x", None]}}))
  for d in (with_config, specific, mapped):
    assert inputs._generic_tokenizer_class(str(d)) is None, d


def test_without_blocks_only_while_importing(tmp_path, monkeypatch):
  import importlib
  from peft_jax.imports import without
  (tmp_path / "pj_lazy_mod.py").write_text("X = 1\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "pj_lazy_mod", raising=False)
  with without("pj_lazy_mod", "json"):
    with pytest.raises(ImportError):
      importlib.import_module("pj_lazy_mod")
    assert importlib.import_module("json").dumps(1) == "1"    # already loaded: untouched
  assert importlib.import_module("pj_lazy_mod").X == 1
