"""Named sites where PEFT methods act on a model, without editing model files.

A model calls ``sites.<kind>(module, ...)`` at each of these places:

============  ==============================================================
kind          what a handler receives and returns
============  ==============================================================
``linear``    ``(module, x, call_next, deterministic) -> y``; wraps every
              linear projection (``q k v o wi wo gate up down lm_head``).
              ``call_next(x)`` computes the rest of the chain (finally the
              frozen ``x @ kernel``), so a handler can rescale the input
              (IA3 on ``wo``), add a branch (LoRA), or replace the product.
``attention_kv`` ``(module, k, v, mask, bias, deterministic) -> (k, v, mask, bias)``;
              keys/values after projection and head split, ``[B, S, K, H]``;
              ``mask`` ``[B, 1, T, S]`` bool, ``bias`` ``[1|B, N, T, S]`` or None.
              Prefix tuning concatenates its prefixes here.
``ffn_act``   ``(module, h, deterministic) -> h``; the FFN intermediate
              activation, before the output projection.
``sublayer``  ``(module, name, h_in, y, deterministic, x) -> y``; ``module``
              is the layer (block), ``name`` the sub-layer (``attn``,
              ``self_attn``, ``cross_attn``, ``mlp``), ``x`` the residual
              stream entering it, ``h_in`` its normalised input and ``y`` its
              output (after the block's dropout) before the residual add
              ``x + y`` (bottleneck adapters).
``embed``     ``(module, x, mask, deterministic) -> (x, mask)``; the input
              embeddings of the stack that reads the prompt (T5 encoder,
              LLaMA decoder). Prompt tuning prepends its tokens here.
``lookup``    ``(module, ids, x, stack) -> x``; the token-embedding lookup
              (``module`` is the embedding, ``ids`` ``[B,T]``, ``x = table[ids]``),
              ``stack`` the stack that reads it (T5: ``encoder`` / ``decoder``,
              which share one table; LLaMA: None). The tied output head
              (``attend``) is not a site: LoRA on the embedding changes only
              the lookup, as in HF PEFT.
``positions`` ``(module, q_pos, k_pos, deterministic) -> (q_pos, k_pos)``; the
              token positions a model encodes. A T5 stack passes the query and
              key positions ``[T]``/``[S]`` from which it computes the relative
              position bias (a handler may return more key positions than the
              mask has keys, for keys that an ``attention_kv`` handler adds);
              LLaMA passes its RoPE positions ``[B,T]`` and ``k_pos=None``.
              Prefix tuning shifts the tokens behind its prefix here.
============  ==============================================================

``module`` is the calling linen module, bound to its parameters: a handler
reads the leaves its method added with ``module.get_variable('params', name)``
(``module.has_variable`` tells whether this site was selected), and uses
``module.make_rng('dropout')`` for randomness. Inside the layer scan these
leaves are already sliced to the current layer. ``module.name`` is the local
name (``'q'``) and ``module.scope.path`` the full path.

Handlers are plain hashable objects; a model gets the tuple of handlers of the
active methods as ``Sites(handlers)``. With no handlers every site is the
identity and the model is the plain base model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Tuple


@dataclasses.dataclass(frozen=True)
class Sites:
  handlers: Tuple[Any, ...] = ()

  def _with(self, kind):
    return [h for h in self.handlers if hasattr(h, kind)]

  def linear(self, module, x, base: Callable, deterministic: bool = True):
    fn = base
    for h in reversed(self._with("linear")):
      fn = _bind_linear(h, module, fn, deterministic)
    return fn(x)

  def has(self, kind: str) -> bool:
    """Whether a handler acts at sites of ``kind`` (a model may then skip work that
    only matters to handlers, e.g. a layout change)."""
    return bool(self._with(kind))

  def attention_kv(self, module, k, v, mask, bias, deterministic=True):
    for h in self._with("attention_kv"):
      k, v, mask, bias = h.attention_kv(module, k, v, mask, bias, deterministic)
    return k, v, mask, bias

  def ffn_act(self, module, h, deterministic=True):
    for hd in self._with("ffn_act"):
      h = hd.ffn_act(module, h, deterministic)
    return h

  def sublayer(self, module, name, h_in, y, deterministic=True, x=None):
    for hd in self._with("sublayer"):
      y = hd.sublayer(module, name, h_in, y, deterministic, x=x)
    return y

  def embed(self, module, x, mask, deterministic=True):
    for hd in self._with("embed"):
      x, mask = hd.embed(module, x, mask, deterministic)
    return x, mask

  def lookup(self, module, ids, x, stack=None):
    for hd in self._with("lookup"):
      x = hd.lookup(module, ids, x, stack)
    return x

  def positions(self, module, q_pos, k_pos, deterministic=True):
    for hd in self._with("positions"):
      q_pos, k_pos = hd.positions(module, q_pos, k_pos, deterministic)
    return q_pos, k_pos


def _bind_linear(handler, module, nxt, deterministic):
  def fn(x):
    return handler.linear(module, x, nxt, deterministic)
  return fn


NO_SITES = Sites()
