"""AdaLoRA [adalora]: an SVD-form update ``dW = P diag(lambda) Q`` whose rank is pruned
during training by importance scores, on a schedule toward a target average rank.

Names, defaults, initialisation, scaling, schedule and scoring follow Hugging Face
PEFT's ``AdaLoraConfig`` / ``RankAllocator`` (PEFT 0.21):

* defaults ``init_r=12``, ``target_r=8``, ``tinit=0``, ``tfinal=0``, ``deltaT=1``,
  ``beta1=beta2=0.85``, ``orth_reg_weight=0.5``, ``total_step=None`` (required for
  training, as in HF; an abstract build / count works without it), ``lora_alpha=8``,
  ``lora_dropout=0``, ``init_lora_weights=True``. ``target_modules=None``: HF's AdaLoRA
  mapping - T5 ``q, k, v, o, wi, wo`` (names that exist: a gated T5 has ``wi_0/wi_1``, which
  HF's ``wi`` does not match, so it gets ``q, k, v, o, wo``), LLaMA ``q_proj, v_proj``.
  Layer / sub-layer selection as for LoRA.
* Leaves per targeted kernel ``[in, out]``: ``adalora_A [.., in, r]`` (HF ``lora_A``
  ``[r, in]``, transposed), ``adalora_E [.., r]`` (HF ``lora_E [r, 1]``: the singular
  values lambda), ``adalora_B [.., r, out]`` (HF ``lora_B [out, r]``, transposed), with
  ``r = init_r``. Init: ``E = 0``, ``A, B ~ N(0, 0.02^2)`` (``False``: all ``N(0, 1)``).
* Forward (``linear`` site): ``y = x W + (dropout(x) (A * E)) B * s`` with
  ``s = lora_alpha / (init_r + 1e-5)`` (HF: ``scaling / (ranknum + 1e-5)``, ranknum =
  init_r; ``lora_alpha <= 0`` -> ``init_r``). Pruning zeroes entries of ``E``; the shapes
  stay ``init_r`` (HF resizes only when saving / loading an adapter). HF PEFT: a pruned
  adapter's ``rank_pattern`` (``{"<module>.lora_E": [kept]}``, tensors cut to the kept
  ranks) imports into full ``init_r`` leaves with zeros at the pruned ranks, and the export
  writes one for a pruned state (kept = non-zero lambda; :meth:`AdaLora.hf_export`).
* Loss (:meth:`AdaLora.loss_terms`): ``orth_reg_weight * mean_over_matrices
  ||P^T P - I||_F`` over every ``A`` (``[in, r]``: ``A^T A``) and ``B`` (``B B^T``) of every
  adapted layer (HF adds it to ``outputs.loss``).
* After each optimizer step (:meth:`AdaLora.after_step`, HF ``update_and_allocate``;
  ``step`` = 0-based index of the update just applied, HF's ``global_step``):
  with ``T_end = total_step - tfinal``,

  - ``step < T_end``: importance ``I = |p * g|`` (updated parameter times this step's
    gradient) for every A, B, E entry; ``Ibar = b1 Ibar + (1-b1) I``;
    ``U = b2 U + (1-b2) |I - Ibar|``; then, if ``step > tinit`` and ``step % deltaT == 0``,
    prune to the budget ``b(step)``;
  - ``step == T_end``: prune to ``target_bgt`` with the current averages (no update), keep
    that rank pattern, reset the averages;
  - ``step > T_end``: re-apply the kept pattern (zero the pruned ``E``).

  Budget (HF ``budget_schedule``): ``init_bgt = init_r * n``, ``target_bgt = target_r * n``
  (``n`` = adapted matrices, per layer); ``step <= tinit``: ``init_bgt``; else
  ``int((init_bgt - target_bgt) * (1 - (step - tinit) / (T_end - tinit))^3 + target_bgt)``.
  Pruning: score of triplet i of a matrix = ``S(E_i) + mean_in S(A_:,i) + mean_out S(B_i,:)``
  with ``S = Ibar * U``; the ``k = init_bgt - budget``-th smallest score over all matrices
  is the threshold and every triplet scoring ``<=`` it gets ``E_i = 0`` (HF's kthvalue).
  Pruned entries keep training (the optimizer may revive them until the next pruning), as
  in HF.

Hooks: :func:`peft_jax.peft.make_train_step` calls ``loss_terms`` / ``after_step`` for
methods that define them and keeps its ``step(params, opt_state, *batch)`` contract (the
hook state rides in ``opt_state``, a ``HookedOptState``), so ``peft_jax/step.py`` and
``train.py`` need no change.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, register
from peft_jax.peft.common import Rand, adapter_dtype, compute_dtype, dropout, AdditiveMerge

LEAVES = ("adalora_A", "adalora_B", "adalora_E")


@dataclasses.dataclass(frozen=True)
class AdaLoraHandler:
  scale: float
  rate: float

  def linear(self, module, x, call_next, deterministic):
    y = call_next(x)
    if not module.has_variable("params", "adalora_A"):
      return y
    dt = compute_dtype(module)
    a = module.get_variable("params", "adalora_A").astype(dt)
    b = module.get_variable("params", "adalora_B").astype(dt)
    e = module.get_variable("params", "adalora_E").astype(dt)
    xd = dropout(module, x, self.rate, deterministic).astype(dt)
    return y + (jnp.dot(jnp.dot(xd, a * e), b) * self.scale).astype(y.dtype)


def budget_schedule(hp, init_bgt: int, target_bgt: int, step: int):
  """HF's ``RankAllocator.budget_schedule``: ``(budget, prune)`` at ``step``."""
  tinit, tfinal, total = int(hp["tinit"]), int(hp["tfinal"]), int(hp["total_step"])
  if step <= tinit:
    return init_bgt, False
  if step > total - tfinal:
    return target_bgt, True
  mul = 1 - (step - tinit) / (total - tfinal - tinit)
  return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % int(hp["deltaT"]) == 0


