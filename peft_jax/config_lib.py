"""Building blocks for the experiment configs in ``configs/``.

A config is an ``ml_collections.ConfigDict`` with the sections ``model``,
``tokenizer``, ``data``, ``peft``, ``train``, ``eval``. ``base_config()`` holds
every field with its default, so any of them can be overridden on the command
line (``--config.train.learning_rate=1e-4``); the family files set what their
paper fixed. ``parse_variant`` turns ``"t5-large,rte,lora_qv"`` into named parts.
"""

from __future__ import annotations

from typing import Dict, Sequence

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"name": "", "checkpoint": "", "dtype": "float32",
                                       "param_dtype": "float32", "remat": "none",
                                       "dropout_rate": 0.1})
  c.tokenizer = ""
  c.data = ml_collections.ConfigDict({
      "name": "", "path": "", "size": "", "seed": 0, "max_source_len": 512, "max_target_len": 128,
      "max_train_examples": 0, "max_eval_examples": 0, "eval_split": "validation"})
  c.peft = ml_collections.ConfigDict({"method": "full"})
  c.train = ml_collections.ConfigDict({
      "batch_size": 32, "micro_batch_size": 0, "num_steps": 0, "num_epochs": 3, "min_steps": 0,
      "learning_rate": 1e-4, "schedule": "linear", "warmup_ratio": 0.03, "weight_decay": 0.0,
      "grad_clip": 1.0, "seed": 0, "log_every": 50, "eval_every": 0, "save_every": 0,
      "keep_last": 2, "early_stopping_patience": 0, "eval_at_start": False, "stop_at_step": 0})
  c.eval = ml_collections.ConfigDict({"batch_size": 32, "max_new_tokens": 128, "num_beams": 1,
                                      "metric": "rougeL"})
  # device mesh (peft_jax.sharding): -1 = the rest of the devices; the batch is split over
  # data x fsdp, base weights over fsdp (and tensor); rules: "logical=axes, ..." over the
  # defaults; param_rules: "regex -> dims; ..." over flattened paths (first match wins)
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "num_devices": 0,
                                      "rules": "", "param_rules": ""})
  return c


def parse_variant(variant: str, slots: Dict[str, Sequence[str]], defaults: Dict[str, str]):
  """``"a,b,c"`` -> ``{slot: value}``: each part is matched to the one slot that lists it.

  Unknown parts raise ``ValueError`` naming what each slot accepts.
  """
  out = dict(defaults)
  for part in [p.strip() for p in (variant or "").split(",") if p.strip()]:
    hits = [s for s, allowed in slots.items() if part in allowed]
    if len(hits) != 1:
      accepted = "; ".join(f"{s}: {', '.join(v)}" for s, v in slots.items())
      raise ValueError(f"config variant part {part!r} is not recognised; accepted: {accepted}")
    out[hits[0]] = part
  return out


def tiny_model(c: ml_collections.ConfigDict, family: str):
  """Swaps the model for a tiny random one that still reads the family's tokenizer."""
  c.model.name = "t5-tiny" if family == "t5" else "llama-tiny"
  c.model.vocab_size = 32128 if family == "t5" else 32000
  c.train.batch_size = 4
  c.train.num_steps = 3
  c.train.num_epochs = 0
  c.train.log_every = 1
  c.data.max_source_len = 64
  c.data.max_target_len = 16
  c.data.max_train_examples = 16
  c.data.max_eval_examples = 4
  c.eval.batch_size = 4
  c.eval.max_new_tokens = 4
  c.mesh.num_devices = 1      # a smoke test: one device (micro-batches of 2 split no further)
  return c
