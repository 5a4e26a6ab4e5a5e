"""Mix-and-Match adapter [mam] (He et al. 2021), as AdapterHub's ``MAMConfig``
(``adapters`` 1.3.0), plus AdapterHub-style prefix tuning shared with UniPELT.

What it adds. ``MAMConfig() = ConfigUnion(PrefixTuningConfig(bottleneck_size=800),
ParBnConfig())``:

* **prefix tuning the AdapterHub way** (differs from our HF-PEFT-oriented
  :mod:`peft_jax.peft.prefix_tuning`): on T5 *every* attention gets a prefix
  (``encoder_prefix=True``: encoder self-attention, decoder self-attention
  always, ``cross_prefix=True``: cross-attention); LLaMA: self-attention. Each
  location (AdapterHub's ``encoder_prefix``, ``self_prefix``, ``cross_prefix``)
  has its own reparameterisation ``wte [P, hidden]`` (``nn.Embedding``, N(0, 1))
  -> ``Linear(hidden, bottleneck)`` -> ``tanh`` -> ``Linear(bottleneck, L * 2 *
  kv_heads * head_dim)`` (torch default init), evaluated by
  :meth:`prepare_params` into per-layer ``prefix_key``/``prefix_value`` (layer
  ``l``: rows ``2l`` key, ``2l+1`` value), ``prefix_length=30``,
  ``prefix_bottleneck_size=800``. ``prefix_flat=True``: AdapterHub's
  ``flat=True`` (one ``control_trans`` vector, N(0, 1)).
  Positions as AdapterHub's T5: queries keep positions ``0..T-1`` and the key
  axis becomes ``0..P+S-1`` (prefix first), so the relative position bias of
  the token-token pairs is that of ``(j + P) - i``; cross-attention prefixes
  get zero bias. LLaMA: token RoPE positions unchanged, prefix keys un-rotated.
* a **parallel adapter** at the FFN exactly as our ``parallel`` method
  (``ParBnConfig``: ``reduction_factor=2``, ``scaling=4.0``, relu,
  ``init_weights='mam_adapter'``); its hyperparameters keep ``BnConfig`` names.

Prefix hyperparameters are namespaced: ``prefix_length``,
``prefix_bottleneck_size``, ``prefix_non_linearity``, ``prefix_flat``,
``encoder_prefix``, ``cross_prefix``. Not supported (rejected): prefix
``dropout`` > 0 and prefix ``leave_out``.

Leaves: ``ah_prefix/<location>/{wte, control_trans_0/{kernel,bias},
control_trans_2/{kernel,bias}}`` (or ``control_trans``), plus the adapter leaves
of :mod:`peft_jax.peft.adapters`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, FrozenSet, List, Tuple

import jax
import jax.numpy as jnp

from peft_jax.fields import Field
from peft_jax.models.config import as_dtype
from peft_jax.models.family import SELF_ATTENTION_STACK, family_of
from peft_jax.peft import adapters
from peft_jax.peft.base import Flat, Method, PeftConfigError, register
from peft_jax.peft.common import Rand
from peft_jax.peft.prefix_tuning import token_dim

ROOT = "ah_prefix"

#: AdapterHub's PrefixTuningConfig fields (adapters 1.3.0), namespaced ``prefix_*`` where
#: the name alone would clash with the adapter's, with its defaults.
PREFIX: Dict[str, Field] = {
    "prefix_length": Field(30, "number of prefix positions in front of each attention's "
                           "keys/values", ge=1),
    "prefix_bottleneck_size": Field(512, "hidden width of the prefix MLP (unless prefix_flat)",
                                    ge=1),
    "prefix_non_linearity": Field("tanh", "activation of the prefix MLP (transformers names, any "
                                  "case)", check_fn=adapters._activation_problem),
    "prefix_flat": Field(False, "train the prefixes directly, without the MLP reparameterisation"),
    "encoder_prefix": Field(True, "T5: prefixes in the encoder self-attention too"),
    "cross_prefix": Field(True, "T5: prefixes in the decoder cross-attention too"),
    "prefix_dropout": Field(0.0, "dropout in the prefix module (only 0 is supported)"),
    "prefix_leave_out": Field((), "layer ids without a prefix (only empty is supported)", "any"),
}


#: attention kind -> (AdapterHub's location key, the hyperparameter that enables it or None)
LOCATIONS = {"encoder_self_attn": ("encoder_prefix", "encoder_prefix"),
             "decoder_self_attn": ("self_prefix", None), "self_attn": ("self_prefix", None),
             "cross_attn": ("cross_prefix", "cross_prefix")}


def prefix_locations(cfg, hp) -> List[Tuple[str, str, int]]:
  """``[(AdapterHub location key, attention path, layers)]``."""
  out = []
  for kind, path, n in family_of(cfg).attentions(cfg):
    loc, flag = LOCATIONS[kind]
    if flag is None or hp[flag]:
      out.append((loc, path, n))
  return out


def validate_prefix(name, cfg, hp, flat):
  n = hp["prefix_length"]
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise PeftConfigError(f"{name}: prefix_length must be a positive int, got {n!r}")
  b = hp["prefix_bottleneck_size"]
  if isinstance(b, bool) or not isinstance(b, int) or b < 1:
    raise PeftConfigError(f"{name}: prefix_bottleneck_size must be a positive int, got {b!r}")
  nl = hp["prefix_non_linearity"]
  if not isinstance(nl, str) or nl.lower() not in adapters.ACTIVATIONS:
    raise PeftConfigError(f"{name}: unknown prefix_non_linearity {nl!r}")
  if hp["prefix_dropout"]:
    raise PeftConfigError(f"{name}: prefix_dropout > 0 is not supported")
  if tuple(hp["prefix_leave_out"]):
    raise PeftConfigError(f"{name}: prefix_leave_out is not supported")
  fam = family_of(cfg)
  if fam.layout == "causal" and fam.head_dim(cfg) * fam.num_heads(cfg) != fam.hidden_size(cfg):
    raise PeftConfigError(f"{name}: AdapterHub sizes a decoder-only model's prefixes with "
                          "hidden_size // heads; this config has head_dim * heads != hidden_size")
  for _, path, _ in prefix_locations(cfg, hp):
    if f"{path}/k/kernel" not in flat:
      raise PeftConfigError(f"{name}: the model has no attention at {path}")


def _hidden(cfg):
  return family_of(cfg).hidden_size(cfg)


def init_prefix(cfg, hp, rng) -> Flat:
  rnd = Rand(rng)
  d, P, b, td = _hidden(cfg), hp["prefix_length"], hp["prefix_bottleneck_size"], token_dim(cfg)
  out = {}
  for loc, _, L in prefix_locations(cfg, hp):
    head = f"{ROOT}/{loc}"
    if hp["prefix_flat"]:
      out[f"{head}/control_trans"] = rnd.normal((P * L * 2 * td,))
      continue
    out[f"{head}/wte"] = rnd.normal((P, d))
    for i, (fi, fo) in ((0, (d, b)), (2, (b, L * 2 * td))):
      bound = 1.0 / math.sqrt(fi)
      out[f"{head}/control_trans_{i}/kernel"] = rnd.uniform((fi, fo), -bound, bound)
      out[f"{head}/control_trans_{i}/bias"] = rnd.uniform((fo,), -bound, bound)
  return out


def project_prefix(cfg, hp, flat) -> Flat:
  """The stored reparameterisation -> ``{<attention>/prefix_key|prefix_value: [L, P, td]}``."""
  P, td = hp["prefix_length"], token_dim(cfg)
  act = adapters.ACTIVATIONS[hp["prefix_non_linearity"].lower()]
  f32 = lambda k: jnp.asarray(flat[k], jnp.float32)  # noqa: E731
  out = {}
  for loc, path, L in prefix_locations(cfg, hp):
    head = f"{ROOT}/{loc}"
    if hp["prefix_flat"]:
      kv = f32(f"{head}/control_trans")
      dtype = flat[f"{head}/control_trans"].dtype
    else:
      h = act(f32(f"{head}/wte") @ f32(f"{head}/control_trans_0/kernel") + f32(f"{head}/control_trans_0/bias"))
      kv = h @ f32(f"{head}/control_trans_2/kernel") + f32(f"{head}/control_trans_2/bias")
      dtype = flat[f"{head}/wte"].dtype
    kv = jnp.transpose(kv.reshape(P, L, 2, td), (1, 2, 0, 3))      # [L, 2, P, td]
    out[f"{path}/prefix_key"] = kv[:, 0].astype(dtype)
    out[f"{path}/prefix_value"] = kv[:, 1].astype(dtype)
  return out


def prefix_param_count(cfg, hp) -> int:
  d, P, b, td = _hidden(cfg), hp["prefix_length"], hp["prefix_bottleneck_size"], token_dim(cfg)
  tot = 0
  for _, _, L in prefix_locations(cfg, hp):
    out = L * 2 * td
    tot += P * out if hp["prefix_flat"] else P * d + d * b + b + b * out + out
  return tot


# ----------------------------------------------------------------------------- handler

#: inputs of each attention's query projection during one trace, keyed by the attention's
#: scope path; the ``linear`` site of ``q`` writes, the same attention's ``attention_kv`` reads
#: (AdapterHub's prefix gate reads the attention's input, which that site does not carry).
_ATTN_INPUT: Dict[Tuple[str, ...], Any] = {}


def _gate_value(p, x):
  """AdapterHub's gate: ``mean_t sigmoid(x W + b)`` -> ``[B, outputs]`` (fp32)."""
  z = jnp.dot(x.astype(jnp.float32), p["kernel"].astype(jnp.float32)) + p["bias"].astype(jnp.float32)
  return jnp.mean(jax.nn.sigmoid(z), axis=1)


