"""Where a method acts: the model's linear modules and norms, target matching,
layer and sub-layer selection, and the Hugging Face names of each module.

Everything here is pure Python on the flattened parameter paths and shapes, so
it works on an abstract tree (``abstract_params``) as well as on real weights.

Targets (``target_modules``, names and semantics as in HF PEFT)
----------------------------------------------------------------
* ``None``: the method's per-model default (HF PEFT's mapping for the model
  type, declared by the model's family: ``Family.hf_peft_default_targets``).
* a list of names: a module matches when a name equals its short name
  (``q``; for LLaMA also the HF name ``q_proj``) or a ``/``-suffix of its
  layer-agnostic path (``cross_attn/q``); HF's dotted suffixes of the HF name
  (``EncDecAttention.q``) are accepted too.
* ``"all-linear"``: every linear module except the output head (as HF PEFT).
* any other string: a regular expression ``re.fullmatch``-ed against the
  layer-agnostic path (``decoder/layers/cross_attn/q``, ``lm_head``).

Sub-layers (``target_sublayers``): T5 ``encoder_self_attn``,
``decoder_self_attn``, ``cross_attn``, ``encoder_mlp``, ``decoder_mlp``; LLaMA
``self_attn``, ``mlp``; aliases ``self_attn`` (T5: both self-attentions),
``mlp`` (all FFNs), ``attn`` (every attention).

Layer selection (at most one): ``layers_to_transform`` (HF: an int or a list of
layer indices, applied to every stack; for T5 also a dict
``{"encoder": [...], "decoder": [...]}``), ``first_k_layers``,
``last_k_layers``, ``random_layer_fraction`` (with ``layer_seed``; rounds to
the nearest count, at least one layer per stack). For T5 the selection is made
per stack (first/last/random of the encoder and of the decoder). Modules
outside the layer stack (``lm_head``) are excluded when a selection is given
(as in HF PEFT, where they carry no layer index). The dict form of
``layers_to_transform`` may also name targeted modules by their layer-agnostic path,
each with its own layers or ``'all'`` (an unstacked module such as ``lm_head`` is kept
only so): ``{"layers/attn/q": [0, 1], "layers/attn/v": [2], "lm_head": "all"}``; a
module's entry takes precedence over its stack's. This is how an HF PEFT adapter whose
regex targets different layers for different modules imports.

T5 v1.0's tied head has no kernel of its own; :func:`tied_head_modules` lists it (path
``lm_head``, leaf ``shared/embedding``) for the methods that adapt it through the
``linear`` site without touching its weight (LoRA).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from peft_jax.models.family import family_of
from peft_jax.fields import Field
from peft_jax.peft.base import Flat, PeftConfigError

LAYER_SELECTION_KEYS = ("layers_to_transform", "first_k_layers", "last_k_layers",
                        "random_layer_fraction")
#: the layer and sub-layer selection every targeted method shares (its ``hparams``)
SELECTION = {
    "layers_to_transform": Field(None, "only these layer indices of each stack (HF PEFT); in a "
                                 "config file also a {stack or module path: [..] or 'all'} dict",
                                 "ints"),
    "first_k_layers": Field(None, "only the first k layers of each stack", "int", ge=1),
    "last_k_layers": Field(None, "only the last k layers of each stack", "int", ge=1),
    "random_layer_fraction": Field(None, "a random fraction of the layers of each stack "
                                   "(drawn with layer_seed)", "float", gt=0, le=1),
    "layer_seed": Field(0, "seed of random_layer_fraction's draw"),
    "target_sublayers": Field(None, "only modules in these sub-layers (encoder_self_attn, "
                              "decoder_self_attn, decoder_cross_attn, self_attn, mlp)", "names"),
}
SELECTION_DEFAULTS = {k: f.default for k, f in SELECTION.items()}

@dataclasses.dataclass(frozen=True)
class Module:
  """A linear module (kernel ``[in, out]``, stacked ``[layers, in, out]``) or a norm."""
  path: str                 # layer-agnostic path of the module ('encoder/layers/attn/q')
  leaf: str                 # its weight leaf ('encoder/layers/attn/q/kernel')
  name: str                 # short name ('q')
  stack: Optional[str]      # 'encoder' | 'decoder' | 'layers' (LLaMA) | None (not stacked)
  sublayer: Optional[str]   # 'encoder_self_attn', ..., 'mlp'; None outside the layers
  n_layers: Optional[int]   # leading layers axis, None if not stacked
  d_in: int
  d_out: int
  kind: str                 # 'attn' | 'mlp' | 'head' | 'norm'

  @property
  def stacked(self):
    return self.n_layers is not None


def default_targets(cfg, peft_type: str):
  """HF PEFT's default ``target_modules`` of ``peft_type`` for this model's family."""
  return list(family_of(cfg).hf_peft_default_targets[peft_type])


def _sublayer(parts):
  if parts[0] == "layers":          # LLaMA
    return {"attn": "self_attn", "mlp": "mlp"}.get(parts[1])
  if len(parts) > 2 and parts[1] == "layers":
    sub = parts[2]
    if sub == "attn":
      return "encoder_self_attn"
    if sub == "self_attn":
      return "decoder_self_attn"
    if sub == "cross_attn":
      return "cross_attn"
    if sub == "mlp":
      return f"{parts[0]}_mlp"
  return None


def linear_modules(flat: Flat) -> List[Module]:
  """Every linear projection of the tree (leaves named ``kernel``, or ``kernel_q`` for a
  quantized base kernel, whose shape it has; :mod:`peft_jax.quantize`), in path order."""
  out = []
  for leaf in sorted(flat):
    if leaf.startswith("prefix_encoder/"):
      continue
    if leaf.endswith("/kernel"):
      path = leaf[: -len("/kernel")]
    elif leaf.endswith("/kernel_q"):
      path = leaf[: -len("/kernel_q")]
    else:
      continue
    shape = tuple(flat[leaf].shape)
    parts = path.split("/")
    stacked = "layers" in parts and len(shape) == 3
    sub = _sublayer(parts)
    stack = None
    if stacked:
      stack = "layers" if parts[0] == "layers" else parts[0]
    kind = "head" if sub is None else ("mlp" if sub.endswith("mlp") else "attn")
    out.append(Module(path=path, leaf=leaf, name=parts[-1], stack=stack, sublayer=sub,
                      n_layers=shape[0] if stacked else None, d_in=shape[-2], d_out=shape[-1],
                      kind=kind))
  return out


def tied_head_modules(cfg, flat: Flat) -> List[Module]:
  """T5 v1.0's tied ``lm_head`` as a linear module (``leaf``: the shared embedding
  ``[vocab, embed]`` it reads, transposed), for methods that adapt it through the
  ``linear`` site without a kernel of its own (LoRA); [] when the model has no tied head."""
  from peft_jax.peft.modules_to_save import tied_head_source
  src = tied_head_source(cfg, flat)
  if src is None:
    return []
  vocab, d = tuple(flat[src].shape)
  return [Module(path="lm_head", leaf=src, name="lm_head", stack=None, sublayer=None,
                 n_layers=None, d_in=d, d_out=vocab, kind="head")]


def norm_modules(flat: Flat) -> List[Module]:
  out = []
  for leaf in sorted(flat):
    if not leaf.endswith("/scale"):
      continue
    shape = tuple(flat[leaf].shape)
    path = leaf[: -len("/scale")]
    parts = path.split("/")
    stacked = "layers" in parts and len(shape) == 2
    stack = ("layers" if parts[0] == "layers" else parts[0]) if stacked else None
    out.append(Module(path=path, leaf=leaf, name=parts[-1], stack=stack, sublayer=_sublayer(parts),
                      n_layers=shape[0] if stacked else None, d_in=shape[-1], d_out=shape[-1],
                      kind="norm"))
  return out


# ----------------------------------------------------------------------------- HF names

def hf_module_name(cfg, m: Module, layer: Optional[int]) -> str:
  """The ``transformers`` module name of ``m`` (in layer ``layer``)."""
  return family_of(cfg).hf_module_name(m.path, m.kind, m.name, layer)


def hf_short_name(cfg, m: Module) -> str:
  full = hf_module_name(cfg, m, 0)
  return full.split(".")[-1]


def hf_layer_agnostic(cfg, m: Module) -> str:
  full = hf_module_name(cfg, m, 0)
  return re.sub(r"\.(block|layers)\.0\.", ".", full)


# ----------------------------------------------------------------------------- matching

def _suffix_match(t: str, path: str, sep: str) -> bool:
  return path == t or path.endswith(sep + t)


def match_targets(cfg, modules: Sequence[Module], targets, what="target_modules",
                  all_linear_ok=True) -> List[Module]:
  """The modules ``targets`` selects; :class:`PeftConfigError` when a target selects none."""
  mods = list(modules)
  if isinstance(targets, str):
    if targets == "all-linear" and all_linear_ok:
      sel = [m for m in mods if m.kind != "head"]
    else:
      try:
        rx = re.compile(targets)
      except re.error as e:
        raise PeftConfigError(f"{what}={targets!r} is not a valid regular expression: {e}") from None
      sel = [m for m in mods if rx.fullmatch(m.path)]
    if not sel:
      raise PeftConfigError(_no_match_msg(cfg, mods, targets, what))
    return sel
  if isinstance(targets, (list, tuple, set, frozenset)):
    if not targets:
      raise PeftConfigError(f"{what} is empty; expected module names, e.g. {_names(cfg, mods)[:4]}")
    sel = []
    for t in targets:
      if not isinstance(t, str):
        raise PeftConfigError(f"{what} entries must be strings, got {t!r}")
      hit = [m for m in mods
             if t in (m.name, hf_short_name(cfg, m)) or _suffix_match(t, m.path, "/")
             or _suffix_match(t, hf_layer_agnostic(cfg, m), ".")]
      if not hit:
        raise PeftConfigError(_no_match_msg(cfg, mods, t, what))
      sel.extend(h for h in hit if h not in sel)
    return [m for m in mods if m in sel]
  raise PeftConfigError(f"{what} must be a list of module names or a regex string, got {targets!r}")


def _names(cfg, mods):
  names = []
  for m in mods:
    for n in (m.name, hf_short_name(cfg, m)):
      if n not in names:
        names.append(n)
  return names


def _no_match_msg(cfg, mods, t, what):
  paths = sorted({m.path for m in mods})
  return (f"{what}: {t!r} matches no module of this {family_of(cfg).name} model; modules that exist: "
          f"{', '.join(_names(cfg, mods))} (layer-agnostic paths: {', '.join(paths)})")


def filter_sublayers(cfg, mods: List[Module], sublayers) -> List[Module]:
  if sublayers is None:
    return mods
  if isinstance(sublayers, str):
    sublayers = [sublayers]
  fam = family_of(cfg)
  al = fam.sublayer_aliases
  want = set()
  for s in sublayers:
    if s not in al:
      raise PeftConfigError(f"target_sublayers: unknown sub-layer {s!r} for {fam.name}; "
                            f"expected some of {sorted(al)}")
    want |= al[s]
  sel = [m for m in mods if m.sublayer in want]
  if not sel:
    raise PeftConfigError(f"target_sublayers={list(sublayers)} leaves no targeted module; the "
                          f"targets are in sub-layers {sorted({m.sublayer for m in mods if m.sublayer})}")
  return sel


# ----------------------------------------------------------------------------- layers

def _stack_sizes(mods):
  return {m.stack: m.n_layers for m in mods if m.stacked}


def _stack_selection(cfg, hp, mods: List[Module]) -> Optional[Dict[str, np.ndarray]]:
  """``{stack: bool[n_layers]}`` or None (all layers, unstacked modules included)."""
  given = [k for k in LAYER_SELECTION_KEYS if hp.get(k) is not None]
  if not given:
    return None
  if len(given) > 1:
    raise PeftConfigError(f"give at most one layer selection; got {given}")
  key, val = given[0], hp[given[0]]
  sizes = _stack_sizes(mods)
  if not sizes:
    raise PeftConfigError(f"{key} is set but no targeted module lies in the layer stack")
  out = {}
  if key == "layers_to_transform":
    if isinstance(val, dict):
      unknown = sorted(set(val) - set(sizes))
      if unknown:
        raise PeftConfigError(f"layers_to_transform names stacks {unknown}; expected some of {sorted(sizes)}")
      per = {s: val.get(s, []) for s in sizes}
    else:
      per = {s: val for s in sizes}
    for s, n in sizes.items():
      idx = [per[s]] if isinstance(per[s], (int, np.integer)) else list(per[s])
      for i in idx:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
          raise PeftConfigError(f"layers_to_transform entries must be ints, got {i!r}")
        ok = (-n <= i < n) if isinstance(val, dict) else any(-m <= i < m for m in sizes.values())
        if not ok:
          raise PeftConfigError(f"layers_to_transform={val!r}: layer {i} is out of range; the "
                                f"stacks have {dict(sizes)} layers")
      sel = np.zeros(n, bool)
      for i in idx:
        if -n <= i < n:
          sel[i] = True
      out[s] = sel
  else:
    for s, n in sizes.items():
      sel = np.zeros(n, bool)
      if key in ("first_k_layers", "last_k_layers"):
        k = int(val)
        if k < 1:
          raise PeftConfigError(f"{key} must be >= 1, got {val!r}")
        k = min(k, n)
        if key == "first_k_layers":
          sel[:k] = True
        else:
          sel[n - k:] = True
      else:
        f = float(val)
        if not 0.0 < f <= 1.0:
          raise PeftConfigError(f"random_layer_fraction must be in (0, 1], got {val!r}")
        k = max(1, int(round(f * n)))
        rng = np.random.default_rng([int(hp.get("layer_seed") or 0), sorted(sizes).index(s)])
        sel[rng.choice(n, size=k, replace=False)] = True
      out[s] = sel
  return out


def _module_selection(val, mods: List[Module]) -> Dict[str, Optional[np.ndarray]]:
  """``layers_to_transform`` as a dict naming modules: ``{module path: bool[n] | None}``."""
  sizes = _stack_sizes(mods)
  paths = {m.path for m in mods}
  unknown = sorted(set(val) - set(sizes) - paths)
  if unknown:
    raise PeftConfigError(f"layers_to_transform names {unknown}: neither a stack ({sorted(sizes)}) "
                          f"nor a targeted module ({sorted(paths)})")
  out = {}
  for m in mods:
    if m.path in val:
      v = val[m.path]
    elif m.stacked and m.stack in val:
      v = val[m.stack]
    else:
      continue                                   # not selected
    if v == "all":
      out[m.path] = None
      continue
    if not m.stacked:
      raise PeftConfigError(f"layers_to_transform[{m.path!r}]={v!r}: {m.path} lies outside the "
                            "layer stack; select it with 'all'")
    idx = [v] if isinstance(v, (int, np.integer)) else v
    if isinstance(idx, str) or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                       for i in idx):
      raise PeftConfigError(f"layers_to_transform[{m.path!r}]={v!r}: expected layer indices "
                            "(ints) or 'all'")
    sel = np.zeros(m.n_layers, bool)
    for i in idx:
      if not -m.n_layers <= int(i) < m.n_layers:
        raise PeftConfigError(f"layers_to_transform[{m.path!r}]: layer {i} is out of range; "
                              f"{m.path} has {m.n_layers} layers")
      sel[int(i)] = True
    out[m.path] = sel
  return out


def layer_selection(cfg, hp, mods: List[Module]) -> Optional[Dict[str, Optional[np.ndarray]]]:
  """``{module path: bool[n_layers] | None}`` of the selected modules (None: every layer of
  a stacked module, or an unstacked module named with ``'all'``), or None: no selection
  (every layer, unstacked modules included). ``layers_to_transform`` as a dict may name
  stacks and module paths; a module's own entry takes precedence over its stack's."""
  val = hp.get("layers_to_transform")
  given = [k for k in LAYER_SELECTION_KEYS if hp.get(k) is not None]
  if len(given) == 1 and isinstance(val, dict) and any(
      k not in _stack_sizes(mods) for k in val):
    return _module_selection(val, mods)
  per_stack = _stack_selection(cfg, hp, mods)
  if per_stack is None:
    return None
  return {m.path: per_stack[m.stack] for m in mods if m.stacked and m.stack in per_stack}


@dataclasses.dataclass(frozen=True)
class Placement:
  """Targeted modules with, for stacked ones, the selected layers."""
  modules: Tuple[Module, ...]
  layers: Dict[str, Optional[np.ndarray]]   # path -> bool[n_layers] (None: all / unstacked)

  def selected(self, m: Module) -> List[Optional[int]]:
    if not m.stacked:
      return [None]
    sel = self.layers.get(m.path)
    return list(range(m.n_layers)) if sel is None else [int(i) for i in np.nonzero(sel)[0]]

  def partial(self, m: Module) -> bool:
    sel = self.layers.get(m.path)
    return sel is not None and not bool(sel.all())


def place(cfg, hp, flat: Flat, default_targets, *, modules=None, what="target_modules") -> Placement:
  """Targets, sub-layer filter and layer selection -> :class:`Placement`."""
  mods = linear_modules(flat) if modules is None else modules
  targets = hp.get("target_modules")
  if targets is None:
    targets = default_targets
  sel = match_targets(cfg, mods, targets, what)
  sel = filter_sublayers(cfg, sel, hp.get("target_sublayers"))
  layers = layer_selection(cfg, hp, sel)
  if layers is None:
    return Placement(tuple(sel), {m.path: None for m in sel})
  kept = [m for m in sel if m.path in layers and (layers[m.path] is None or layers[m.path].any())]
  lay = {m.path: layers[m.path] for m in kept}
  if not kept:
    raise PeftConfigError("the layer selection leaves no targeted module")
  return Placement(tuple(kept), lay)


def layer_mask(m: Module, sel: Optional[np.ndarray], leaf_ndim: int) -> Optional[np.ndarray]:
  """Bool array ``[n_layers, 1, ...]`` broadcastable to a stacked leaf, None when all layers."""
  if sel is None or bool(sel.all()):
    return None
  return np.asarray(sel, bool).reshape((-1,) + (1,) * (leaf_ndim - 1))


@functools.lru_cache(maxsize=16)
def _abstract_flat(cfg):
  from peft_jax.models import abstract_params
  from peft_jax.peft.base import flatten
  return flatten(abstract_params(cfg))


def abstract_flat(cfg) -> Flat:
  """The base model's flattened abstract tree (shapes only; cached per config)."""
  return dict(_abstract_flat(cfg))


