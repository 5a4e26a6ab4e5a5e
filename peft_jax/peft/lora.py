r"""LoRA [lora] and DoRA [dora].

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

Per-module ranks and alphas (HF's ``rank_pattern`` / ``alpha_pattern``): each key is
matched as HF PEFT's ``get_pattern_key`` does, ``re.match(rf"(.*\.)?({key})$", name)``
against the ``transformers`` module name of each module in each layer
(``model.layers.1.self_attn.q_proj``, ``encoder.block.0.layer.0.SelfAttention.q``; the
first matching key wins, no match: ``r`` / ``lora_alpha``). A stacked leaf keeps one
shape for its layers, so ``A``/``B`` are stored at the largest rank among the module's
selected layers; the rank columns past a layer's own rank are zero, masked out of
training and out of the counts (:meth:`update_masks`). Then each module also gets a
frozen ``lora_scale [..]`` leaf (the per-layer ``alpha / r``), a constant that is not
counted as a parameter.

Merge: ``W' = W + s A B``; DoRA ``W' = m / n * (W + s A B)`` with
``n = ||W + s A B||_c``, which merge stores (leaf ``dora_merge_norm``) because
``unmerge`` cannot recover it from ``W'``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, register
from peft_jax.peft.common import Rand, adapter_dtype, compute_dtype, dropout
from peft_jax.quantize import base_kernel, module_kernel

def pattern_key(keys, name: str):
  """The first of ``keys`` that matches module ``name`` as in HF PEFT's ``get_pattern_key``
  (a regex or a dotted suffix, matched to the end of the name); None: no key matches."""
  for k in keys:
    if re.match(rf"(.*\.)?({k})$", name):
      return k
  return None


def _pattern_problem(kind: str):
  def check(v):
    if not isinstance(v, dict):
      return "expected a {module pattern: value} dict"
    for k, x in v.items():
      if not isinstance(k, str):
        return f"pattern {k!r} is not a string"
      try:
        re.compile(k)
      except re.error as e:
        return f"pattern {k!r} is not a regular expression ({e})"
      if isinstance(x, bool) or not isinstance(x, (int, float)) or (
          kind == "rank" and (not isinstance(x, int) or x < 1)):
        return f"{k!r}: {x!r} is not {'a positive int' if kind == 'rank' else 'a number'}"
    return None
  return check


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
    scale = self.scale
    if module.has_variable("params", "lora_scale"):   # per-module ranks / alphas
      scale = module.get_variable("params", "lora_scale").astype(dt)
    if not self.dora:
      return y + (lora * scale).astype(y.dtype)
    w = module_kernel(module)     # dequantized on a quantized base (peft_jax.quantize)
    m = module.get_variable("params", "lora_magnitude")
    delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32)) * jnp.asarray(scale, jnp.float32)
    n = jax.lax.stop_gradient(jnp.linalg.norm(w.astype(jnp.float32) + delta, axis=0))
    f = (m.astype(jnp.float32) / n).astype(dt)
    if deterministic or self.rate <= 0.0:
      base = y       # DoRA rescales the product x W, not a layer's own bias (as HF PEFT)
      if getattr(module, "use_bias", False):
        base = base - module.get_variable("params", "bias").astype(y.dtype)
    else:
      base = jnp.dot(xd.astype(dt), w.astype(dt))
    return y + ((f - 1) * base + f * lora * scale).astype(y.dtype)


def check_bias(bias, flat):
  """HF's ``bias="lora_only"`` / ``"all"`` also trains the model's biases: a no-op on a
  model without any (T5, LLaMA); the trained biases are not supported."""
  if bias not in ("none", "lora_only", "all"):
    raise PeftConfigError(f"LoRA bias={bias!r}: expected 'none', 'lora_only' or 'all'")
  if bias != "none" and any(k.endswith("/bias") for k in flat):
    raise PeftConfigError(f"LoRA bias={bias!r} on a model with biases is not supported "
                          "(peft-jax imports bias='none' only there)")


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
      "rank_pattern": Field(None, "{module pattern: rank} overriding r per module (HF PEFT: "
                            "regex or dotted suffix of the transformers module name)", "any",
                            check_fn=_pattern_problem("rank")),
      "alpha_pattern": Field(None, "{module pattern: alpha} overriding lora_alpha per module "
                             "(matched as rank_pattern)", "any", check_fn=_pattern_problem("alpha")),
      **targets.SELECTION,
  }

  def _dora(self, hp):
    return bool(hp["use_dora"])

  def placement(self, cfg, hp, flat) -> targets.Placement:
    return targets.place(cfg, hp, flat, targets.default_targets(cfg, "LORA"))

  def scaling(self, hp, r=None, alpha=None):
    r = hp["r"] if r is None else r
    alpha = hp["lora_alpha"] if alpha is None else alpha
    return alpha / (math.sqrt(r) if hp["use_rslora"] else r)

  # ------------------------------------------------------------------ per-module ranks
  def patterned(self, hp) -> bool:
    return bool(hp.get("rank_pattern") or hp.get("alpha_pattern"))

  def layer_ranks(self, cfg, hp, m):
    """``[(rank, alpha)]`` of module ``m`` per layer (one entry when not stacked)."""
    rp, ap = hp.get("rank_pattern") or {}, hp.get("alpha_pattern") or {}
    out = []
    for l in (range(m.n_layers) if m.stacked else [None]):
      name = targets.hf_module_name(cfg, m, l)
      kr, ka = pattern_key(rp, name), pattern_key(ap, name)
      out.append((hp["r"] if kr is None else rp[kr], hp["lora_alpha"] if ka is None else ap[ka]))
    return out

  def stored_rank(self, cfg, hp, pl, m) -> int:
    """The rank ``A``/``B`` are stored at: the largest among the selected layers."""
    if not self.patterned(hp):
      return hp["r"]
    ranks = self.layer_ranks(cfg, hp, m)
    return max(ranks[0 if l is None else l][0] for l in pl.selected(m))

  def rank_masks(self, cfg, hp, pl, m):
    """``(A mask [L, 1, R], B mask [L, R, 1])`` of the rank columns each layer uses, or None
    when every layer uses all ``R`` stored columns."""
    if not self.patterned(hp) or not m.stacked:
      return None
    R = self.stored_rank(cfg, hp, pl, m)
    used = np.arange(R)[None, :] < np.array([r for r, _ in self.layer_ranks(cfg, hp, m)])[:, None]
    if used.all():
      return None
    return used[:, None, :], used[:, :, None]

  def module_scale(self, cfg, hp, m):
    """The frozen ``lora_scale`` value: ``[L]`` (stacked) or ``[]`` per-layer scales."""
    s = np.array([self.scaling(hp, r, a) for r, a in self.layer_ranks(cfg, hp, m)], np.float32)
    return s if m.stacked else s[0]

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
      rm = self.stored_rank(cfg, hp, pl, m)
      if rm > min(m.d_in, m.d_out):
        what = f"rank r={r}" if rm == r else f"rank {rm} (rank_pattern)"
        raise PeftConfigError(f"{what} is larger than layer {m.path} allows: its kernel is "
                              f"[in={m.d_in}, out={m.d_out}], so r must be <= {min(m.d_in, m.d_out)}")

  def init_leaves(self, cfg, hp, flat, rng):
    pl = self.placement(cfg, hp, flat)
    r, init = hp["r"], hp["init_lora_weights"]
    out = {}
    rnd = Rand(rng)
    for m in pl.modules:
      w = flat[m.leaf]
      lead = (m.n_layers,) if m.stacked else ()
      r = self.stored_rank(cfg, hp, pl, m)
      # torch layout [r, in] / [out, r], transposed to our [in, r] / [r, out]
      if init == "gaussian" and self.patterned(hp):
        std = 1.0 / np.array([rl for rl, _ in self.layer_ranks(cfg, hp, m)], np.float32)
        a = rnd.normal(lead + (r, m.d_in)) * (std.reshape(lead + (1, 1)) if m.stacked else std[0])
      elif init == "gaussian":
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
      rmask = self.rank_masks(cfg, hp, pl, m)
      if rmask is not None:
        a = jnp.where(rmask[0], a, 0.0)
        b = jnp.where(rmask[1], b, 0.0)
      out[f"{m.path}/lora_A"] = a.astype(adapter_dtype(w.dtype))
      out[f"{m.path}/lora_B"] = b.astype(adapter_dtype(w.dtype))
      scale = self.scaling(hp)
      if self.patterned(hp):
        scale = self.module_scale(cfg, hp, m)
        out[f"{m.path}/lora_scale"] = jnp.asarray(scale)
        scale = scale[:, None, None] if m.stacked else scale
      if self._dora(hp):
        delta = jnp.einsum("...ir,...ro->...io", a, b) * scale
        out[f"{m.path}/lora_magnitude"] = jnp.linalg.norm(
            base_kernel(flat, m.path, jnp.float32) + delta, axis=-2).astype(adapter_dtype(w.dtype))
    return out

  def leaf_roles(self, cfg, hp, paths):
    """DoRA's magnitude vectors train without weight decay; ``lora_scale`` is a constant."""
    out = {p: "no_decay" for p in paths if p.endswith("/lora_magnitude")}
    out.update({p: "frozen" for p in paths if p.endswith("/lora_scale")})
    return out

  def update_masks(self, cfg, hp, flat):
    pl = self.placement(cfg, hp, flat)
    out = {}
    for m in pl.modules:
      sel = pl.layers.get(m.path)
      rmask = self.rank_masks(cfg, hp, pl, m)
      for i, (leaf, nd) in enumerate((("lora_A", 3), ("lora_B", 3), ("lora_magnitude", 2))):
        lm = targets.layer_mask(m, sel, nd)
        if rmask is not None and i < 2:
          lm = rmask[i] if lm is None else lm & rmask[i]
        if lm is not None and f"{m.path}/{leaf}" in flat:
          out[f"{m.path}/{leaf}"] = lm
      if f"{m.path}/lora_scale" in flat:   # a constant, not a parameter (never counted)
        out[f"{m.path}/lora_scale"] = np.zeros(np.shape(flat[f"{m.path}/lora_scale"]), bool)
    return out

  def changed_params(self, cfg, hp, flat):
    return targets.dense_changed_params(self.placement(cfg, hp, flat))

  def handlers(self, cfg, hp):
    return (LoraHandler(scale=float(self.scaling(hp)), rate=float(hp["lora_dropout"]),
                        dora=self._dora(hp)),)

  # ------------------------------------------------------------------ merge
  def _modules(self, flat):
    return sorted(k[: -len("/lora_A")] for k in flat if k.endswith("/lora_A"))

  def _scale_of(self, hp, flat, p):
    """The scale of module ``p``, broadcastable to its kernel."""
    if f"{p}/lora_scale" not in flat:
      return self.scaling(hp)
    s = jnp.asarray(flat[f"{p}/lora_scale"], jnp.float32)
    return s[..., None, None] if s.ndim else s

  def merge(self, cfg, hp, flat):
    out = dict(flat)
    for p in self._modules(flat):
      w = jnp.asarray(flat[f"{p}/kernel"])
      delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(flat[f"{p}/lora_A"], jnp.float32),
                         jnp.asarray(flat[f"{p}/lora_B"], jnp.float32)) * self._scale_of(hp, flat, p)
      new = w.astype(jnp.float32) + delta
      if f"{p}/lora_magnitude" in flat:
        n = jnp.linalg.norm(new, axis=-2)
        out[f"{p}/dora_merge_norm"] = n
        new = new * (jnp.asarray(flat[f"{p}/lora_magnitude"], jnp.float32) / n)[..., None, :]
      out[f"{p}/kernel"] = new.astype(w.dtype)
    return out

  def unmerge(self, cfg, hp, flat):
    out = dict(flat)
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
                         jnp.asarray(flat[f"{p}/lora_B"], jnp.float32)) * self._scale_of(hp, flat, p)
      out[f"{p}/kernel"] = (new - delta).astype(w.dtype)
    return out

  # ------------------------------------------------------------------ HF PEFT (LoraConfig)
  hf_peft_type = "LORA"
  #: every field of peft 0.21's LoraConfig (see ``hf_peft.check_fields``)
  hf_fields = {
      **{k: "used" for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
                             "bias", "rank_pattern", "alpha_pattern")},
      # the saved tensors name the adapted modules and layers; initialisation-only settings
      **{k: "noop" for k in ("target_modules", "exclude_modules", "layers_to_transform",
                             "layers_pattern", "megatron_core", "qalora_group_size",
                             "eva_config", "corda_config", "lora_ga_config", "runtime_config",
                             "ensure_weight_tying")},
      "init_lora_weights": ((True, False, "gaussian"), "the other initialisations (PiSSA, "
                            "OLoRA, LoftQ, CorDA, ...) change the base weights too"),
      "fan_in_fan_out": ((False,), "transposed Conv1D weights; these models use nn.Linear"),
      "modules_to_save": ((None, []), "fully trained module copies"),
      "trainable_token_indices": ((None,), "trained token embedding rows"),
      "lora_bias": ((False,), "a trained bias on lora_B"),
      "layer_replication": ((None,), "layers repeated to build a deeper model"),
      "loftq_config": (({}, None), "quantised base weights"),
      "megatron_config": ((None,), "Megatron parallel layers"),
      "use_qalora": ((False,), "quantisation-aware LoRA pooling"),
      "alora_invocation_tokens": ((None,), "activated LoRA acts only after these tokens"),
      "target_parameters": ((None,), "LoRA on raw parameters (e.g. MoE experts)"),
      "velora_config": ((None,), "VeLoRA"),
      "monteclora_config": ((None,), "MonteCLoRA"),
      "use_bdlora": ((None,), "block-diagonal LoRA"),
      "arrow_config": ((None,), "Arrow routing"),
      "kasa_config": ((None,), "KaSA"),
  }

  def hf_export(self, state, params):
    """``...<module>.lora_A.weight [r, in] = A.T``, ``lora_B.weight [out, r] = B.T``, DoRA
    ``lora_magnitude_vector [out]``; ``target_modules`` names the exact modules and layers."""
    from peft_jax.peft import hf_peft
    from peft_jax.tree import flatten
    cfg, hp, flat = state.model_cfg, state.hparams, flatten(params)
    pl = self.placement(cfg, hp, flat)
    names, tensors = [], {}
    for m in pl.modules:
      ranks = self.layer_ranks(cfg, hp, m)
      for l in pl.selected(m):
        hf = targets.hf_module_name(cfg, m, l)
        names.append(hf)
        sl = (lambda a, l=l: a[l]) if m.stacked else (lambda a: a)
        key = f"{hf_peft.PREFIX}{hf}"
        rl = ranks[0 if l is None else l][0]   # the layer's own rank (stored padded)
        tensors[f"{key}.lora_A.weight"] = hf_peft.np32(sl(flat[f"{m.path}/lora_A"]))[:, :rl].T
        tensors[f"{key}.lora_B.weight"] = hf_peft.np32(sl(flat[f"{m.path}/lora_B"]))[:rl].T
        if hp["use_dora"]:
          tensors[f"{key}.lora_magnitude_vector"] = hf_peft.np32(sl(flat[f"{m.path}/lora_magnitude"]))
    fields = dict(r=int(hp["r"]), lora_alpha=hp["lora_alpha"], lora_dropout=float(hp["lora_dropout"]),
                  use_rslora=bool(hp["use_rslora"]), use_dora=bool(hp["use_dora"]),
                  target_modules=hf_peft.regex(names), bias="none", fan_in_fan_out=False,
                  init_lora_weights=True, layers_to_transform=None, layers_pattern=None,
                  rank_pattern=dict(hp.get("rank_pattern") or {}),
                  alpha_pattern=dict(hp.get("alpha_pattern") or {}), modules_to_save=None)
    return fields, tensors

  def hf_import(self, conf, tensors, cfg, base_params, path):
    from peft_jax.peft import hf_peft
    from peft_jax.peft.base import apply_peft
    from peft_jax.tree import flatten, unflatten
    check_bias(conf.get("bias", "none"), flatten(base_params))
    found = hf_peft.found_modules(cfg, flatten(base_params), tensors, ".lora_A.weight")
    if not found:
      raise PeftConfigError(f"no lora_A tensors in {path}")
    dora = bool(conf.get("use_dora"))
    hp = {"r": int(conf["r"]), "lora_alpha": conf["lora_alpha"],
          "lora_dropout": float(conf.get("lora_dropout") or 0.0),
          "use_rslora": bool(conf.get("use_rslora")), **hf_peft.selection(found)}
    for k in ("rank_pattern", "alpha_pattern"):
      if conf.get(k):
        hp[k] = dict(conf[k])
    state = apply_peft(cfg, base_params, "dora" if dora else "lora", hp)
    flat = flatten(state.params)
    pl = self.placement(cfg, state.hparams, flat)
    stored = {m.path: self.stored_rank(cfg, state.hparams, pl, m) for m in pl.modules}
    for p, (m, layers) in found.items():
      ranks = self.layer_ranks(cfg, state.hparams, m)
      for l in layers:
        hf = targets.hf_module_name(cfg, m, l)
        key = f"{hf_peft.PREFIX}{hf}"
        a, b = tensors[f"{key}.lora_A.weight"], hf_peft.need(tensors, f"{key}.lora_B.weight")
        rl = ranks[0 if l is None else l][0]
        if a.shape[0] != rl or b.shape[-1] != rl:
          raise PeftConfigError(f"adapter tensor {key}.lora_A.weight has rank {a.shape[0]}; r and "
                                f"rank_pattern give rank {rl} for {hf}")
        pad = stored[p] - rl
        vals = {"lora_A": np.pad(a.T, ((0, 0), (0, pad))), "lora_B": np.pad(b.T, ((0, pad), (0, 0)))}
        if dora:
          vals["lora_magnitude"] = hf_peft.need(tensors, f"{key}.lora_magnitude_vector")
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
