"""Prefix tuning as AdapterHub does it [prefix_tuning_ah] (``adapters`` 1.3.0 ``PrefixTuningConfig``).

Why a second prefix method: the survey (seed 003) ran prefix tuning through AdapterHub,
whose placement and parameter count differ from HF PEFT's (our ``prefix_tuning``): on T5
*every* attention gets prefixes (encoder self-, decoder self- and cross-attention), and
each of those three locations has its own MLP reparameterisation. On T5-Large at the
defaults that is 3 x 25,770,496 = 77,311,488 trainable parameters (the survey's 77.31M);
HF PEFT's decoder-only placement has one third of it.

What it adds and where it acts: exactly MAM's prefix part (see :mod:`peft_jax.peft.mam`,
which holds the AdapterHub prefix code shared by MAM, UniPELT and this method): leaves
``ah_prefix/<location>/{wte, control_trans_0, control_trans_2}`` evaluated before each
forward into per-layer ``prefix_key``/``prefix_value``, consumed at the ``attention_kv``
site, with AdapterHub's positions. Defaults are AdapterHub's: ``prefix_length=30``,
``prefix_bottleneck_size=512``, tanh, ``encoder_prefix=True``, ``cross_prefix=True``,
``prefix_flat=False``. ``prefix_flat=True`` trains the prefixes directly (AdapterHub's
``flat=True``): the survey's "prompt tuning" row counts exactly this at length 30
(30 x 72 attentions x 2 x 1024 = 4,423,680 on T5-Large).

Not mergeable (prefixes are extra positions, not a weight change); no HF PEFT mapping
(HF PEFT cannot place prefixes on T5's encoder or cross-attention).
"""

from __future__ import annotations

import jax

from peft_jax.models.config import as_dtype
from peft_jax.peft import mam
from peft_jax.peft.base import Method, register


@register
class AHPrefixTuning(Method):
  name = "prefix_tuning_ah"
  identity_at_init = False      # prefixes attend from step 0 (as AdapterHub)
  reference = "AdapterHub adapters 1.3.0 PrefixTuningConfig"
  mergeable = False
  hparams = dict(mam.PREFIX)
  example_hparams = {"prefix_length": 4, "prefix_bottleneck_size": 8}

  def validate(self, cfg, hp, flat):
    mam.validate_prefix(self.name, cfg, hp, flat)

  def init_leaves(self, cfg, hp, flat, rng):
    dt = as_dtype(cfg.param_dtype)
    return {k: v.astype(dt) for k, v in mam.init_prefix(cfg, hp, jax.random.fold_in(rng, 1)).items()}

  def prepare_params(self, cfg, hp, flat):
    out = dict(flat)
    out.update(mam.project_prefix(cfg, hp, flat))
    return out

  def handlers(self, cfg, hp):
    return (mam.prefix_handler(cfg, hp),)
