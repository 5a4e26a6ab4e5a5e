"""Model families: what training and evaluation need to know about a model's kind, behind
one interface, so that no code outside this package branches on T5 versus LLaMA for it.

A :class:`Family` says how a batch is laid out (``seq2seq``: encoder inputs plus decoder
inputs; ``causal``: one sequence), which keys it has and their abstract shapes (for
``--plan``), the first decoder token, whether the encoder input ends with EOS, whether the
config has a dropout rate, and how the model's forward reads a batch (with the logits cut to
the target positions: methods that prepend tokens lengthen a causal model's output).

Adding a family: its model module and presets in this package, and an entry in
:data:`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import jax
import jax.numpy as jnp

from peft_jax.models.config import LlamaConfig, T5Config


@dataclasses.dataclass(frozen=True)
class Family:
  name: str                  # the config's model_type
  layout: str                # "seq2seq" | "causal" (peft_jax.data.batching)
  source_eos: bool           # the encoder input ends with EOS
  has_dropout: bool          # the config has dropout_rate

  def start_token(self, cfg, pad_id: int) -> int:
    """The first decoder token of a target (seq2seq) or the pad (causal)."""
    return cfg.decoder_start_token_id if self.layout == "seq2seq" else pad_id

  def abstract_batch(self, batch_size: int, source_len: int, target_len: int
                     ) -> Dict[str, jax.ShapeDtypeStruct]:
    """The largest bucket's batch: seq2seq ``[B, source]`` + ``[B, target]``; causal
    ``[B, source + target]``."""
    i32 = jnp.int32
    if self.layout == "seq2seq":
      src = jax.ShapeDtypeStruct((batch_size, source_len), i32)
      tgt = jax.ShapeDtypeStruct((batch_size, target_len), i32)
      return {"inputs": src, "input_mask": src, "decoder_inputs": tgt, "targets": tgt,
              "target_mask": tgt}
    n = jax.ShapeDtypeStruct((batch_size, source_len + target_len), i32)
    return {k: n for k in ("inputs", "input_mask", "targets", "target_mask")}

  def logits(self, model, params, batch, deterministic: bool, rngs=None):
    """The model's logits at the target positions of ``batch``, ``[B, T, vocab]``."""
    if self.layout == "seq2seq":
      out = model.apply({"params": params}, batch["inputs"], batch["input_mask"],
                        batch["decoder_inputs"], None, deterministic, rngs=rngs)
    else:
      out = model.apply({"params": params}, batch["inputs"], batch["input_mask"], None,
                        deterministic, rngs=rngs)
    return out[:, -batch["targets"].shape[1]:]


FAMILIES = {
    T5Config: Family("t5", "seq2seq", source_eos=True, has_dropout=True),
    LlamaConfig: Family("llama", "causal", source_eos=False, has_dropout=False),
}


def family_of(cfg) -> Family:
  """The family of a model config."""
  for cls, fam in FAMILIES.items():
    if isinstance(cfg, cls):
      return fam
  raise TypeError(f"unsupported model config {type(cfg).__name__}; expected one of "
                  f"{[c.__name__ for c in FAMILIES]}")
