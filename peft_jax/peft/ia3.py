"""(IA)^3 [ia3] (Liu et al., 2022).

What it adds: a learned vector ``ia3_l`` per targeted linear module, next to
its kernel: ``[layers, out]`` for an ordinary target (rescales the output:
keys and values) and ``[layers, in]`` for a feed-forward target (rescales the
input, i.e. the FFN intermediate activation). Where it acts: the ``linear``
site, ``y = (x W) * l`` resp. ``y = (x * l) W``. Defaults follow HF PEFT
0.21's ``IA3Config``: targets ``k, v, wo`` with ``wo`` feed-forward on T5
(``k_proj, v_proj, down_proj`` with ``down_proj`` on LLaMA), vectors
initialised to ones (``init_ia3_weights=True``: the base model at step 0).
``feedforward_modules`` must be a subset of ``target_modules`` (as HF).

Merge folds exactly: ``W' = W * l[None, :]`` (output scaling) or
``W' = l[:, None] * W`` (input scaling), and a layer's own bias (Qwen2's q, k, v)
``b' = b * l`` with output scaling (as HF PEFT); unmerge divides (refused if a
vector has a zero entry).
"""

from __future__ import annotations

import dataclasses
from typing import FrozenSet

import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, register
from peft_jax.peft.common import Rand, adapter_dtype, path_of



@dataclasses.dataclass(frozen=True)
class Ia3Handler:
  ff_paths: FrozenSet[str]

  def linear(self, module, x, call_next, deterministic):
    if not module.has_variable("params", "ia3_l"):
      return call_next(x)
    l = module.get_variable("params", "ia3_l")
    if path_of(module) in self.ff_paths:
      return call_next(x * l.astype(x.dtype))
    y = call_next(x)
    return y * l.astype(y.dtype)


