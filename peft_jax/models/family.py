"""Model families: everything the rest of peft-jax needs to know about a model's kind,
behind one interface, so that no code outside this package branches on T5 versus LLaMA.

A :class:`Family` says

* how a batch is laid out (``seq2seq``: encoder inputs plus decoder inputs; ``causal``: one
  sequence), its abstract shapes (for ``--plan``), the first decoder token, whether the
  encoder input ends with EOS, and how the forward reads a batch;
* the model's dimensions in common terms (hidden width, heads, head width, key/value width);
* where PEFT methods can act, in the path language of the parameter tree: the sub-layer
  of a module path and its aliases, every attention (with its kind), the residual sites
  of bottleneck adapters, the prompt and token-embedding leaves;
* the Hugging Face side: ``transformers``' module name of each of our modules, the config
  and weight-name conversion of a checkpoint, HF PEFT's task type and its per-model default
  target modules.

Attention kinds are a fixed vocabulary shared by all families: ``self_attn`` (a decoder-only
model), ``encoder_self_attn``, ``decoder_self_attn`` and ``cross_attn`` (an encoder-decoder).
Residual-site kinds: ``self_attn``, ``cross_attn``, ``mlp``.

Adding a family: its config class and presets (``config.py``), its model module, a module
defining its :class:`Family` subclass, registered with :func:`register` and imported in
``peft_jax/models/__init__.py``. Nothing outside this package changes.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

#: the self-attention kinds of an encoder-decoder -> their stack (the ``is_decoder`` of the
#: model's stack modules)
SELF_ATTENTION_STACK = {"encoder_self_attn": "encoder", "decoder_self_attn": "decoder"}
#: one HF weight: (our flattened path, HF name with ``{i}`` for the layer, layer count or
#: None, transpose: kernels are ``[in, out]`` here and ``[out, in]`` in torch)
WeightName = Tuple[str, str, Optional[int], bool]
#: one attention: (kind, layer-agnostic path of the attention module, layers)
Attention = Tuple[str, str, int]
#: one stack's residual sites: (stack path prefix, layers, global id of the stack's first
#: layer (encoder layers first, as AdapterHub counts), ((site name, kind), ...))
ResidualSites = Tuple[str, int, int, Tuple[Tuple[str, str], ...]]


def loss_targets(batch):
  """``(targets, mask)`` aligned with :meth:`Family.logits`: the batch's own, or with
  ``loss_positions`` ``[B, K]`` (-1: an unused slot) those gathered at the positions."""
  lp = batch.get("loss_positions")
  if lp is None:
    return batch["targets"], batch["target_mask"]
  at = jnp.maximum(lp, 0)
  targets = jnp.take_along_axis(batch["targets"], at, axis=1)
  mask = jnp.take_along_axis(batch["target_mask"], at, axis=1) * (lp >= 0)
  return targets, mask


class Family(abc.ABC):
  """The interface; one subclass instance per family (see the module docstring)."""

  name: str = ""                          # the config's model_type
  config_class: type = object
  layout: str = ""                        # "seq2seq" | "causal" (peft_jax.data.batching)
  source_eos: bool = False                # the encoder input ends with EOS
  has_dropout: bool = False               # the config has dropout_rate
  prompt_leaf: str = ""                   # where prompt tuning's virtual tokens live
  embedding_leaf: str = ""                # the token embedding read by the prompt's stack
  #: the lookups of that table as HF PEFT wraps them: ``{our path: transformers module}``
  #: (LoRA on embeddings; one per stack that reads the table)
  embedding_lookups: Mapping[str, str] = {}
  #: the ``transformers`` module of the table itself (HF's ``trainable_token_indices``)
  hf_embedding_table: str = ""
  hf_model_types: Tuple[str, ...] = ()    # config.json model_type values this family reads
  hf_architecture: str = ""               # transformers class, for messages
  hf_task_type: str = ""                  # HF PEFT task_type
  #: HF PEFT's default ``target_modules`` for this model type, per PEFT type
  #: (``LORA``, ``IA3``, ``IA3_FEEDFORWARD``, ``ADALORA``), from HF PEFT's mapping tables
  hf_peft_default_targets: Mapping[str, Sequence[str]] = {}
  #: checkpoint tensors that may stand in for one the name map names (tied embeddings)
  hf_weight_aliases: Mapping[str, Sequence[str]] = {}
  #: ``target_sublayers`` names -> the sub-layers they select
  sublayer_aliases: Mapping[str, frozenset] = {}

  def __repr__(self):
    return f"<Family {self.name}>"

  # ------------------------------------------------------------------ model
  @abc.abstractmethod
  def build(self, cfg, sites):
    ...

  def dummy_inputs(self, cfg) -> tuple:
    """Positional inputs that ``init`` traces the model with."""
    ids = jnp.zeros((1, 4), jnp.int32)
    return (ids, None, ids) if self.layout == "seq2seq" else (ids,)

  # ------------------------------------------------------------------ batches
  def start_token(self, cfg, pad_id: int) -> int:
    """The first decoder token of a target (seq2seq) or the pad (causal)."""
    return cfg.decoder_start_token_id if self.layout == "seq2seq" else pad_id

  def abstract_batch(self, batch_size: int, source_len: int, target_len: int
                     ) -> Dict[str, jax.ShapeDtypeStruct]:
    """The largest bucket's batch: seq2seq ``[B, source]`` + ``[B, target]``; causal
    ``[B, source + target]`` with ``loss_positions [B, target]``."""
    i32 = jnp.int32
    if self.layout == "seq2seq":
      src = jax.ShapeDtypeStruct((batch_size, source_len), i32)
      tgt = jax.ShapeDtypeStruct((batch_size, target_len), i32)
      return {"inputs": src, "input_mask": src, "decoder_inputs": tgt, "targets": tgt,
              "target_mask": tgt}
    n = jax.ShapeDtypeStruct((batch_size, source_len + target_len), i32)
    out = {k: n for k in ("inputs", "input_mask", "targets", "target_mask")}
    if target_len < source_len + target_len:     # as make_batch: the head at the targets only
      out["loss_positions"] = jax.ShapeDtypeStruct((batch_size, target_len), i32)
    return out

  def logits(self, model, params, batch, deterministic: bool, rngs=None):
    """The model's logits at the target positions of ``batch``, ``[B, T, vocab]`` (methods
    that prepend tokens lengthen a causal model's output). A packed batch
    (:mod:`peft_jax.data.packing`) brings its segment ids and per-segment positions. A
    causal batch with ``loss_positions`` ``[B, K]`` (:func:`peft_jax.data.batching.make_batch`)
    gets ``[B, K, vocab]``: the head at those positions only (see :func:`loss_targets`)."""
    packed = {k: batch[k] for k in PACKED_KEYS[self.layout] if k in batch}
    if self.layout == "causal" and "loss_positions" in batch:
      at = jnp.maximum(batch["loss_positions"], 0)
      return model.apply({"params": params}, batch["inputs"], batch["input_mask"],
                         packed.pop("positions", None), deterministic, rngs=rngs,
                         logits_at=at, **packed)
    if self.layout == "seq2seq":
      out = model.apply({"params": params}, batch["inputs"], batch["input_mask"],
                        batch["decoder_inputs"], None, deterministic, rngs=rngs, **packed)
    else:
      out = model.apply({"params": params}, batch["inputs"], batch["input_mask"],
                        packed.pop("positions", None), deterministic, rngs=rngs, **packed)
    return out[:, -batch["targets"].shape[1]:]

  # ------------------------------------------------------------------ dimensions
  @abc.abstractmethod
  def hidden_size(self, cfg) -> int:
    ...

  @abc.abstractmethod
  def num_heads(self, cfg) -> int:
    ...

  @abc.abstractmethod
  def head_dim(self, cfg) -> int:
    ...

  @abc.abstractmethod
  def kv_width(self, cfg) -> int:
    """Width of an attention's projected keys (= values): key/value heads * head width."""

  @abc.abstractmethod
  def num_layers(self, cfg) -> int:
    """The layer count HF PEFT's configs record (``num_layers``)."""

  @abc.abstractmethod
  def max_input_length(self, cfg) -> Tuple[int, str]:
    """The longest input (virtual tokens included) and where that number comes from."""

  # ------------------------------------------------------------------ sites
  @abc.abstractmethod
  def attentions(self, cfg) -> List[Attention]:
    """Every attention of the model, in canonical order."""

  @abc.abstractmethod
  def residual_sites(self, cfg) -> Tuple[ResidualSites, ...]:
    """Each stack's sub-layers where a bottleneck adapter can sit."""

  @abc.abstractmethod
  def hf_module_name(self, path: str, kind: str, name: str, layer: Optional[int]) -> str:
    """``transformers``' name of our module ``path`` (``kind``: attn/mlp/head/norm; ``name``:
    its last path part) in layer ``layer``."""

  # ------------------------------------------------------------------ generation
  @abc.abstractmethod
  def start(self, model, params, ids, mask, max_new_tokens: int):
    """Generation's start: ``(first logits [B, V], cache, aux)``. The cache has room for
    ``max_new_tokens`` more tokens; ``aux`` is a pytree of arrays (what :meth:`advance`
    needs besides the cache, read-only while decoding), so both can cross ``jax.jit``
    boundaries. Leaves of ``aux`` under a ``layers`` key are per-layer values stacked on a
    leading axis (batch on axis 1), like the parameters of a layer stack."""

  @abc.abstractmethod
  def advance(self, model, params, aux, cache, tokens, t):
    """Feeds ``tokens`` ``[B]`` (the token chosen at step ``t``, traced) and returns
    ``(next logits [B, V], new cache)``."""

  def prefill(self, model, params, ids, mask, max_new_tokens: int, repeat: int,
              split_layers: bool = False):
    """:meth:`start` as a closure (:mod:`peft_jax.decoding`): ``(first logits [B, V], cache
    for B rows, step)``; ``step(cache, tokens, t)`` feeds the token chosen at step ``t`` for
    all ``B * repeat`` rows (batch-major, as beam search orders them) and returns
    ``(next logits, new cache)``. ``split_layers``: the steps read per-layer copies of the
    stacked parameters and ``aux`` leaves, made once (:func:`split_layers_of`)."""
    first, cache, aux = self.start(model, params, ids, mask, max_new_tokens)
    aux = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.repeat(x, repeat, 1 if is_stacked(p) else 0) if x.ndim else x, aux)
    get_params, get_aux = (lambda: params), (lambda: aux)
    if split_layers:
      params_parts, join_params = split_layers_of(params)
      aux_parts, join_aux = split_layers_of(aux)
      get_params, get_aux = (lambda: join_params(params_parts)), (lambda: join_aux(aux_parts))
    return first, cache, lambda c, tokens, t: self.advance(model, get_params(), get_aux(), c,
                                                           tokens, t)

  # ------------------------------------------------------------------ HF checkpoints
  @abc.abstractmethod
  def config_from_hf(self, hf: Dict[str, Any], tensor_names=()) -> Any:
    """Our config from a ``config.json`` dict (``ValueError`` for an unsupported variant)."""

  @abc.abstractmethod
  def config_to_hf(self, cfg) -> Dict[str, Any]:
    ...

  @abc.abstractmethod
  def hf_weight_names(self, cfg) -> List[WeightName]:
    ...


