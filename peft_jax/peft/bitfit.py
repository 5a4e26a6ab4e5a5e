"""BitFit [bitfit] (Ben Zaken et al., 2021).

What it adds: existing bias leaves (any leaf named ``bias``) become trainable;
T5 and LLaMA have none, so BitFit adds a zero-initialised bias ``<module>/bias``
(``[layers, out]``) to every targeted linear module, by default every
attention and FFN projection (``q k v o wi/wi_0 wi_1 wo`` resp.
``q k v o gate up down``), not ``lm_head`` (FLAN-T5-XL: 1,179,648). Where it
acts: the ``linear`` site, ``y = x W + b`` (zero at step 0: the base model).
HF PEFT has no BitFit; the hyperparameters reuse its target/layer-selection
names (``target_modules`` default ``"all-linear"``).

Merge: the added biases are ordinary linear biases already and there is no
bias-free place to fold them into, so ``merge`` leaves the tree unchanged
(merged == unmerged exactly; the model keeps BitFit's handler, which *is* the
linear bias); a plain bias-free checkpoint (``merge(..., plain)``/``save_hf``)
cannot represent the biases and is refused with :class:`PeftConfigError`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from peft_jax.fields import Field
from peft_jax.peft import targets
from peft_jax.peft.base import Method, register
from peft_jax.peft.common import adapter_dtype


@dataclasses.dataclass(frozen=True)
class BiasHandler:
  def linear(self, module, x, call_next, deterministic):
    y = call_next(x)
    # A linear layer with its own bias (Qwen2's q, k, v) adds it in the base product.
    if module.has_variable("params", "bias") and not getattr(module, "use_bias", False):
      y = y + module.get_variable("params", "bias").astype(y.dtype)
    return y


@register
class BitFit(Method):
  name = "bitfit"
  identity_at_init = True
  reference = "BitFit (Ben Zaken et al. 2021); target names as HF PEFT"
  mergeable = True
  hparams = {
      "target_modules": Field("all-linear", "linear modules that get a trainable bias (default: "
                              "every attention and FFN projection)", "names"),
      **targets.SELECTION,
  }

  def placement(self, cfg, hp, flat):
    return targets.place(cfg, hp, flat, "all-linear")

  def validate(self, cfg, hp, flat):
    self.placement(cfg, hp, flat)

  def trainable_existing(self, cfg, hp, paths):
    return {p for p in paths if p.endswith("/bias")}

  def init_leaves(self, cfg, hp, flat, rng):
    out = {}
    for m in self.placement(cfg, hp, flat).modules:
      if f"{m.path}/bias" in flat:
        continue
      lead = (m.n_layers,) if m.stacked else ()
      out[f"{m.path}/bias"] = jnp.zeros(lead + (m.d_out,), adapter_dtype(flat[m.leaf].dtype))
    return out

  def update_masks(self, cfg, hp, flat):
    pl = self.placement(cfg, hp, flat)
    out = {}
    for m in pl.modules:
      lm = targets.layer_mask(m, pl.layers.get(m.path), 2)
      if lm is not None:
        out[f"{m.path}/bias"] = lm
    return out

  def handlers(self, cfg, hp):
    return (BiasHandler(),)

  def merge(self, cfg, hp, flat):
    return dict(flat)

  def unmerge(self, cfg, hp, flat):
    return dict(flat)

  plain_merge_error = ("bitfit cannot be merged into a plain checkpoint: T5/LLaMA linear layers "
                       "have no bias, so the trained biases have nowhere to go; keep them as "
                       "'<module>/bias' leaves with the bitfit sites (merge(..., plain=False))")
