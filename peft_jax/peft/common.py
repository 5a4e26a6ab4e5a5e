"""Small helpers shared by the method modules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models.config import as_dtype
from peft_jax.models.layers import apply_dropout, keep_mask


def dropout(module, x, rate: float, deterministic: bool):
  """Inverted dropout drawing from the module's ``dropout`` RNG stream."""
  if deterministic or rate <= 0.0:
    return x
  return apply_dropout(x, keep_mask(module.make_rng("dropout"), 1.0 - rate, x.shape), rate)


def compute_dtype(module):
  return as_dtype(getattr(module, "dtype", jnp.float32))


def adapter_dtype(dtype):
  """Storage dtype of a method's own leaves: float32 when the base is bf16/fp16 (HF PEFT's
  ``autocast_adapter_dtype=True``), else the base dtype. Handlers cast to the compute dtype."""
  if not jnp.issubdtype(dtype, jnp.floating):   # quantized base codes (peft_jax.quantize)
    return jnp.dtype(jnp.float32)
  return jnp.promote_types(dtype, jnp.float32)


def path_of(module) -> str:
  return "/".join(module.scope.path)


def param_dtype(flat, leaf):
  return flat[leaf].dtype


class Rand:
  """Random initial values from a JAX key: drawn with ``jax.random`` when traced (abstract
  builds under ``eval_shape``), with a NumPy generator seeded from the key when concrete
  (no per-shape XLA compilation of the random-bit generator, which costs ~0.3 s a shape
  on CPU). Each draw uses a fresh stream, so values depend only on the key and the order
  of draws."""

  def __init__(self, key):
    self.key = key
    self.n = 0
    self.traced = isinstance(key, jax.core.Tracer)
    if not self.traced:
      data = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                        else key)
      self.seed = [int(v) for v in data.ravel()]

  def _next(self):
    self.n += 1
    if self.traced:
      return jax.random.fold_in(self.key, self.n)
    return np.random.default_rng(self.seed + [self.n])

  def uniform(self, shape, lo, hi):
    g = self._next()
    if self.traced:
      return jax.random.uniform(g, shape, jnp.float32, lo, hi)
    return jnp.asarray(g.uniform(lo, hi, shape).astype(np.float32))

  def normal(self, shape, std=1.0):
    g = self._next()
    if self.traced:
      return jax.random.normal(g, shape, jnp.float32) * std
    return jnp.asarray((g.standard_normal(shape) * std).astype(np.float32))

  def randint(self, shape, lo, hi):
    g = self._next()
    if self.traced:
      return jax.random.randint(g, shape, lo, hi)
    return jnp.asarray(g.integers(lo, hi, shape).astype(np.int32))

  def kaiming_uniform_a5(self, shape_out_in):
    """torch's ``kaiming_uniform_(w, a=sqrt(5))`` on a ``[out, in]`` weight: U(+-1/sqrt(in))."""
    b = 1.0 / math.sqrt(shape_out_in[-1])
    return self.uniform(shape_out_in, -b, b)



class AdditiveMerge:
  """Mixin for reparameterisations ``W' = W + delta``: the method provides
  ``_modules(flat)`` (the adapted module paths) and ``delta(hp, flat, path)``
  (float32, the kernel's shape); merge adds it, unmerge subtracts it."""

  def _fold(self, hp, flat, sign):
    out = dict(flat)
    for p in self._modules(flat):
      w = jnp.asarray(flat[f"{p}/kernel"])
      out[f"{p}/kernel"] = (w.astype(jnp.float32) + sign * self.delta(hp, flat, p)).astype(w.dtype)
    return out

  def merge(self, cfg, hp, flat):
    return self._fold(hp, flat, 1.0)

  def unmerge(self, cfg, hp, flat):
    return self._fold(hp, flat, -1.0)
