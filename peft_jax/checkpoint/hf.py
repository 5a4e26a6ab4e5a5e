"""Import and export of Hugging Face checkpoints (the families of peft_jax.models).

Reads a local directory in the Hugging Face layout (``config.json`` plus
``model.safetensors``, a sharded ``model.safetensors.index.json``, or
``pytorch_model.bin`` / its index), or a hub id when the machine is online.
Tensors are read one at a time and written into a preallocated stacked
array per parameter, so peak host memory is about one model copy. Export writes
the same layout back (``config.json`` + ``model.safetensors``) so that
``transformers`` loads it.

Errors are :class:`CheckpointError` with one message naming the problem.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from peft_jax.models.family import families, family_for_hf, family_of


class CheckpointError(ValueError):
  """A checkpoint is missing, unsupported or does not match the model."""


# ----------------------------------------------------------------------------- configs
# The family (peft_jax.models) owns the config conversion and the weight names.

def config_from_hf(hf: Dict[str, Any], tensor_names=()) -> Any:
  mt = hf.get("model_type")
  fam = family_for_hf(mt)
  if fam is None:
    supported = ", ".join(f"{t!r} ({f.hf_architecture})" for f in families()
                          for t in f.hf_model_types)
    raise CheckpointError(f"unsupported architecture: model_type={mt!r} "
                          f"architectures={hf.get('architectures') or []}; peft-jax supports "
                          f"model_type {supported}")
  try:
    return fam.config_from_hf(hf, tensor_names)
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  except KeyError as e:
    raise CheckpointError(f"config.json lacks {e.args[0]!r}, which a {fam.name} config needs") from None


def config_to_hf(cfg) -> Dict[str, Any]:
  return family_of(cfg).config_to_hf(cfg)


def name_map(cfg) -> List[Tuple[str, str, Optional[int], bool]]:
  """(our flattened path, HF name with ``{i}`` for the layer, layer count or None, transpose)
  for every weight; kernels are [in, out] here and [out, in] in torch."""
  return family_of(cfg).hf_weight_names(cfg)


# ----------------------------------------------------------------------------- readers

class _TensorSource:
  """Lazy access to the tensors of a checkpoint directory, one tensor at a time."""

  def __init__(self, path: str):
    self.path = path
    self._files: Dict[str, str] = {}      # tensor name -> file
    self._open: Dict[str, Any] = {}
    st_single = os.path.join(path, "model.safetensors")
    st_index = os.path.join(path, "model.safetensors.index.json")
    pt_single = os.path.join(path, "pytorch_model.bin")
    pt_index = os.path.join(path, "pytorch_model.bin.index.json")
    if os.path.exists(st_index) or os.path.exists(pt_index):
      idx = st_index if os.path.exists(st_index) else pt_index
      try:
        wm = json.load(open(idx))["weight_map"]
      except (ValueError, KeyError) as e:
        raise CheckpointError(f"corrupt checkpoint index {idx}: {e}") from None
      for name, f in wm.items():
        self._files[name] = os.path.join(path, f)
      missing = sorted({f for f in self._files.values() if not os.path.exists(f)})
      if missing:
        raise CheckpointError(f"checkpoint index {idx} names shard files that are missing: {missing}")
    elif os.path.exists(st_single):
      self._scan_safetensors(st_single)
    elif os.path.exists(pt_single):
      for name in self._torch(pt_single):
        self._files[name] = pt_single
    else:
      raise CheckpointError(
          f"no weights in {path}: expected model.safetensors, model.safetensors.index.json, "
          f"pytorch_model.bin or pytorch_model.bin.index.json (found: {sorted(os.listdir(path))})")

  def _scan_safetensors(self, f):
    from safetensors import safe_open
    try:
      with safe_open(f, framework="numpy") as h:
        for name in h.keys():
          self._files[name] = f
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f"cannot read safetensors file {f}: {e}") from None

  def _torch(self, f):
    if f not in self._open:
      import torch
      try:
        self._open[f] = torch.load(f, map_location="cpu", weights_only=True)
      except Exception as e:
        raise CheckpointError(f"cannot read PyTorch checkpoint {f}: {e}") from None
    return self._open[f]

  def names(self):
    return set(self._files)

  def _st(self, f):
    from safetensors import safe_open
    if f not in self._open:
      try:
        self._open[f] = safe_open(f, framework="numpy")
      except Exception as e:
        raise CheckpointError(f"cannot read safetensors file {f}: {e}") from None
    return self._open[f]

  def shape(self, name: str) -> Tuple[int, ...]:
    """The stored shape, from the file header only (safetensors)."""
    f = self._files[name]
    if f.endswith(".safetensors"):
      return tuple(self._st(f).get_slice(name).get_shape())
    return tuple(self._torch(f)[name].shape)

  def read(self, name: str, index: Tuple[slice, ...]) -> np.ndarray:
    """Only the block ``index`` of a tensor (safetensors reads just those bytes)."""
    f = self._files[name]
    if f.endswith(".safetensors"):
      t = self._st(f).get_slice(name)[tuple(index)]
      return np.asarray(t)
    return self.get(name)[tuple(index)]

  def get(self, name: str) -> np.ndarray:
    f = self._files[name]
    if f.endswith(".safetensors"):
      t = self._st(f).get_tensor(name)
    else:
      import torch
      t = self._torch(f)[name]
      t = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return np.asarray(t)


def resolve_checkpoint_dir(path_or_id: str) -> str:
  """A local directory as is; otherwise a hub id, downloaded when online."""
  if os.path.isdir(path_or_id):
    return path_or_id
  if os.path.exists(path_or_id):
    raise CheckpointError(f"checkpoint path {path_or_id} is a file; expected a directory in the "
                          "Hugging Face layout (config.json + weights)")
  if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
    raise CheckpointError(f"checkpoint directory {path_or_id} does not exist")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                         "*.txt", "*.bin"])
  except Exception as e:
    raise CheckpointError(f"{path_or_id!r} is not a local directory and could not be fetched "
                          f"from the Hugging Face hub ({type(e).__name__}: {e})") from None


def read_hf_config(path: str) -> Dict[str, Any]:
  f = os.path.join(path, "config.json")
  if not os.path.exists(f):
    raise CheckpointError(f"missing config.json in {path}")
  try:
    return json.load(open(f))
  except ValueError as e:
    raise CheckpointError(f"corrupt config.json in {path}: {e}") from None


def load_hf(path_or_id: str, dtype=np.float32, cfg=None, shardings=None):
  """Returns ``(config, params)`` with params a nested dict of numpy arrays.

  With ``shardings`` (a tree of ``jax.sharding.Sharding`` matching the model's
  parameters), returns ``jax.Array`` leaves in those shardings instead, each
  device's block read from the files on its own (safetensors: only those bytes);
  no host or device ever holds a whole stacked leaf. Leaves take the model's
  ``param_dtype``."""
  if shardings is not None:
    return _load_sharded(path_or_id, cfg, shardings)
  path = resolve_checkpoint_dir(path_or_id)
  hf_cfg = read_hf_config(path)
  src = _TensorSource(path)
  names = src.names()
  if cfg is None:
    cfg = config_from_hf(hf_cfg, names)
  from flax.traverse_util import unflatten_dict
  from peft_jax import quantize
  shapes = _fp_shapes(cfg)
  spec = quantize.spec_of(cfg)
  quantized = set(quantize.selected(spec, shapes)) if spec.on else set()
  out = {}
  for ours, found, n, transpose in _resolve_names(src, names, path, cfg, shapes):
    arr = np.empty(shapes[ours].shape, dtype)
    for i, name in enumerate(found):
      t = src.get(name)
      t = t.T if transpose else t
      if n is None:
        arr[...] = t
      else:
        arr[i] = t
    if ours in quantized:     # one tensor at a time: never the whole fp32 model
      out.update(quantize.quantize_flat(spec, {ours: arr}, [ours]))
    else:
      out[ours] = arr
  return cfg, unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def _fp_shapes(cfg):
  """Flat shapes of the unquantized parameters (the checkpoint's tensors)."""
  from flax.traverse_util import flatten_dict
  from peft_jax.models import abstract_params
  return flatten_dict(abstract_params(cfg.replace(quantize="none")), sep="/")


def _resolve_names(src, names, path, cfg, shapes):
  """(ours, [hf names per layer or one], layer count, transpose) with every shape checked
  from the file headers before anything is read."""
  out = []
  for ours, theirs, n, transpose in name_map(cfg):
    if ours not in shapes:
      raise CheckpointError(f"internal name map names {ours}, which the model does not have")
    want = tuple(shapes[ours].shape)
    target = want[1:] if n is not None else want
    found = []
    for i in (range(n) if n is not None else [None]):
      name = theirs.format(i=i)
      if name not in names:
        alt = [a for a in family_of(cfg).hf_weight_aliases.get(name, ()) if a in names]
        if not alt:
          raise CheckpointError(f"checkpoint {path} lacks tensor {name!r} (for {ours})")
        name = alt[0]
      got = src.shape(name)
      got = got[::-1] if transpose else got
      if tuple(got) != tuple(target):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(got)}{' (transposed)' if transpose else ''} "
            f"but {ours} expects {tuple(target)} (config.json in {path} and the weights disagree)")
      found.append(name)
    out.append((ours, found, n, transpose))
  return out


