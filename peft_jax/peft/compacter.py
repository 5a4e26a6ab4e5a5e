"""Compacter [compacter] and Compacter++ [compacter_pp] (Mahabadi et al. 2021), as
AdapterHub (``adapters`` 1.3.0) builds them.

What it adds. A bottleneck adapter (see :mod:`peft_jax.peft.adapters`, whose
placement, residual logic and handler are reused unchanged) whose down and up
projections are PHM layers: ``H = sum_i kron(C_i, W_i)`` with ``n = phm_dim``
"rule" matrices ``C_i [n, n]`` and ``W_i [in/n, out/n]``, ``y = x H + b``.
Defaults (AdapterHub's ``BnConfig`` PHM fields): ``phm_dim=4``,
``shared_phm_rule=True`` (one ``C [n, n, n]`` for every PHM layer of the model,
down *and* up), ``factorized_phm_rule=False``, ``shared_W_phm=False``,
``factorized_phm_W=True`` with ``phm_rank=1`` (``W_i = W_left_i @ W_right_i``,
the low-rank factorised second factor), ``phm_bias=True``,
``phm_c_init='normal'``, ``phm_init_range=1e-4``.

* ``compacter`` = ``CompacterConfig`` (``DoubleSeqBnConfig`` placement: after
  attention and after the FFN), ``reduction_factor=32``, ``non_linearity='gelu'``.
* ``compacter_pp`` = ``CompacterPlusPlusConfig`` (``SeqBnConfig`` placement:
  after the FFN, reading ``x + y``), ``reduction_factor=32``, ``non_linearity='gelu'``.

Stored leaves (``P`` a stack prefix, ``S`` the sub-layer, stacked ``[layers, ...]``)::

  P/adapter_S/{down,up}/W_left [L, n, in/n, rank]  W_right [L, n, rank, out/n]   (factorized_phm_W)
  P/adapter_S/{down,up}/W      [L, n, in/n, out/n]                               (otherwise)
  P/adapter_S/{down,up}/bias   [L, out]                                          (phm_bias)
  P/adapter_S/{down,up}/phm_rule [L, n, n, n] or phm_rule_left/right             (not shared_phm_rule)
  compacter_shared/phm_rule [n, n, n] (or phm_rule_left [n, n, 1], phm_rule_right [n, 1, n])
  compacter_shared/W_{down,up}_{left,right}                                      (shared_W_phm)

:meth:`prepare_params` (run before every forward by ``state.prepare`` /
``apply_fn``) evaluates the Kronecker sums into the plain ``down/kernel`` and
``up/kernel`` that the bottleneck handler reads, so gradients reach the
factors and the shared rule.

Initialisation as AdapterHub's (which ``init_weights='bert'`` leaves alone: PHM
layers are not ``nn.Linear``): ``W`` factors ``xavier_normal`` per ``i``
(AdapterHub's ``init_W`` tests ``if hypercomplex_nonlinearity:`` first, so every
value of that option ends up xavier-normal), biases 0, shared rule
``N(0, phm_init_range)`` (``'uniform'``: ``U(-1, 1)``), per-layer rules
``N(0, 0.01)`` (``U(+-0.01)``). Rejected (AdapterHub fails or ignores them):
``init_weights`` other than ``'bert'`` (PHM layers have no ``.weight``),
``shared_W_phm`` without ``factorized_phm_W`` (``NameError`` there),
``learn_phm=False`` (``train_adapter`` re-enables the gradients anyway).
"""

from __future__ import annotations

import math
from typing import Dict

import jax
import jax.numpy as jnp

from peft_jax.fields import Field
from peft_jax.models.config import as_dtype
from peft_jax.peft import adapters
from peft_jax.peft.base import Flat, PeftConfigError, register

SHARED = "compacter_shared"

