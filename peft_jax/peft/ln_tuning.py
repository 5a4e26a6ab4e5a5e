"""LayerNorm tuning [ln_tuning].

What it adds: nothing; the scales of the targeted norms (T5 LayerNorm /
LLaMA RMSNorm: scale only, neither model has a norm bias) become trainable.
Where it acts: nowhere (no site handlers). Defaults follow HF PEFT 0.21's
``LNTuningConfig``: every norm, final norms included (HF: ``layer_norm`` and
``final_layer_norm`` on T5; ``input_layernorm``, ``post_attention_layernorm``
and ``norm`` on LLaMA). ``target_modules`` accepts our names (``attn_norm``,
``self_attn_norm``, ``cross_attn_norm``, ``mlp_norm``, ``final_norm``), the
HF names, or a regex over the layer-agnostic paths.

HF PEFT trains a *copy* of each norm (``ln_tuning_layers``) and keeps the
frozen original, so its "all params" count is ours plus the trainable count;
trainable counts are equal.
"""

from __future__ import annotations

from peft_jax.fields import Field
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, register


def _norms_from_paths(paths):
  out = []
  for leaf in sorted(paths):
    if not leaf.endswith("/scale"):
      continue
    path = leaf[: -len("/scale")]
    parts = path.split("/")
    stacked = "layers" in parts
    stack = ("layers" if parts[0] == "layers" else parts[0]) if stacked else None
    out.append(targets.Module(path=path, leaf=leaf, name=parts[-1], stack=stack,
                        sublayer=targets._sublayer(parts), n_layers=1 if stacked else None, d_in=0,
                        d_out=0, kind="norm"))
  return out


@register
class LnTuning(Method):
  name = "ln_tuning"
  identity_at_init = True
  reference = "HF PEFT 0.21 LNTuningConfig"
  hparams = {
      "target_modules": Field(None, "norms whose scales train: our names, HF names or a regex "
                              "(none: every norm)", "names"),
  }

  def _selected(self, cfg, hp, paths):
    mods = _norms_from_paths(paths)
    if not mods:
      raise PeftConfigError("ln_tuning: the model has no norm scales")
    tg = hp["target_modules"]
    if tg is None:
      return mods
    return targets.match_targets(cfg, mods, tg, "target_modules", all_linear_ok=False)

  def validate(self, cfg, hp, flat):
    self._selected(cfg, hp, list(flat))

  def trainable_existing(self, cfg, hp, paths):
    return {m.leaf for m in self._selected(cfg, hp, paths)}

  # ------------------------------------------------------------------ HF PEFT (LNTuningConfig)
  hf_peft_type = "LN_TUNING"
  #: every field of peft 0.21's LNTuningConfig (the saved tensors name the norms)
  hf_fields = {"target_modules": "noop", "exclude_modules": "noop",
               "modules_to_save": ((None, []), "fully trained module copies"),}

  def hf_export(self, state, params):
    """``...<norm>.ln_tuning_layers.weight`` for every layer of each tuned norm."""
    from peft_jax.peft import hf_peft
    from peft_jax.tree import flatten
    cfg, flat = state.model_cfg, flatten(params)
    names, tensors = [], {}
    mods = {m.leaf: m for m in targets.norm_modules(flat)}
    for leaf in state.made_trainable:
      m = mods[leaf]
      for l in (range(m.n_layers) if m.stacked else [None]):
        hf = targets.hf_module_name(cfg, m, l)
        names.append(hf)
        tensors[f"{hf_peft.PREFIX}{hf}.ln_tuning_layers.weight"] = hf_peft.np32(
            flat[leaf][l] if m.stacked else flat[leaf])
    return dict(target_modules=hf_peft.regex(names), modules_to_save=None), tensors

  def hf_import(self, conf, tensors, cfg, base_params, path):
    from peft_jax.peft import hf_peft
    from peft_jax.peft.base import apply_peft
    from peft_jax.tree import flatten, unflatten
    base = flatten(base_params)
    found = hf_peft.found_modules(cfg, base, tensors, ".ln_tuning_layers.weight",
                                  targets.norm_modules(base))
    for p, (m, layers) in found.items():
      if m.stacked and len(layers) != m.n_layers:
        raise PeftConfigError(f"LN tuning adapter covers only layers {sorted(layers)} of {p}")
    state = apply_peft(cfg, base_params, "ln_tuning", {"target_modules": hf_peft.regex(sorted(found))})
    flat = flatten(state.params)
    for p, (m, layers) in found.items():
      for l in layers:
        hf = targets.hf_module_name(cfg, m, l)
        flat[m.leaf] = hf_peft.set_layer(flat[m.leaf], l,
                                         tensors[f"{hf_peft.PREFIX}{hf}.ln_tuning_layers.weight"], hf)
    return state, unflatten(flat)
