"""Compacter / Compacter++ (AdapterHub ``CompacterConfig`` / ``CompacterPlusPlusConfig``):
t5-large counts, the Kronecker reparameterisation, training, and parity with AdapterHub 1.3.0
(``tests/adapterhub_ref6.py`` in ``.venv-adapters``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import peft
from peft_jax.models import abstract_params, get_preset
from peft_jax.peft import compacter
from peft_jax.peft.base import PeftConfigError, apply_peft, flatten

from test_peft_mam_unipelt import _base, adapterhub_parity, check_parity, train


def _per_module(d, m, n=4, r=1):
  """One Compacter module (down + up PHM layer, factorised W of rank r, biases), AdapterHub's shapes."""
  down = n * (d // n) * r + n * r * (m // n) + m
  up = n * (m // n) * r + n * r * (d // n) + d
  return down + up


def test_t5_large_counts_match_adapterhub_formula():
  cfg = get_preset("t5-large")                        # d=1024, rf=32 -> m=32; 24+24 layers
  comp = peft.describe(cfg, "compacter")["trainable_params"]
  pp = peft.describe(cfg, "compacter_pp")["trainable_params"]
  assert _per_module(1024, 32) == 3168
  assert comp == 96 * 3168 + 64 == 304_192           # + the shared phm_rule [4, 4, 4]
  assert pp == 48 * 3168 + 64 == 152_128
  st = apply_peft(cfg, abstract_params(cfg), "compacter_pp")
  assert st.hparams["reduction_factor"] == 32 and st.hparams["non_linearity"] == "gelu"
  assert st.hparams["phm_dim"] == 4 and st.hparams["shared_phm_rule"] and st.hparams["factorized_phm_W"]
  # options: per-layer factorised rule, unfactorised W, rank 2, shared W
  got = peft.describe(cfg, "compacter_pp", {"shared_phm_rule": False, "factorized_phm_rule": True})
  assert got["trainable_params"] == 48 * (3168 + 2 * 2 * 4 * 4)
  got = peft.describe(cfg, "compacter_pp", {"factorized_phm_W": False})
  assert got["trainable_params"] == 48 * (2 * 4 * 256 * 8 + 32 + 1024) + 64
  got = peft.describe(cfg, "compacter_pp", {"phm_rank": 2})
  assert got["trainable_params"] == 48 * _per_module(1024, 32, r=2) + 64
  got = peft.describe(cfg, "compacter_pp", {"shared_W_phm": True})
  assert got["trainable_params"] == 48 * (32 + 1024) + 64 + 2 * (4 * 256 + 4 * 8)


@pytest.mark.parametrize("bad,match", [
    ({"reduction_factor": 48}, "divisible"),        # m = 1024 // 48 = 21
    ({"init_weights": "mam_adapter"}, "init_weights"),
    ({"shared_W_phm": True, "factorized_phm_W": False}, "shared_W_phm"),
    ({"phm_c_init": "zeros"}, "phm_c_init"),
    ({"learn_phm": False}, "learn_phm"),
])
def test_bad_hyperparameters(bad, match):
  cfg = get_preset("t5-large")
  with pytest.raises(PeftConfigError, match=match):
    peft.describe(cfg, "compacter", bad)


def test_kron_sum_and_prepare():
  r = np.random.default_rng(0)
  rule = r.standard_normal((4, 4, 4)).astype(np.float32)
  w = r.standard_normal((4, 3, 2)).astype(np.float32)
  want = sum(np.kron(rule[i], w[i]) for i in range(4))
  np.testing.assert_allclose(np.asarray(compacter.kron_sum(jnp.asarray(rule), jnp.asarray(w))), want, rtol=1e-5,
                             atol=1e-5)
  cfg, params = _base("llama-tiny-gqa")
  st = apply_peft(cfg, params, "compacter", {"reduction_factor": 4})
  fl = flatten(st.params)
  prep = flatten(st.prepare(st.params))
  d = cfg.hidden_size
  k = prep["layers/adapter_mlp/down/kernel"]
  assert k.shape == (cfg.num_hidden_layers, d, d // 4)
  wl, wr = fl["layers/adapter_mlp/down/W_left"], fl["layers/adapter_mlp/down/W_right"]
  want = compacter.kron_sum(fl["compacter_shared/phm_rule"][None], jnp.matmul(wl, wr))
  np.testing.assert_allclose(np.asarray(k), np.asarray(want), rtol=1e-6)
  # init: shared rule ~ N(0, 1e-4): the adapter starts near the identity
  assert float(jnp.std(fl["compacter_shared/phm_rule"])) < 1e-3


@pytest.mark.parametrize("preset,method", [("t5-v1_1-tiny", "compacter"), ("llama-tiny-gqa", "compacter_pp")])
def test_trains(preset, method):
  """25 Adam steps (lr 3e-2) on a fixed batch: the loss falls by at least 25%, and the shared
  rule (one leaf for all layers) receives updates."""
  over = {"reduction_factor": 4}
  st, p, losses = train(preset, method, over, lr=3e-2)
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.75 * losses[0], losses
  assert not np.allclose(flatten(p)["compacter_shared/phm_rule"], flatten(st.params)["compacter_shared/phm_rule"])


PARITY = [
    ("t5-compacter", "t5_v10", "compacter", {"reduction_factor": 4}, "CompacterConfig", {"reduction_factor": 4}),
    ("t5-compacter_pp", "t5_v10", "compacter_pp", {"reduction_factor": 4}, "CompacterPlusPlusConfig",
     {"reduction_factor": 4}),
    ("llama-compacter", "llama_mha", "compacter", {"reduction_factor": 4}, "CompacterConfig",
     {"reduction_factor": 4}),
    ("llama-compacter_pp-opts", "llama_mha", "compacter_pp",
     {"reduction_factor": 4, "shared_phm_rule": False, "factorized_phm_rule": True, "phm_rank": 2},
     "CompacterPlusPlusConfig",
     {"reduction_factor": 4, "shared_phm_rule": False, "factorized_phm_rule": True, "phm_rank": 2}),
]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
  return adapterhub_parity(tmp_path_factory, PARITY, "compacter")


@pytest.mark.parametrize("cid", [c[0] for c in PARITY])
def test_parity_with_adapterhub(parity, cid):
  check_parity(*parity[cid])


def test_parity_counts_on_tiny_models(parity):
  # d=32, rf=4 -> m=8 (AdapterHub's default rf=32 gives m=1, not divisible by phm_dim=4)
  assert parity["t5-compacter"][1]["trainable"] == 8 * _per_module(32, 8) + 64 == 1024
  assert parity["t5-compacter_pp"][1]["trainable"] == 4 * _per_module(32, 8) + 64
  assert parity["llama-compacter"][1]["trainable"] == 4 * _per_module(32, 8) + 64
