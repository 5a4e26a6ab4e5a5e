"""Fully trained modules beside any method [``modules_to_save``, every method's hyperparameter].

What it does: the weights of the named modules (e.g. the output head ``lm_head``, a norm, the
embedding) train in full alongside the method's own leaves; everything else stays frozen.
It is method-independent: :func:`peft_jax.peft.base.apply_peft` resolves it for every method
(the field is added to every method's ``hparams`` at registration), the leaves land in
``PeftState.saved`` (trainable in the optimizer mask, saved in adapter checkpoints by
:mod:`peft_jax.peft.io`, counted as trainable) and :mod:`peft_jax.peft.hf_peft` maps it to
and from HF PEFT's ``modules_to_save``.

Which modules: every module with weights of its own, as ``transformers`` names them (the
family's ``hf_weight_names``: linear projections, norms, embeddings, the head). A name
selects, as HF PEFT's ``_set_trainable`` does, every module whose ``transformers`` name
(``model.layers.1.mlp.down_proj``, ``lm_head``) ends with it, and also every module whose
layer-agnostic path (``layers/mlp/down``, ``lm_head``) is it or ends with ``/<name>``; a
string that is no plain name is a regular expression ``re.fullmatch``-ed against the
layer-agnostic paths. A name that selects only some layers of a stacked leaf trains those
layers (an update mask keeps the others frozen and out of the counts). A name that matches
only a module holding other modules (``mlp``, ``self_attn``) is refused with one line (HF
would copy the whole block; name its weights' modules instead).

T5 v1.0's tied head: ``lm_head`` there is HF's ``nn.Linear`` sharing the input embedding
(:class:`peft_jax.models.layers.TiedHead` in our model). HF's ``ModulesToSaveWrapper``
deep-copies it, which unties a trained copy; here the copy is a new leaf ``lm_head/kernel``
``[d_model, vocab]`` initialised from ``shared/embedding`` transposed, which the tied head
reads instead of the shared matrix (T5's ``d_model**-0.5`` rescale before the head stays,
as in ``transformers``). Trainable counts equal HF PEFT's (one copy of each module).

A module cannot be both adapted by the method and fully trained (refused with one line).
Refused too (the family's ``modules_to_save_problem``), where HF PEFT's copy would act
differently from one trained leaf: T5's ``shared`` embedding (HF's copy is read by no
layer: the stacks keep the original as ``embed_tokens``) and, on a LLaMA-family model with
a tied head, ``embed_tokens`` (HF's head stays on the original).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from peft_jax.fields import Field
from peft_jax.models.family import family_of

#: the field every method gets (``--config.peft.modules_to_save``)
FIELD = Field(None, "modules trained in full beside the method (HF PEFT's modules_to_save): "
              "transformers names or our paths, e.g. lm_head", "names")


@dataclasses.dataclass(frozen=True)
class SavedModule:
  """A module with weights of its own, in our tree and in ``transformers``."""
  path: str                     # our layer-agnostic module path ('layers/mlp/down', 'lm_head')
  hf: str                       # its transformers name, '{i}' for the layer ('model.layers.{i}.mlp.down_proj')
  leaves: Tuple[Tuple[str, str, bool], ...]   # (our leaf, HF parameter name, transposed)
  n_layers: Optional[int]       # stacked: leading layers axis
  tied_from: Optional[str] = None   # a new leaf copied from this one (T5's tied head)

  def hf_name(self, layer):
    return self.hf.format(i=layer)

  def layers(self):
    return list(range(self.n_layers)) if self.n_layers else [None]


def tied_head_source(cfg, flat) -> Optional[str]:
  """The embedding leaf that T5's tied head reads, when the model has such a head and no
  ``lm_head/kernel`` of its own (None otherwise)."""
  src = getattr(family_of(cfg), "tied_head_source", lambda c: None)(cfg)
  return src if src is not None and "lm_head/kernel" not in flat and src in flat else None


def untied_copies(cfg, saved) -> List[str]:
  """The leaves of ``saved`` that are new untied copies of a tied head (no base weight)."""
  src = getattr(family_of(cfg), "tied_head_source", lambda c: None)(cfg)
  return [k for k in saved if src is not None and k == "lm_head/kernel"]


def modules(cfg, flat) -> List[SavedModule]:
  """Every module of the model that ``modules_to_save`` can name."""
  groups: Dict[str, list] = {}
  for leaf, name, n, tr in family_of(cfg).hf_weight_names(cfg):
    if leaf not in flat:
      continue
    hf, param = name.rsplit(".", 1)
    path = leaf.rsplit("/", 1)[0]
    g = groups.setdefault(path, [hf, n, []])
    g[2].append((leaf, param, tr))
  out = [SavedModule(path=p, hf=hf, leaves=tuple(ls), n_layers=n) for p, (hf, n, ls) in groups.items()]
  src = getattr(family_of(cfg), "tied_head_source", lambda c: None)(cfg)
  if src is not None and src in flat:   # (also when the tree holds the copy already)
    out.append(SavedModule(path="lm_head", hf="lm_head", leaves=(("lm_head/kernel", "weight", True),),
                           n_layers=None, tied_from=src))
  return sorted(out, key=lambda m: m.path)


def _suffix(path: str, name: str) -> bool:
  return path == name or path.endswith("/" + name)


def resolve(cfg, flat, spec) -> Dict[SavedModule, Optional[np.ndarray]]:
  """``{module: bool[n_layers] of the selected layers, or None (all / unstacked)}``."""
  from peft_jax.peft.base import PeftConfigError
  mods = modules(cfg, flat)
  if isinstance(spec, str):
    spec = [spec] if re.fullmatch(r"[\w.]+", spec) else spec
  if isinstance(spec, str):
    try:
      rx = re.compile(spec)
    except re.error as e:
      raise PeftConfigError(f"modules_to_save={spec!r} is not a valid regular expression: {e}") from None
    sel = {m: None for m in mods if rx.fullmatch(m.path)}
    if not sel:
      raise PeftConfigError(f"modules_to_save={spec!r} matches no module; modules: "
                            f"{', '.join(m.path for m in mods)}")
    return sel
  if not isinstance(spec, (list, tuple)) or not all(isinstance(s, str) and s for s in spec):
    raise PeftConfigError(f"modules_to_save must be a list of module names or a regex, got {spec!r}")
  containers = {".".join(m.hf_name(l).split(".")[:k]) for m in mods for l in m.layers()
                for k in range(1, len(m.hf_name(l).split(".")))}
  out: Dict[SavedModule, Optional[np.ndarray]] = {}
  for name in spec:
    hit = False
    for m in mods:
      if _suffix(m.path, name):
        layers = [True] * (m.n_layers or 1)
      else:
        layers = [m.hf_name(l).endswith(name) for l in m.layers()]
      if not any(layers):
        continue
      hit = True
      prev = out.get(m)
      cur = np.asarray(layers, bool) if m.n_layers else None
      if m in out and prev is not None and cur is not None:
        cur = cur | prev
      elif m in out:
        cur = None
      out[m] = cur
    if not hit:
      inner = sorted(c for c in containers if c.endswith(name))
      if inner:
        raise PeftConfigError(f"modules_to_save: {name!r} names {inner[0]!r}, a module holding "
                              "other modules; peft-jax trains modules with weights of their own "
                              f"(e.g. {', '.join(m.path for m in mods[:4])})")
      raise PeftConfigError(f"modules_to_save: {name!r} matches no module of this "
                            f"{family_of(cfg).name} model; modules: "
                            f"{', '.join(m.path for m in mods)} (or their transformers names)")
  return {m: (None if s is not None and s.all() else s) for m, s in out.items()}


def apply(cfg, spec, flat, method_leaves, made) -> Tuple[Dict[str, object], Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """``(existing leaves made trainable {leaf: None}, new leaves {leaf: array}, update masks)``
  for ``spec``; ``flat``: the base tree, ``method_leaves``/``made``: the method's new leaves
  and the existing leaves it trains (a module the method touches is refused)."""
  from peft_jax.peft.base import PeftConfigError
  sel = resolve(cfg, flat, spec)
  existing, new, masks = {}, {}, {}
  problem = getattr(family_of(cfg), "modules_to_save_problem", lambda c, p: None)
  for m, layers in sel.items():
    why = problem(cfg, m.path)
    if why:
      raise PeftConfigError(f"modules_to_save: {m.path} ({m.hf}) is not supported: {why}")
    clash = sorted(k for k in list(method_leaves) + list(made)
                   if k.startswith(m.path + "/") or any(k == leaf for leaf, _, _ in m.leaves))
    if clash:
      raise PeftConfigError(f"modules_to_save: module {m.path} is also adapted by the method "
                            f"({clash[0]}); a module is either adapted or fully trained")
    for leaf, _, tr in m.leaves:
      if m.tied_from is not None:     # an untied trained copy of the shared matrix
        import jax
        import jax.numpy as jnp
        src = flat[m.tied_from]
        new[leaf] = (jax.ShapeDtypeStruct(tuple(src.shape)[::-1], src.dtype)
                     if isinstance(src, jax.ShapeDtypeStruct) else jnp.swapaxes(jnp.asarray(src), 0, 1))
        continue
      existing[leaf] = None
      if layers is not None:
        nd = len(flat[leaf].shape)
        masks[leaf] = np.asarray(layers, bool).reshape((-1,) + (1,) * (nd - 1))
  return existing, new, masks


# ----------------------------------------------------------------------------- HF PEFT

def _torch_weight(m: SavedModule, leaf: str, tr: bool, value):
  a = np.asarray(value)
  a = a.astype(np.float32) if a.dtype.name == "bfloat16" else a
  return np.ascontiguousarray(a.T if tr else a)


def hf_export(state, params, prefix: str):
  """``(modules_to_save: exact transformers names, {tensor name: array})`` of ``state.saved``."""
  from peft_jax.tree import flatten
  flat = flatten(params)
  names, tensors = [], {}
  for m in modules(state.model_cfg, flat):
    for leaf, param, tr in m.leaves:
      if leaf not in state.saved:
        continue
      mask = state.update_masks.get(leaf)
      for l in m.layers():
        if l is not None and mask is not None and not bool(np.asarray(mask).reshape(-1)[l]):
          continue
        hf = m.hf_name(l)
        if hf not in names:
          names.append(hf)
        v = flat[leaf] if l is None else flat[leaf][l]
        tensors[f"{prefix}{hf}.{param}"] = _torch_weight(m, leaf, tr, v)
  return names, tensors


def hf_import(spec, tensors, out, base_params, prefix: str):
  """The imported ``(state, params)`` of the method, rebuilt with ``modules_to_save=spec``
  and the trained copies read from ``tensors``."""
  from peft_jax.peft.base import PeftConfigError, apply_peft
  from peft_jax.peft.hf_peft import need, set_layer
  from peft_jax.tree import flatten, unflatten
  state, params = out
  cfg = state.model_cfg
  new = apply_peft(cfg, base_params, state.method.name, dict(state.hparams, modules_to_save=list(spec)
                                                              if not isinstance(spec, str) else [spec]))
  flat, got = flatten(new.params), flatten(params)
  for k in set(state.added) | set(state.made_trainable):
    flat[k] = got[k]
  base = flatten(base_params)
  for m, layers in resolve(cfg, base, new.hparams["modules_to_save"]).items():
    for leaf, param, tr in m.leaves:
      for l in m.layers():
        if l is not None and layers is not None and not layers[l]:
          continue
        key = f"{prefix}{m.hf_name(l)}.{param}"
        v = np.asarray(need(tensors, key), np.float32)
        v = v.T if tr else v
        if m.tied_from is not None and tuple(v.shape) != tuple(np.shape(flat[leaf])):
          raise PeftConfigError(f"adapter tensor {key} has shape {tuple(v.T.shape)}, the model "
                                f"expects {tuple(np.shape(flat[leaf]))[::-1]}")
        flat[leaf] = set_layer(flat[leaf], l, v, key)
  return new, unflatten(flat)


def check_hf_base_layers(cfg, base_params, tensors, prefix: str) -> None:
  """HF PEFT saves ``<module>.base_layer.weight`` beside LoRA on ``lm_head`` / embeddings;
  HF would load it over the model's weight, so it must equal it (read, then compared)."""
  from peft_jax.peft.base import PeftConfigError
  from peft_jax.tree import flatten
  suffix = ".base_layer.weight"
  names = [k for k in tensors if k.endswith(suffix)]
  if not names:
    return
  base = flatten(base_params)
  by_hf = {}
  for m in modules(cfg, base):
    for l in m.layers():
      by_hf[m.hf_name(l)] = (m, l)
  for k in names:
    hf = k[len(prefix):-len(suffix)] if k.startswith(prefix) else k[:-len(suffix)]
    if hf not in by_hf:
      raise PeftConfigError(f"adapter tensor {k}: module {hf!r} does not exist in this model")
    m, l = by_hf[hf]
    leaf, _, tr = [x for x in m.leaves if x[1] == "weight"][0]
    ours = np.asarray(base[m.tied_from], np.float32) if m.tied_from else _torch_weight(
        m, leaf, tr, base[leaf] if l is None else base[leaf][l])
    theirs = np.asarray(tensors[k], np.float32)
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, atol=1e-6, rtol=1e-5):
      raise PeftConfigError(f"adapter tensor {k} is a base weight of {hf} that differs from this "
                            "model's (HF PEFT would load it over the model's); load the adapter "
                            "onto the base model it was made for")
