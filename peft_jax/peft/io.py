"""Adapter-only save/load: only the method's leaves, plus a small JSON config.

``save_adapter(state, params, dir, format="safetensors"|"npz")`` writes
``adapter.safetensors`` (or ``adapter.npz``) with the leaves the method added,
the existing leaves it trains and those of the fully trained modules
(``modules_to_save``, ``state.saved``; keys: flattened paths), and
``peft_config.json`` (``{"method", "hparams", "model_type", "leaves",
"format", "base"}``; ``base``: the checkpoint or preset and init seed, and a fingerprint
of the base weights, see ``run.base_info``). ``load_adapter(dir, model_cfg, base_params)``
rebuilds the state with the saved hyperparameters and puts the saved leaves
into the tree, checking names and shapes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Tuple

import jax
import numpy as np

from peft_jax.models.family import family_of
from peft_jax.peft.base import PeftConfigError, PeftState, apply_peft, flatten, unflatten

CONFIG = "peft_config.json"
#: what save_adapter writes (rewritten on every save)
OWN_FILES = (CONFIG, "adapter.safetensors", "adapter.npz", "MANIFEST.json")


def adapter_leaves(state: PeftState, params) -> Dict[str, Any]:
  flat = flatten(params)
  keys = sorted(set(state.added) | set(state.made_trainable) | set(state.saved))
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
  """Writes the method's leaves, ``peft_config.json`` and a checksum manifest
  (``MANIFEST.json``); ``base`` (``inputs.base_info``) records which base weights the adapter
  belongs to. The directory is written beside ``out_dir`` and renamed into place, so a kill
  leaves either the previous adapter or the new one, never a mix."""
  from peft_jax.integrity import fault, write_manifest
  if format not in ("safetensors", "npz"):
    raise PeftConfigError(f"format must be 'safetensors' or 'npz', got {format!r}")
  leaves = {k: np.asarray(v) for k, v in adapter_leaves(state, params).items()}
  dtypes = {k: str(v.dtype) for k, v in leaves.items()}
  store = {k: (v.astype(np.float32) if v.dtype.name == "bfloat16" else v) for k, v in leaves.items()}
  out_dir = os.path.abspath(out_dir)
  parent, name = os.path.split(out_dir)
  if os.path.isdir(parent):        # leftovers of a save that was killed
    for n in os.listdir(parent):
      if n.startswith((f"{name}.tmp-", f"{name}.old-")):
        shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  os.makedirs(tmp)
  if format == "safetensors":
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in store.items()},
              os.path.join(tmp, "adapter.safetensors"))
  else:
    np.savez(os.path.join(tmp, "adapter.npz"), **store)
  cfg = {"method": state.method.name, "hparams": _jsonable(state.hparams),
         "model_type": family_of(state.model_cfg).name, "format": format,
         "leaves": {k: {"shape": list(v.shape), "dtype": dtypes[k]} for k, v in leaves.items()}}
  if base is not None:
    cfg["base"] = _jsonable(base)
  with open(os.path.join(tmp, CONFIG), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  if os.path.isdir(out_dir):       # files others put beside the adapter stay with it
    for name in os.listdir(out_dir):
      src = os.path.join(out_dir, name)
      if name not in OWN_FILES and not os.path.exists(os.path.join(tmp, name)):
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
  write_manifest(tmp)
  fault("adapter")
  if os.path.isdir(out_dir):
    old = f"{out_dir}.old-{os.getpid()}"
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out_dir)
  return out_dir


def read_adapter_config(path: str) -> Dict[str, Any]:
  """The ``peft_config.json`` of an adapter directory."""
  cf = os.path.join(path, CONFIG)
  if not os.path.exists(cf):
    raise PeftConfigError(f"no {CONFIG} in {path}; expected a directory written by save_adapter")
  try:
    with open(cf) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise PeftConfigError(f"adapter config {cf} is unreadable ({type(e).__name__}: {e})") from None
  missing = [k for k in ("method", "hparams", "model_type") if not isinstance(cfg, dict) or k not in cfg]
  if missing:
    raise PeftConfigError(f"adapter config {cf} lacks {missing}")
  return cfg


def verify_adapter(path: str) -> None:
  """Checks the adapter's files against its manifest (:class:`PeftConfigError` naming the
  file). Adapters saved before manifests existed are read with a warning."""
  from peft_jax.integrity import MANIFEST, manifest_problem
  if not os.path.exists(os.path.join(path, MANIFEST)):
    import sys
    print(f"warning: adapter {path} has no {MANIFEST} (saved by an older peft-jax); its bytes "
          "cannot be verified", file=sys.stderr)
    return
  problem = manifest_problem(path)
  if problem is not None:
    raise PeftConfigError(f"adapter {path} is damaged: {problem}")


def read_adapter(path: str, verify: bool = True) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """(config, arrays); ``verify=False`` when the caller has checked the manifest already."""
  if verify:
    verify_adapter(path)
  cfg = read_adapter_config(path)
  fmt = cfg.get("format", "safetensors")
  f = os.path.join(path, "adapter.npz" if fmt == "npz" else "adapter.safetensors")
  if not os.path.exists(f):
    raise PeftConfigError(f"adapter {path} has no weights file {os.path.basename(f)}")
  try:
    if fmt == "npz":
      with np.load(f) as z:
        arrs = {k: z[k] for k in z.files}
    else:
      from safetensors.numpy import load_file
      arrs = load_file(f)
  except Exception as e:  # numpy and safetensors raise several types for damaged files
    raise PeftConfigError(f"adapter weights {f} are unreadable ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
  return cfg, arrs


def load_adapter(path: str, model_cfg, base_params) -> Tuple[PeftState, Any]:
  """(state, params): the base tree with the adapter's method applied and its leaves."""
  cfg = read_adapter_config(path)
  mt = family_of(model_cfg).name
  if cfg["model_type"] != mt:
    raise PeftConfigError(f"adapter in {path} is for a {cfg['model_type']} model, not {mt}")
  state = apply_peft(model_cfg, base_params, cfg["method"], cfg["hparams"])
  return state, load_adapter_leaves(path, state)


def load_adapter_leaves(path: str, state: PeftState, verify: bool = True):
  """``state.params`` with the adapter's saved leaves put in (names and shapes checked;
  each leaf keeps the sharding of the leaf it replaces)."""
  cfg, arrs = read_adapter(path, verify=verify)
  mt = family_of(state.model_cfg).name
  if cfg["model_type"] != mt:
    raise PeftConfigError(f"adapter in {path} is for a {cfg['model_type']} model, not {mt}")
  if cfg["method"] != state.method.name:
    raise PeftConfigError(f"adapter in {path} was made by method {cfg['method']!r}, not "
                          f"{state.method.name!r}")
  flat = flatten(state.params)
  want = set(state.added) | set(state.made_trainable) | set(state.saved)
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
