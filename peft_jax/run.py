"""Pieces shared by ``train.py`` and ``eval.py``: config -> model, tokenizer, data."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models import LlamaConfig, T5Config, build_model, get_preset, init_params


class ConfigError(ValueError):
  """A bad value in the experiment config (named in the message)."""

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(p: str) -> str:
  """Paths in configs are relative to the repository root unless absolute."""
  if not p or os.path.isabs(p) or os.path.exists(p):
    return p
  cand = os.path.join(REPO, p)
  return cand if os.path.exists(cand) else p


def model_config(cfg):
  """The model config from ``model.name`` (a preset) or ``model.checkpoint`` (HF dir/id)."""
  m = cfg.model
  if m.get("checkpoint"):
    from peft_jax.checkpoint.hf import config_from_hf, read_hf_config, resolve_checkpoint_dir
    mc = config_from_hf(read_hf_config(resolve_checkpoint_dir(resolve_path(m.checkpoint))))
  elif m.get("name"):
    try:
      mc = get_preset(m.name)
    except ValueError as e:
      raise ConfigError(f"config.model.name: {e}") from None
  else:
    raise ConfigError("config.model needs `name` (a preset) or `checkpoint` (a local directory "
                     "or hub id)")
  kw = {k: m[k] for k in ("dtype", "param_dtype", "remat", "vocab_size") if m.get(k)}
  if isinstance(mc, T5Config) and m.get("dropout_rate") is not None:
    kw["dropout_rate"] = m.dropout_rate
  return mc.replace(**kw)


def base_params(cfg, mc, rng, shardings=None):
  """Pretrained weights from ``model.checkpoint``, else a random init (presets).

  With ``shardings`` (a tree matching the base parameters) each leaf is created or
  read straight into its shards (see :mod:`peft_jax.sharding`)."""
  if cfg.model.get("checkpoint"):
    from peft_jax.checkpoint.hf import load_hf
    _, params = load_hf(resolve_path(cfg.model.checkpoint), cfg=mc, shardings=shardings)
    if shardings is not None:
      return params
    return jax.tree_util.tree_map(jnp.asarray, params)
  if shardings is not None:
    from peft_jax.sharding import init_sharded
    return init_sharded(mc, rng, shardings)
  return init_params(mc, rng)


def make_mesh(cfg):
  """The device mesh of ``config.mesh`` (``num_devices``: use the first n; 0 = all)."""
  from peft_jax.sharding import ShardingError, make_mesh as _make
  m = cfg.get("mesh")
  n = int(m.get("num_devices") or 0) if m is not None else 0
  devices = jax.devices()
  if n > len(devices):
    raise ConfigError(f"config.mesh.num_devices={n} but only {len(devices)} devices are visible")
  try:
    return _make(m, devices[:n] if n else devices)
  except ShardingError as e:
    raise ConfigError(f"config.mesh: {e}") from None


def tokenizer(cfg, mc=None):
  """``AutoTokenizer`` from ``config.tokenizer`` or the checkpoint directory. A bare
  vocabulary (e.g. only ``tokenizer.json``) gets its EOS/pad tokens from the model config."""
  from transformers import AutoTokenizer
  path = cfg.get("tokenizer") or cfg.model.get("checkpoint")
  if not path:
    raise ConfigError("config.tokenizer (or model.checkpoint) must name a tokenizer directory")
  path = resolve_path(path)
  if not os.path.isdir(path):
    raise ConfigError(f"config.tokenizer: {path} is not a directory; expected a tokenizer "
                      "saved in the Hugging Face layout")
  tok = AutoTokenizer.from_pretrained(path)
  if mc is not None:
    if tok.eos_token_id is None and mc.eos_token_id is not None:
      tok.eos_token = tok.convert_ids_to_tokens(int(mc.eos_token_id))
    if tok.pad_token_id is None:
      pad = mc.pad_token_id if mc.pad_token_id is not None else tok.eos_token_id
      if pad is not None:
        tok.pad_token = tok.convert_ids_to_tokens(int(pad))
  return tok


def read_jsonl(path) -> List[Dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def dataset(cfg) -> Tuple[List[dict], List[dict]]:
  """(train rows, evaluation rows) for ``config.data``."""
  d = cfg.data
  if d.name == "quickstart":
    root = resolve_path(d.get("path") or "data/quickstart")
    train, val = read_jsonl(os.path.join(root, "train.jsonl")), read_jsonl(os.path.join(root, "validation.jsonl"))
  elif d.name == "jsonl":
    train, val = read_jsonl(resolve_path(d.train_file)), read_jsonl(resolve_path(d.validation_file))
  else:
    from peft_jax.data.sources import load_dataset_rows
    kw = {"path": resolve_path(d.path) if d.get("path") else None, "seed": d.get("seed", 0)}
    size = d.get("size") or None
    train = list(load_dataset_rows(d.name, "train", size=size, **kw))
    val = list(load_dataset_rows(d.name, d.get("eval_split") or "validation", **kw))
  if d.get("max_train_examples"):
    train = train[: d.max_train_examples]
  if d.get("max_eval_examples"):
    val = val[: d.max_eval_examples]
  if not train:
    raise ConfigError(f"config.data: data set {d.name!r} gave no training rows")
  return train, val


_LIST_KEYS = ("target_modules", "feedforward_modules", "target_sublayers", "layers_to_transform")
_REGEX_CHARS = set(".*+?()[]{}|^$\\/")


def peft_overrides(cfg):
  """Method hyperparameters from ``config.peft`` (all fields but ``method``).

  Command-line friendly lists: for ``target_modules`` and the like, a plain string
  of names (``"q,v"``, ``"wo"``, ``""``) becomes a list; ``"all-linear"`` and strings
  with regex characters stay strings (HF PEFT: a regex over module paths);
  ``encoder_hidden_size=0`` means none."""
  out = {}
  for k, v in cfg.peft.items():
    if k == "method":
      continue
    if hasattr(v, "to_dict"):
      v = v.to_dict()
    if k in _LIST_KEYS and isinstance(v, str) and v != "all-linear" and not (_REGEX_CHARS & set(v)):
      v = [x.strip() for x in v.split(",") if x.strip()]
      if k == "layers_to_transform":
        v = [int(x) for x in v]
    out[k] = v
  return out


def layout(mc) -> str:
  return "seq2seq" if isinstance(mc, T5Config) else "causal"


def start_and_pad(mc, tok):
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  start = mc.decoder_start_token_id if isinstance(mc, T5Config) else pad
  return pad, start


def run_cli(main_fn):
  """Runs ``main_fn`` under absl; configuration and checkpoint errors print one line
  (``error: ...``) and exit with status 2, before any compute."""
  import sys
  from absl import app
  from peft_jax.checkpoint.hf import CheckpointError
  from peft_jax.peft.base import PeftConfigError
  from peft_jax.data.common import DataError

  def wrapped(argv):
    try:
      return main_fn(argv)
    except (PeftConfigError, CheckpointError, ConfigError, DataError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except RuntimeError as e:
      if type(e).__name__ != "TrainingDiverged":
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(3)

  app.run(wrapped)