def is_stacked(path) -> bool:
  """A leaf of a layer stack: its tree path (``jax.tree_util`` keys) passes a ``layers`` key,
  and its leading axis is the layer (the scan's stacked parameters, :func:`peft_jax.models.layers.scanned`)."""
  return any(getattr(k, "key", None) == "layers" for k in path)


def split_layers_of(tree):
  """``(parts, join)``: every stacked leaf of ``tree`` cut into its layers, and a function
  stacking them again. Called outside a decoding loop and joined inside it, the stacking
  and the loop's static per-layer slices cancel (XLA simplifies ``slice(concatenate(..))``
  to the operand), so each step reads per-layer buffers made once, where slicing the
  stacked arrays copied every layer's weights at every token (XLA:CPU copies a slice
  before a matmul reads it). Costs one copy of the stacked leaves for the call."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  stacked = [is_stacked(p) for p, _ in flat]
  parts = [[x[i] for i in range(x.shape[0])] if st else x
           for st, (_, x) in zip(stacked, flat)]

  def join(parts):
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.stack(x) if st else x for st, x in zip(stacked, parts)])

  return parts, join


#: the keys a packed batch adds, per layout (the models' keyword arguments)
PACKED_KEYS = {"seq2seq": ("segment_ids", "positions", "decoder_segment_ids", "decoder_positions"),
               "causal": ("segment_ids", "positions")}

_FAMILIES: List[Family] = []


def register(family: Family) -> Family:
  """Adds ``family`` (replacing a registered one of the same name)."""
  _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name] + [family]
  return family


def unregister(name: str) -> None:
  _FAMILIES[:] = [f for f in _FAMILIES if f.name != name]


def families() -> Tuple[Family, ...]:
  return tuple(_FAMILIES)


def family_of(cfg) -> Family:
  """The family of a model config."""
  for fam in _FAMILIES:              # the exact class first: a family may extend another's config
    if type(cfg) is fam.config_class:
      return fam
  for fam in _FAMILIES:
    if isinstance(cfg, fam.config_class):
      return fam
  raise TypeError(f"unsupported model config {type(cfg).__name__}; expected one of "
                  f"{[f.config_class.__name__ for f in _FAMILIES]}")


def family_for_hf(model_type: Optional[str]) -> Optional[Family]:
  """The family reading HF checkpoints of ``model_type``, or None."""
  for fam in _FAMILIES:
    if model_type in fam.hf_model_types:
      return fam
  return None