def _load_sharded(path_or_id, cfg, shardings):
  import jax
  from flax.traverse_util import flatten_dict, unflatten_dict
  path = resolve_checkpoint_dir(path_or_id)
  hf_cfg = read_hf_config(path)
  src = _TensorSource(path)
  if cfg is None:
    cfg = config_from_hf(hf_cfg, src.names())
  from peft_jax import quantize
  shapes = _fp_shapes(cfg)
  spec = quantize.spec_of(cfg)
  quantized = set(quantize.selected(spec, shapes)) if spec.on else set()
  sh = flatten_dict(shardings, sep="/")
  out = {}
  for ours, found, n, transpose in _resolve_names(src, src.names(), path, cfg, shapes):
    want, dt = tuple(shapes[ours].shape), shapes[ours].dtype
    head = ours[: -len("kernel")]
    where = sh[head + "kernel_q"] if ours in quantized else sh[ours]

    def block(name, idx, transpose=transpose):
      if transpose:   # ours [in, out] = theirs[out, in].T
        return src.read(name, tuple(reversed(idx))).T
      return src.read(name, idx)

    def cb(index, found=found, n=n, want=want, dt=dt, block=block):
      index = tuple(index) + (slice(None),) * (len(want) - len(index))
      if n is None:
        return np.asarray(block(found[0], index), dt)
      rows = range(*index[0].indices(n))
      return np.stack([np.asarray(block(found[i], index[1:]), dt) for i in rows])

    arr = jax.make_array_from_callback(want, where, cb)
    if ours in quantized:    # quantized in its shards, one tensor at a time
      outs = {s: sh[head + s] for s in quantize.SUFFIXES if head + s in sh}
      q = jax.jit(lambda w: {k: v for k, v in quantize.quantize_kernel(
          w, spec.mode, spec.block, spec.double).items()}, out_shardings=outs)(arr)
      del arr
      out.update({head + s: v for s, v in q.items()})
    else:
      out[ours] = arr
  return cfg, unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def save_hf(cfg, params, out_dir: str, tokenizer_from: Optional[str] = None):
  """Writes ``config.json`` + ``model.safetensors`` (fp32 unless the params are bf16)."""
  from flax.traverse_util import flatten_dict
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  flat = flatten_dict(params, sep="/")
  quantized = sorted(k for k in flat if k.endswith("/kernel_q"))
  if quantized:
    raise CheckpointError(f"cannot export a quantized base ({len(quantized)} quantized kernels, "
                          f"e.g. {quantized[0]}) as a Hugging Face checkpoint; load the base "
                          "with model.quantize=none to export it")
  tensors = {}
  for ours, theirs, n, transpose in name_map(cfg):
    if ours not in flat:
      raise CheckpointError(f"cannot export: parameter {ours} is missing from the tree")
    a = np.asarray(flat[ours])
    if a.dtype.name == "bfloat16":
      a = a.astype(np.float32)
    for i in (range(n) if n is not None else [None]):
      t = a[i] if n is not None else a
      tensors[theirs.format(i=i)] = np.ascontiguousarray(t.T if transpose else t)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2, sort_keys=True)
  if tokenizer_from:
    import shutil
    for fn in os.listdir(tokenizer_from):
      if fn.startswith(("tokenizer", "special_tokens", "spiece")) or fn.endswith(".model"):
        shutil.copy(os.path.join(tokenizer_from, fn), out_dir)
  return out_dir
