"""Dropout masks from 16 random bits per element (``layers.keep_mask``, ``layers.Dropout``,
T5's dropout and the methods' ``common.dropout``)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models import layers


def test_keep_mask_rate_and_independence():
  m = np.asarray(layers.keep_mask(jax.random.PRNGKey(0), 0.9, (64, 1001)))   # odd size
  assert m.shape == (64, 1001) and m.dtype == bool
  n = m.size
  assert abs(m.mean() - 0.9) < 4 * np.sqrt(0.09 / n)                 # 4 sigma
  flat = m.reshape(-1).astype(np.float64)
  for lag in (1, 2, 3, 4, 251, 1001):   # elements 251 (= ceil(1001/4)) apart share a draw
    assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 4 / np.sqrt(n), lag
  for keep in (0.0, 0.5, 1.0):
    mk = np.asarray(layers.keep_mask(jax.random.PRNGKey(1), keep, (4096,)))
    assert abs(mk.mean() - keep) < 0.04
  assert not np.asarray(layers.keep_mask(jax.random.PRNGKey(2), 0.0, (999,))).any()
  assert np.asarray(layers.keep_mask(jax.random.PRNGKey(2), 1.0, (999,))).all()
  # different keys, different masks
  assert (np.asarray(layers.keep_mask(jax.random.PRNGKey(3), 0.5, (256,))) !=
          np.asarray(layers.keep_mask(jax.random.PRNGKey(4), 0.5, (256,)))).any()


def test_threefry2x32_is_jax_random_hash_bit_for_bit():
  from jax.extend.random import threefry_2x32
  key = jax.random.PRNGKey(7)
  x = jax.random.randint(jax.random.PRNGKey(8), (2, 4096), 0, 2**31 - 1).astype(jnp.uint32)
  ref = threefry_2x32(key, x.reshape(-1))                     # hashes the halves as pairs
  mine = jnp.concatenate(layers.threefry2x32(key[0], key[1], x[0], x[1]))
  np.testing.assert_array_equal(np.asarray(mine), np.asarray(ref))


def test_keep_mask_typed_and_other_prng_keys():
  raw = jax.random.PRNGKey(11)
  np.testing.assert_array_equal(layers.keep_mask(raw, 0.8, (5, 13)),
                                layers.keep_mask(jax.random.wrap_key_data(raw), 0.8, (5, 13)))
  rbg = jax.random.key(11, impl="rbg")              # not threefry: the jax.random.bits path
  m = np.asarray(layers.keep_mask(rbg, 0.8, (64, 513)))
  assert m.shape == (64, 513) and abs(m.mean() - 0.8) < 4 * np.sqrt(0.16 / m.size)


def test_dropout_module_scales_kept_values_and_is_the_identity_when_deterministic():
  x = jnp.arange(1, 2001, dtype=jnp.float32).reshape(40, 50)
  d = layers.Dropout(0.25)
  y = d.apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert 0.65 < kept.mean() < 0.85
  np.testing.assert_array_equal(d.apply({}, x, True), x)
  # two calls of one instance draw different masks, as flax.linen.Dropout does
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      drop = layers.Dropout(0.5)
      return drop(x, False), drop(x, False)
  a, b = Twice().apply({}, x, rngs={"dropout": jax.random.PRNGKey(1)})
  assert ((np.asarray(a) != 0) != (np.asarray(b) != 0)).any()


def test_the_flag_restores_jax_random_bernoulli():
  key = jax.random.PRNGKey(5)
  old = layers.HALF_BITS_DROPOUT
  try:
    layers.HALF_BITS_DROPOUT = False
    np.testing.assert_array_equal(layers.keep_mask(key, 0.7, (33, 7)),
                                  jax.random.bernoulli(key, 0.7, (33, 7)))
  finally:
    layers.HALF_BITS_DROPOUT = old