@register
class AdaLora(AdditiveMerge, Method):
  name = "adalora"
  identity_at_init = True
  example_hparams = {"total_step": 10, "init_r": 4, "target_r": 2}
  reference = "HF PEFT 0.21 AdaLoraConfig"
  mergeable = True
  hparams = {
      "init_r": Field(12, "starting rank of every adapted matrix (the size of its leaves)", ge=1),
      "target_r": Field(8, "average rank the budget schedule prunes down to", ge=0),
      "tinit": Field(0, "warm-up steps before any pruning", ge=0),
      "tfinal": Field(0, "final steps that keep the reached rank pattern fixed", ge=0),
      "deltaT": Field(1, "prune every deltaT steps during the budgeting phase", ge=1),
      "beta1": Field(0.85, "EMA coefficient of the importance scores", gt=0, lt=1),
      "beta2": Field(0.85, "EMA coefficient of the importance uncertainty", gt=0, lt=1),
      "orth_reg_weight": Field(0.5, "weight of the loss term pushing A and B towards orthogonality",
                               ge=0),
      "total_step": Field(None, "total training steps, the schedule's end (required for training)",
                          "int", ge=1),
      "lora_alpha": Field(8, "scale numerator: s = lora_alpha / init_r (lora_alpha <= 0: s ~ 1)",
                          "float"),
      "lora_dropout": Field(0.0, "dropout on the input of A during training", ge=0, lt=1),
      "init_lora_weights": Field(True, "True: E = 0, A, B ~ N(0, 0.02^2) (the base model at init); "
                                 "False: all N(0, 1)"),
      "target_modules": Field(None, "modules to adapt (none: q, k, v, o, wi, wo on T5; q, v on "
                              "LLaMA)", "names"),
      **targets.SELECTION,
  }

  # ------------------------------------------------------------------ placement
  def placement(self, cfg, hp, flat) -> targets.Placement:
    mods = targets.linear_modules(flat)
    defaults = targets.default_targets(cfg, "ADALORA")
    if hp.get("target_modules") is None:
      # HF skips default names that match nothing (``wi`` on a gated T5)
      ok = []
      for t in defaults:
        try:
          targets.match_targets(cfg, mods, [t])
          ok.append(t)
        except PeftConfigError:
          pass
      defaults = ok or defaults
    return targets.place(cfg, hp, flat, defaults, modules=mods)

  def scaling(self, hp):
    r = int(hp["init_r"])
    alpha = hp["lora_alpha"] if hp["lora_alpha"] > 0 else float(r)
    return alpha / (r + 1e-5)

  def _units(self, cfg, hp, flat):
    """[(module, bool[n_layers] or None)] and the number of adapted matrices n."""
    pl = self.placement(cfg, hp, flat)
    units = [(m, pl.layers.get(m.path)) for m in pl.modules]
    n = sum(len(pl.selected(m)) for m in pl.modules)
    return pl, units, n

  def budgets(self, cfg, hp, flat):
    """``(init_bgt, target_bgt)``."""
    _, _, n = self._units(cfg, hp, flat)
    return int(hp["init_r"]) * n, int(hp["target_r"]) * n

  def validate(self, cfg, hp, flat):
    def pos_int(k, lo=1):
      v = hp[k]
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
        raise PeftConfigError(f"{k} must be an int >= {lo}, got {v!r}")
    pos_int("init_r")
    pos_int("target_r", 0)
    pos_int("tinit", 0)
    pos_int("tfinal", 0)
    pos_int("deltaT")
    for k in ("beta1", "beta2"):
      if not 0.0 < float(hp[k]) < 1.0:
        raise PeftConfigError(f"{k} must be in (0, 1), got {hp[k]!r}")
    if float(hp["orth_reg_weight"]) < 0:
      raise PeftConfigError(f"orth_reg_weight must be >= 0, got {hp['orth_reg_weight']!r}")
    if hp["target_r"] > hp["init_r"]:
      raise PeftConfigError(f"target_r={hp['target_r']} must be <= init_r={hp['init_r']}")
    if not 0.0 <= float(hp["lora_dropout"]) < 1.0:
      raise PeftConfigError(f"lora_dropout must be in [0, 1), got {hp['lora_dropout']!r}")
    if hp["init_lora_weights"] not in (True, False):
      raise PeftConfigError(f"init_lora_weights must be True or False, got {hp['init_lora_weights']!r}")
    if hp["total_step"] is not None:
      pos_int("total_step")
      if hp["tinit"] >= hp["total_step"] - hp["tfinal"]:
        raise PeftConfigError("the schedule leaves no budgeting phase: need tinit < total_step - "
                              f"tfinal (tinit={hp['tinit']}, tfinal={hp['tfinal']}, "
                              f"total_step={hp['total_step']})")
    pl = self.placement(cfg, hp, flat)
    for m in pl.modules:
      if hp["init_r"] > min(m.d_in, m.d_out):
        raise PeftConfigError(f"init_r={hp['init_r']} is larger than layer {m.path} allows "
                              f"(kernel [in={m.d_in}, out={m.d_out}])")

  # ------------------------------------------------------------------ leaves
  def init_leaves(self, cfg, hp, flat, rng):
    pl = self.placement(cfg, hp, flat)
    r = int(hp["init_r"])
    std = 0.02 if hp["init_lora_weights"] else 1.0
    rnd = Rand(rng)
    out = {}
    for m in pl.modules:
      w = flat[m.leaf]
      lead = (m.n_layers,) if m.stacked else ()
      a = jnp.swapaxes(rnd.normal(lead + (r, m.d_in), std), -1, -2)
      b = jnp.swapaxes(rnd.normal(lead + (m.d_out, r), std), -1, -2)
      e = rnd.normal(lead + (r,), 1.0) if not hp["init_lora_weights"] else jnp.zeros(lead + (r,))
      sel = pl.layers.get(m.path)
      for leaf, v in (("adalora_A", a), ("adalora_B", b), ("adalora_E", e)):
        lm = targets.layer_mask(m, sel, v.ndim)
        if lm is not None:
          v = jnp.where(lm, v, 0.0)
        out[f"{m.path}/{leaf}"] = v.astype(adapter_dtype(w.dtype))
    return out

  def update_masks(self, cfg, hp, flat):
    pl = self.placement(cfg, hp, flat)
    out = {}
    for m in pl.modules:
      for leaf, nd in (("adalora_A", 3), ("adalora_B", 3), ("adalora_E", 2)):
        lm = targets.layer_mask(m, pl.layers.get(m.path), nd)
        if lm is not None and f"{m.path}/{leaf}" in flat:
          out[f"{m.path}/{leaf}"] = lm
    return out

  def changed_params(self, cfg, hp, flat):
    return targets.dense_changed_params(self.placement(cfg, hp, flat))

  def handlers(self, cfg, hp):
    return (AdaLoraHandler(scale=float(self.scaling(hp)), rate=float(hp["lora_dropout"])),)

  # ------------------------------------------------------------------ hooks
  def loss_terms(self, cfg, hp, flat):
    w = float(hp["orth_reg_weight"])
    _, units, n = self._units(cfg, hp, flat)
    if n == 0:
      return None
    total = jnp.zeros((), jnp.float32)
    for m, sel in units:
      a = jnp.asarray(flat[f"{m.path}/adalora_A"], jnp.float32)
      b = jnp.asarray(flat[f"{m.path}/adalora_B"], jnp.float32)
      eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
      ra = jnp.sqrt(jnp.sum(jnp.square(jnp.einsum("...ir,...is->...rs", a, a) - eye), axis=(-2, -1)))
      rb = jnp.sqrt(jnp.sum(jnp.square(jnp.einsum("...ro,...so->...rs", b, b) - eye), axis=(-2, -1)))
      v = ra + rb
      if sel is not None and m.stacked:
        v = v * jnp.asarray(sel, jnp.float32)
      total = total + jnp.sum(v)
    return w * total / (2 * n)

  def init_hook_state(self, cfg, hp, flat):
    if hp["total_step"] is None:
      raise PeftConfigError("AdaLoRA needs total_step (the number of training steps) to schedule "
                            "its rank budget; set total_step > 0")
    _, units, _ = self._units(cfg, hp, flat)
    z = {}
    for m, _ in units:
      for leaf in LEAVES:
        k = f"{m.path}/{leaf}"
        z[k] = jnp.zeros(flat[k].shape, jnp.float32)
    pattern = {f"{m.path}/adalora_E": jnp.ones(flat[f"{m.path}/adalora_E"].shape, bool)
               for m, _ in units}
    return {"ipt": z, "unc": dict(z), "pattern": pattern}

  def schedule_tables(self, cfg, hp, flat):
    """``(budget[s], prune[s])`` for ``s = 0 .. total_step - tfinal`` (numpy)."""
    init_bgt, target_bgt = self.budgets(cfg, hp, flat)
    t_end = int(hp["total_step"]) - int(hp["tfinal"])
    rows = [budget_schedule(hp, init_bgt, target_bgt, s) for s in range(t_end + 1)]
    return (np.asarray([b for b, _ in rows], np.int32), np.asarray([p for _, p in rows], bool))

  def after_step(self, cfg, hp, step, flat, grads, hook_state):
    _, units, _ = self._units(cfg, hp, flat)
    init_bgt, _ = self.budgets(cfg, hp, flat)
    t_end = int(hp["total_step"]) - int(hp["tfinal"])
    budget_tab, prune_tab = self.schedule_tables(cfg, hp, flat)
    b1, b2 = float(hp["beta1"]), float(hp["beta2"])
    step = jnp.asarray(step, jnp.int32)
    in_budget, at_end, after = step < t_end, step == t_end, step > t_end
    idx = jnp.clip(step, 0, t_end)

    ipt, unc = dict(hook_state["ipt"]), dict(hook_state["unc"])
    for k in ipt:
      p = jnp.asarray(flat[k], jnp.float32)
      i = jnp.abs(p * jnp.asarray(grads[k], jnp.float32))
      e = b1 * ipt[k] + (1 - b1) * i
      u = b2 * unc[k] + (1 - b2) * jnp.abs(i - e)
      ipt[k] = jnp.where(in_budget, e, ipt[k])
      unc[k] = jnp.where(in_budget, u, unc[k])

    # triplet scores [.., r] per module; layers outside a selection never compete
    scores: Dict[str, jnp.ndarray] = {}
    for m, sel in units:
      s = lambda leaf: ipt[f"{m.path}/{leaf}"] * unc[f"{m.path}/{leaf}"]  # noqa: E731
      sc = s("adalora_E") + jnp.mean(s("adalora_A"), axis=-2) + jnp.mean(s("adalora_B"), axis=-1)
      if sel is not None and m.stacked:
        sc = jnp.where(jnp.asarray(sel)[:, None], sc, jnp.inf)
      scores[f"{m.path}/adalora_E"] = sc
    allsc = jnp.sort(jnp.concatenate([v.reshape(-1) for v in scores.values()]))
    budget = jnp.asarray(budget_tab)[idx]
    kth = init_bgt - budget
    thr = jnp.where(kth >= 1, allsc[jnp.clip(kth - 1, 0, allsc.shape[0] - 1)], -jnp.inf)
    prune = at_end | (in_budget & jnp.asarray(prune_tab)[idx])

    out = dict(flat)
    pattern = dict(hook_state["pattern"])
    for k, sc in scores.items():
      keep_new = sc > thr
      pat = jnp.where(prune, keep_new, pattern[k])
      pattern[k] = pat
      e = jnp.asarray(flat[k])
      out[k] = jnp.where((prune | after) & ~pat, jnp.zeros_like(e), e)
    for k in ipt:   # HF resets the averages once the final pattern is fixed
      ipt[k] = jnp.where(at_end, jnp.zeros_like(ipt[k]), ipt[k])
      unc[k] = jnp.where(at_end, jnp.zeros_like(unc[k]), unc[k])
    return out, {"ipt": ipt, "unc": unc, "pattern": pattern}

  # ------------------------------------------------------------------ merge
  def _modules(self, flat):
    return sorted(k[: -len("/adalora_A")] for k in flat if k.endswith("/adalora_A"))

  def delta(self, hp, flat, p):
    a = jnp.asarray(flat[f"{p}/adalora_A"], jnp.float32)
    b = jnp.asarray(flat[f"{p}/adalora_B"], jnp.float32)
    e = jnp.asarray(flat[f"{p}/adalora_E"], jnp.float32)
    return jnp.einsum("...ir,...ro->...io", a * e[..., None, :], b) * self.scaling(hp)

  # ------------------------------------------------------------------ HF PEFT (AdaLoraConfig)
  hf_peft_type = "ADALORA"

  @property
  def hf_fields(self):
    """Every field of peft 0.21's AdaLoraConfig: LoraConfig's (see ``lora.py``) with AdaLoRA's
    own schedule; ``r`` is unused (``init_r`` is the rank)."""
    from peft_jax.peft.lora import Lora
    out = dict(Lora.hf_fields)
    out.update({k: "used" for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1",
                                    "beta2", "orth_reg_weight", "total_step")})
    out.update(r="noop", use_rslora=((False,), "rank-stabilised scaling"),
               use_dora=((False,), "DoRA"), alpha_pattern=(({}, None), "per-module alphas"),
               lora_bias=((False,), "a trained bias on lora_B"),
               trainable_token_indices=((None,), "trained token embedding rows"))
    return out

  def hf_export(self, state, params):
    """``...<module>.lora_A [r, in]``, ``lora_B [out, r]``, ``lora_E [r, 1]``. A pruned
    adapter (some lambdas, entries of ``adalora_E``, are zero and some are not) is written
    as HF's own pruned adapters are: ``rank_pattern`` ``{"<module>.lora_E": [kept, ...]}``
    (a rank is kept iff its lambda is non-zero) and every tensor cut to its module's kept
    ranks, which HF's ``resize_modules_by_rank_pattern`` restores on load (the scaling
    keeps ``init_r``). An unpruned adapter (all lambdas non-zero, or all zero as at
    init) is written at the full ``init_r`` with ``rank_pattern=None``."""
    from peft_jax.peft import hf_peft
    hp = state.hparams
    raw = hf_tensors(state, params)
    keep = {k[: -len(".lora_E")]: np.asarray(v)[:, 0] != 0 for k, v in raw.items()
            if k.endswith(".lora_E")}
    kept = np.concatenate(list(keep.values())) if keep else np.ones(0, bool)
    rank_pattern = None
    if kept.any() and not kept.all():
      rank_pattern = {f"{m}.lora_E": [bool(x) for x in k] for m, k in sorted(keep.items())}
      for k in list(raw):
        mod, leaf = k.rsplit(".", 1)
        idx = keep[mod]
        raw[k] = raw[k][:, idx] if leaf == "lora_B" else raw[k][idx]
    tensors = {f"{hf_peft.PREFIX}{k}": hf_peft.np32(v) for k, v in raw.items()}
    names = sorted({k.rsplit(".", 1)[0][len(hf_peft.PREFIX):] for k in tensors})
    fields = dict(init_r=int(hp["init_r"]), target_r=int(hp["target_r"]), tinit=int(hp["tinit"]),
                  tfinal=int(hp["tfinal"]), deltaT=int(hp["deltaT"]), beta1=float(hp["beta1"]),
                  beta2=float(hp["beta2"]), orth_reg_weight=float(hp["orth_reg_weight"]),
                  total_step=hp["total_step"], lora_alpha=hp["lora_alpha"],
                  lora_dropout=float(hp["lora_dropout"]), target_modules=hf_peft.regex(names),
                  rank_pattern=rank_pattern, bias="none", fan_in_fan_out=False,
                  init_lora_weights=True, layers_to_transform=None, layers_pattern=None,
                  modules_to_save=None)
    return fields, tensors

  def hf_import(self, conf, tensors, cfg, base_params, path):
    from peft_jax.peft import hf_peft
    from peft_jax.peft.base import apply_peft
    from peft_jax.tree import flatten
    from peft_jax.peft.lora import check_bias
    check_bias(conf.get("bias", "none"), flatten(base_params))
    found = hf_peft.found_modules(cfg, flatten(base_params), tensors, ".lora_E")
    if not found:
      raise PeftConfigError(f"no lora_E tensors in {path}")
    hp = {k: conf[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1",
                                 "beta2", "orth_reg_weight", "total_step", "lora_alpha")
          if conf.get(k) is not None}
    hp["lora_dropout"] = float(conf.get("lora_dropout") or 0.0)
    hp.update(hf_peft.selection(found))
    state = apply_peft(cfg, base_params, "adalora", hp)
    ours = hf_peft.unprefixed(tensors)
    if conf.get("rank_pattern"):
      ours = expand_rank_pattern(conf["rank_pattern"], ours, int(state.hparams["init_r"]))
    return state, set_hf_tensors(state, state.params, ours)


