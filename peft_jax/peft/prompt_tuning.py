"""Prompt tuning [prompt_tuning] (Lester et al., 2021).

What it adds: ``num_virtual_tokens`` soft-prompt vectors ``prompt_embeddings
[P, d_model]`` (T5: ``encoder/prompt_embeddings``; LLaMA: top-level
``prompt_embeddings``). Where it acts: the ``embed`` site, prepending them to
the input embeddings of the stack that reads the prompt (T5 encoder, LLaMA)
and ``P`` ones to its key mask; the T5 decoder cross-attends to the longer
encoder output, LLaMA's logits gain ``P`` leading positions (as HF PEFT's).
Defaults follow HF PEFT 0.21's ``PromptTuningConfig``: ``num_virtual_tokens``
is required; ``prompt_tuning_init="RANDOM"`` draws N(0, 1) (torch's
``nn.Embedding`` init), ``"SAMPLE_VOCAB"`` copies the embeddings of uniformly
sampled token ids, ``"TEXT"`` those of ``prompt_tuning_init_text`` tokenised
with ``tokenizer_name_or_path`` (repeated/truncated to ``P``).

``max_input_length`` (ours): prompt plus input may not exceed it; default
LLaMA ``max_position_embeddings``, T5 512 (T5 has relative positions, so this
is a policy, not a hard limit). Checked at build time (``P`` alone) and when
a forward is traced (``P + T``), raising :class:`PeftConfigError`.

HF PEFT's seq2seq default (``num_transformer_submodules=2``) allocates ``2P``
prompt rows of which only the first ``P`` are ever used; we keep ``P`` (the
HF export writes ``num_transformer_submodules=1``; the import reads the first
``P`` rows of either layout).

LLaMA with a KV cache: the model applies the ``embed`` site only without a
cache, so a cached generation must prefill without the prompt or handle the
prompt itself (see the report / model docs).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.models.family import family_of
from peft_jax.peft.base import Method, PeftConfigError, register
from peft_jax.peft.common import Rand, adapter_dtype

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")

#: ours, shared with prefix tuning
MAX_INPUT_LENGTH = Field(None, "longest virtual tokens + input allowed (none: T5 512, LLaMA "
                         "max_position_embeddings)", "int", ge=1)


def _init_problem(init: str):
  if init.upper() not in INITS:
    return f"expected one of {INITS} (any case)"
  return None


def max_input_length(cfg, hp):
  if hp.get("max_input_length") is not None:
    return int(hp["max_input_length"])
  return family_of(cfg).max_input_length(cfg)[0]


def prompt_leaf(cfg):
  return family_of(cfg).prompt_leaf


def embedding_leaf(cfg):
  return family_of(cfg).embedding_leaf


@dataclasses.dataclass(frozen=True)
class PromptHandler:
  max_len: int

  def embed(self, module, x, mask, deterministic):
    if not module.has_variable("params", "prompt_embeddings"):
      return x, mask
    p = module.get_variable("params", "prompt_embeddings")
    b, t = x.shape[:2]
    n = p.shape[0]
    if n + t > self.max_len:
      raise PeftConfigError(f"prompt tuning: {n} virtual tokens + {t} input tokens = {n + t} exceed "
                            f"the maximum input length {self.max_len}")
    x = jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype)[None], (b, n, x.shape[-1])), x], axis=1)
    mask = jnp.concatenate([jnp.ones((mask.shape[0], n), mask.dtype), mask], axis=1)
    return x, mask


def check_num_virtual_tokens(cfg, hp, what):
  n = hp["num_virtual_tokens"]
  if n is None:
    raise PeftConfigError(f"{what} needs num_virtual_tokens (no default, as in HF PEFT)")
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise PeftConfigError(f"num_virtual_tokens must be a positive int, got {n!r}")
  mx = max_input_length(cfg, hp)
  if n >= mx:
    if hp.get("max_input_length") is not None:
      src = "max_input_length"
    else:
      src = family_of(cfg).max_input_length(cfg)[1]
    raise PeftConfigError(f"num_virtual_tokens={n} leaves no room for input: the maximum input "
                          f"length is {mx} ({src}); expected num_virtual_tokens < {mx}")


@register
class PromptTuning(Method):
  name = "prompt_tuning"
  example_hparams = {"num_virtual_tokens": 4}
  reference = "HF PEFT 0.21 PromptTuningConfig"
  hparams = {
      "num_virtual_tokens": Field(None, "number P of soft-prompt vectors (required)", "int", ge=1),
      "prompt_tuning_init": Field("RANDOM", "RANDOM: N(0, 1); SAMPLE_VOCAB: random token "
                                  "embeddings; TEXT: the init text's (any case)",
                                  check_fn=_init_problem),
      "prompt_tuning_init_text": Field(None, "text whose token embeddings start the prompt (TEXT)",
                                       "str"),
      "tokenizer_name_or_path": Field(None, "tokenizer for prompt_tuning_init_text (TEXT)", "str"),
      "max_input_length": MAX_INPUT_LENGTH,
  }

  def validate(self, cfg, hp, flat):
    check_num_virtual_tokens(cfg, hp, "prompt_tuning")
    init = str(hp["prompt_tuning_init"]).upper()
    if init not in INITS:
      raise PeftConfigError(f"prompt_tuning_init must be one of {INITS}, got {hp['prompt_tuning_init']!r}")
    if init == "TEXT" and (not hp["prompt_tuning_init_text"] or not hp["tokenizer_name_or_path"]):
      raise PeftConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and "
                            "tokenizer_name_or_path")

  def init_leaves(self, cfg, hp, flat, rng):
    n = int(hp["num_virtual_tokens"])
    emb = flat[embedding_leaf(cfg)]
    vocab, d = emb.shape
    init = str(hp["prompt_tuning_init"]).upper()
    rnd = Rand(rng)
    if init == "RANDOM":
      p = rnd.normal((n, d))
    elif init == "SAMPLE_VOCAB":
      ids = rnd.randint((n,), 0, vocab)
      p = jnp.take(emb, ids, axis=0).astype(jnp.float32)
    else:
      from transformers import AutoTokenizer
      tok = AutoTokenizer.from_pretrained(hp["tokenizer_name_or_path"])
      ids = tok(hp["prompt_tuning_init_text"])["input_ids"]
      ids = (ids * (n // max(len(ids), 1) + 1))[:n]
      p = jnp.take(emb, jnp.asarray(ids, jnp.int32), axis=0).astype(jnp.float32)
    return {prompt_leaf(cfg): p.astype(adapter_dtype(emb.dtype))}

  def handlers(self, cfg, hp):
    return (PromptHandler(max_len=max_input_length(cfg, hp)),)

  # ------------------------------------------------------------------ HF PEFT (PromptTuningConfig)
  hf_peft_type = "PROMPT_TUNING"
  #: every field of peft 0.21's PromptTuningConfig: the sizes are checked against the
  #: tensor and the model, the rest only initialises
  hf_fields = {"num_virtual_tokens": "used",
               **{k: "noop" for k in ("num_transformer_submodules", "token_dim", "num_attention_heads",
                                     "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
                                     "tokenizer_name_or_path", "tokenizer_kwargs")},
               "modules_to_save": ((None, []), "fully trained module copies"),}

  def hf_export(self, state, params):
    """``prompt_embeddings [P, d_model]``, ``num_transformer_submodules=1``."""
    from peft_jax.peft import hf_peft
    from peft_jax.tree import flatten
    cfg = state.model_cfg
    p = hf_peft.np32(flatten(params)[prompt_leaf(cfg)])
    fields = dict(num_virtual_tokens=int(p.shape[0]), token_dim=int(p.shape[1]),
                  num_transformer_submodules=1, num_attention_heads=family_of(cfg).num_heads(cfg),
                  num_layers=family_of(cfg).num_layers(cfg), prompt_tuning_init="RANDOM",
                  prompt_tuning_init_text=None, tokenizer_name_or_path=None)
    return fields, {"prompt_embeddings": p}

  def hf_import(self, conf, tensors, cfg, base_params, path):
    """The first ``num_virtual_tokens`` rows of ``prompt_embeddings``."""
    from peft_jax.peft import hf_peft
    from peft_jax.peft.base import apply_peft
    from peft_jax.tree import flatten, unflatten
    n = int(conf["num_virtual_tokens"])
    state = apply_peft(cfg, base_params, "prompt_tuning", {"num_virtual_tokens": n})
    flat = flatten(state.params)
    flat[prompt_leaf(cfg)] = hf_peft.set_layer(flat[prompt_leaf(cfg)], None,
                                               tensors["prompt_embeddings"][:n], "prompt_embeddings")
    return state, unflatten(flat)
