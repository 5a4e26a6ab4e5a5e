"""Parameter accounting: total, trainable, changed, % trainable.

* ``total``: every element of the tree (base leaves plus the method's leaves),
  except the slices of added stacked leaves that a layer selection leaves out
  (they are fixed padding, e.g. LoRA ``A = B = 0`` for unselected layers).
* ``trainable``: elements of trainable leaves; where a method trains only part
  of a stacked leaf (layer selection) only the selected layers count.
* ``frozen = total - trainable``; ``trainable_percent = 100 * trainable /
  (frozen + trainable)`` (HF PEFT's ``print_trainable_parameters``).
* ``changed``: entries of the *base model's own* weights that the method alters
  - the kernels a mergeable method folds into (selected layers only), or the
  existing leaves it trains (full, LayerNorm tuning); 0 for methods that only
  add parameters next to the model (prompt/prefix tuning, added biases).
* ``added``: elements of the leaves the method adds; ``base = total - added`` (the
  base model's own elements) and ``trainable_percent_of_base = 100 * trainable / base``
  (the survey's, seed 003 Table 5, "% trainable": trainable over the base model).
* A quantized base (``model.quantize``, :mod:`peft_jax.quantize`): a kernel's codes count
  as its parameters, its scales do not; ``base_bytes`` is the base leaves' storage
  (4-bit codes at half a byte, plus the scales), ``quantized_kernels`` how many.

Works on abstract trees (``ShapeDtypeStruct``); :func:`describe` builds one.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from peft_jax.peft.base import PeftState, apply_peft, flatten
from peft_jax.quantize import is_scale, nbytes, quantized_modules


def _size(x):
  return int(np.prod(x.shape)) if len(x.shape) else 1


def _masked_size(leaf, mask):
  if mask is None:
    return _size(leaf)
  return int(np.broadcast_to(np.asarray(mask, bool), tuple(leaf.shape)).sum())


def count(state: PeftState, params=None) -> Dict[str, Any]:
  params = state.params if params is None else params
  flat = flatten(params)
  mask = flatten(state.trainable)
  added_set = set(state.added)
  # slices of added stacked leaves that a layer selection leaves out are padding, not parameters
  total = sum(_masked_size(v, state.update_masks.get(k)) if k in added_set else _size(v)
              for k, v in flat.items() if not is_scale(k))
  trainable_leaves = {k for k, m in mask.items() if m}
  override = state.method.counted_params(state.model_cfg, state.hparams, flat, trainable_leaves)
  if override is not None:
    trainable = int(override)
  else:
    trainable = sum(_masked_size(flat[k], state.update_masks.get(k)) for k in trainable_leaves)
  changed = state.method.changed_params(state.model_cfg, state.hparams, flat)
  if changed is None:
    changed = sum(_masked_size(flat[k], state.update_masks.get(k)) for k in state.made_trainable)
  added = sum(_masked_size(flat[k], state.update_masks.get(k)) for k in state.added)
  frozen = total - trainable
  pct = 100.0 * trainable / (frozen + trainable) if total else 0.0
  base = total - added
  base_bytes = sum(nbytes(v) for k, v in flat.items() if k not in added_set)
  return {"base_bytes": int(base_bytes), "quantized_kernels": len(quantized_modules(flat)),
          "method": state.method.name, "total_params": int(total), "trainable_params": int(trainable),
          "frozen_params": int(frozen), "changed_params": int(changed), "added_params": int(added),
          "base_params": int(base), "trainable_percent": pct,
          "trainable_percent_of_base": 100.0 * trainable / base if base else 0.0}


def table(info: Dict[str, Any], state: PeftState = None) -> str:
  rows = [("method", info["method"]),
          ("total params", f"{info['total_params']:,}"),
          ("trainable params", f"{info['trainable_params']:,}"),
          ("frozen params", f"{info['frozen_params']:,}"),
          ("changed base params", f"{info['changed_params']:,}"),
          ("added params", f"{info['added_params']:,}"),
          ("% trainable", f"{info['trainable_percent']:.4f}%"),
          ("% trainable of base", f"{info['trainable_percent_of_base']:.4f}%"),
          ("base weight bytes", f"{info['base_bytes']:,}"
                                + (f" ({info['quantized_kernels']} kernels quantized)"
                                   if info.get("quantized_kernels") else ""))]
  lines = []
  if state is not None:
    flat = flatten(state.params)
    mask = flatten(state.trainable)
    groups: Dict[str, list] = {}
    for k, m in mask.items():
      if not m:
        continue
      leafname = k.rsplit("/", 1)[-1]
      g = groups.setdefault(leafname, [0, 0])
      g[0] += 1
      g[1] += _masked_size(flat[k], state.update_masks.get(k))
    for name, (n, c) in sorted(groups.items()):
      lines.append((f"  trainable '{name}' ({n} leaves)", f"{c:,}"))
  w = max(len(a) for a, _ in rows + lines)
  v = max(len(b) for _, b in rows + lines)
  sep = "+" + "-" * (w + 2) + "+" + "-" * (v + 2) + "+"
  out = [sep] + [f"| {a:<{w}} | {b:>{v}} |" for a, b in rows]
  if lines:
    out += [sep] + [f"| {a:<{w}} | {b:>{v}} |" for a, b in lines]
  out.append(sep)
  return "\n".join(out)


def summary(state: PeftState, params=None) -> Dict[str, Any]:
  info = count(state, params)
  info["table"] = table(info, state)
  return info


def describe(model_cfg, method: str, overrides=None) -> Dict[str, Any]:
  """Builds the PEFT tree abstractly (no weights) and returns the accounting plus a table.

  Keys: ``method, hparams, total_params, trainable_params, frozen_params,
  changed_params, added_params, trainable_percent, table``. Raises
  :class:`PeftConfigError` for a bad configuration.
  """
  from peft_jax.models import abstract_params
  state = apply_peft(model_cfg, abstract_params(model_cfg), method, overrides or {})
  info = summary(state)
  info["hparams"] = dict(state.hparams)
  return info