def expand_rank_pattern(rank_pattern, tensors, init_r: int) -> Dict[str, np.ndarray]:
  """HF's pruned AdaLoRA tensors (cut to the ranks ``rank_pattern`` keeps,
  ``{"<module>.lora_E": [bool] * init_r}``) put back at their rank positions in full
  ``init_r`` tensors, zeros at the pruned ones (``lambda = 0``: the same update)."""
  if not isinstance(rank_pattern, dict):
    raise PeftConfigError(f"AdaLoRA rank_pattern={rank_pattern!r}: expected a "
                          "{'<module>.lora_E': [bool, ...]} dict")
  out = {}
  for key, keep in rank_pattern.items():
    mod = key[: -len(".lora_E")] if isinstance(key, str) and key.endswith(".lora_E") else None
    if mod is None:
      raise PeftConfigError(f"AdaLoRA rank_pattern key {key!r}: expected '<module>.lora_E'")
    if (not isinstance(keep, list) or len(keep) != init_r
        or not all(isinstance(x, bool) for x in keep)):
      raise PeftConfigError(f"AdaLoRA rank_pattern[{key!r}] must be a list of {init_r} booleans "
                            f"(init_r), got {keep!r}")
    idx = np.asarray(keep, bool)
    for leaf in ("lora_A", "lora_B", "lora_E"):
      name = f"{mod}.{leaf}"
      if name not in tensors:
        raise PeftConfigError(f"AdaLoRA rank_pattern names {key!r}, but the adapter has no "
                              f"tensor {name}")
      t = np.asarray(tensors[name])
      got = t.shape[1] if leaf == "lora_B" else t.shape[0]
      if got != int(idx.sum()):
        raise PeftConfigError(f"adapter tensor {name} has rank {got}; its rank_pattern keeps "
                              f"{int(idx.sum())} of {init_r}")
      if leaf == "lora_B":
        full = np.zeros((t.shape[0], init_r), t.dtype)
        full[:, idx] = t
      else:
        full = np.zeros((init_r,) + t.shape[1:], t.dtype)
        full[idx] = t
      out[name] = full
  return _Overlay(tensors, out)


