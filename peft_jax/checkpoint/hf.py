"""Import and export of Hugging Face checkpoints (T5, LLaMA).

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
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from peft_jax.models.config import LlamaConfig, T5Config


class CheckpointError(ValueError):
  """A checkpoint is missing, unsupported or does not match the model."""


# ----------------------------------------------------------------------------- configs

def config_from_hf(hf: Dict[str, Any], tensor_names=()) -> Any:
  mt = hf.get("model_type")
  archs = hf.get("architectures") or []
  if mt == "t5" or mt == "mt5":
    tie = hf.get("tie_word_embeddings", True) is not False
    if "scale_decoder_outputs" in hf:
      scale = bool(hf["scale_decoder_outputs"])
      tie = tie and "lm_head.weight" not in tensor_names
    else:
      scale = tie
    return T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_heads=hf["num_heads"], num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers"),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"), tie_word_embeddings=tie,
        scale_decoder_outputs=scale,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        dropout_rate=hf.get("dropout_rate", 0.1), pad_token_id=hf.get("pad_token_id", 0) or 0,
        eos_token_id=_first(hf.get("eos_token_id", 1)),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)) or 0)
  if mt == "llama":
    for flag in ("attention_bias", "mlp_bias"):
      if hf.get(flag):
        raise CheckpointError(f"unsupported LLaMA variant: {flag}=true (peft-jax's LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
      raise CheckpointError(f"unsupported LLaMA hidden_act {hf['hidden_act']!r}; expected 'silu'")
    rp = dict(hf.get("rope_parameters") or {})
    theta = rp.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rs = hf.get("rope_scaling") or rp
    rs = {k: v for k, v in rs.items() if v is not None} if rs else None
    if rs and rs.get("rope_type", rs.get("type", "default")) == "default":
      rs = None
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        num_hidden_layers=hf["num_hidden_layers"], head_dim_=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=None if not rs else tuple(sorted(rs.items())),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first(hf.get("bos_token_id", 1)), eos_token_id=_first(hf.get("eos_token_id", 2)),
        pad_token_id=hf.get("pad_token_id"))
  raise CheckpointError(
      f"unsupported architecture: model_type={mt!r} architectures={archs}; "
      "peft-jax supports model_type 't5' (T5ForConditionalGeneration) and 'llama' (LlamaForCausalLM)")


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def config_to_hf(cfg) -> Dict[str, Any]:
  if isinstance(cfg, T5Config):
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.n_decoder_layers, "feed_forward_proj": cfg.feed_forward_proj,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.scales_decoder_outputs,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "dropout_rate": cfg.dropout_rate,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id, "is_encoder_decoder": True,
        "dtype": "float32",
    }
  if isinstance(cfg, LlamaConfig):
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
      rope.update(cfg.rope_scaling_dict)
    legacy_scaling = None if not cfg.rope_scaling else cfg.rope_scaling_dict
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.num_hidden_layers,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": rope, "rope_scaling": legacy_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "dtype": "float32",
    }
  raise TypeError(type(cfg))


# ----------------------------------------------------------------------------- name maps
# Each entry: (our flattened path, HF name template with {i} for the layer, layer count or
# None, transpose). Kernels are [in, out] here and [out, in] in torch.

def _t5_map(cfg: T5Config) -> List[Tuple[str, str, Optional[int], bool]]:
  m = [("shared/embedding", "shared.weight", None, False)]
  mlp = ["wi_0", "wi_1", "wo"] if cfg.is_gated else ["wi", "wo"]
  for stack, n, subs in (("encoder", cfg.num_layers, [("attn", "SelfAttention")]),
                         ("decoder", cfg.n_decoder_layers,
                          [("self_attn", "SelfAttention"), ("cross_attn", "EncDecAttention")])):
    p = f"{stack}.block.{{i}}.layer"
    for j, (ours, theirs) in enumerate(subs):
      for w in "qkvo":
        m.append((f"{stack}/layers/{ours}/{w}/kernel", f"{p}.{j}.{theirs}.{w}.weight", n, True))
      m.append((f"{stack}/layers/{ours}_norm/scale", f"{p}.{j}.layer_norm.weight", n, False))
    j = len(subs)
    for w in mlp:
      m.append((f"{stack}/layers/mlp/{w}/kernel", f"{p}.{j}.DenseReluDense.{w}.weight", n, True))
    m.append((f"{stack}/layers/mlp_norm/scale", f"{p}.{j}.layer_norm.weight", n, False))
    m.append((f"{stack}/rel_bias/embedding",
              f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None, False))
    m.append((f"{stack}/final_norm/scale", f"{stack}.final_layer_norm.weight", None, False))
  if not cfg.tie_word_embeddings:
    m.append(("lm_head/kernel", "lm_head.weight", None, True))
  return m


def _llama_map(cfg: LlamaConfig):
  n = cfg.num_hidden_layers
  p = "model.layers.{i}"
  m = [("embed/embedding", "model.embed_tokens.weight", None, False)]
  for w in "qkvo":
    m.append((f"layers/attn/{w}/kernel", f"{p}.self_attn.{w}_proj.weight", n, True))
  for w in ("gate", "up", "down"):
    m.append((f"layers/mlp/{w}/kernel", f"{p}.mlp.{w}_proj.weight", n, True))
  m.append(("layers/attn_norm/scale", f"{p}.input_layernorm.weight", n, False))
  m.append(("layers/mlp_norm/scale", f"{p}.post_attention_layernorm.weight", n, False))
  m.append(("final_norm/scale", "model.norm.weight", None, False))
  if not cfg.tie_word_embeddings:
    m.append(("lm_head/kernel", "lm_head.weight", None, True))
  return m


def name_map(cfg):
  return _t5_map(cfg) if isinstance(cfg, T5Config) else _llama_map(cfg)


_ALIASES = {"shared.weight": ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"],
            "model.embed_tokens.weight": ["embed_tokens.weight"]}


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
  from peft_jax.models import abstract_params
  from flax.traverse_util import flatten_dict, unflatten_dict
  shapes = flatten_dict(abstract_params(cfg), sep="/")
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
    out[ours] = arr
  return cfg, unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


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
        alt = [a for a in _ALIASES.get(name, []) if a in names]
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
  from peft_jax.models import abstract_params
  path = resolve_checkpoint_dir(path_or_id)
  hf_cfg = read_hf_config(path)
  src = _TensorSource(path)
  if cfg is None:
    cfg = config_from_hf(hf_cfg, src.names())
  shapes = flatten_dict(abstract_params(cfg), sep="/")
  sh = flatten_dict(shardings, sep="/")
  out = {}
  for ours, found, n, transpose in _resolve_names(src, src.names(), path, cfg, shapes):
    want, dt = tuple(shapes[ours].shape), shapes[ours].dtype

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

    out[ours] = jax.make_array_from_callback(want, sh[ours], cb)
  return cfg, unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def save_hf(cfg, params, out_dir: str, tokenizer_from: Optional[str] = None):
  """Writes ``config.json`` + ``model.safetensors`` (fp32 unless the params are bf16)."""
  from flax.traverse_util import flatten_dict
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  flat = flatten_dict(params, sep="/")
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
