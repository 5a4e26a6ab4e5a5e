"""LoRA [lora] and DoRA [dora].

What it adds: for every targeted linear module ``W`` (kernel ``[in, out]``,
stacked ``[layers, in, out]``) two leaves next to the kernel,
``lora_A [.., in, r]`` and ``lora_B [.., r, out]``; DoRA also a magnitude
vector ``lora_magnitude [.., out]``. Where it acts: the ``linear`` site,
``y = x W + dropout(x) A B * s`` with ``s = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with ``use_rslora``). DoRA:
``y = m / ||W + s A B||_c * (x W + dropout(x) A B s)`` where the column norm
(over the input axis, one value per output) is treated as a constant in the
backward pass (DoRA paper §4.3, as HF PEFT). Defaults, names and
initialisation follow HF PEFT's ``LoraConfig`` (0.21): ``r=8``,
``lora_alpha=8``, ``lora_dropout=0``, targets ``q, v`` on T5 and LLaMA,
``A ~ U(+-1/sqrt(in))`` (torch's kaiming-uniform with ``a=sqrt(5)``), ``B = 0``
(``init_lora_weights=True``; ``"gaussian"``: ``A ~ N(0, 1/r)``; ``False``: B
random too). DoRA's magnitude starts at ``||W + s A B||_c = ||W||_c``, so both
methods are the base model at step 0.

Layer selection: stacked leaves keep all layers; unselected layers get
``A = B = 0`` (and DoRA ``m = ||W||``), which is the identity, and an update
mask keeps them frozen (with ``A = B = 0`` their gradients are exactly zero
anyway). Counts include only the selected layers.

Merge: ``W' = W + s A B``; DoRA ``W' = m / n * (W + s A B)`` with
``n = ||W + s A B||_c``, which merge stores (leaf ``dora_merge_norm``) because
``unmerge`` cannot recover it from ``W'``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, register
from peft_jax.peft.common import Rand, adapter_dtype, compute_dtype, dropout

@dataclasses.dataclass(frozen=True)
class LoraHandler:
  scale: float
  rate: float
  dora: bool

  def linear(self, module, x, call_next, deterministic):
    y = call_next(x)
    if not module.has_variable("params", "lora_A"):
      return y
    dt = compute_dtype(module)
    a = module.get_variable("params", "lora_A")
    b = module.get_variable("params", "lora_B")
    xd = dropout(module, x, self.rate, deterministic)
    lora = jnp.dot(jnp.dot(xd.astype(dt), a.astype(dt)), b.astype(dt))
    if not self.dora:
      return y + (lora * self.scale).astype(y.dtype)
    w = module.get_variable("params", "kernel")
    m = module.get_variable("params", "lora_magnitude")
    delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32)) * self.scale
    n = jax.lax.stop_gradient(jnp.linalg.norm(w.astype(jnp.float32) + delta, axis=0))
    f = (m.astype(jnp.float32) / n).astype(dt)
    if deterministic or self.rate <= 0.0:
      base = y       # DoRA rescales the product x W, not a layer's own bias (as HF PEFT)
      if getattr(module, "use_bias", False):
        base = base - module.get_variable("params", "bias").astype(y.dtype)
    else:
      base = jnp.dot(xd.astype(dt), w.astype(dt))
    return y + ((f - 1) * base + f * lora * self.scale).astype(y.dtype)


@register
class Lora(Method):
  name = "lora"
  identity_at_init = True
  reference = "HF PEFT 0.21 LoraConfig"
  mergeable = True
  hparams = {
      "r": Field(8, "rank of A [in, r] and B [r, out]", ge=1),
      "lora_alpha": Field(8, "scale numerator: the update is x A B * lora_alpha / r", "float"),
      "lora_dropout": Field(0.0, "dropout on the input of A during training", ge=0, lt=1),
      "use_rslora": Field(False, "scale by lora_alpha / sqrt(r) (rank-stabilised LoRA)"),
      "target_modules": Field(None, "modules to adapt (none: q,v on T5 and LLaMA)", "names"),
      "init_lora_weights": Field(True, "True: A kaiming-uniform, B = 0 (identity at init); "
                                 "'gaussian': A ~ N(0, 1/r); False: B random too",
                                 "bool_or_str", choices=("gaussian",)),
      "use_dora": Field(False, "DoRA: add a magnitude vector (method 'dora' sets it)"),
      **targets.SELECTION,
  }

  def _dora(self, hp):
    return bool(hp["use_dora"])

  def placement(self, cfg, hp, flat) -> targets.Placement:
    return targets.place(cfg, hp, flat, targets.default_targets(cfg, "LORA"))

  def scaling(self, hp):
    r = hp["r"]
    return hp["lora_alpha"] / (math.sqrt(r) if hp["use_rslora"] else r)

  def validate(self, cfg, hp, flat):
    r = hp["r"]
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
      raise PeftConfigError(f"r must be a positive int, got {r!r}")
    if not isinstance(hp["lora_alpha"], (int, float)) or isinstance(hp["lora_alpha"], bool):
      raise PeftConfigError(f"lora_alpha must be a number, got {hp['lora_alpha']!r}")
    if not 0.0 <= float(hp["lora_dropout"]) < 1.0:
      raise PeftConfigError(f"lora_dropout must be in [0, 1), got {hp['lora_dropout']!r}")
    if hp["init_lora_weights"] not in (True, False, "gaussian"):
      raise PeftConfigError(f"init_lora_weights must be True, False or 'gaussian', got "
                            f"{hp['init_lora_weights']!r}")
    pl = self.placement(cfg, hp, flat)
    for m in pl.modules:
      if r > min(m.d_in, m.d_out):
        raise PeftConfigError(f"rank r={r} is larger than layer {m.path} allows: its kernel is "
                              f"[in={m.d_in}, out={m.d_out}], so r must be <= {min(m.d_in, m.d_out)}")

  def init_leaves(self, cfg, hp, flat, rng):
    pl = self.placement(cfg, hp, flat)
    r, init = hp["r"], hp["init_lora_weights"]
    out = {}
    rnd = Rand(rng)
    for m in pl.modules:
      w = flat[m.leaf]
      lead = (m.n_layers,) if m.stacked else ()
      # torch layout [r, in] / [out, r], transposed to our [in, r] / [r, out]
      if init == "gaussian":
        a = rnd.normal(lead + (r, m.d_in), 1.0 / r)
      else:
        a = rnd.kaiming_uniform_a5(lead + (r, m.d_in))
      if init is False:
        b = rnd.kaiming_uniform_a5(lead + (m.d_out, r))
      else:
        b = jnp.zeros(lead + (m.d_out, r), jnp.float32)
      a, b = jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2)
      lm = targets.layer_mask(m, pl.layers.get(m.path), 3)
      if lm is not None:
        a = jnp.where(lm, a, 0.0)
        b = jnp.where(lm, b, 0.0)
      out[f"{m.path}/lora_A"] = a.astype(adapter_dtype(w.dtype))
      out[f"{m.path}/lora_B"] = b.astype(adapter_dtype(w.dtype))
      if self._dora(hp):
        delta = jnp.einsum("...ir,...ro->...io", a, b) * self.scaling(hp)
        out[f"{m.path}/lora_magnitude"] = jnp.linalg.norm(
            w.astype(jnp.float32) + delta, axis=-2).astype(adapter_dtype(w.dtype))
    return out

  def leaf_roles(self, cfg, hp, paths):
    """DoRA's magnitude vectors train without weight decay."""
    return {p: "no_decay" for p in paths if p.endswith("/lora_magnitude")}

  def update_masks(self, cfg, hp, flat):
    pl = self.placement(cfg, hp, flat)
    out = {}
    for m in pl.modules:
      sel = pl.layers.get(m.path)
      for leaf, nd in (("lora_A", 3), ("lora_B", 3), ("lora_magnitude", 2)):
        lm = targets.layer_mask(m, sel, nd)
        if lm is not None and f"{m.path}/{leaf}" in flat:
          out[f"{m.path}/{leaf}"] = lm
    return out

  def changed_params(self, cfg, hp, flat):
    return targets.dense_changed_params(self.placement(cfg, hp, flat))

  def handlers(self, cfg, hp):
    return (LoraHandler(scale=float(self.scaling(hp)), rate=float(hp["lora_dropout"]),
                        dora=self._dora(hp)),)

  # ------------------------------------------------------------------ merge
  def _modules(self, flat):
    return sorted(k[: -len("/lora_A")] for k in flat if k.endswith("/lora_A"))

  def merge(self, cfg, hp, flat):
    out = dict(flat)
    s = self.scaling(hp)
    for p in self._modules(flat):
      w = jnp.asarray(flat[f"{p}/kernel"])
      delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(flat[f"{p}/lora_A"], jnp.float32),
                         jnp.asarray(flat[f"{p}/lora_B"], jnp.float32)) * s
      new = w.astype(jnp.float32) + delta
      if f"{p}/lora_magnitude" in flat:
        n = jnp.linalg.norm(new, axis=-2)
        out[f"{p}/dora_merge_norm"] = n
        new = new * (jnp.asarray(flat[f"{p}/lora_magnitude"], jnp.float32) / n)[..., None, :]
      out[f"{p}/kernel"] = new.astype(w.dtype)
    return out

  def unmerge(self, cfg, hp, flat):
    out = dict(flat)
    s = self.scaling(hp)
    for p in self._modules(flat):
      w = jnp.asarray(flat[f"{p}/kernel"])
      new = w.astype(jnp.float32)
      if f"{p}/lora_magnitude" in flat:
        if f"{p}/dora_merge_norm" not in flat:
          raise PeftConfigError(f"cannot unmerge DoRA at {p}: the weight norm that merge stored "
                                "(dora_merge_norm) is missing; merge with keep_adapter=True")
        n = jnp.asarray(out.pop(f"{p}/dora_merge_norm"), jnp.float32)
        new = new / (jnp.asarray(flat[f"{p}/lora_magnitude"], jnp.float32) / n)[..., None, :]
      delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(flat[f"{p}/lora_A"], jnp.float32),
                         jnp.asarray(flat[f"{p}/lora_B"], jnp.float32)) * s
      out[f"{p}/kernel"] = (new - delta).astype(w.dtype)
    return out

  # ------------------------------------------------------------------ HF PEFT (LoraConfig)
  hf_peft_type = "LORA"

  def hf_export(self, state, params):
    """``...<module>.lora_A.weight [r, in] = A.T``, ``lora_B.weight [out, r] = B.T``, DoRA
    ``lora_magnitude_vector [out]``; ``target_modules`` names the exact modules and layers."""
    from peft_jax.peft import hf_peft
    from peft_jax.tree import flatten
    cfg, hp, flat = state.model_cfg, state.hparams, flatten(params)
    pl = self.placement(cfg, hp, flat)
    names, tensors = [], {}
    for m in pl.modules:
      for l in pl.selected(m):
        hf = targets.hf_module_name(cfg, m, l)
        names.append(hf)
        sl = (lambda a, l=l: a[l]) if m.stacked else (lambda a: a)
        key = f"{hf_peft.PREFIX}{hf}"
        tensors[f"{key}.lora_A.weight"] = hf_peft.np32(sl(flat[f"{m.path}/lora_A"])).T
        tensors[f"{key}.lora_B.weight"] = hf_peft.np32(sl(flat[f"{m.path}/lora_B"])).T
        if hp["use_dora"]:
          tensors[f"{key}.lora_magnitude_vector"] = hf_peft.np32(sl(flat[f"{m.path}/lora_magnitude"]))
    fields = dict(r=int(hp["r"]), lora_alpha=hp["lora_alpha"], lora_dropout=float(hp["lora_dropout"]),
                  use_rslora=bool(hp["use_rslora"]), use_dora=bool(hp["use_dora"]),
                  target_modules=hf_peft.regex(names), bias="none", fan_in_fan_out=False,
                  init_lora_weights=True, layers_to_transform=None, layers_pattern=None,
                  rank_pattern={}, alpha_pattern={}, modules_to_save=None)
    return fields, tensors

  def hf_import(self, conf, tensors, cfg, base_params, path):
    from peft_jax.peft import hf_peft
    from peft_jax.peft.base import apply_peft
    from peft_jax.tree import flatten, unflatten
    for k in ("rank_pattern", "alpha_pattern"):
      if conf.get(k):
        raise PeftConfigError(f"LoRA {k}={conf[k]} is not supported (one rank/alpha for all modules)")
    if conf.get("bias", "none") != "none":
      raise PeftConfigError(f"LoRA bias={conf['bias']!r} is not supported")
    found = hf_peft.found_modules(cfg, flatten(base_params), tensors, ".lora_A.weight")
    if not found:
      raise PeftConfigError(f"no lora_A tensors in {path}")
    dora = bool(conf.get("use_dora"))
    hp = {"r": int(conf["r"]), "lora_alpha": conf["lora_alpha"],
          "lora_dropout": float(conf.get("lora_dropout") or 0.0),
          "use_rslora": bool(conf.get("use_rslora")), **hf_peft.selection(found)}
    state = apply_peft(cfg, base_params, "dora" if dora else "lora", hp)
    flat = flatten(state.params)
    for p, (m, layers) in found.items():
      for l in layers:
        hf = targets.hf_module_name(cfg, m, l)
        key = f"{hf_peft.PREFIX}{hf}"
        vals = {"lora_A": tensors[f"{key}.lora_A.weight"].T, "lora_B": tensors[f"{key}.lora_B.weight"].T}
        if dora:
          vals["lora_magnitude"] = tensors[f"{key}.lora_magnitude_vector"]
        for nm, v in vals.items():
          flat[f"{p}/{nm}"] = hf_peft.set_layer(flat[f"{p}/{nm}"], l, v, f"{hf}.{nm}")
    return state, unflatten(flat)


@register
class Dora(Lora):
  name = "dora"
  reference = "HF PEFT 0.21 LoraConfig(use_dora=True)"
  hparams = dict(Lora.hparams, use_dora=Field(True, "DoRA: LoRA direction plus a magnitude vector"))

  def validate(self, cfg, hp, flat):
    if not hp["use_dora"]:
      raise PeftConfigError("method 'dora' needs use_dora=True; use method 'lora' for plain LoRA")
    super().validate(cfg, hp, flat)