def dense_changed_params(placement) -> int:
  """Entries of the placed ``[in, out]`` matrices, per selected layer (what a low-rank
  update of each one changes)."""
  return int(sum(m.d_in * m.d_out * len(placement.selected(m)) for m in placement.modules))


def per_layer_tensors(state, params, leaves: Dict[str, str], to_ext) -> Dict[str, np.ndarray]:
  """``{"<hf module>.<name>": array}``: each of the method's placed modules' leaves
  (``leaves``: our leaf -> external name), one entry per selected layer, converted by
  ``to_ext(leaf, array)``. Leaves a module lacks are skipped."""
  from peft_jax.peft.base import flatten
  fl = flatten(params)
  cfg = state.model_cfg
  pl = state.method.placement(cfg, state.hparams, fl)
  out = {}
  for m in pl.modules:
    for leaf, ext in leaves.items():
      k = f"{m.path}/{leaf}"
      if k not in fl:
        continue
      v = np.asarray(fl[k])
      for i in pl.selected(m):
        out[f"{hf_module_name(cfg, m, i)}.{ext}"] = to_ext(leaf, v if i is None else v[i])
  return out


def set_per_layer_tensors(state, params, tensors, leaves: Dict[str, str], from_ext):
  """Inverse of :func:`per_layer_tensors`: the tree with those leaves read from ``tensors``
  (``from_ext(leaf, array)`` converts back)."""
  import jax.numpy as jnp
  from peft_jax.peft.base import flatten, unflatten
  fl = flatten(params)
  cfg = state.model_cfg
  pl = state.method.placement(cfg, state.hparams, fl)
  for m in pl.modules:
    for leaf, ext in leaves.items():
      k = f"{m.path}/{leaf}"
      if k not in fl:
        continue
      v = np.array(fl[k])
      for i in pl.selected(m):
        t = from_ext(leaf, np.asarray(tensors[f"{hf_module_name(cfg, m, i)}.{ext}"]))
        if i is None:
          v = t.astype(v.dtype)
        else:
          v[i] = t
      fl[k] = jnp.asarray(v)
  return unflatten(fl)
