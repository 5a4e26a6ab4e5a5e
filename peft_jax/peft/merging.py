"""Merge / unmerge: fold a method into the base weights and back.

* ``merge(state, params)`` -> a plain base tree (the method's leaves removed)
  for ``build_model(cfg)`` without sites or ``checkpoint.hf.save_hf``.
* ``merge(state, params, plain=False)`` -> the merged kernels *plus* the
  method's leaves and any bookkeeping (DoRA's weight norm), for ``unmerge``.
  (Build the model without the method's sites to evaluate it.)
* ``unmerge(state, merged)`` -> the original tree (up to float rounding).

Supported: lora, dora, ia3 fold exactly. bitfit: see ``bitfit.py`` - its
biases stay linear biases (``plain=False`` returns the tree unchanged; a plain
bias-free tree is refused). Other methods raise :class:`PeftConfigError`.
A quantized base (``model.quantize``) is refused with one line
(:func:`peft_jax.quantize.refuse_merge`).
"""

from __future__ import annotations

from peft_jax.peft.base import PeftConfigError, PeftState, flatten, unflatten
from peft_jax.quantize import refuse_merge


def merge(state: PeftState, params, plain: bool = True):
  m = state.method
  if not m.mergeable:
    raise PeftConfigError(f"method {m.name!r} cannot be merged into the base weights; mergeable: "
                          "lora, dora, ia3 (bitfit: keeps its biases, plain=False)")
  if plain and getattr(m, "plain_merge_error", None):
    raise PeftConfigError(m.plain_merge_error)
  if plain and state.saved:
    from peft_jax.peft.modules_to_save import untied_copies
    extra = untied_copies(state.model_cfg, state.saved)
    if extra:
      raise PeftConfigError(f"merge: {extra[0]} is an untied trained copy of the tied head "
                            "(modules_to_save); the tied base model has no place for it "
                            "(merge with plain=False)")
  flat = flatten(params)
  refuse_merge(flat, f"merge {m.name}")
  merged = m.merge(state.model_cfg, state.hparams, flat)
  if not plain:
    return unflatten(merged)
  added = set(state.added)
  return unflatten({k: v for k, v in merged.items() if k in flat and k not in added})


def unmerge(state: PeftState, merged):
  m = state.method
  if not m.mergeable:
    raise PeftConfigError(f"method {m.name!r} cannot be unmerged")
  flat = flatten(merged)
  refuse_merge(flat, f"unmerge {m.name}")
  missing = [k for k in state.added if k not in flat]
  if missing:
    raise PeftConfigError(f"unmerge needs the method's leaves (merge with plain=False); missing "
                          f"{missing[:3]}")
  return unflatten(m.unmerge(state.model_cfg, state.hparams, flat))