@dataclasses.dataclass(frozen=True)
class AHPrefixHandler:
  """Prefix keys/values in front (``attention_kv``), AdapterHub's positions (``positions``),
  optionally AdapterHub's per-attention prefix gate (leaf ``<attention>/prefix_gate``)."""
  n: int
  self_stacks: FrozenSet[str]     # encoder-decoder stacks whose self-attention has a prefix
  gated: bool = False

  def positions(self, module, q_pos, k_pos, deterministic):
    if k_pos is None:               # rotary positions (decoder-only): unchanged
      return q_pos, k_pos
    stack = "decoder" if getattr(module, "is_decoder", False) else "encoder"
    if stack not in self.self_stacks:
      return q_pos, k_pos
    return q_pos, jnp.concatenate([jnp.arange(self.n, dtype=k_pos.dtype), k_pos + self.n])

  def linear(self, module, x, call_next, deterministic):
    if self.gated and module.name == "q":
      _ATTN_INPUT[tuple(module.scope.path[:-1])] = x
    return call_next(x)

  def attention_kv(self, module, k, v, mask, bias, deterministic):
    if not module.has_variable("params", "prefix_key"):
      return k, v, mask, bias
    b, s, nk, h = k.shape
    pk = module.get_variable("params", "prefix_key").reshape(self.n, nk, h).astype(k.dtype)
    pv = module.get_variable("params", "prefix_value").reshape(self.n, nk, h).astype(v.dtype)
    pk = jnp.broadcast_to(pk[None], (b, self.n, nk, h))
    pv = jnp.broadcast_to(pv[None], (b, self.n, nk, h))
    if self.gated and module.has_variable("params", "prefix_gate"):
      x = _ATTN_INPUT.pop(tuple(module.scope.path), None)
      if x is None:
        raise PeftConfigError("prefix gate: the attention's query input was not seen by the q projection")
      g = _gate_value(module.get_variable("params", "prefix_gate"), x)      # [B, 1|2]
      pk = pk * g[:, 0][:, None, None, None].astype(pk.dtype)
      pv = pv * g[:, -1][:, None, None, None].astype(pv.dtype)
    k = jnp.concatenate([pk, k], axis=1)
    v = jnp.concatenate([pv, v], axis=1)
    if mask is not None:
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (self.n,), mask.dtype), mask], axis=-1)
    if bias is not None and bias.shape[-1] == s:
      bias = jnp.concatenate([jnp.zeros(bias.shape[:-1] + (self.n,), bias.dtype), bias], axis=-1)
    return k, v, mask, bias


