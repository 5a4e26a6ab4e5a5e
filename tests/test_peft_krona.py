"""KronA (HF PEFT LoKr defaults): counts vs HF PEFT, Kronecker-vector product, parity of
logits with HF PEFT LoKr on the tiny models, exact merge, and training."""
import copy
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from tiny_hf import saved_hf_model

hfpeft = pytest.importorskip("peft")

from peft_jax import peft  # noqa: E402
from peft_jax.checkpoint.hf import load_hf  # noqa: E402
from peft_jax.models import build_model, get_preset, init_params  # noqa: E402
from peft_jax.peft import krona  # noqa: E402
from peft_jax.peft.base import flatten, unflatten  # noqa: E402
from steps import train_step  # noqa: E402  (the production step)

warnings.filterwarnings("ignore", module="peft")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def t5_large_meta():
  import transformers
  cfg = transformers.T5Config(d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=24,
                              feed_forward_proj="relu", vocab_size=32128)
  with torch.device("meta"):
    return transformers.T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("hp", [{}, {"decompose_both": True, "r": 4},
                                {"target_modules": "all-linear", "decompose_factor": 8}])
def test_t5_large_counts_equal_hf_lokr(hp):
  """HF's count from HF PEFT's LoKr on a meta-device t5-large (no weights)."""
  info = peft.describe(get_preset("t5-large"), "krona", hp)
  pm = hfpeft.get_peft_model(t5_large_meta(), hfpeft.LoKrConfig(task_type="SEQ_2_SEQ_LM", **hp))
  hf_trainable, hf_all = pm.get_nb_trainable_parameters()
  assert info["trainable_params"] == hf_trainable
  assert info["total_params"] == hf_all
  if not hp:   # defaults: q, v of 144 attention blocks; 1024 = 32 x 32, r=8 < 16 -> W2 = (32x8)(8x32)
    assert info["trainable_params"] == 144 * (32 * 32 + 2 * 32 * 8) == 221_184


def test_factorization_matches_hf():
  from peft.tuners.lokr.layer import factorization
  for n in (1, 7, 32, 48, 64, 96, 127, 128, 1024, 4096, 11008, 2816):
    for f in (-1, 2, 4, 8, 3):
      assert krona.factorization(n, f) == factorization(n, f), (n, f)


def test_kron_vec_is_x_times_kron():
  r = np.random.default_rng(0)
  w1 = jnp.asarray(r.standard_normal((4, 3)), jnp.float32)   # [c, a]
  w2 = jnp.asarray(r.standard_normal((6, 5)), jnp.float32)   # [d, b]
  x = jnp.asarray(r.standard_normal((2, 7, 24)), jnp.float32)
  full = jnp.asarray(np.kron(np.asarray(w1), np.asarray(w2)))
  np.testing.assert_allclose(np.asarray(krona.kron_delta(w1, w2)), np.asarray(full), atol=1e-6)
  np.testing.assert_allclose(np.asarray(krona.kron_vec(x, w1, w2)), np.asarray(x @ full), atol=1e-4)
  # the forward never builds the [in, out] product: no intermediate of that size in the jaxpr
  jaxpr = jax.make_jaxpr(krona.kron_vec)(x, w1, w2)
  sizes = [int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars]
  assert max(sizes) < 24 * 15


# ----------------------------------------------------------------------------- HF parity

@functools.lru_cache(maxsize=None)
def loaded(kind):
  m, d = saved_hf_model(kind)
  cfg, base = load_hf(d)
  return m, cfg, base


def inputs(kind):
  r = np.random.default_rng(1)
  ids = r.integers(2, 128, (2, 7))
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  dec = r.integers(2, 128, (2, 5)) if kind.startswith("t5") else None
  return ids, mask, dec


def our_logits(kind, state, params, sites=True):
  cfg = loaded(kind)[1]
  ids, mask, dec = inputs(kind)
  model = build_model(cfg, state.sites) if sites else build_model(cfg)
  args = [jnp.asarray(ids), jnp.asarray(mask)] + ([jnp.asarray(dec)] if dec is not None else [])
  return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args))


def hf_logits(kind, pm):
  ids, mask, dec = inputs(kind)
  kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if dec is not None:
    kw["decoder_input_ids"] = torch.tensor(dec)
  with torch.no_grad():
    return pm(**kw).logits.numpy()