class _Overlay(dict):
  """``tensors`` with some entries replaced; reads of the others go to ``tensors`` (so a
  :class:`~peft_jax.peft.hf_peft.Tracked` dict still records them)."""

  def __init__(self, tensors, replaced):
    super().__init__(replaced)
    self.tensors = tensors

  def __getitem__(self, k):
    return dict.__getitem__(self, k) if dict.__contains__(self, k) else self.tensors[k]

  def __contains__(self, k):
    return dict.__contains__(self, k) or k in self.tensors



def count_nonzero_ranks(state, params) -> int:
  """Non-zero lambdas (entries of ``adalora_E``) over the adapted matrices (selected layers)."""
  from peft_jax.peft.base import flatten
  fl = flatten(params)
  n = 0
  for k in fl:
    if k.endswith("/adalora_E"):
      v = np.asarray(fl[k]) != 0
      if k in state.update_masks:
        v = v & np.broadcast_to(state.update_masks[k], v.shape)
      n += int(v.sum())
  return n


_HF_LEAF = {"adalora_A": "lora_A", "adalora_B": "lora_B", "adalora_E": "lora_E"}


def _to_hf(leaf, v):
  return v[:, None] if leaf == "adalora_E" else v.T


def hf_tensors(state, params) -> Dict[str, np.ndarray]:
  """Our leaves as HF PEFT AdaLoRA tensors ``{"<hf module>.lora_A": [r, in], ...}`` (one per
  layer, full ``init_r``; HF's ``rank_pattern`` resizing is not applied)."""
  return targets.per_layer_tensors(state, params, _HF_LEAF, _to_hf)


def set_hf_tensors(state, params, tensors: Dict[str, np.ndarray]):
  """Inverse of :func:`hf_tensors`."""
  return targets.set_per_layer_tensors(state, params, tensors, _HF_LEAF,
                                 lambda leaf, t: t[:, 0] if leaf == "adalora_E" else t.T)
