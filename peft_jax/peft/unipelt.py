"""UniPELT [unipelt] (Mao et al. 2022), as AdapterHub's ``UniPELTConfig`` (``adapters`` 1.3.0).

What it adds. ``UniPELTConfig() = ConfigUnion(PrefixTuningConfig(prefix_length=10),
SeqBnConfig(reduction_factor=16), LoRAConfig(r=8, alpha=2))``, every component
with ``use_gating=True``. A gate is AdapterHub's ``nn.Linear(in, 1)`` followed
by ``sigmoid`` and a mean over the sequence axis (all positions, padding
included): ``g = mean_t sigmoid(z_t W + b)``, one value per example in (0, 1).

* **prefix tuning** the AdapterHub way (:mod:`peft_jax.peft.mam`: every T5
  attention, own MLP per location, ``prefix_length=10``,
  ``prefix_bottleneck_size=512``). Gate per attention layer
  (``<attention>/prefix_gate``, ``z`` = the attention's (normalised) input,
  i.e. the query projection's input; ``prefix_shared_gating=True``: one output
  scaling both prefix keys and values, else two): prefix keys/values are
  multiplied by ``g`` before the concatenation.
* **bottleneck adapter** = ``pfeiffer``'s placement and math
  (``SeqBnConfig``: after the FFN, reading ``x + y``, relu, ``reduction_factor=16``,
  ``'bert'`` init) with a gate (``P/adapter_mlp/gate``, ``z`` = the adapter
  input): ``x + y + g * A(x + y)``.
* **LoRA** on ``q`` and ``v`` of every attention (T5: encoder self, decoder
  self *and* cross-attention, as AdapterHub wraps every ``T5Attention``;
  LLaMA: self-attention), ``r=8``, leaves ``<module>/gated_lora/{A, B,
  gate/kernel, gate/bias}``: ``y = x W + g * (x A B)`` with ``z`` = the
  module's input. With gating AdapterHub multiplies by the gate *instead of*
  ``alpha / r``, so ``lora_alpha`` has no effect (kept for the record).

Inits as AdapterHub's: LoRA ``A`` kaiming-uniform(a=sqrt 5), ``B = 0``; LoRA and
prefix gate weights N(0, 0.02), biases torch's default U(+-1/sqrt(in)); the
adapter gate follows the adapter's ``'bert'`` init (N(0, 0.02), bias 0).
Hyperparameters: the prefix ones as in ``mam`` (``prefix_*``,
``encoder_prefix``, ``cross_prefix``) plus ``prefix_shared_gating``; the
adapter's under ``BnConfig`` names; LoRA's as ``lora_r``, ``lora_alpha``,
``lora_dropout``, ``lora_attn_matrices``. Not supported: ``use_gating=False``,
a parallel adapter component.

Implementation note: the prefix gate reads the attention's input, which the
``attention_kv`` site does not carry; the handler's ``linear`` site at ``q``
records it (per attention scope, within the same trace) for ``attention_kv``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from peft_jax.fields import Field
from peft_jax.models.config import as_dtype
from peft_jax.peft import adapters
from peft_jax.peft import mam
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, register
from peft_jax.peft.common import Rand, compute_dtype, dropout

#: the prefix fields of ``mam``, pfeiffer's adapter fields (gated) and LoRA's, with
#: UniPELTConfig's defaults.
UNIPELT = {
    **adapters.with_defaults(mam.PREFIX, prefix_length=10),
    "prefix_shared_gating": Field(True, "one prefix gate output for keys and values (False: "
                                  "one each)"),
    **adapters.PFEIFFER,
    "use_gating": Field(True, "gate every component (UniPELT itself; False is rejected)"),
    "lora_r": Field(8, "rank of the gated LoRA on the attention projections", ge=1),
    "lora_alpha": Field(2, "LoRA scale numerator; no effect here: the gate replaces alpha / r",
                        "float"),
    "lora_dropout": Field(0.0, "dropout on the LoRA input during training", ge=0, lt=1),
    "lora_attn_matrices": Field(("q", "v"), "attention projections that get LoRA: some of q, k, v"),
}

LORA = "gated_lora"


def gated_bottleneck_out(p, spec: adapters.AdapterSpec, y, x, dropout_rng=None):
  """:func:`peft_jax.peft.adapters.bottleneck_out` of a sequential adapter whose bottleneck
  output is multiplied by AdapterHub's gate ``mean_t sigmoid(inp W_g + b_g)`` (before the
  residual and the optional ``ln_after``)."""
  dt = jnp.dtype(spec.dtype)
  act = adapters.ACTIVATIONS[spec.non_linearity]
  yy, xx = y.astype(dt), x.astype(dt)
  inp = yy + xx if spec.original_ln_before else yy
  res = yy if spec.residual_before_ln else inp
  z = adapters._layer_norm(p["ln_before"], inp) if spec.ln_before else inp
  up = adapters._dense(p["up"], act(adapters._dense(p["down"], z, dt)), dt)
  if isinstance(spec.scaling, str):
    up = up * p["scaling"].astype(dt)
  elif spec.scaling != 1.0:
    up = up * jnp.asarray(spec.scaling, dt)
  if dropout_rng is not None and spec.dropout > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - spec.dropout, up.shape)
    up = jnp.where(keep, up / (1.0 - spec.dropout), 0).astype(up.dtype)
  g = mam._gate_value(p["gate"], inp)[:, None, :]          # [B, 1, 1]
  out = up * g.astype(dt)
  if spec.adapter_residual_before_ln:
    out = out + res
    if spec.ln_after:
      out = adapters._layer_norm(p["ln_after"], out)
  else:
    if spec.ln_after:
      out = adapters._layer_norm(p["ln_after"], out)
    out = out + res
  if not spec.original_ln_after:
    out = out - xx
  return out.astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class UniPeltHandler(mam.AHPrefixHandler):
  spec: adapters.AdapterSpec = adapters.AdapterSpec()
  lora_rate: float = 0.0

  def linear(self, module, x, call_next, deterministic):
    if module.name == "q":
      mam._ATTN_INPUT[tuple(module.scope.path[:-1])] = x
    y = call_next(x)
    if not module.has_variable("params", LORA):
      return y
    p = module.get_variable("params", LORA)
    dt = compute_dtype(module)
    xd = dropout(module, x, self.lora_rate, deterministic)
    delta = jnp.dot(jnp.dot(xd.astype(dt), p["A"].astype(dt)), p["B"].astype(dt))
    g = mam._gate_value(p["gate"], x)[:, None, :]           # [B, 1, 1]
    return y + (delta * g.astype(dt)).astype(y.dtype)

  def sublayer(self, module, name, h_in, y, deterministic=True, x=None):
    key = f"adapter_{name}"
    if not module.has_variable("params", key):
      return y
    p = module.get_variable("params", key)
    if x is None:
      raise PeftConfigError("unipelt: the adapter reads the sub-layer's residual input x, which the "
                            "model did not pass")
    rng = module.make_rng("dropout") if (not deterministic and self.spec.dropout > 0) else None
    out = gated_bottleneck_out(p, self.spec, y, x, rng)
    if "layer_on" in p:
      out = jnp.where(p["layer_on"] > 0.5, out, y)
    return out


class _SeqImpl(adapters._Bottleneck):
  name = "pfeiffer(unipelt)"
  hparams = adapters.PFEIFFER


_SEQ = _SeqImpl()


def lora_modules(cfg, hp, flat):
  mats = hp["lora_attn_matrices"]
  mats = [mats] if isinstance(mats, str) else list(mats)
  return [m for m in targets.linear_modules(flat) if m.kind == "attn" and m.name in mats]


@register
class UniPELT(Method):
  """Gated prefix tuning + gated sequential adapter + gated LoRA (AdapterHub ``UniPELTConfig``)."""
  name = "unipelt"
  hparams = UNIPELT
  reference = ("AdapterHub adapters 1.3.0 UniPELTConfig (PrefixTuningConfig(prefix_length=10) + "
               "SeqBnConfig(reduction_factor=16) + LoRAConfig(r=8, alpha=2), use_gating=True)")
  mergeable = False

  def _bn(self, hp):
    return dict(mam.adapter_hp(hp, adapters.PFEIFFER), use_gating=False)

  def validate(self, cfg, hp, flat):
    if hp["use_gating"] is not True:
      raise PeftConfigError("unipelt: use_gating must be True (UniPELT is the gated combination; "
                            "use 'pfeiffer', 'lora', 'mam' for ungated parts)")
    if hp["is_parallel"]:
      raise PeftConfigError("unipelt: a parallel adapter component is not supported")
    mam.validate_prefix(self.name, cfg, hp, flat)
    _SEQ.validate(cfg, self._bn(hp), flat)
    r = hp["lora_r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
      raise PeftConfigError(f"unipelt: lora_r must be a positive int, got {r!r}")
    if not 0.0 <= float(hp["lora_dropout"]) < 1.0:
      raise PeftConfigError(f"unipelt: lora_dropout must be in [0, 1), got {hp['lora_dropout']!r}")
    mats = hp["lora_attn_matrices"]
    mats = [mats] if isinstance(mats, str) else list(mats)
    if not mats or any(m not in ("q", "k", "v") for m in mats):
      raise PeftConfigError(f"unipelt: lora_attn_matrices must be a non-empty subset of q, k, v, got {mats!r}")

  def init_leaves(self, cfg, hp, flat, rng):
    dt = as_dtype(cfg.param_dtype)
    out = dict(mam.init_prefix(cfg, hp, jax.random.fold_in(rng, 1)))
    rnd = Rand(jax.random.fold_in(rng, 3))
    d = mam._hidden(cfg)
    n_out = 1 if hp["prefix_shared_gating"] else 2
    for _, path, L in mam.prefix_locations(cfg, hp):
      out[f"{path}/prefix_gate/kernel"] = rnd.normal((L, d, n_out), 0.02)
      out[f"{path}/prefix_gate/bias"] = rnd.uniform((L, n_out), -1 / math.sqrt(d), 1 / math.sqrt(d))
    r = hp["lora_r"]
    for m in lora_modules(cfg, hp, flat):
      lead = (m.n_layers,) if m.stacked else ()
      out[f"{m.path}/{LORA}/A"] = jnp.swapaxes(rnd.kaiming_uniform_a5(lead + (r, m.d_in)), -1, -2)
      out[f"{m.path}/{LORA}/B"] = jnp.zeros(lead + (r, m.d_out), jnp.float32)
      out[f"{m.path}/{LORA}/gate/kernel"] = rnd.normal(lead + (m.d_in, 1), 0.02)
      b = 1 / math.sqrt(m.d_in)
      out[f"{m.path}/{LORA}/gate/bias"] = rnd.uniform(lead + (1,), -b, b)
    bhp = self._bn(hp)
    ad = _SEQ.init_leaves(cfg, bhp, flat, jax.random.fold_in(rng, 2))
    for prefix, site in adapters.bottleneck_sizes(cfg, bhp):
      L = dict((p, n) for p, n, _, _ in adapters._sites_of(cfg))[prefix]
      on = adapters.active_layers(cfg, bhp, prefix)
      k = rnd.normal((L, d, 1), 0.02)
      out[f"{prefix}/adapter_{site}/gate/kernel"] = jnp.where(on[:, None, None], k, 0.0)
      out[f"{prefix}/adapter_{site}/gate/bias"] = jnp.zeros((L, 1), jnp.float32)
    out = {k: v.astype(dt) for k, v in out.items()}
    out.update(ad)
    return out

  def update_masks(self, cfg, hp, flat):
    return _SEQ.update_masks(cfg, self._bn(hp), flat)

  def leaf_roles(self, cfg, hp, paths):
    return _SEQ.leaf_roles(cfg, self._bn(hp), paths)

  def prepare_params(self, cfg, hp, flat):
    out = dict(flat)
    out.update(mam.project_prefix(cfg, hp, flat))
    return out

  def handlers(self, cfg, hp):
    base = mam.prefix_handler(cfg, hp, gated=True)
    return (UniPeltHandler(n=base.n, self_stacks=base.self_stacks, gated=True,
                           spec=adapters.AdapterSpec.from_hp(self._bn(hp), cfg.dtype),
                           lora_rate=float(hp["lora_dropout"])),)
