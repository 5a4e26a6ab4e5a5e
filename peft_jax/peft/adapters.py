"""Bottleneck adapters as AdapterHub (``adapters`` 1.3.0) defines them: ``houlsby``,
``pfeiffer`` and ``parallel``.

What AdapterHub does on T5 and LLaMA (read from its source, 1.3.0)
-------------------------------------------------------------------
Both models are pre-norm. Every adapted sub-layer calls
``bottleneck_layer_forward(hidden_states=y, residual_input=x, layer_norm=None)``
where ``x`` is the sub-layer's *residual input* (the un-normalised residual
stream before the sub-layer's own norm) and ``y`` the sub-layer output (T5:
after the block's dropout; LLaMA has none). ``layer_norm`` is always ``None``:
the pre-trained norm of a pre-norm model sits in front of the sub-layer and is
never re-applied by the adapter (``original_ln_*`` therefore only switch the
``+ x`` residual on or off).

Locations (``location_key`` -> config flag):

=================  =====================================  =================
model              sub-layer (our ``sublayer`` site name)  config flag
=================  =====================================  =================
T5 encoder         self-attention (``attn``)              ``mh_adapter``
T5 decoder         self-attention (``self_attn``)         ``mh_adapter``
T5 decoder         cross-attention (``cross_attn``)       ``cross_adapter``
T5 enc. + dec.     feed-forward (``mlp``)                 ``output_adapter``
LLaMA              self-attention (``attn``)              ``mh_adapter``
LLaMA              MLP (``mlp``)                          ``output_adapter``
=================  =====================================  =================

``cross_adapter`` defaults to False in every config, so in the T5 decoder
houlsby adapts self-attention and FFN only, not cross-attention.

Sequential adapter (``is_parallel=False``), with ``A(z) = up(act(down(LN_b(z)))) * scaling``
(``LN_b`` only with ``ln_before``; adapter dropout after the scaling)::

    inp  = y + x              if original_ln_before else y
    res  = y                  if residual_before_ln  else inp
    out  = LN_a(A(inp) + res) if adapter_residual_before_ln else LN_a(A(inp)) + res
    new  = out + x            if original_ln_after   else out

Parallel adapter (``is_parallel=True``; ``original_ln_before`` and
``residual_before_ln`` are ignored)::

    out = LN_a(A(x));  new = out + y (+ x if original_ln_after)

``new`` replaces ``x + y`` as the residual stream after the sub-layer; ``LN_a``
only with ``ln_after``. ``down``/``up`` are ``nn.Linear`` with biases; the
bottleneck size is ``int(hidden // reduction_factor)`` (at least 1).

The three methods and the AdapterHub config each one follows
------------------------------------------------------------
* ``houlsby`` = ``DoubleSeqBnConfig``: adapters after attention and after the
  FFN (``mh_adapter=output_adapter=True``), ``reduction_factor=16``,
  ``non_linearity='swish'``, ``original_ln_before=False`` (the adapter reads the
  sub-layer output ``y``), ``init_weights='bert'``. Result: ``x + y + A(y)``.
* ``pfeiffer`` = ``SeqBnConfig``: FFN only (``output_adapter=True``),
  ``reduction_factor=16``, ``non_linearity='relu'``, ``original_ln_before=True``
  (the adapter reads ``x + y``), ``init_weights='bert'``. Result:
  ``x + y + A(x + y)``.
* ``parallel`` = ``ParBnConfig``: FFN only, parallel to it, reading the FFN's
  residual input ``x`` (not its normalised input), ``reduction_factor=2``,
  ``non_linearity='relu'``, ``scaling=4.0``, ``init_weights='mam_adapter'``.
  Result: ``x + y + 4 * A(x)``.

Initialisations (``init_weights``): ``'bert'``: weights ~ N(0, 0.02), biases 0
(*not* an identity at step 0); ``'mam_adapter'``: down kernel kaiming-uniform
(``a=sqrt(5)``, i.e. U(+-1/sqrt(hidden))), down bias 0, up kernel and bias 0
(exact identity at step 0); ``'houlsby'``: both kernels truncated N(0, 0.01) in
[-0.02, 0.02], biases 0 (near-identity). ``init_weights_seed`` set: every
adapter module gets the same initial weights (AdapterHub reseeds per module);
the random numbers themselves differ from torch's.

Hyperparameters are AdapterHub's ``BnConfig`` fields with the same names and
per-method defaults; additionally ``bottleneck_size`` (ours, default None)
overrides ``reduction_factor`` with an explicit size. ``reduction_factor`` may
be a mapping ``{"<layer id>": rf, "default": rf}`` (AdapterHub layer ids: T5
encoder layers first, then decoder layers) as long as it gives one size per
stacked leaf (all adapted layers of one stack). ``leave_out`` takes AdapterHub
layer ids (T5: encoder ``0..L-1``, decoder ``L..``): those layers get no
adapter; the stacked leaves keep a zero slice for them that
:meth:`update_masks` excludes from training and counting, and a frozen
``layer_on`` flag per layer switches the adapter off there. Not supported
(rejected with :class:`PeftConfigError`): ``use_gating``, ``phm_layer`` (Compacter),
``inv_adapter``, ``stochastic_depth``, ``scaling`` other than a number /
``'learned'`` / ``'channel'``, and ``residual_before_ln='post_add'`` (AdapterHub
itself raises ``UnboundLocalError`` for it on T5/LLaMA since ``layer_norm`` is
None there).

Parameters (``P`` = ``encoder/layers``, ``decoder/layers`` for T5, ``layers``
for LLaMA; ``S`` the sub-layer name; ``m`` the bottleneck size)::

  P/adapter_S/down/kernel [layers, hidden, m]   P/adapter_S/down/bias [layers, m]
  P/adapter_S/up/kernel   [layers, m, hidden]   P/adapter_S/up/bias   [layers, hidden]
  P/adapter_S/ln_before/{scale,bias}, ln_after/{scale,bias}  [layers, hidden]  (if enabled)
  P/adapter_S/scaling     [layers, 1] ('learned') or [layers, hidden] ('channel')
  P/adapter_S/layer_on    [layers] 1.0 / 0.0, never trained (only with leave_out)

Site and its residual input
---------------------------
The forward pass uses the ``sublayer`` site, which passes the sub-layer's
residual input ``x`` (needed by ``pfeiffer``, ``parallel`` and any
configuration with ``original_ln_before=True`` or ``original_ln_after=False``)
next to its output ``y``; the block adds ``x + (returned value)``.

Dropout in training: as in AdapterHub, T5's sub-layer dropout is applied to
``y`` before the adapter sees it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.models.config import as_dtype
from peft_jax.models.family import family_of
from peft_jax.peft.base import Flat, Method, PeftConfigError, register

# ----------------------------------------------------------------------------- configuration

_INITS = ("bert", "mam_adapter", "houlsby")


def _activation_problem(name: str) -> Optional[str]:
  if name.lower() not in ACTIVATIONS:
    return f"unknown activation; expected one of {sorted(ACTIVATIONS)} (any case)"
  return None


def _rf_problem(rf) -> Optional[str]:
  pos = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0  # noqa: E731
  if isinstance(rf, Mapping):
    if all(pos(v) for v in rf.values()):
      return None
  elif pos(rf):
    return None
  return "expected a number > 0 or a {'<layer id>': number, 'default': number} mapping"


def _scaling_problem(sc) -> Optional[str]:
  if sc in ("learned", "channel") or (isinstance(sc, numbers.Real) and not isinstance(sc, bool)):
    return None
  return "expected a number, 'learned' or 'channel'"


#: BnConfig's fields (adapters 1.3.0) that this implementation reads, with BnConfig's
#: defaults; each method below changes only the defaults that differ.
BOTTLENECK: Dict[str, Field] = {
    "mh_adapter": Field(False, "adapter after each self-attention sub-layer"),
    "output_adapter": Field(True, "adapter after each feed-forward sub-layer"),
    "cross_adapter": Field(False, "adapter after each T5 decoder cross-attention sub-layer"),
    "reduction_factor": Field(16, "bottleneck size = hidden // reduction_factor; or a "
                              "{'<layer id>': rf, 'default': rf} mapping", "any",
                              check_fn=_rf_problem),
    "bottleneck_size": Field(None, "explicit bottleneck size, overriding reduction_factor (ours)",
                             "int", ge=1),
    "non_linearity": Field("relu", "activation between the down and up projections "
                           "(transformers names, any case)", check_fn=_activation_problem),
    "original_ln_before": Field(False, "the adapter reads the residual sum x + y instead of the "
                                "sub-layer output y (sequential only)"),
    "original_ln_after": Field(True, "add the sub-layer's residual input x back after the adapter"),
    "residual_before_ln": Field(True, "residual around the adapter: y (True) or the adapter input "
                                "(False); 'post_add' is rejected", "bool_or_str",
                                choices=("post_add",)),
    "adapter_residual_before_ln": Field(False, "add the adapter's residual before ln_after, not "
                                        "after it"),
    "ln_before": Field(False, "a new LayerNorm on the adapter input"),
    "ln_after": Field(False, "a new LayerNorm on the adapter output"),
    "init_weights": Field("bert", "'bert': N(0, 0.02); 'mam_adapter': up projection zero; "
                          "'houlsby': truncated N(0, 0.01)", choices=_INITS),
    "init_weights_seed": Field(None, "one seed for every adapter module, so all start with the "
                               "same weights", "int"),
    "is_parallel": Field(False, "adapter in parallel to the sub-layer, reading its residual "
                         "input x"),
    "scaling": Field(1.0, "factor on the adapter output; 'learned': a trained scalar, 'channel': a "
                     "trained vector", "any", check_fn=_scaling_problem),
    "dropout": Field(0.0, "dropout on the adapter output during training", ge=0, lt=1),
    "leave_out": Field((), "AdapterHub layer ids that get no adapter (T5: encoder layers first, "
                       "then decoder)", "any"),
    # accepted only at their defaults (see the module docstring)
    "use_gating": Field(False, "a trained gate on the adapter output (not supported here)"),
    "phm_layer": Field(False, "PHM down/up projections (use the compacter methods instead)"),
    "inv_adapter": Field(None, "invertible adapter after the embeddings (not supported)", "str"),
    "stochastic_depth": Field(0.0, "probability of dropping whole layers (not supported)"),
}
_BN_DEFAULTS: Dict[str, Any] = {k: f.default for k, f in BOTTLENECK.items()}


def with_defaults(fields: Dict[str, Field], **defaults) -> Dict[str, Field]:
  """``fields`` with some defaults changed (kind, range and doc kept)."""
  out = dict(fields)
  for k, v in defaults.items():
    out[k] = dataclasses.replace(fields[k], default=v)
  return out


HOULSBY = with_defaults(BOTTLENECK, mh_adapter=True, non_linearity="swish")
PFEIFFER = with_defaults(BOTTLENECK, original_ln_before=True)
PARALLEL = with_defaults(BOTTLENECK, reduction_factor=2, init_weights="mam_adapter",
                         is_parallel=True, scaling=4.0)
HOULSBY_DEFAULTS = {k: f.default for k, f in HOULSBY.items()}
PFEIFFER_DEFAULTS = {k: f.default for k, f in PFEIFFER.items()}
PARALLEL_DEFAULTS = {k: f.default for k, f in PARALLEL.items()}

_SQRT2 = math.sqrt(2.0)


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_erf(x):
  return 0.5 * x * (1.0 + jax.lax.erf(x / _SQRT2))


#: ``non_linearity`` names as AdapterHub resolves them (``transformers.activations.get_activation``
#: of the lower-cased name; ``leakyrelu`` is AdapterHub's own, slope 0.01).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "gelu": _gelu_erf,
    "gelu_python": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_10": lambda x: jnp.clip(_gelu_erf(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * _SQRT2))),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "leakyrelu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "linear": lambda x: x,
}


#: residual-site kind (the model family's) -> the AdapterHub flag that enables an adapter there
SITE_FLAGS = {"self_attn": "mh_adapter", "cross_attn": "cross_adapter", "mlp": "output_adapter"}


def _sites_of(model_cfg) -> Tuple[Tuple[str, int, int, Tuple[Tuple[str, str], ...]], ...]:
  """``(stack prefix, layers, AdapterHub id of the stack's first layer, ((site, flag), ...))``."""
  return tuple((prefix, n, first, tuple((site, SITE_FLAGS[kind]) for site, kind in subs))
               for prefix, n, first, subs in family_of(model_cfg).residual_sites(model_cfg))


def _hidden(model_cfg) -> int:
  return family_of(model_cfg).hidden_size(model_cfg)


def _rf_for_layer(rf, layer_id: int):
  if isinstance(rf, Mapping):
    if str(layer_id) in rf:
      return rf[str(layer_id)]
    if "default" in rf:
      return rf["default"]
    raise PeftConfigError("reduction_factor mapping gives no value for layer "
                          f"{layer_id} and no 'default' (e.g. {{'1': 8, 'default': 16}})")
  return rf


def active_layers(model_cfg, hp, prefix: str) -> np.ndarray:
  """Bool ``[layers]`` of the stack: False for the layers ``leave_out`` names."""
  for p, n, first_id, _ in _sites_of(model_cfg):
    if p == prefix:
      out = set(int(i) for i in hp["leave_out"])
      return np.array([first_id + i not in out for i in range(n)], bool)
  raise KeyError(prefix)


def _size_from_rf(hidden: int, rf) -> int:
  if isinstance(rf, bool) or not isinstance(rf, numbers.Real) or not rf > 0:
    raise PeftConfigError(f"reduction_factor must be a number > 0, got {rf!r}")
  return max(1, int(hidden // rf))


def bottleneck_sizes(model_cfg, hp) -> Dict[Tuple[str, str], int]:
  """``(stack prefix, site) -> bottleneck size`` for every adapted site."""
  hidden = _hidden(model_cfg)
  out = {}
  for prefix, n, first_id, subs in _sites_of(model_cfg):
    on = active_layers(model_cfg, hp, prefix)
    for site, flag in subs:
      if not hp[flag] or not on.any():
        continue
      if hp["bottleneck_size"] is not None:
        out[(prefix, site)] = int(hp["bottleneck_size"])
        continue
      sizes = {_size_from_rf(hidden, _rf_for_layer(hp["reduction_factor"], first_id + i))
               for i in range(n) if on[i]}
      if len(sizes) != 1:
        raise PeftConfigError(
            f"reduction_factor {hp['reduction_factor']!r} gives different bottleneck sizes "
            f"{sorted(sizes)} within {prefix}; one size per stack is supported (stacked leaves)")
      out[(prefix, site)] = sizes.pop()
  return out


def adapter_param_count(hidden: int, m: int, hp) -> int:
  """Parameters of one adapter module, as AdapterHub builds it."""
  n = hidden * m + m + m * hidden + hidden
  n += 2 * hidden * (int(bool(hp["ln_before"])) + int(bool(hp["ln_after"])))
  if hp["scaling"] == "learned":
    n += 1
  elif hp["scaling"] == "channel":
    n += hidden
  return n


# ----------------------------------------------------------------------------- forward math

@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """The forward-relevant hyperparameters (hashable)."""
  non_linearity: str = "relu"
  original_ln_before: bool = False
  original_ln_after: bool = True
  residual_before_ln: bool = True
  adapter_residual_before_ln: bool = False
  ln_before: bool = False
  ln_after: bool = False
  is_parallel: bool = False
  scaling: Any = 1.0            # float, or 'learned' / 'channel' (a leaf)
  dropout: float = 0.0
  dtype: str = "float32"        # compute dtype

  @property
  def needs_residual_input(self) -> bool:
    return self.is_parallel or self.original_ln_before or not self.original_ln_after

  @classmethod
  def from_hp(cls, hp, dtype):
    sc = hp["scaling"]
    return cls(non_linearity=hp["non_linearity"].lower(),
               original_ln_before=bool(hp["original_ln_before"]),
               original_ln_after=bool(hp["original_ln_after"]),
               residual_before_ln=bool(hp["residual_before_ln"]),
               adapter_residual_before_ln=bool(hp["adapter_residual_before_ln"]),
               ln_before=bool(hp["ln_before"]), ln_after=bool(hp["ln_after"]),
               is_parallel=bool(hp["is_parallel"]),
               scaling=sc if isinstance(sc, str) else float(sc),
               dropout=float(hp["dropout"]), dtype=str(jnp.dtype(as_dtype(dtype))))


def _layer_norm(p, z, eps=1e-5):
  """``torch.nn.LayerNorm`` (eps 1e-5, affine), in fp32."""
  zf = z.astype(jnp.float32)
  mu = jnp.mean(zf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(zf - mu), axis=-1, keepdims=True)
  out = (zf - mu) * jax.lax.rsqrt(var + eps)
  return (out * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(z.dtype)


def _dense(p, z, dt):
  return jnp.dot(z.astype(dt), p["kernel"].astype(dt)) + p["bias"].astype(dt)


def bottleneck_out(p, spec: AdapterSpec, y, x=None, dropout_rng=None):
  """The value to add to the residual input ``x`` after the sub-layer, i.e.
  AdapterHub's new residual stream minus ``x``, for one layer's adapter leaves ``p``.

  ``y``: the sub-layer output; ``x``: its residual input (needed when
  ``spec.needs_residual_input``). ``dropout_rng``: adapter dropout on (training).
  """
  dt = jnp.dtype(spec.dtype)
  if spec.needs_residual_input and x is None:
    raise PeftConfigError("this adapter configuration needs the sub-layer's residual input x")
  act = ACTIVATIONS[spec.non_linearity]

  def bottleneck(z):
    if spec.ln_before:
      z = _layer_norm(p["ln_before"], z)
    up = _dense(p["up"], act(_dense(p["down"], z, dt)), dt)
    if isinstance(spec.scaling, str):
      up = up * p["scaling"].astype(dt)
    elif spec.scaling != 1.0:
      up = up * jnp.asarray(spec.scaling, dt)
    if dropout_rng is not None and spec.dropout > 0:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - spec.dropout, up.shape)
      up = jnp.where(keep, up / (1.0 - spec.dropout), 0).astype(up.dtype)
    return up

  yy = y.astype(dt)
  xx = None if x is None else x.astype(dt)
  if spec.is_parallel:
    out = bottleneck(xx)
    if spec.ln_after:
      out = _layer_norm(p["ln_after"], out)
    out = out + yy
  else:
    inp = yy + xx if spec.original_ln_before else yy
    res = yy if spec.residual_before_ln else inp
    out = bottleneck(inp)
    if spec.adapter_residual_before_ln:
      out = out + res
      if spec.ln_after:
        out = _layer_norm(p["ln_after"], out)
    else:
      if spec.ln_after:
        out = _layer_norm(p["ln_after"], out)
      out = out + res
  if not spec.original_ln_after:
    out = out - xx      # AdapterHub adds no x; the block will
  return out.astype(y.dtype)


# ----------------------------------------------------------------------------- handler

@dataclasses.dataclass(frozen=True)
class BottleneckHandler:
  spec: AdapterSpec
  method: str = "bottleneck"

  def sublayer(self, module, name, h_in, y, deterministic=True, x=None):
    key = f"adapter_{name}"
    if not module.has_variable("params", key):
      return y
    p = module.get_variable("params", key)
    if x is None and self.spec.needs_residual_input:
      raise PeftConfigError(f"method {self.method!r} with this configuration reads the "
                            f"sub-layer's residual input x, which the model did not pass")
    rng = None
    if not deterministic and self.spec.dropout > 0:
      rng = module.make_rng("dropout")
    out = bottleneck_out(p, self.spec, y, x, rng)
    if "layer_on" in p:          # leave_out: this layer has no adapter
      out = jnp.where(p["layer_on"] > 0.5, out, y)
    return out


# ----------------------------------------------------------------------------- method

class _Bottleneck(Method):
  mergeable = False

  def validate(self, model_cfg, hp, flat: Flat) -> None:
    _sites_of(model_cfg)
    lo = hp["leave_out"]
    n_ids = sum(n for _, n, _, _ in _sites_of(model_cfg))
    if (isinstance(lo, (str, bytes)) or not hasattr(lo, "__iter__")
        or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < n_ids
                   for i in lo)):
      raise PeftConfigError(f"{self.name}: leave_out must be a list of layer ids in [0, {n_ids}) "
                            f"(encoder layers first, then decoder layers), got {lo!r}")
    for k, ok in (("use_gating", lambda v: not v),
                  ("phm_layer", lambda v: not v), ("inv_adapter", lambda v: v is None),
                  ("stochastic_depth", lambda v: not v)):
      if not ok(hp[k]):
        raise PeftConfigError(f"{self.name}: {k}={hp[k]!r} is not supported (only its default "
                              f"{_BN_DEFAULTS[k]!r}); see peft_jax.peft.adapters")
    if not (hp["mh_adapter"] or hp["output_adapter"] or hp["cross_adapter"]):
      raise PeftConfigError(f"{self.name}: none of mh_adapter, output_adapter, cross_adapter is set")
    if (hp["cross_adapter"] and not hp["mh_adapter"] and not hp["output_adapter"]
        and not any(f == "cross_adapter" for *_, subs in _sites_of(model_cfg) for _, f in subs)):
      raise PeftConfigError(f"{self.name}: cross_adapter only applies to an encoder-decoder's "
                            "decoder (cross-attention)")
    nl = hp["non_linearity"]
    if not isinstance(nl, str) or nl.lower() not in ACTIVATIONS:
      raise PeftConfigError(f"{self.name}: unknown non_linearity {nl!r}; expected one of "
                            f"{sorted(ACTIVATIONS)}")
    if hp["init_weights"] not in _INITS:
      raise PeftConfigError(f"{self.name}: unknown init_weights {hp['init_weights']!r}; expected one "
                            f"of {list(_INITS)}")
    sc = hp["scaling"]
    if not (sc in ("learned", "channel") or
            (isinstance(sc, numbers.Real) and not isinstance(sc, bool))):
      raise PeftConfigError(f"{self.name}: scaling must be a number, 'learned' or 'channel', got {sc!r}")
    rbl = hp["residual_before_ln"]
    if rbl == "post_add":
      raise PeftConfigError(
          f"{self.name}: residual_before_ln='post_add' only differs from True where the model "
          "passes its post-sub-layer LayerNorm (post-norm models); on T5/LLaMA AdapterHub itself "
          "fails with it. Use True or False")
    if not isinstance(rbl, bool):
      raise PeftConfigError(f"{self.name}: residual_before_ln must be True or False, got {rbl!r}")
    if not 0.0 <= float(hp["dropout"]) < 1.0:
      raise PeftConfigError(f"{self.name}: dropout must be in [0, 1), got {hp['dropout']!r}")
    bs = hp["bottleneck_size"]
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, numbers.Integral) or bs < 1):
      raise PeftConfigError(f"{self.name}: bottleneck_size must be a positive int or None, got {bs!r}")
    sizes = bottleneck_sizes(model_cfg, hp)
    if not sizes:
      raise PeftConfigError(f"{self.name}: leave_out={list(lo)!r} leaves no layer with an adapter")
    for prefix, _, _, subs in _sites_of(model_cfg):
      for site, flag in subs:
        if (prefix, site) in sizes and f"{prefix}/{site}_norm/scale" not in flat:
          raise PeftConfigError(f"{self.name}: the parameter tree has no {prefix}/{site}_norm; "
                                "is it the tree of this model config?")

  def init_leaves(self, model_cfg, hp, flat: Flat, rng) -> Flat:
    dtype = as_dtype(model_cfg.param_dtype)
    hidden = _hidden(model_cfg)
    seed = hp["init_weights_seed"]
    out: Flat = {}
    for idx, ((prefix, site), m) in enumerate(sorted(bottleneck_sizes(model_cfg, hp).items())):
      n = dict((p, k) for p, k, _, _ in _sites_of(model_cfg))[prefix]
      key = jax.random.PRNGKey(seed) if seed is not None else jax.random.fold_in(rng, idx)
      on = active_layers(model_cfg, hp, prefix)
      leaves = _init_adapter(key, hidden, m, n, hp, same_per_layer=seed is not None)
      if not on.all():
        leaves = {k: jnp.where(on.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.zeros_like(v))
                  for k, v in leaves.items()}
        leaves["layer_on"] = jnp.asarray(on, jnp.float32)
      for name, arr in leaves.items():
        out[f"{prefix}/adapter_{site}/{name}"] = arr.astype(dtype)
    return out

  def update_masks(self, model_cfg, hp, flat: Flat) -> Dict[str, Any]:
    """With ``leave_out``: the left-out layers' slices are neither trained nor counted
    (the ``layer_on`` flags are frozen leaves, see :meth:`leaf_roles`)."""
    out: Dict[str, Any] = {}
    for prefix, site in bottleneck_sizes(model_cfg, hp):
      on = active_layers(model_cfg, hp, prefix)
      if on.all():
        continue
      head = f"{prefix}/adapter_{site}/"
      for k, v in flat.items():
        if k.startswith(head):
          nd = len(v.shape)
          if k != head + "layer_on":
            out[k] = on.reshape((-1,) + (1,) * (nd - 1))
    return out

  def leaf_roles(self, model_cfg, hp, paths):
    """The ``layer_on`` flags (with ``leave_out``) are constants."""
    return {p: "frozen" for p in paths if p.endswith("/layer_on")}

  def handlers(self, model_cfg, hp):
    return (BottleneckHandler(AdapterSpec.from_hp(hp, model_cfg.dtype), self.name),)


