"""Test setup: 8 simulated CPU devices (before any JAX call), fp32 matmuls, and one
compilation cache for the session's train.py / eval.py subprocesses (a temporary
directory, removed at the end: nothing is written to the real home)."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# the programs' persistent compilation cache (peft_jax/compile_cache.py): shared by the
# session's subprocesses, which compile the same quickstart steps again and again
_CACHE = tempfile.mkdtemp(prefix="peft_jax_test_cache_")
os.environ["PEFT_JAX_CACHE_DIR"] = _CACHE
os.environ.pop("PEFT_JAX_COMPILATION_CACHE", None)
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data samples not found at {SHARED_DATA} (../shared/data is absent)")
  return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
  """torch's intra-op threads fight XLA's on 2 cores (a tiny forward then takes ~1 s)."""
  import torch
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)
