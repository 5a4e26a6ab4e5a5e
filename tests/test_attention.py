"""The heads-major attention (``layers.attention_heads_major``, CPU's default) against
``jax.nn.dot_product_attention``: same values and gradients for every mask, bias and
grouping the models pass, and the same answer for a row with no valid key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models.layers import attention, attention_heads_major

B, T, S, H = 2, 5, 7, 8


def _inputs(n, kv, dtype=jnp.float32, seed=0):
  kq, kk, kv_, kb = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (B, T, n, H), dtype)
  k = jax.random.normal(kk, (B, S, kv, H), dtype)
  v = jax.random.normal(kv_, (B, S, kv, H), dtype)
  bias = jax.random.normal(kb, (1, n, T, S), jnp.float32)
  return q, k, v, bias


def _masks(n):
  pad = jnp.arange(S)[None, None, None, :] < jnp.array([S, 3])[:, None, None, None]   # [B,1,1,S]
  causal = (jnp.arange(T)[:, None] + S - T >= jnp.arange(S)[None, :])[None, None]     # [1,1,T,S]
  per_head = jax.random.bernoulli(jax.random.PRNGKey(3), 0.7, (B, n, T, S)).at[..., 0].set(True)
  return {"none": None, "padding": pad, "causal": pad & causal, "per_head": per_head}


@pytest.mark.parametrize("n,kv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal", "per_head"])
@pytest.mark.parametrize("with_bias,scale", [(False, None), (True, 1.0), (True, 0.3)])
def test_heads_major_equals_jax(n, kv, mask_kind, with_bias, scale):
  q, k, v, bias = _inputs(n, kv)
  mask = _masks(n)[mask_kind]
  bias = bias if with_bias else None
  c = jax.random.normal(jax.random.PRNGKey(9), (B, T, n, H))

  def ours(q, k, v):
    return attention_heads_major(q, k, v, mask=mask, bias=bias, scale=scale)

  def ref(q, k, v):
    return attention(q, k, v, mask=mask, bias=bias, scale=scale, impl="xla")

  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=2e-6, rtol=1e-6)
  g_ours = jax.grad(lambda *a: (ours(*a) * c).sum(), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *a: (ref(*a) * c).sum(), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_heads_major_bf16_equals_jax_within_bf16():
  q, k, v, bias = _inputs(4, 2, jnp.bfloat16)
  mask = _masks(4)["causal"]
  ours = attention_heads_major(q, k, v, mask=mask, bias=bias[:, :4])
  ref = attention(q, k, v, mask=mask, bias=bias[:, :4], impl="xla")
  assert ours.dtype == ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_row_without_valid_key_is_the_mean_of_the_values_as_in_jax():
  q, k, v, _ = _inputs(2, 2)
  mask = jnp.ones((B, 1, T, S), bool).at[0, 0, 1, :].set(False)
  ours = attention_heads_major(q, k, v, mask=mask)
  np.testing.assert_allclose(ours, attention(q, k, v, mask=mask, impl="xla"), atol=2e-6)
  np.testing.assert_allclose(ours[0, 1], v[0].mean(0), atol=1e-6)
  assert np.isfinite(np.asarray(ours)).all()


def test_default_kernel_on_cpu_is_heads_major_and_dropout_maps_the_probabilities():
  q, k, v, bias = _inputs(4, 4)
  mask = _masks(4)["padding"]
  assert jax.default_backend() == "cpu"
  np.testing.assert_array_equal(attention(q, k, v, mask=mask, bias=bias),
                                attention_heads_major(q, k, v, mask=mask, bias=bias))
  same = attention(q, k, v, mask=mask, bias=bias, impl="xla", dropout=lambda p: p)
  np.testing.assert_array_equal(same, attention_heads_major(q, k, v, mask=mask, bias=bias))
  seen = []
  halved = attention(q, k, v, mask=mask, dropout=lambda p: seen.append(p.shape) or p * 0.5)
  assert seen == [(B, 4, 1, T, S)]
  np.testing.assert_allclose(halved, 0.5 * attention(q, k, v, mask=mask), atol=1e-6)
