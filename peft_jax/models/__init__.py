"""Model registry: build a model from a config, abstractly or for real."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from peft_jax.models.config import (PRESETS, LlamaConfig, MistralConfig, Qwen2Config, T5Config,
                                    as_dtype, get_preset)
from peft_jax.models.family import Family, families, family_for_hf, family_of
# the families (each registers itself)
from peft_jax.models import llama_family, t5_family  # noqa: F401
from peft_jax.sites import NO_SITES, Sites
from peft_jax import quantize


def build_model(cfg, sites: Sites = NO_SITES) -> nn.Module:
  return family_of(cfg).build(cfg, sites)


def init_boxed(cfg, rng):
  """Parameters wrapped in ``nn.Partitioned`` boxes that carry logical axis names."""
  model = build_model(cfg)
  return model.init(rng, *family_of(cfg).dummy_inputs(cfg))["params"]


@functools.lru_cache(maxsize=32)
def _abstract_params(cfg):
  tree = nn.unbox(jax.eval_shape(lambda: init_boxed(cfg, jax.random.PRNGKey(0))))
  return _quantized(cfg, tree, quantize.abstract_flat)


def _quantized(cfg, tree, fn):
  """``tree`` with the kernels that ``cfg.quantize*`` selects stored quantized
  (:mod:`peft_jax.quantize`); ``fn(spec, flat)`` does it (abstractly or for real)."""
  spec = quantize.spec_of(cfg)
  if not spec.on:
    return tree
  from peft_jax.tree import flatten, unflatten
  return unflatten(fn(quantize.check_spec(spec), flatten(tree)))


def abstract_params(cfg):
  """``ShapeDtypeStruct`` tree of the parameters: no memory is allocated (memoised per
  config; a fresh dict structure is returned each time)."""
  return jax.tree_util.tree_map(lambda x: x, _abstract_params(cfg))


def logical_axes(cfg):
  """Tree of ``PartitionSpec`` with logical axis names, same structure as the params."""
  boxed = jax.eval_shape(lambda: init_boxed(cfg, jax.random.PRNGKey(0)))
  axes = nn.get_partition_spec(boxed)
  spec = quantize.spec_of(cfg)
  if not spec.on:
    return axes
  from peft_jax.tree import flatten, unflatten
  shapes = flatten(nn.unbox(boxed))
  return unflatten(quantize.axes_flat(quantize.check_spec(spec), shapes, flatten(axes)))


def init_params(cfg, rng):
  """Random parameters as a plain pytree (unboxed); selected kernels quantized when
  ``cfg.quantize`` says so (the fp kernels are drawn first, then quantized)."""
  return _quantized(cfg, nn.unbox(jax.jit(lambda r: init_boxed(cfg, r))(rng)),
                    quantize.quantize_flat)


def count_params(tree) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


__all__ = ["PRESETS", "T5Config", "LlamaConfig", "Qwen2Config", "MistralConfig", "get_preset", "Family", "families", "family_for_hf", "family_of", "build_model", "abstract_params",
           "logical_axes", "init_params", "count_params", "as_dtype"]