#: BnConfig's PHM fields (adapters 1.3.0), with its defaults and ``phm_layer=True``.
PHM: Dict[str, Field] = {
    "phm_layer": Field(True, "PHM down/up projections (False would be a plain adapter: use "
                       "houlsby/pfeiffer)"),
    "phm_dim": Field(4, "number n of Kronecker summands; hidden and bottleneck sizes must divide "
                     "by n", ge=1),
    "factorized_phm_W": Field(True, "each W_i as a rank-phm_rank product W_left @ W_right"),
    "shared_W_phm": Field(False, "one set of W factors for every layer (needs factorized_phm_W)"),
    "shared_phm_rule": Field(True, "one set of rule matrices C_i for every PHM layer of the model"),
    "factorized_phm_rule": Field(False, "each C_i as the product of an [n, 1] and a [1, n] factor"),
    "phm_c_init": Field("normal", "init of the rule matrices: normal or uniform",
                        choices=("normal", "uniform")),
    "phm_init_range": Field(0.0001, "std of the shared rule matrices' normal init"),
    "learn_phm": Field(True, "train the rule matrices (False is rejected)"),
    "hypercomplex_nonlinearity": Field("glorot-uniform", "AdapterHub's W init option (every value "
                                       "gives xavier-normal there and here)",
                                       choices=("phm", "glorot-normal", "glorot-uniform",
                                                "normal")),
    "phm_rank": Field(1, "rank of the factorised W_i", ge=1),
    "phm_bias": Field(True, "a bias on the PHM down and up projections"),
}

COMPACTER = dict(adapters.with_defaults(adapters.HOULSBY, reduction_factor=32, non_linearity="gelu"), **PHM)
COMPACTER_PP = dict(adapters.with_defaults(adapters.PFEIFFER, reduction_factor=32, non_linearity="gelu"), **PHM)


def kron_sum(rule, w):
  """``sum_i kron(rule[i], w[i])`` for ``rule [..., n, p, q]``, ``w [..., n, r, s]`` -> ``[..., p*r, q*s]``."""
  out = jnp.einsum("...iab,...ikl->...akbl", rule, w)
  sh = out.shape
  return out.reshape(sh[:-4] + (sh[-4] * sh[-3], sh[-2] * sh[-1]))


def _xavier_normal(key, shape):
  """torch ``xavier_normal_`` on each ``[a, b]`` slice of ``shape [..., a, b]``."""
  std = math.sqrt(2.0 / (shape[-1] + shape[-2]))
  return std * jax.random.normal(key, shape, jnp.float32)


