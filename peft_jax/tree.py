"""Parameter trees as flat ``{"encoder/layers/attn/q/kernel": leaf}`` dicts: the one path
language of targets, freezing and sharding rules."""

from __future__ import annotations

from typing import Any, Dict, Mapping

from flax.traverse_util import flatten_dict, unflatten_dict

Flat = Dict[str, Any]


def flatten(tree) -> Flat:
  return {"/".join(k): v for k, v in flatten_dict(tree).items()}


def unflatten(flat: Mapping[str, Any]):
  return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def split_trainable(params, trainable):
  """(trainable subtree, frozen subtree) as flat dicts; differentiate only the first."""
  fp, fm = flatten(params), flatten(trainable)
  return ({k: v for k, v in fp.items() if fm[k]}, {k: v for k, v in fp.items() if not fm[k]})


def join(trainable_flat: Flat, frozen_flat: Flat):
  out = dict(frozen_flat)
  out.update(trainable_flat)
  return unflatten(out)
