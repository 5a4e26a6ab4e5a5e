"""T-Few's LoRA with multiplicative scaling [tfew] (Liu et al., 2022, the (IA)^3 paper's code).

Why it is here: seed 002 (FLAN-T5-XL, "we follow Liu et al. (2022) in morphing the
LoRA matrix-multiplication adaptation in attention blocks to also support element-wise
scaling for (IA)^3") implements both its LoRA and its (IA)^3 with this one layer, and
its parameter counts (A.4 / Table 3: LoRA 3,538,944, (IA)^3 933,888) are this layer's
counts with every one of its vectors trained. HF PEFT's LoRA and (IA)^3 (methods
``lora`` and ``ia3``) give other counts (1,179,648 and 540,672) because they have no
input-side vector.

What it adds, for a targeted linear module ``W`` (kernel ``[in, out]``):

* ``scaling_rank`` = s >= 1: ``tfew_scale_in [s, in]`` and ``tfew_scale_out [s, out]``
  (T-Few's ``multi_lora_a`` / ``multi_lora_b``), both initialised to ones. The kernel
  is multiplied element-wise by their rank-s product: ``W * (a^T b) / s``, i.e. for
  s = 1 ``y = ((x * a) W) * b``: (IA)^3-style rescaling of the input and the output.
* ``r`` >= 1: ``tfew_lora_a [in, r]`` ~ N(0, init_scale^2) and ``tfew_lora_b [r, out]`` = 0
  (T-Few's ``lora_a``/``lora_b``), added as ``x A B / r`` (scale 1/r, T-Fews's choice).

Where it acts: the ``linear`` site:
``y = sum_k ((x * a_k) W) * b_k / s + x A B / r`` (the scaled base is computed with
``s`` kernel products, one for s = 1). With ``init_scale=0`` the layer is the base
model at step 0; a positive init_scale (T-Few's LoRA uses 0.01) perturbs ``a`` by
``N(0, init_scale^2)`` noise like T-Few (``multi_lora_a = 1 + noise``), so the model
starts near, not at, the base model. A negative init_scale is T-Few's "random B"
variant (``lora_b`` and ``multi_lora_b`` get noise too).

Defaults: T-Few's LoRA example (rank 4, scaling rank 1, init scale 0.01, every linear
module of the attention and feed-forward blocks: ``all-linear``); its (IA)^3 is
``r=0, scaling_rank=1, init_scale=0, target_modules="k,v,wi_1"``. Layer selection
(``first_k_layers`` ...) keeps unselected layers at the identity (ones and zeros)
and frozen by update masks; counts include the selected layers only.

Merge: ``W' = W * (a^T b) / s + A B / r``; unmerge inverts it (refused where the
scaling has a zero entry). HF PEFT has no such layer: no HF export.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, register
from peft_jax.peft.common import Rand, adapter_dtype, compute_dtype

A, B, SIN, SOUT = "tfew_lora_a", "tfew_lora_b", "tfew_scale_in", "tfew_scale_out"


@dataclasses.dataclass(frozen=True)
class TfewHandler:
  r: int
  s: int

  def linear(self, module, x, call_next, deterministic):
    scaled = self.s and module.has_variable("params", SIN)
    lora = self.r and module.has_variable("params", A)
    if not (scaled or lora):
      return call_next(x)
    if scaled:
      a = module.get_variable("params", SIN).astype(x.dtype)        # [s, in]
      b = module.get_variable("params", SOUT)                        # [s, out]
      if self.s == 1:
        y = call_next(x * a[0]) * b[0].astype(x.dtype)
      else:   # the rank-s product: s kernel products, summed
        ys = call_next(x[..., None, :] * a)                          # [..., s, out]
        y = (ys * b.astype(ys.dtype)).sum(-2) / self.s
    else:
      y = call_next(x)
    if lora:
      dt = compute_dtype(module)
      la, lb = module.get_variable("params", A), module.get_variable("params", B)
      d = jnp.dot(jnp.dot(x.astype(dt), la.astype(dt)), lb.astype(dt)) / self.r
      y = y + d.astype(y.dtype)
    return y


@register
class Tfew(Method):
  name = "tfew"
  identity_at_init = False     # init_scale > 0 perturbs the input scaling (T-Few's choice)
  reference = "T-Few (Liu et al. 2022) LoRALinear; seed 002's LoRA and (IA)^3"
  mergeable = True
  hparams = {
      "r": Field(4, "rank of the additive term x A B / r (0: none)", "int", ge=0),
      "scaling_rank": Field(1, "rank s of the element-wise kernel scaling W * (a^T b) / s "
                            "(0: none; 1: input and output vectors, (IA)^3-style)", "int", ge=0),
      "init_scale": Field(0.01, "std of the noise on A and on the input scaling a (T-Few's "
                          "lora_init_scale; 0: exactly the base model at init; < 0: B and b "
                          "random too)", "float"),
      "target_modules": Field("all-linear", "linear modules to adapt", "names"),
      **targets.SELECTION,
  }
  example_hparams = {"r": 2, "scaling_rank": 1, "init_scale": 0.01}

  def placement(self, cfg, hp, flat):
    return targets.place(cfg, hp, flat, "all-linear")

  def validate(self, cfg, hp, flat):
    for k in ("r", "scaling_rank"):
      v = hp[k]
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
        raise PeftConfigError(f"{k} must be an int >= 0, got {v!r}")
    if hp["r"] == 0 and hp["scaling_rank"] == 0:
      raise PeftConfigError("r=0 and scaling_rank=0 adapt nothing; expected r >= 1 (additive "
                            "LoRA term) or scaling_rank >= 1 (element-wise scaling), or both")
    pl = self.placement(cfg, hp, flat)
    for m in pl.modules:
      if hp["r"] > min(m.d_in, m.d_out):
        raise PeftConfigError(f"rank r={hp['r']} is larger than layer {m.path} allows: its "
                              f"kernel is [in={m.d_in}, out={m.d_out}]")

  def _leaves(self, hp):
    return ((A, B) if hp["r"] else ()) + ((SIN, SOUT) if hp["scaling_rank"] else ())

  def init_leaves(self, cfg, hp, flat, rng):
    pl = self.placement(cfg, hp, flat)
    r, s, init = int(hp["r"]), int(hp["scaling_rank"]), float(hp["init_scale"])
    rnd = Rand(rng)
    out = {}
    for m in pl.modules:
      lead = (m.n_layers,) if m.stacked else ()
      vals = {}
      if r:
        vals[A] = rnd.normal(lead + (m.d_in, r), abs(init)) if init else \
            jnp.zeros(lead + (m.d_in, r), jnp.float32)
        vals[B] = rnd.normal(lead + (r, m.d_out), abs(init)) if init < 0 else \
            jnp.zeros(lead + (r, m.d_out), jnp.float32)
      if s:
        vals[SIN] = 1.0 + (rnd.normal(lead + (s, m.d_in), abs(init)) if init else 0.0)
        vals[SOUT] = 1.0 + (rnd.normal(lead + (s, m.d_out), abs(init)) if init < 0 else 0.0)
        vals[SIN] = jnp.broadcast_to(vals[SIN], lead + (s, m.d_in))
        vals[SOUT] = jnp.broadcast_to(vals[SOUT], lead + (s, m.d_out))
      lm = targets.layer_mask(m, pl.layers.get(m.path), 3)
      for k, v in vals.items():
        if lm is not None:    # unselected layers: the identity
          v = jnp.where(lm, v, 1.0 if k in (SIN, SOUT) else 0.0)
        out[f"{m.path}/{k}"] = jnp.asarray(v).astype(adapter_dtype(flat[m.leaf].dtype))
    return out

  def leaf_roles(self, cfg, hp, paths):
    """The scaling vectors train without weight decay (decay would pull them to 0, not 1)."""
    return {p: "no_decay" for p in paths if p.endswith((f"/{SIN}", f"/{SOUT}"))}

  def update_masks(self, cfg, hp, flat):
    pl = self.placement(cfg, hp, flat)
    out = {}
    for m in pl.modules:
      lm = targets.layer_mask(m, pl.layers.get(m.path), 3)
      if lm is not None:
        for k in self._leaves(hp):
          out[f"{m.path}/{k}"] = lm
    return out

  def changed_params(self, cfg, hp, flat):
    return targets.dense_changed_params(self.placement(cfg, hp, flat))

  def handlers(self, cfg, hp):
    return (TfewHandler(r=int(hp["r"]), s=int(hp["scaling_rank"])),)

  # ------------------------------------------------------------------ merge
  def _parts(self, hp, flat, p):
    """(multiplicative [.., in, out] or None, additive [.., in, out] or None) in fp32."""
    mult = add = None
    if f"{p}/{SIN}" in flat:
      a = jnp.asarray(flat[f"{p}/{SIN}"], jnp.float32)
      b = jnp.asarray(flat[f"{p}/{SOUT}"], jnp.float32)
      mult = jnp.einsum("...si,...so->...io", a, b) / a.shape[-2]
    if f"{p}/{A}" in flat:
      add = jnp.einsum("...ir,...ro->...io", jnp.asarray(flat[f"{p}/{A}"], jnp.float32),
                       jnp.asarray(flat[f"{p}/{B}"], jnp.float32)) / int(hp["r"])
    return mult, add

  def _modules(self, flat):
    return sorted({k.rsplit("/", 1)[0] for k in flat if k.endswith((f"/{A}", f"/{SIN}"))})

  def merge(self, cfg, hp, flat):
    out = dict(flat)
    for p in self._modules(flat):
      w = jnp.asarray(flat[f"{p}/kernel"])
      mult, add = self._parts(hp, flat, p)
      new = w.astype(jnp.float32)
      if mult is not None:
        new = new * mult
      if add is not None:
        new = new + add
      out[f"{p}/kernel"] = new.astype(w.dtype)
    return out

  def unmerge(self, cfg, hp, flat):
    out = dict(flat)
    for p in self._modules(flat):
      w = jnp.asarray(flat[f"{p}/kernel"])
      mult, add = self._parts(hp, flat, p)
      new = w.astype(jnp.float32)
      if add is not None:
        new = new - add
      if mult is not None:
        if bool((mult == 0).any()):
          raise PeftConfigError(f"cannot unmerge tfew at {p}: its scaling has zero entries")
        new = new / mult
      out[f"{p}/kernel"] = new.astype(w.dtype)
    return out
