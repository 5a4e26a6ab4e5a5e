"""What the backward pass keeps: gated MLPs and attention save no redundant residuals.

The training step's temporaries are mostly the residuals its backward pass reads; every
extra ``[tokens, intermediate]`` or ``[B, N, T, S]`` array per layer is memory and, on a
CPU, fresh pages to fault in at every step (issue 15's profiles). ``layers.gated`` and
``layers.softmax`` keep only what their derivatives need, and give the derivatives of
the plain formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from peft_jax.models import build_model, get_preset, init_params
import functools

from peft_jax.models.layers import attention, gated, softmax

GELU_NEW = functools.partial(jax.nn.gelu, approximate=True)
swiglu = functools.partial(gated, jax.nn.silu)


def _plain_swiglu(g, u):
  return jax.nn.silu(g) * u


@pytest.mark.parametrize("act", [jax.nn.silu, GELU_NEW, jax.nn.relu])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_gated_value_and_gradients_equal_the_plain_formula(act, dtype, tol):
  kg, ku, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  g = (4 * jax.random.normal(kg, (3, 5, 40))).astype(dtype)
  u = jax.random.normal(ku, (3, 5, 40)).astype(dtype)
  c = jax.random.normal(kc, (3, 5, 40)).astype(dtype)
  loss = lambda f: (lambda g, u: (f(g, u).astype(jnp.float32) * c).sum())
  plain = lambda g, u: act(g) * u
  ours_f = functools.partial(gated, act)
  np.testing.assert_array_equal(ours_f(g, u), plain(g, u))
  ours = jax.grad(loss(ours_f), argnums=(0, 1))(g, u)
  ref = jax.grad(loss(plain), argnums=(0, 1))(g, u)
  for a, b in zip(ours, ref):
    assert a.dtype == dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=tol)


def test_gated_and_softmax_keep_only_what_their_derivatives_read():
  x = jnp.ones((4, 6))
  assert len(saved_residuals(lambda g, u: swiglu(g, u).sum(), x, x)) == 2      # gate, up
  assert len(saved_residuals(lambda g, u: _plain_swiglu(g, u).sum(), x, x)) == 5
  assert len(saved_residuals(lambda z: softmax(z).sum(), x)) == 1              # the probs
  assert len(saved_residuals(lambda z: jax.nn.softmax(z).sum(), x)) == 3


def test_softmax_and_attention_gradients_equal_jax_defaults():
  kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(kq, (2, 5, 4, 8))
  k = jax.random.normal(kk, (2, 7, 2, 8))
  v = jax.random.normal(kv, (2, 7, 2, 8))
  c = jax.random.normal(kc, (2, 5, 4, 8))
  mask = jnp.arange(7)[None, None, None, :] < jnp.array([7, 4])[:, None, None, None]
  ours = jax.grad(lambda q, k, v: (attention(q, k, v, mask=mask) * c).sum(),
                  argnums=(0, 1, 2))(q, k, v)
  with jax.softmax_custom_jvp(False):
    ref = jax.grad(lambda q, k, v: (jax.nn.dot_product_attention(q, k, v, mask=mask) * c).sum(),
                   argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  x = jax.random.normal(kc, (3, 11))
  np.testing.assert_allclose(jax.grad(lambda x: (softmax(x) * x).sum())(x),
                             jax.grad(lambda x: (jax.nn.softmax(x) * x).sum())(x),
                             atol=1e-6, rtol=1e-6)


def test_llama_training_keeps_three_mlp_residuals_and_one_attention_residual_per_layer():
  cfg = get_preset("llama-tiny")
  model = build_model(cfg)
  params = init_params(cfg, jax.random.PRNGKey(0))
  t = 7
  ids = jnp.arange(2 * t).reshape(2, t) % 100
  res = [s for s, why in saved_residuals(lambda p: model.apply({"params": p}, ids).mean(),
                                         params) if "argument" not in why]
  layers = cfg.num_hidden_layers
  mlp = [s for s in res if s.shape[0] == layers and s.shape[-1] == cfg.intermediate_size]
  probs = [s for s in res if s.shape[0] == layers and s.shape[-2:] == (t, t)]
  assert len(mlp) == 3, [s.shape for s in mlp]      # gate, up and the product (down's input)
  assert len(probs) == 1, [s.shape for s in probs]  # the attention probabilities


def test_gated_gelu_t5_keeps_three_mlp_residuals_per_layer():
  cfg = get_preset("t5-tiny").replace(feed_forward_proj="gated-gelu", dropout_rate=0.0)
  assert cfg.is_gated
  model = build_model(cfg)
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids = jnp.arange(14).reshape(2, 7) % 100
  dec = jnp.arange(10).reshape(2, 5) % 100
  res = [s for s, why in saved_residuals(
      lambda p: model.apply({"params": p}, ids, jnp.ones_like(ids), dec).mean(), params)
      if "argument" not in why]
  mlp = [s for s in res if s.ndim and s.shape[-1] == cfg.d_ff]
  # encoder and decoder: wi_0, wi_1 and the product (wo's input) each
  assert len(mlp) == 6, [s.shape for s in mlp]
