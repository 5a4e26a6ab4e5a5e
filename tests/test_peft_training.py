"""Training with a method: step-0 identity, frozen leaves bitwise unchanged, optimizer state
only for trainable leaves, gradient masks exactly as each method defines them."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft_jax import peft
from peft_jax.models import build_model, get_preset, init_params
from peft_jax.peft.base import flatten
from steps import train_step  # noqa: E402  (the production step)

PRESETS = ("t5-v1_1-tiny", "llama-tiny-gqa")

METHODS = {
    "full": ({}, lambda k: True),
    "lora": ({"target_modules": "all-linear"}, lambda k: k.endswith(("/lora_A", "/lora_B"))),
    "dora": ({}, lambda k: k.endswith(("/lora_A", "/lora_B", "/lora_magnitude"))),
    "ia3": ({}, lambda k: k.endswith("/ia3_l")),
    "bitfit": ({}, lambda k: k.endswith("/bias")),
    "ln_tuning": ({}, lambda k: k.endswith("/scale")),
    "prompt_tuning": ({"num_virtual_tokens": 2}, lambda k: k.endswith("prompt_embeddings")),
    "prefix_tuning": ({"num_virtual_tokens": 2}, lambda k: k.endswith(("/prefix_key", "/prefix_value"))),
    "prefix_projection": ({"num_virtual_tokens": 2, "prefix_projection": True, "encoder_hidden_size": 8},
                          lambda k: k.startswith("prefix_encoder/")),
}
ZERO_INIT = ("full", "lora", "dora", "ia3", "bitfit", "ln_tuning")


# One layer per stack: XLA's CPU compile time (seconds for a backward pass) grows with depth.
_SHALLOW = {"t5-v1_1-tiny": dict(num_layers=1, num_decoder_layers=1),
            "llama-tiny-gqa": dict(num_hidden_layers=1)}


@functools.lru_cache(maxsize=None)
def base(preset, shallow=True):
  cfg = get_preset(preset)
  if shallow:
    cfg = cfg.replace(**_SHALLOW[preset])
  return cfg, init_params(cfg, jax.random.PRNGKey(0))


def batch(cfg):
  r = np.random.default_rng(0)
  ids = jnp.asarray(r.integers(2, cfg.vocab_size, (2, 6)), jnp.int32)
  mask = jnp.asarray(np.array([[1] * 6, [1] * 4 + [0] * 2]), bool)
  if cfg.model_type == "t5":
    dec = jnp.asarray(r.integers(2, cfg.vocab_size, (2, 4)), jnp.int32)
    return (ids, mask, dec), jnp.asarray(r.integers(0, cfg.vocab_size, (2, 4)), jnp.int32)
  return (ids, mask), jnp.asarray(r.integers(0, cfg.vocab_size, (2, 6)), jnp.int32)


def loss_fn(state):
  fwd = peft.apply_fn(state)

  def f(params, inputs, labels):
    logits = fwd(params, *inputs)
    logits = logits[:, -labels.shape[1]:]     # LLaMA prompt tuning prepends positions
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits

  return f


@functools.lru_cache(maxsize=None)
def _fwd(model):
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a))


def logits_of(cfg, state, params, inputs, labels):
  model = build_model(cfg, state.sites if state is not None else None) if state is not None \
      else build_model(cfg)
  p = state.prepare(params) if state is not None else params
  return np.asarray(_fwd(model)(p, *inputs))[:, -labels.shape[1]:]


def _method(name):
  return "prefix_tuning" if name == "prefix_projection" else name


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ZERO_INIT)
def test_step0_is_the_base_model(preset, name):
  cfg, params0 = base(preset)
  state = peft.apply_peft(cfg, params0, name, METHODS[name][0], jax.random.PRNGKey(1))
  inputs, labels = batch(cfg)
  ours = logits_of(cfg, state, state.params, inputs, labels)
  plain = logits_of(cfg, None, params0, inputs, labels)
  if name == "dora":
    # m = ||W|| (init, eager) vs ||W + s A B|| with B = 0 (forward, jit): equal up to rounding
    np.testing.assert_allclose(ours, plain, rtol=0, atol=1e-5)
  elif name == "ia3":
    # (x W) * 1 and (x * 1) W are exact, but XLA may fuse the extra multiply into the matmul
    # and accumulate in another order: last-bit differences only
    np.testing.assert_allclose(ours, plain, rtol=0, atol=1e-6)
  else:   # bitwise: x W + (x A) 0, x W + 0 bias, unchanged weights
    np.testing.assert_array_equal(ours, plain)


# Backward passes take seconds to compile on CPU: every method trains on LLaMA, T5 on one.
TRAIN_CASES = [("llama-tiny-gqa", m) for m in METHODS] + [("t5-v1_1-tiny", "prefix_tuning")]


@pytest.mark.parametrize("preset,name", TRAIN_CASES)
def test_train_steps(preset, name):
  cfg, params0 = base(preset)
  hp, is_trainable = METHODS[name]
  state = peft.apply_peft(cfg, params0, _method(name), hp, jax.random.PRNGKey(1))
  params = state.params
  flat0 = flatten(params)
  mask = flatten(state.trainable)
  # the gradient mask is what the method defines
  assert {k for k, m in mask.items() if m} == {k for k in flat0 if is_trainable(k)}
  assert any(mask.values())
  inputs, labels = batch(cfg)

  opt, step = train_step(state, loss_fn(state), optax.adamw(1e-2, weight_decay=0.1),
                                   has_aux=True)
  opt_state = opt.init(params)
  # the optimizer holds arrays only for trainable leaves (Adam: mu and nu)
  n_train = sum(v.size for k, v in flat0.items() if mask[k])
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if getattr(x, "ndim", 0) > 0)
  assert n_state == 2 * n_train
  step = jax.jit(step)
  for i in range(3):
    params, opt_state, loss = step(params, opt_state, inputs, labels)
    assert np.isfinite(float(loss))
  flat = flatten(params)
  for k, v in flat.items():
    if mask[k]:
      assert not np.array_equal(np.asarray(v), np.asarray(flat0[k])), f"{k} did not train"
    else:
      assert np.array_equal(np.asarray(v), np.asarray(flat0[k])), f"frozen {k} changed"


def test_value_and_grad_is_zero_on_frozen_leaves():
  """Gradients flow through the prefix MLP (``prepare``) and nowhere else."""
  cfg, params0 = base("llama-tiny-gqa")
  hp, is_trainable = METHODS["prefix_projection"]
  state = peft.apply_peft(cfg, params0, "prefix_tuning", hp, jax.random.PRNGKey(1))
  inputs, labels = batch(cfg)
  _, grads = jax.jit(peft.value_and_grad(loss_fn(state), state, has_aux=True))(
      state.params, inputs, labels)
  g = flatten(grads)
  assert set(g) == set(flatten(state.params))
  nonzero = {k for k, v in g.items() if np.any(np.asarray(v) != 0)}
  assert nonzero == {k for k in g if is_trainable(k)}


def test_layer_selection_trains_only_selected_layers():
  cfg, params0 = base("llama-tiny-gqa", shallow=False)
  state = peft.apply_peft(cfg, params0, "lora", {"last_k_layers": 1, "target_modules": ["q", "v"]})
  flat0 = flatten(state.params)
  assert state.update_masks["layers/attn/q/lora_A"].reshape(-1).tolist() == [False, True]
  info = peft.count(state)
  assert info["trainable_params"] == 8 * (32 + 32) + 8 * (32 + 16)   # r * (in + out), one layer
  inputs, labels = batch(cfg)
  opt, step = train_step(state, loss_fn(state), optax.adamw(1e-2, weight_decay=0.1),
                                   has_aux=True)
  params, opt_state = state.params, opt.init(state.params)
  step = jax.jit(step)
  for _ in range(3):
    params, opt_state, _ = step(params, opt_state, inputs, labels)
  flat = flatten(params)
  for k in ("layers/attn/q/lora_A", "layers/attn/q/lora_B", "layers/attn/v/lora_A", "layers/attn/v/lora_B"):
    assert np.array_equal(np.asarray(flat[k][0]), np.asarray(flat0[k][0]))        # unselected: frozen
    assert np.all(np.asarray(flat0[k][0]) == 0)                                   # ... and the identity
    assert not np.array_equal(np.asarray(flat[k][1]), np.asarray(flat0[k][1]))    # selected: trains



def test_ia3_layer_selection_masks_updates():
  """(IA)^3 vectors of unselected layers get nonzero gradients; the optimizer masks them."""
  cfg, params0 = base("llama-tiny-gqa", shallow=False)
  state = peft.apply_peft(cfg, params0, "ia3", {"layers_to_transform": [0]})
  assert peft.count(state)["trainable_params"] == 16 + 16 + 64
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)     # pretend every gradient is 1
  opt = peft.make_optimizer(state, optax.sgd(0.5))
  updates, _ = opt.update(grads, opt.init(state.params), state.params)
  u = flatten(updates)
  for k in ("layers/attn/k/ia3_l", "layers/mlp/down/ia3_l"):
    assert np.all(np.asarray(u[k][1]) == 0) and np.all(np.asarray(u[k][0]) == -0.5)
  assert all(np.all(np.asarray(v) == 0) for k, v in u.items() if not k.endswith("ia3_l"))