class _Compacter(adapters._Bottleneck):
  example_hparams = {"reduction_factor": 8}     # a bottleneck phm_dim divides on tiny models
  mergeable = False

  def _bn_hp(self, hp):
    return dict(hp, phm_layer=False)

  def validate(self, model_cfg, hp, flat: Flat) -> None:
    super().validate(model_cfg, self._bn_hp(hp), flat)
    n = hp["phm_dim"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise PeftConfigError(f"{self.name}: phm_dim must be a positive int, got {n!r}")
    r = hp["phm_rank"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
      raise PeftConfigError(f"{self.name}: phm_rank must be a positive int, got {r!r}")
    if not hp["phm_layer"]:
      raise PeftConfigError(f"{self.name}: phm_layer=False is a plain adapter; use 'houlsby'/'pfeiffer'")
    if hp["init_weights"] != "bert":
      raise PeftConfigError(f"{self.name}: init_weights={hp['init_weights']!r} is unsupported: AdapterHub "
                            "only runs 'bert' with PHM layers (which it leaves at their own init)")
    if hp["phm_c_init"] not in ("normal", "uniform"):
      raise PeftConfigError(f"{self.name}: phm_c_init must be 'normal' or 'uniform', got {hp['phm_c_init']!r}")
    if hp["hypercomplex_nonlinearity"] not in ("phm", "glorot-normal", "glorot-uniform", "normal"):
      raise PeftConfigError(f"{self.name}: unknown hypercomplex_nonlinearity {hp['hypercomplex_nonlinearity']!r}")
    if not hp["learn_phm"]:
      raise PeftConfigError(f"{self.name}: learn_phm=False is not supported (AdapterHub's train_adapter "
                            "makes the rule trainable regardless)")
    hidden = adapters._hidden(model_cfg)
    sizes = adapters.bottleneck_sizes(model_cfg, self._bn_hp(hp))
    for (prefix, site), m in sizes.items():
      for what, v in (("hidden size", hidden), ("bottleneck size", m)):
        if v % n:
          raise PeftConfigError(f"{self.name}: the {what} {v} at {prefix}/{site} is not divisible by "
                                f"phm_dim={n} (choose reduction_factor/bottleneck_size accordingly)")
    if hp["shared_W_phm"]:
      if not hp["factorized_phm_W"]:
        raise PeftConfigError(f"{self.name}: shared_W_phm=True needs factorized_phm_W=True "
                              "(AdapterHub fails otherwise)")
      if len(set(sizes.values())) != 1 or hp["bottleneck_size"] is not None or isinstance(
          hp["reduction_factor"], dict):
        raise PeftConfigError(f"{self.name}: shared_W_phm=True needs one scalar reduction_factor "
                              "(one bottleneck size everywhere)")

  # ------------------------------------------------------------------ leaves
  def _factor_shapes(self, hp, d_in, d_out):
    n, r = hp["phm_dim"], hp["phm_rank"]
    if hp["factorized_phm_W"]:
      return {"W_left": (n, d_in // n, r), "W_right": (n, r, d_out // n)}
    return {"W": (n, d_in // n, d_out // n)}

  def _rule_shapes(self, hp):
    n = hp["phm_dim"]
    if hp["factorized_phm_rule"]:
      return {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)}
    return {"phm_rule": (n, n, n)}

  def init_leaves(self, model_cfg, hp, flat: Flat, rng) -> Flat:
    bhp = self._bn_hp(hp)
    dtype = as_dtype(model_cfg.param_dtype)
    hidden = adapters._hidden(model_cfg)
    seed = hp["init_weights_seed"]
    out: Flat = {}
    counter = [0]

    def key():
      counter[0] += 1
      return jax.random.fold_in(rng, counter[0])

    def rule(shape, shared):
      k = key()
      if hp["phm_c_init"] == "normal":
        std = hp["phm_init_range"] if shared else 0.01
        return std * jax.random.normal(k, shape, jnp.float32)
      lim = 1.0 if shared else 0.01
      return jax.random.uniform(k, shape, jnp.float32, -lim, lim)

    stacks = {p: n for p, n, _, _ in adapters._sites_of(model_cfg)}
    for (prefix, site), m in sorted(adapters.bottleneck_sizes(model_cfg, bhp).items()):
      L = stacks[prefix]
      on = adapters.active_layers(model_cfg, bhp, prefix)
      leaves = {}
      for proj, (din, dout) in (("down", (hidden, m)), ("up", (m, hidden))):
        if not hp["shared_W_phm"]:
          for j, (nm, sh) in enumerate(self._factor_shapes(hp, din, dout).items()):
            if seed is not None:   # AdapterHub: every module starts the same
              v = _xavier_normal(jax.random.fold_in(jax.random.PRNGKey(seed), 2 * (proj == "up") + j), sh)
              v = jnp.broadcast_to(v, (L,) + sh)
            else:
              v = _xavier_normal(key(), (L,) + sh)
            leaves[f"{proj}/{nm}"] = v
        if hp["phm_bias"]:
          leaves[f"{proj}/bias"] = jnp.zeros((L, dout), jnp.float32)
        if not hp["shared_phm_rule"]:
          for nm, sh in self._rule_shapes(hp).items():
            leaves[f"{proj}/{nm}"] = rule((L,) + sh, shared=False)
      if not on.all():
        leaves = {k: jnp.where(on.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.zeros_like(v))
                  for k, v in leaves.items()}
        leaves["layer_on"] = jnp.asarray(on, jnp.float32)
      for nm, arr in leaves.items():
        out[f"{prefix}/adapter_{site}/{nm}"] = arr.astype(dtype)
    if hp["shared_phm_rule"]:
      for nm, sh in self._rule_shapes(hp).items():
        out[f"{SHARED}/{nm}"] = rule(sh, shared=True).astype(dtype)
    if hp["shared_W_phm"]:
      m = next(iter(adapters.bottleneck_sizes(model_cfg, bhp).values()))
      for proj, (din, dout) in (("down", (hidden, m)), ("up", (m, hidden))):
        for nm, sh in self._factor_shapes(hp, din, dout).items():
          side = nm.split("_")[1]
          out[f"{SHARED}/W_{proj}_{side}"] = _xavier_normal(key(), sh).astype(dtype)
    return out

  def update_masks(self, model_cfg, hp, flat: Flat):
    return super().update_masks(model_cfg, self._bn_hp(hp), flat)

  # ------------------------------------------------------------------ forward
  def prepare_params(self, model_cfg, hp, flat: Flat) -> Flat:
    out = dict(flat)
    hidden = adapters._hidden(model_cfg)
    f32 = lambda k: jnp.asarray(flat[k], jnp.float32)  # noqa: E731
    stacks = {p: n for p, n, _, _ in adapters._sites_of(model_cfg)}
    for (prefix, site), m in adapters.bottleneck_sizes(model_cfg, self._bn_hp(hp)).items():
      head = f"{prefix}/adapter_{site}"
      for proj, dout in (("down", m), ("up", hidden)):
        if hp["shared_phm_rule"]:
          src = lambda nm: f32(f"{SHARED}/{nm}")  # noqa: E731
        else:
          src = lambda nm: f32(f"{head}/{proj}/{nm}")  # noqa: E731
        rule = (jnp.matmul(src("phm_rule_left"), src("phm_rule_right")) if hp["factorized_phm_rule"]
                else src("phm_rule"))
        if hp["shared_W_phm"]:
          w = jnp.matmul(f32(f"{SHARED}/W_{proj}_left"), f32(f"{SHARED}/W_{proj}_right"))
        elif hp["factorized_phm_W"]:
          w = jnp.matmul(f32(f"{head}/{proj}/W_left"), f32(f"{head}/{proj}/W_right"))
        else:
          w = f32(f"{head}/{proj}/W")
        if rule.ndim == 3 and w.ndim == 4:
          rule = jnp.broadcast_to(rule, (w.shape[0],) + rule.shape)
        kern = kron_sum(rule, w)
        if kern.ndim == 2:
          kern = jnp.broadcast_to(kern, (stacks[prefix],) + kern.shape)
        pdt = as_dtype(model_cfg.param_dtype)
        out[f"{head}/{proj}/kernel"] = kern.astype(pdt)
        if f"{head}/{proj}/bias" not in flat:
          out[f"{head}/{proj}/bias"] = jnp.zeros((kern.shape[0], dout), pdt)
    return out


def phm_param_count(hidden: int, m: int, hp) -> int:
  """Parameters of one Compacter module (both PHM layers), excluding shared leaves."""
  n, r = hp["phm_dim"], hp["phm_rank"]
  tot = 0
  for din, dout in ((hidden, m), (m, hidden)):
    if not hp["shared_W_phm"]:
      tot += n * (din // n) * r + n * r * (dout // n) if hp["factorized_phm_W"] else n * (din // n) * (dout // n)
    if hp["phm_bias"]:
      tot += dout
    if not hp["shared_phm_rule"]:
      tot += 2 * n * n if hp["factorized_phm_rule"] else n ** 3
  return tot


@register
class Compacter(_Compacter):
  """PHM adapters after attention and FFN (AdapterHub ``CompacterConfig``)."""
  name = "compacter"
  hparams = COMPACTER
  reference = "AdapterHub adapters 1.3.0 CompacterConfig ('compacter', Mahabadi et al. 2021)"


@register
class CompacterPP(_Compacter):
  """PHM adapter after the FFN only (AdapterHub ``CompacterPlusPlusConfig``)."""
  name = "compacter_pp"
  hparams = COMPACTER_PP
  reference = "AdapterHub adapters 1.3.0 CompacterPlusPlusConfig ('compacter++', Mahabadi et al. 2021)"

