"""Adapter-only save/load: only the method's leaves, plus a small JSON config.

``save_adapter(state, params, dir, format="safetensors"|"npz")`` writes
``adapter.safetensors`` (or ``adapter.npz``) with the leaves the method added
and the existing leaves it trains (keys: flattened paths), and
``peft_config.json`` (``{"method", "hparams", "model_type", "leaves",
"format", "base"}``; ``base``: the checkpoint or preset and init seed, and a fingerprint
of the base weights, see ``run.base_info``). ``load_adapter(dir, model_cfg, base_params)``
rebuilds the state with the saved hyperparameters and puts the saved leaves
into the tree, checking names and shapes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import jax
import numpy as np

from peft_jax.models.family import family_of
from peft_jax.peft.base import PeftConfigError, PeftState, apply_peft, flatten, unflatten

CONFIG = "peft_config.json"


def adapter_leaves(state: PeftState, params) -> Dict[str, Any]:
  flat = flatten(params)
  keys = sorted(set(state.added) | set(state.made_trainable))
  return {k: flat[k] for k in keys}


def _jsonable(x):
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  return x


def save_adapter(state: PeftState, params, out_dir: str, format: str = "safetensors",
                 base: Dict[str, Any] = None) -> str:
  """Writes the method's leaves and ``peft_config.json``; ``base`` (``run.base_info``)
  records which base weights the adapter belongs to."""
  if format not in ("safetensors", "npz"):
    raise PeftConfigError(f"format must be 'safetensors' or 'npz', got {format!r}")
  os.makedirs(out_dir, exist_ok=True)
  leaves = {k: np.asarray(v) for k, v in adapter_leaves(state, params).items()}
  dtypes = {k: str(v.dtype) for k, v in leaves.items()}
  store = {k: (v.astype(np.float32) if v.dtype.name == "bfloat16" else v) for k, v in leaves.items()}
  if format == "safetensors":
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in store.items()},
              os.path.join(out_dir, "adapter.safetensors"))
  else:
    np.savez(os.path.join(out_dir, "adapter.npz"), **store)
  cfg = {"method": state.method.name, "hparams": _jsonable(state.hparams),
         "model_type": family_of(state.model_cfg).name, "format": format,
         "leaves": {k: {"shape": list(v.shape), "dtype": dtypes[k]} for k, v in leaves.items()}}
  if base is not None:
    cfg["base"] = _jsonable(base)
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  return out_dir


def read_adapter_config(path: str) -> Dict[str, Any]:
  """The ``peft_config.json`` of an adapter directory."""
  cf = os.path.join(path, CONFIG)
  if not os.path.exists(cf):
    raise PeftConfigError(f"no {CONFIG} in {path}; expected a directory written by save_adapter")
  with open(cf) as f:
    return json.load(f)


def read_adapter(path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  cfg = read_adapter_config(path)
  if cfg.get("format") == "npz":
    with np.load(os.path.join(path, "adapter.npz")) as z:
      arrs = {k: z[k] for k in z.files}
  else:
    from safetensors.numpy import load_file
    arrs = load_file(os.path.join(path, "adapter.safetensors"))
  return cfg, arrs


def load_adapter(path: str, model_cfg, base_params) -> Tuple[PeftState, Any]:
  """(state, params): the base tree with the adapter's method applied and its leaves."""
  cfg = read_adapter_config(path)
  mt = family_of(model_cfg).name
  if cfg["model_type"] != mt:
    raise PeftConfigError(f"adapter in {path} is for a {cfg['model_type']} model, not {mt}")
  state = apply_peft(model_cfg, base_params, cfg["method"], cfg["hparams"])
  return state, load_adapter_leaves(path, state)


def load_adapter_leaves(path: str, state: PeftState):
  """``state.params`` with the adapter's saved leaves put in (names and shapes checked;
  each leaf keeps the sharding of the leaf it replaces)."""
  cfg, arrs = read_adapter(path)
  mt = family_of(state.model_cfg).name
  if cfg["model_type"] != mt:
    raise PeftConfigError(f"adapter in {path} is for a {cfg['model_type']} model, not {mt}")
  if cfg["method"] != state.method.name:
    raise PeftConfigError(f"adapter in {path} was made by method {cfg['method']!r}, not "
                          f"{state.method.name!r}")
  flat = flatten(state.params)
  want = set(state.added) | set(state.made_trainable)
  if set(arrs) != want:
    raise PeftConfigError(f"adapter in {path} does not match the model: missing "
                          f"{sorted(want - set(arrs))[:5]}, unexpected {sorted(set(arrs) - want)[:5]}")
  for k, a in arrs.items():
    if tuple(a.shape) != tuple(flat[k].shape):
      raise PeftConfigError(f"adapter leaf {k} has shape {tuple(a.shape)}, the model expects "
                            f"{tuple(flat[k].shape)}")
    value = np.asarray(a).astype(flat[k].dtype)
    sharding = getattr(flat[k], "sharding", None)
    flat[k] = value if sharding is None else jax.device_put(value, sharding)
  return unflatten(flat)