PARITY = [("t5_v11", {"target_modules": "all-linear", "r": 2, "alpha": 4, "decompose_both": True}),
          ("llama_gqa", {"r": 4, "alpha": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
          ("t5_v10", {})]


@pytest.mark.parametrize("kind,hp", PARITY)
def test_logits_match_hf_lokr(kind, hp):
  tm, cfg, base = loaded(kind)
  task = "SEQ_2_SEQ_LM" if kind.startswith("t5") else "CAUSAL_LM"
  pm = hfpeft.get_peft_model(copy.deepcopy(tm).eval(), hfpeft.LoKrConfig(task_type=task, **hp))
  g = torch.Generator().manual_seed(0)
  tensors = {}
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if p.requires_grad:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
        tensors[n[len("base_model.model."):-len(".default")]] = p.numpy().copy()
  pm.eval()
  state = peft.apply_peft(cfg, base, "krona", hp)
  assert len(krona.hf_tensors(state, state.params)) == len(tensors)
  params = krona.set_hf_tensors(state, state.params, tensors)
  assert krona.hf_tensors(state, params).keys() == tensors.keys()
  theirs = hf_logits(kind, pm)
  ours = our_logits(kind, state, params)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(ours - our_logits(kind, state, base, sites=False)).max() > 1e-2   # adapter active
  assert peft.describe(cfg, "krona", hp)["trainable_params"] == pm.get_nb_trainable_parameters()[0]


@functools.lru_cache(maxsize=None)
def preset_base(name):
  cfg = get_preset(name)
  return cfg, init_params(cfg, jax.random.PRNGKey(0))


def preset_logits(cfg, sites, params):
  r = np.random.default_rng(1)
  ids = jnp.asarray(r.integers(2, cfg.vocab_size, (2, 7)), jnp.int32)
  model = build_model(cfg, sites) if sites is not None else build_model(cfg)
  if cfg.model_type == "t5":
    dec = jnp.asarray(r.integers(2, cfg.vocab_size, (2, 5)), jnp.int32)
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, None, dec))(params))
  return np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids))(params))


@pytest.mark.parametrize("preset", ["t5-v1_1-tiny", "llama-tiny-gqa"])
def test_init_is_identity_and_merge_is_exact(preset):
  cfg, base = preset_base(preset)
  hp = {"target_modules": "all-linear", "r": 2, "decompose_both": True}
  state = peft.apply_peft(cfg, base, "krona", hp)
  ref = preset_logits(cfg, None, base)
  np.testing.assert_allclose(preset_logits(cfg, state.sites, state.params), ref, atol=1e-5, rtol=0)
  r = np.random.default_rng(0)
  fl = flatten(state.params)
  for k in state.added:
    fl[k] = jnp.asarray(0.3 * r.standard_normal(fl[k].shape), jnp.float32)
  params = unflatten(fl)
  unmerged = preset_logits(cfg, state.sites, params)
  assert np.abs(unmerged - ref).max() > 1e-2                                     # adapter active
  merged = preset_logits(cfg, None, peft.merge(state, params))
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)               # merged = unmerged
  back = flatten(peft.unmerge(state, peft.merge(state, params, plain=False)))
  for k, v in flatten(params).items():
    np.testing.assert_allclose(np.asarray(back[k]), np.asarray(v), atol=1e-5, rtol=0)


def test_layer_selection_and_dropout():
  cfg = get_preset("llama-tiny")
  base = init_params(cfg, jax.random.PRNGKey(0))
  st = peft.apply_peft(cfg, base, "krona", {"layers_to_transform": [1], "init_weights": False})
  fl = flatten(st.params)
  assert float(jnp.abs(fl["layers/attn/q/lokr_w1"][0]).max()) == 0.0          # layer 0: no update
  assert float(jnp.abs(fl["layers/attn/q/lokr_w1"][1]).max()) > 0.0
  assert peft.describe(cfg, "krona", {"layers_to_transform": [1]})["trainable_params"] == \
      peft.describe(cfg, "krona", {})["trainable_params"] // 2
  st = peft.apply_peft(cfg, base, "krona", {"init_weights": False, "rank_dropout": 0.5,
                                            "module_dropout": 0.3})
  model = build_model(cfg, st.sites)
  ids = jnp.ones((1, 4), jnp.int32)
  f = jax.jit(lambda p, det, k: model.apply({"params": p}, ids, deterministic=det,
                                            rngs={"dropout": k}), static_argnums=1)
  e1, e2 = f(st.params, True, jax.random.PRNGKey(1)), f(st.params, True, jax.random.PRNGKey(2))
  t1, t2 = f(st.params, False, jax.random.PRNGKey(1)), f(st.params, False, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
  assert np.abs(np.asarray(t1) - np.asarray(t2)).max() > 1e-4


# ----------------------------------------------------------------------------- training

def copy_task(cfg, n=8, length=6, seed=0):
  """A generated copy task: the target is the input sequence."""
  r = np.random.default_rng(seed)
  src = jnp.asarray(r.integers(3, cfg.vocab_size, (n, length)), jnp.int32)
  dec = jnp.concatenate([jnp.zeros((n, 1), jnp.int32), src[:, :-1]], axis=1)
  return src, dec


def test_krona_trains_on_copy_task():
  cfg = get_preset("t5-tiny")
  base = init_params(cfg, jax.random.PRNGKey(0))
  state = peft.apply_peft(cfg, base, "krona", {"target_modules": "all-linear", "r": 4})
  fwd = peft.apply_fn(state)
  src, dec = copy_task(cfg)

  def loss_fn(params):
    logits = fwd(params, src, None, dec)
    return optax.softmax_cross_entropy_with_integer_labels(logits, src).mean()

  opt, step = train_step(state, loss_fn, optax.adam(3e-2))
  step = jax.jit(step)
  params, opt_state = state.params, opt.init(state.params)
  losses = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses[::5]
  fb, fp = flatten(base), flatten(params)
  assert all(np.array_equal(np.asarray(fb[k]), np.asarray(fp[k])) for k in fb)   # base frozen
