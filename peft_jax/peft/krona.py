r"""KronA [krona]: a Kronecker-product update ``dW = s * (W1 (x) W2)`` on chosen projections.

Names, defaults, factorisation and initialisation follow Hugging Face PEFT's LoKr
(``LoKrConfig``, PEFT 0.21), as the survey's code did:

* ``r=8``, ``alpha=8`` (scale ``s = alpha / r``), ``rank_dropout=0``,
  ``module_dropout=0``, ``rank_dropout_scale=False``, ``decompose_both=False``,
  ``decompose_factor=-1``, ``init_weights=True`` (``"lycoris"`` and ``False`` too),
  ``target_modules=None`` -> HF's LoKr mapping (= LoRA's): ``q, v`` on T5 and LLaMA.
  Layer / sub-layer selection as for LoRA (:mod:`peft_jax.peft.targets`).
* A kernel ``[in, out]`` is split as ``in = c * d``, ``out = a * b`` with
  ``(c, d) = factorization(in, decompose_factor)``, ``(a, b) =
  factorization(out, decompose_factor)`` (HF's ``factorization``: the pair of
  divisors closest to the square root, or ``(f, n/f)`` for a factor ``f``).
  ``W1 [c, a]`` is a full matrix (leaf ``lokr_w1``) unless ``decompose_both`` and
  ``r < max(a, c) / 2``, then ``W1 = lokr_w1_b @ lokr_w1_a`` (``[c, r] @ [r, a]``);
  ``W2 [d, b]`` is ``lokr_w2`` unless ``r < max(b, d) / 2``, then
  ``lokr_w2_b @ lokr_w2_a``.
* Our leaves are HF's tensors transposed (our kernels are ``[in, out]``, torch's
  ``[out, in]``); ``kron(W1, W2) = kron(w1, w2)^T``.
* Init (``True``): the ``W1`` leaf (``lokr_w1`` / ``lokr_w1_a``) is zero, the others
  torch's ``kaiming_uniform(a=sqrt(5))`` (``U(+-1/sqrt(fan_in))`` on the torch shape),
  so the model starts as the base model. ``"lycoris"``: ``W2``'s (second) factor is
  zero instead; ``False``: everything random.

Forward (``linear`` site): the Kronecker-vector product, never forming ``dW``:
``x [.., c*d] -> X [.., c, d]``, ``Y = W1^T X W2 [.., a, b] -> [.., a*b]``, added to the
frozen output times ``s``. In training, ``rank_dropout`` drops output features of the
update (one mask per call, divided by its mean with ``rank_dropout_scale``) and
``module_dropout`` skips the whole update with that probability (as HF).

Per-module ranks and alphas (HF's ``rank_pattern`` / ``alpha_pattern``, matched as for
LoRA: ``re.match(rf"(.*\.)?({key})$", name)`` on each layer's ``transformers`` module name,
first matching key wins): the scale is ``alpha / r`` of each module and layer, held in a
frozen, uncounted ``lokr_scale`` leaf (``[L]`` stacked). A stacked leaf keeps one shape for
its layers, so a low-rank factor is stored at the largest rank among the module's
selected layers, the columns past a layer's own rank zero, masked out of training and of
the counts. Layers of one module whose ranks need different factor forms (a full ``W2`` in
one layer, a low-rank one in another) are refused with one line.

Merge: ``W' = W + s * kron(W1, W2)`` (per layer for stacked kernels); exact up to
float rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, register
from peft_jax.peft.common import Rand, adapter_dtype, compute_dtype, AdditiveMerge
from peft_jax.peft.lora import _pattern_problem, pattern_ranks

LEAVES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
  """``(m, n)`` with ``m * n == dimension`` and ``m <= n`` (HF PEFT's LoKr rule): ``(factor,
  dimension // factor)`` when ``factor`` divides; otherwise the divisor pair closest to the
  square root with ``m <= factor`` (``factor=-1``: no bound)."""
  if factor > 0 and dimension % factor == 0:
    return factor, dimension // factor
  if factor == -1:
    factor = dimension
  m, n = 1, dimension
  length = m + n
  while m < n:
    new_m = m + 1
    while dimension % new_m != 0:
      new_m += 1
    new_n = dimension // new_m
    if new_m + new_n > length or new_m > factor:
      break
    m, n = new_m, new_n
  if m > n:
    m, n = n, m
  return m, n


@dataclasses.dataclass(frozen=True)
class Layout:
  """Factor shapes of one kernel ``[in=c*d, out=a*b]``."""
  a: int
  b: int
  c: int
  d: int
  full_w1: bool
  full_w2: bool

  def shapes(self, r) -> Dict[str, Tuple[int, ...]]:
    """Our leaf shapes (HF's transposed)."""
    out = {}
    if self.full_w1:
      out["lokr_w1"] = (self.c, self.a)
    else:
      out["lokr_w1_a"] = (r, self.a)
      out["lokr_w1_b"] = (self.c, r)
    if self.full_w2:
      out["lokr_w2"] = (self.d, self.b)
    else:
      out["lokr_w2_a"] = (r, self.b)
      out["lokr_w2_b"] = (self.d, r)
    return out


def layout(d_in: int, d_out: int, r: int, decompose_both: bool, decompose_factor: int) -> Layout:
  c, d = factorization(d_in, decompose_factor)
  a, b = factorization(d_out, decompose_factor)
  full_w1 = not (decompose_both and r < max(a, c) / 2)
  full_w2 = not (r < max(b, d) / 2)
  return Layout(a=a, b=b, c=c, d=d, full_w1=full_w1, full_w2=full_w2)


def _factor(get, which):
  """``W1 [.., c, a]`` / ``W2 [.., d, b]`` from the leaves ``get(name)`` returns (None if absent)."""
  full = get(f"lokr_{which}")
  if full is not None:
    return full
  return jnp.matmul(get(f"lokr_{which}_b"), get(f"lokr_{which}_a"))


def kron_delta(w1, w2):
  """``kron(W1, W2)`` per leading index: ``[.., c, a] x [.., d, b] -> [.., c*d, a*b]``."""
  c, a = w1.shape[-2:]
  d, b = w2.shape[-2:]
  out = jnp.einsum("...ca,...db->...cdab", w1, w2)
  return out.reshape(out.shape[:-4] + (c * d, a * b))


def kron_vec(x, w1, w2):
  """``x @ kron(W1, W2)`` without forming the Kronecker product."""
  c, a = w1.shape
  d, b = w2.shape
  xs = x.reshape(x.shape[:-1] + (c, d))
  t = jnp.einsum("...cd,db->...cb", xs, w2)
  y = jnp.einsum("...cb,ca->...ab", t, w1)
  return y.reshape(x.shape[:-1] + (a * b,))


@dataclasses.dataclass(frozen=True)
class KronaHandler:
  scale: float
  rank_dropout: float
  module_dropout: float
  rank_dropout_scale: bool

  def linear(self, module, x, call_next, deterministic):
    y = call_next(x)
    if not (module.has_variable("params", "lokr_w1") or module.has_variable("params", "lokr_w1_a")):
      return y
    dt = compute_dtype(module)

    def get(name):
      if not module.has_variable("params", name):
        return None
      return module.get_variable("params", name).astype(dt)

    w1, w2 = _factor(get, "w1"), _factor(get, "w2")
    scale = self.scale
    if module.has_variable("params", "lokr_scale"):   # per-module ranks / alphas
      scale = module.get_variable("params", "lokr_scale").astype(dt)
    delta = kron_vec(x.astype(dt), w1, w2) * scale
    if not deterministic and self.rank_dropout > 0.0:
      keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - self.rank_dropout,
                                  (delta.shape[-1],)).astype(dt)
      if self.rank_dropout_scale:
        keep = keep / jnp.maximum(keep.mean(), jnp.finfo(dt).tiny)   # HF: drop /= drop.mean()
      delta = delta * keep
    if not deterministic and self.module_dropout > 0.0:
      on = jax.random.uniform(module.make_rng("dropout"), ()) > self.module_dropout
      delta = jnp.where(on, delta, jnp.zeros_like(delta))
    return y + delta.astype(y.dtype)


@register
class Krona(AdditiveMerge, Method):
  name = "krona"
  identity_at_init = True
  reference = "HF PEFT 0.21 LoKrConfig"
  mergeable = True
  hparams = {
      "r": Field(8, "rank of the low-rank Kronecker factors (W2; W1 too with decompose_both)",
                 ge=1),
      "alpha": Field(8, "scale numerator: the update is kron(W1, W2) * alpha / r", "float"),
      "rank_dropout": Field(0.0, "training: drop each output feature of the update with this "
                            "probability", ge=0, lt=1),
      "module_dropout": Field(0.0, "training: skip the whole update with this probability",
                              ge=0, lt=1),
      "rank_dropout_scale": Field(False, "divide the rank-dropout mask by its mean"),
      "decompose_both": Field(False, "also write W1 as a rank-r product when r is small enough"),
      "decompose_factor": Field(-1, "split in/out dims with this factor (-1: the divisors "
                                "closest to the square root)"),
      "init_weights": Field(True, "True: W1 zero (the base model at init); 'lycoris': W2 zero "
                            "instead; False: all random", "bool_or_str", choices=("lycoris",)),
      "target_modules": Field(None, "modules to adapt (none: q, v on T5 and LLaMA)", "names"),
      "rank_pattern": Field(None, "{module pattern: rank} overriding r per module (HF PEFT: "
                            "regex or dotted suffix of the transformers module name)", "any",
                            check_fn=_pattern_problem("rank")),
      "alpha_pattern": Field(None, "{module pattern: alpha} overriding alpha per module "
                             "(matched as rank_pattern)", "any", check_fn=_pattern_problem("alpha")),
      **targets.SELECTION,
  }

  def placement(self, cfg, hp, flat) -> targets.Placement:
    return targets.place(cfg, hp, flat, targets.default_targets(cfg, "LORA"))

  def scaling(self, hp):
    return hp["alpha"] / hp["r"]

  def patterned(self, hp) -> bool:
    return bool(hp.get("rank_pattern") or hp.get("alpha_pattern"))

  def layer_ranks(self, cfg, hp, m):
    """``[(rank, alpha)]`` of module ``m`` per layer (one entry when not stacked)."""
    return pattern_ranks(cfg, hp, m, "alpha")

  def layout(self, hp, m: targets.Module, r=None) -> Layout:
    return layout(m.d_in, m.d_out, int(hp["r"]) if r is None else r, bool(hp["decompose_both"]),
                  int(hp["decompose_factor"]))

  def stored(self, cfg, hp, pl, m) -> Tuple[Layout, int]:
    """``(layout, stored rank)`` of module ``m``: the largest rank among its selected layers,
    whose factor forms must agree."""
    if not self.patterned(hp):
      return self.layout(hp, m), int(hp["r"])
    ranks = self.layer_ranks(cfg, hp, m)
    sel = [ranks[0 if l is None else l][0] for l in pl.selected(m)]
    forms = {(lo.full_w1, lo.full_w2) for lo in (self.layout(hp, m, r) for r in sel)}
    if len(forms) > 1:
      raise PeftConfigError(f"LoKr rank_pattern gives the layers of {m.path} ranks {sorted(set(sel))} "
                            "that need different factor forms (full and low-rank); peft-jax "
                            "stores a module's layers in one leaf, give them ranks of one form")
    R = max(sel)
    return self.layout(hp, m, R), R

  def rank_masks(self, cfg, hp, pl, m) -> Dict[str, np.ndarray]:
    """``{leaf: bool mask [L, .., ..]}`` of the rank columns each layer uses (low-rank
    factors of a stacked module whose layers' ranks differ)."""
    if not self.patterned(hp) or not m.stacked:
      return {}
    lo, R = self.stored(cfg, hp, pl, m)
    used = np.arange(R)[None, :] < np.array([r for r, _ in self.layer_ranks(cfg, hp, m)])[:, None]
    if used.all():
      return {}
    rows, cols = used[:, :, None], used[:, None, :]
    out = {}
    if not lo.full_w1:
      out.update(lokr_w1_a=rows, lokr_w1_b=cols)
    if not lo.full_w2:
      out.update(lokr_w2_a=rows, lokr_w2_b=cols)
    return out

  def module_scale(self, cfg, hp, m):
    s = np.array([a / r for r, a in self.layer_ranks(cfg, hp, m)], np.float32)
    return s if m.stacked else s[0]

  def leaf_roles(self, cfg, hp, paths):
    """``lokr_scale`` (per-module alpha / r) is a constant."""
    return {p: "frozen" for p in paths if p.endswith("/lokr_scale")}

  def validate(self, cfg, hp, flat):
    r = hp["r"]
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
      raise PeftConfigError(f"r must be a positive int, got {r!r}")
    if not isinstance(hp["alpha"], (int, float)) or isinstance(hp["alpha"], bool):
      raise PeftConfigError(f"alpha must be a number, got {hp['alpha']!r}")
    for k in ("rank_dropout", "module_dropout"):
      if not 0.0 <= float(hp[k]) < 1.0:
        raise PeftConfigError(f"{k} must be in [0, 1), got {hp[k]!r}")
    f = hp["decompose_factor"]
    if not isinstance(f, (int, np.integer)) or isinstance(f, bool) or not (f == -1 or f > 0):
      raise PeftConfigError(f"decompose_factor must be -1 or a positive int, got {f!r}")
    if hp["init_weights"] not in (True, False, "lycoris"):
      raise PeftConfigError(f"init_weights must be True, False or 'lycoris', got {hp['init_weights']!r}")
    pl = self.placement(cfg, hp, flat)
    for m in pl.modules:
      self.stored(cfg, hp, pl, m)

  def init_leaves(self, cfg, hp, flat, rng):
    pl = self.placement(cfg, hp, flat)
    init = hp["init_weights"]
    rnd = Rand(rng)
    out = {}
    for m in pl.modules:
      w = flat[m.leaf]
      lead = (m.n_layers,) if m.stacked else ()
      lm = targets.layer_mask(m, pl.layers.get(m.path), 3)
      zero = {"lokr_w1", "lokr_w1_a"} if init is True else (
          {"lokr_w2", "lokr_w2_b"} if init == "lycoris" else set())
      lo, r = self.stored(cfg, hp, pl, m)
      rmask = self.rank_masks(cfg, hp, pl, m)
      if self.patterned(hp):
        out[f"{m.path}/lokr_scale"] = jnp.asarray(self.module_scale(cfg, hp, m))
      for leaf, shape in lo.shapes(r).items():
        if leaf in zero:
          v = jnp.zeros(lead + shape, jnp.float32)
        else:   # torch draws on its [out, in]-style shape = ours transposed; fan_in = our dim 0
          v = jnp.swapaxes(rnd.kaiming_uniform_a5(lead + shape[::-1]), -1, -2)
        if lm is not None:
          v = jnp.where(lm, v, 0.0)
        if leaf in rmask:
          v = jnp.where(rmask[leaf], v, 0.0)
        out[f"{m.path}/{leaf}"] = v.astype(adapter_dtype(w.dtype))
    return out

  def update_masks(self, cfg, hp, flat):
    pl = self.placement(cfg, hp, flat)
    out = {}
    for m in pl.modules:
      lm = targets.layer_mask(m, pl.layers.get(m.path), 3)
      rmask = self.rank_masks(cfg, hp, pl, m)
      for leaf in LEAVES:
        mask = lm
        if leaf in rmask:
          mask = rmask[leaf] if mask is None else mask & rmask[leaf]
        if mask is not None and f"{m.path}/{leaf}" in flat:
          out[f"{m.path}/{leaf}"] = mask
      if f"{m.path}/lokr_scale" in flat:   # a constant, not a parameter (never counted)
        out[f"{m.path}/lokr_scale"] = np.zeros(np.shape(flat[f"{m.path}/lokr_scale"]), bool)
    return out

  def changed_params(self, cfg, hp, flat):
    return targets.dense_changed_params(self.placement(cfg, hp, flat))

  def handlers(self, cfg, hp):
    return (KronaHandler(scale=float(self.scaling(hp)), rank_dropout=float(hp["rank_dropout"]),
                         module_dropout=float(hp["module_dropout"]),
                         rank_dropout_scale=bool(hp["rank_dropout_scale"])),)

  # ------------------------------------------------------------------ merge
  def _modules(self, flat):
    return sorted({k.rsplit("/", 1)[0] for k in flat
                   if k.endswith(("/lokr_w1", "/lokr_w1_a"))})

  def delta(self, hp, flat, p):
    """``s * kron(W1, W2)`` of module ``p`` (``[.., in, out]``, float32)."""
    def get(name):
      k = f"{p}/{name}"
      return jnp.asarray(flat[k], jnp.float32) if k in flat else None
    s = self.scaling(hp)
    if f"{p}/lokr_scale" in flat:
      s = jnp.asarray(flat[f"{p}/lokr_scale"], jnp.float32)
      s = s[..., None, None] if s.ndim else s
    return kron_delta(_factor(get, "w1"), _factor(get, "w2")) * s

  # ------------------------------------------------------------------ HF PEFT (LoKrConfig)
  hf_peft_type = "LOKR"
  #: every field of peft 0.21's LoKrConfig (``hf_peft.check_fields``)
  hf_fields = {**{k: "used" for k in ("r", "alpha", "rank_dropout", "module_dropout",
                                      "rank_dropout_scale", "decompose_both", "decompose_factor",
                                      "use_effective_conv2d", "rank_pattern", "alpha_pattern")},
               **{k: "noop" for k in ("target_modules", "exclude_modules", "layers_to_transform",
                                     "layers_pattern", "init_weights")},
               "modules_to_save": ((None, []), "fully trained module copies"),}

  def hf_export(self, state, params):
    """``...<module>.lokr_w1`` etc. (:func:`hf_tensors`), one per selected layer."""
    from peft_jax.peft import hf_peft
    from peft_jax.tree import flatten
    hp = state.hparams
    tensors = {f"{hf_peft.PREFIX}{k}": hf_peft.np32(v) for k, v in hf_tensors(state, params).items()}
    names = sorted({k.rsplit(".", 1)[0][len(hf_peft.PREFIX):] for k in tensors})
    if self.patterned(hp):   # each layer's own rank (stored padded to the module's largest)
      ranks = {}
      for m in self.placement(state.model_cfg, hp, flatten(params)).modules:
        for l, (r, _) in enumerate(self.layer_ranks(state.model_cfg, hp, m)):
          ranks[targets.hf_module_name(state.model_cfg, m, l if m.stacked else None)] = r
      for k in list(tensors):
        mod, leaf = k[len(hf_peft.PREFIX):].rsplit(".", 1)
        r = ranks[mod]
        if leaf in ("lokr_w1_a", "lokr_w2_a"):     # torch [.., r] / ours [r, ..]
          tensors[k] = np.ascontiguousarray(tensors[k][:, :r])
        elif leaf in ("lokr_w1_b", "lokr_w2_b"):
          tensors[k] = np.ascontiguousarray(tensors[k][:r])
    fields = dict(r=int(hp["r"]), alpha=hp["alpha"], rank_dropout=float(hp["rank_dropout"]),
                  module_dropout=float(hp["module_dropout"]),
                  rank_dropout_scale=bool(hp["rank_dropout_scale"]),
                  decompose_both=bool(hp["decompose_both"]),
                  decompose_factor=int(hp["decompose_factor"]), use_effective_conv2d=False,
                  init_weights=True, target_modules=hf_peft.regex(names),
                  layers_to_transform=None, layers_pattern=None,
                  rank_pattern=dict(hp.get("rank_pattern") or {}),
                  alpha_pattern=dict(hp.get("alpha_pattern") or {}), modules_to_save=None)
    return fields, tensors

  def hf_import(self, conf, tensors, cfg, base_params, path):
    from peft_jax.peft import hf_peft
    from peft_jax.peft.base import apply_peft
    from peft_jax.tree import flatten
    if conf.get("use_effective_conv2d"):
      raise PeftConfigError("LoKr use_effective_conv2d is for convolutions; these models have none")
    found = {}
    for suffix in (".lokr_w1", ".lokr_w1_a"):
      for p, (m, layers) in hf_peft.found_modules(cfg, flatten(base_params), tensors,
                                                  suffix).items():
        found.setdefault(p, (m, set()))[1].update(layers)   # layers of either W1 form
    if not found:
      raise PeftConfigError(f"no lokr_w1 tensors in {path}")
    hp = {"r": int(conf["r"]), "alpha": conf["alpha"],
          "rank_dropout": float(conf.get("rank_dropout") or 0.0),
          "module_dropout": float(conf.get("module_dropout") or 0.0),
          "rank_dropout_scale": bool(conf.get("rank_dropout_scale")),
          "decompose_both": bool(conf.get("decompose_both")),
          "decompose_factor": int(conf.get("decompose_factor", -1)), **hf_peft.selection(found)}
    for k in ("rank_pattern", "alpha_pattern"):
      if conf.get(k):
        hp[k] = dict(conf[k])
    state = apply_peft(cfg, base_params, "krona", hp)
    ours = hf_peft.unprefixed(tensors)
    if self.patterned(state.hparams):   # pad each layer's low-rank factors to the stored rank
      pl = self.placement(cfg, state.hparams, flatten(state.params))
      padded = {}
      for m in pl.modules:
        _, R = self.stored(cfg, state.hparams, pl, m)
        ranks = self.layer_ranks(cfg, state.hparams, m)
        for l in pl.selected(m):
          hf = targets.hf_module_name(cfg, m, l)
          rl = ranks[0 if l is None else l][0]
          for leaf in ("lokr_w1_a", "lokr_w2_a", "lokr_w1_b", "lokr_w2_b"):
            if f"{hf}.{leaf}" not in ours:
              continue
            t = np.asarray(ours[f"{hf}.{leaf}"])
            got = t.shape[1] if leaf.endswith("_a") else t.shape[0]
            if got != rl:
              raise PeftConfigError(f"adapter tensor {hf}.{leaf} has rank {got}; r and "
                                    f"rank_pattern give rank {rl} for {hf}")
            pad = ((0, 0), (0, R - rl)) if leaf.endswith("_a") else ((0, R - rl), (0, 0))
            padded[f"{hf}.{leaf}"] = np.pad(t, pad)
      from peft_jax.peft.adalora import _Overlay
      ours = _Overlay(ours, padded)
    return state, set_hf_tensors(state, state.params, ours)



def hf_tensors(state, params) -> Dict[str, np.ndarray]:
  """Our adapter leaves as HF PEFT LoKr tensors: ``{"<hf module>.<leaf>": array}`` (torch
  layout, one entry per layer), e.g. ``encoder.block.0.layer.0.SelfAttention.q.lokr_w1``."""
  return targets.per_layer_tensors(state, params, {leaf: leaf for leaf in LEAVES}, lambda _, v: v.T)


def set_hf_tensors(state, params, tensors: Dict[str, np.ndarray]):
  """Inverse of :func:`hf_tensors`: copies HF LoKr tensors into our leaves."""
  return targets.set_per_layer_tensors(state, params, tensors, {leaf: leaf for leaf in LEAVES},
                                 lambda _, t: t.T)
