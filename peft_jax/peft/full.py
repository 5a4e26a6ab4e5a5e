"""Full fine-tuning [full].

What it adds: nothing; every existing leaf of the base model becomes
trainable. Where it acts: nowhere (no site handlers; the model is the plain
base model). Follows no library's defaults (there are no hyperparameters).
"""

from __future__ import annotations

import numpy as np

from peft_jax.peft.base import Method, register


@register
class Full(Method):
  name = "full"
  identity_at_init = True
  reference = "none (plain fine-tuning)"
  hparams = {}

  def trainable_existing(self, cfg, hp, paths):
    return set(paths)

  def changed_params(self, cfg, hp, flat):
    return int(sum(int(np.prod(v.shape)) for v in flat.values()))