@register
class Ia3(Method):
  name = "ia3"
  identity_at_init = True
  reference = "HF PEFT 0.21 IA3Config"
  mergeable = True
  hparams = {
      "target_modules": Field(None, "modules that get a scaling vector (none: k, v, wo on T5; "
                              "k, v, down on LLaMA)", "names"),
      "feedforward_modules": Field(None, "targets scaled on their input instead of their output; "
                                   "a subset of target_modules", "names"),
      "init_ia3_weights": Field(True, "True: vectors start at ones (the base model); False: "
                                "random normal"),
      **targets.SELECTION,
  }

  def placement(self, cfg, hp, flat):
    pl = targets.place(cfg, hp, flat, targets.default_targets(cfg, "IA3"))
    ffs = hp["feedforward_modules"]
    if ffs is None:
      ffs = targets.default_targets(cfg, "IA3_FEEDFORWARD") if hp["target_modules"] is None else []
    ff = set()
    if ffs:
      ff_mods = targets.match_targets(cfg, targets.linear_modules(flat), ffs, "feedforward_modules")
      all_targets = targets.match_targets(cfg, targets.linear_modules(flat),
                                    hp["target_modules"] or targets.default_targets(cfg, "IA3"))
      extra = sorted({m.path for m in ff_mods} - {m.path for m in all_targets})
      if extra:
        raise PeftConfigError(f"feedforward_modules must be a subset of target_modules; not "
                              f"targeted: {extra}")
      ff = {m.path for m in ff_mods}
    return pl, frozenset(m.path for m in pl.modules if m.path in ff)

  def validate(self, cfg, hp, flat):
    if hp["init_ia3_weights"] not in (True, False):
      raise PeftConfigError(f"init_ia3_weights must be True or False, got {hp['init_ia3_weights']!r}")
    self.placement(cfg, hp, flat)

  def init_leaves(self, cfg, hp, flat, rng):
    pl, ff = self.placement(cfg, hp, flat)
    out = {}
    rnd = Rand(rng)
    for m in pl.modules:
      lead = (m.n_layers,) if m.stacked else ()
      shape = lead + ((m.d_in,) if m.path in ff else (m.d_out,))
      if hp["init_ia3_weights"]:
        v = jnp.ones(shape, jnp.float32)
      else:
        v = rnd.normal(shape)
      lm = targets.layer_mask(m, pl.layers.get(m.path), 2)
      if lm is not None:
        v = jnp.where(lm, v, 1.0)
      out[f"{m.path}/ia3_l"] = v.astype(adapter_dtype(flat[m.leaf].dtype))
    return out

  def leaf_roles(self, cfg, hp, paths):
    """The scaling vectors train without weight decay (decay would pull them to 0, not 1)."""
    return {p: "no_decay" for p in paths if p.endswith("/ia3_l")}

  def update_masks(self, cfg, hp, flat):
    pl, _ = self.placement(cfg, hp, flat)
    out = {}
    for m in pl.modules:
      lm = targets.layer_mask(m, pl.layers.get(m.path), 2)
      if lm is not None:
        out[f"{m.path}/ia3_l"] = lm
    return out

  def changed_params(self, cfg, hp, flat):
    pl, _ = self.placement(cfg, hp, flat)
    return int(sum(m.d_in * m.d_out * len(pl.selected(m)) for m in pl.modules))

  def handlers(self, cfg, hp):
    return (Ia3Handler(ff_paths=self._ff(cfg, hp, targets.abstract_flat(cfg))),)

  def _ff(self, cfg, hp, flat):
    return self.placement(cfg, hp, flat)[1]

  def merge(self, cfg, hp, flat):
    ff = self._ff(cfg, hp, flat)
    out = dict(flat)
    for k in flat:
      if not k.endswith("/ia3_l"):
        continue
      p = k[: -len("/ia3_l")]
      w = jnp.asarray(flat[f"{p}/kernel"])
      l = jnp.asarray(flat[k], jnp.float32)
      s = l[..., :, None] if p in ff else l[..., None, :]
      out[f"{p}/kernel"] = (w.astype(jnp.float32) * s).astype(w.dtype)
      if p not in ff and f"{p}/bias" in flat:     # a layer's own bias is scaled with its output
        b = jnp.asarray(flat[f"{p}/bias"])
        out[f"{p}/bias"] = (b.astype(jnp.float32) * l).astype(b.dtype)
    return out

  def unmerge(self, cfg, hp, flat):
    ff = self._ff(cfg, hp, flat)
    out = dict(flat)
    for k in flat:
      if not k.endswith("/ia3_l"):
        continue
      p = k[: -len("/ia3_l")]
      l = np.asarray(flat[k], np.float32)
      if (l == 0).any():
        raise PeftConfigError(f"cannot unmerge (IA)^3 at {p}: its vector has zero entries")
      w = jnp.asarray(flat[f"{p}/kernel"])
      s = l[..., :, None] if p in ff else l[..., None, :]
      out[f"{p}/kernel"] = (w.astype(jnp.float32) / s).astype(w.dtype)
      if p not in ff and f"{p}/bias" in flat:
        b = jnp.asarray(flat[f"{p}/bias"])
        out[f"{p}/bias"] = (b.astype(jnp.float32) / l).astype(b.dtype)
    return out

  # ------------------------------------------------------------------ HF PEFT (IA3Config)
  hf_peft_type = "IA3"
  #: every field of peft 0.21's IA3Config (``hf_peft.check_fields``); the saved tensors name
  #: the modules and their layout (``[1, in]``: feed-forward)
  hf_fields = {**{k: "noop" for k in ("target_modules", "exclude_modules", "feedforward_modules",
                                      "init_ia3_weights")},
               "fan_in_fan_out": ((False,), "transposed Conv1D weights; these models use nn.Linear"),
               "modules_to_save": ((None, []), "fully trained module copies"),}

  def hf_export(self, state, params):
    """``...<module>.ia3_l``: ``[out, 1]``, or ``[1, in]`` for feed-forward modules."""
    from peft_jax.peft import hf_peft
    from peft_jax.tree import flatten
    cfg, hp, flat = state.model_cfg, state.hparams, flatten(params)
    pl, ff = self.placement(cfg, hp, flat)
    names, ffn, tensors = [], [], {}
    for m in pl.modules:
      for l in pl.selected(m):
        hf = targets.hf_module_name(cfg, m, l)
        names.append(hf)
        v = hf_peft.np32(flat[f"{m.path}/ia3_l"][l] if m.stacked else flat[f"{m.path}/ia3_l"])
        if m.path in ff:
          ffn.append(hf)
          tensors[f"{hf_peft.PREFIX}{hf}.ia3_l"] = v[None, :]
        else:
          tensors[f"{hf_peft.PREFIX}{hf}.ia3_l"] = v[:, None]
    fields = dict(target_modules=hf_peft.regex(names),
                  feedforward_modules=hf_peft.regex(ffn) if ffn else [], fan_in_fan_out=False,
                  init_ia3_weights=True, modules_to_save=None)
    return fields, tensors

  def hf_import(self, conf, tensors, cfg, base_params, path):
    from peft_jax.peft import hf_peft
    from peft_jax.peft.base import apply_peft
    from peft_jax.tree import flatten, unflatten
    found = hf_peft.found_modules(cfg, flatten(base_params), tensors, ".ia3_l")
    ff = set()
    for p, (m, layers) in found.items():
      t = tensors[f"{hf_peft.PREFIX}{targets.hf_module_name(cfg, m, min(layers) if m.stacked else None)}.ia3_l"]
      if t.shape[0] == 1 and t.shape[1] == m.d_in and m.d_out != 1:
        ff.add(p)
    hp = hf_peft.selection(found)
    hp["feedforward_modules"] = hf_peft.regex(sorted(ff)) if ff else []
    state = apply_peft(cfg, base_params, "ia3", hp)
    flat = flatten(state.params)
    for p, (m, layers) in found.items():
      for l in layers:
        hf = targets.hf_module_name(cfg, m, l)
        flat[f"{p}/ia3_l"] = hf_peft.set_layer(flat[f"{p}/ia3_l"], l,
                                               tensors[f"{hf_peft.PREFIX}{hf}.ia3_l"].reshape(-1), hf)
    return state, unflatten(flat)