def prefix_handler(cfg, hp, gated=False) -> AHPrefixHandler:
  stacks = {SELF_ATTENTION_STACK[kind] for kind, _, _ in family_of(cfg).attentions(cfg)
            if kind in SELF_ATTENTION_STACK and (LOCATIONS[kind][1] is None or hp[LOCATIONS[kind][1]])}
  return AHPrefixHandler(n=int(hp["prefix_length"]), self_stacks=frozenset(stacks), gated=gated)


def adapter_hp(hp, names) -> Dict[str, Any]:
  return {k: hp[k] for k in names}


# ----------------------------------------------------------------------------- method

MAM = dict(adapters.with_defaults(PREFIX, prefix_bottleneck_size=800), **adapters.PARALLEL)


@register
class MAM(Method):
  """Prefix tuning (AdapterHub placement, MLP reparameterisation) + scaled parallel FFN adapter."""
  name = "mam"
  hparams = MAM
  reference = "AdapterHub adapters 1.3.0 MAMConfig (PrefixTuningConfig(bottleneck_size=800) + ParBnConfig)"
  mergeable = False

  def _bn(self, hp):
    return adapter_hp(hp, adapters.PARALLEL)

  def validate(self, cfg, hp, flat):
    validate_prefix(self.name, cfg, hp, flat)
    _PAR.validate(cfg, self._bn(hp), flat)

  def init_leaves(self, cfg, hp, flat, rng):
    dt = as_dtype(cfg.param_dtype)
    out = {k: v.astype(dt) for k, v in init_prefix(cfg, hp, jax.random.fold_in(rng, 1)).items()}
    out.update(_PAR.init_leaves(cfg, self._bn(hp), flat, jax.random.fold_in(rng, 2)))
    return out

  def update_masks(self, cfg, hp, flat):
    return _PAR.update_masks(cfg, self._bn(hp), flat)

  def leaf_roles(self, cfg, hp, paths):
    return _PAR.leaf_roles(cfg, self._bn(hp), paths)

  def prepare_params(self, cfg, hp, flat):
    out = dict(flat)
    out.update(project_prefix(cfg, hp, flat))
    return out

  def handlers(self, cfg, hp):
    return (prefix_handler(cfg, hp), adapters.BottleneckHandler(adapters.AdapterSpec.from_hp(self._bn(hp), cfg.dtype),
                                                         self.name))


class _ParallelImpl(adapters._Bottleneck):
  name = "parallel(mam)"
  hparams = adapters.PARALLEL


_PAR = _ParallelImpl()