def _init_adapter(key, d: int, m: int, n: int, hp, same_per_layer: bool) -> Dict[str, Any]:
  kd, ku = jax.random.split(key)
  lead = () if same_per_layer else (n,)
  iw = hp["init_weights"]
  if iw == "bert":
    down = 0.02 * jax.random.normal(kd, lead + (d, m), jnp.float32)
    up = 0.02 * jax.random.normal(ku, lead + (m, d), jnp.float32)
  elif iw == "mam_adapter":
    bound = 1.0 / math.sqrt(d)      # kaiming_uniform_(a=sqrt(5)) with fan_in = d
    down = jax.random.uniform(kd, lead + (d, m), jnp.float32, -bound, bound)
    up = jnp.zeros(lead + (m, d), jnp.float32)
  else:  # houlsby
    down = 1e-2 * jax.random.truncated_normal(kd, -2.0, 2.0, lead + (d, m), jnp.float32)
    up = 1e-2 * jax.random.truncated_normal(ku, -2.0, 2.0, lead + (m, d), jnp.float32)
  if same_per_layer:
    down = jnp.broadcast_to(down, (n, d, m))
    up = jnp.broadcast_to(up, (n, m, d))
  out = {"down/kernel": down, "down/bias": jnp.zeros((n, m), jnp.float32),
         "up/kernel": up, "up/bias": jnp.zeros((n, d), jnp.float32)}
  for ln in ("ln_before", "ln_after"):
    if hp[ln]:
      out[f"{ln}/scale"] = jnp.ones((n, d), jnp.float32)
      out[f"{ln}/bias"] = jnp.zeros((n, d), jnp.float32)
  if hp["scaling"] == "learned":
    out["scaling"] = jnp.ones((n, 1), jnp.float32)
  elif hp["scaling"] == "channel":
    out["scaling"] = jnp.ones((n, d), jnp.float32)
  return out


@register
class Houlsby(_Bottleneck):
  """Sequential adapters after attention and FFN (AdapterHub ``DoubleSeqBnConfig``)."""
  name = "houlsby"
  hparams = HOULSBY
  reference = "AdapterHub adapters 1.3.0 DoubleSeqBnConfig ('double_seq_bn', Houlsby et al. 2019)"


@register
class Pfeiffer(_Bottleneck):
  """Sequential adapter after the FFN only (AdapterHub ``SeqBnConfig``)."""
  name = "pfeiffer"
  hparams = PFEIFFER
  reference = "AdapterHub adapters 1.3.0 SeqBnConfig ('seq_bn', Pfeiffer et al. 2020)"


@register
class Parallel(_Bottleneck):
  """Scaled adapter parallel to the FFN (AdapterHub ``ParBnConfig``)."""
  name = "parallel"
  identity_at_init = True      # mam_adapter init: the up projection is 0
  hparams = PARALLEL
  reference = "AdapterHub adapters 1.3.0 ParBnConfig ('par_bn', He et al. 2021)"
