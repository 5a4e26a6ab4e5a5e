"""Interop with Hugging Face PEFT adapter directories.

``export_hf_peft(state, params, out_dir)`` writes ``adapter_config.json`` +
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(model,
out_dir)`` loads onto the ``transformers`` model (``T5ForConditionalGeneration``
/ ``LlamaForCausalLM``) with the same logits; ``import_hf_peft(dir, cfg,
base_params)`` reads such a directory (ours or one HF PEFT saved) into a
:class:`PeftState` and tree.

Each method owns its mapping: ``Method.hf_peft_type`` names the HF PEFT ``peft_type``,
``Method.hf_export(state, params) -> (config fields, tensors)`` and
``Method.hf_import(conf, tensors, model_cfg, base_params, path) -> (state, params)``
convert; this module holds the file format and the shared helpers. Mapped: lora, dora
(``LoraConfig(use_dora=True)``), ia3, ln_tuning, prompt_tuning, prefix_tuning, krona
(``LOKR``), adalora (``ADALORA``). Layouts (torch ``[out, in]`` vs our ``[in, out]``):

* LoRA ``...<module>.lora_A.weight [r, in] = A.T``, ``lora_B.weight [out, r] = B.T``,
  DoRA ``...lora_magnitude_vector [out]`` (embeddings, ``lora_bias``, trainable tokens:
  below); IA3 ``...ia3_l`` ``[out, 1]`` or
  ``[1, in]`` (feed-forward); LN tuning ``...<norm>.ln_tuning_layers.weight``.
  The export names the exact modules (and layers) with a ``target_modules``
  regex, so sub-layer and layer selections round-trip.
* prompt tuning: ``prompt_embeddings [P, d_model]`` (export:
  ``num_transformer_submodules=1``; import: first ``P`` rows).
* prefix tuning: ``prompt_embeddings [P, 2 L token_dim]`` (the folded prefixes,
  ``prefix_projection=False`` in the exported config), row ``2l`` / ``2l+1`` =
  key / value of layer ``l`` for LLaMA; for T5 HF's seq2seq row mapping
  (``4l mod 2L``, ``4l+1 mod 2L``), see ``prefix_tuning.py``.

Strict import: every tensor of the adapter file must be read by the method's mapping
(the tensors reach it as a :class:`Tracked` dict that records what was read), and,
for a method that declares ``Method.hf_fields``, every field of
``adapter_config.json`` must be used, a known no-op (:data:`COMMON_FIELDS` and the
method's no-op entries) or hold one of the values the method accepts. Anything else
stops the import with one line naming the tensor or the field and its value, never
a silently different model.

LoRA beyond linear layers (``lora.py``): ``...embed_tokens.lora_embedding_A [r, vocab] = A.T``,
``lora_embedding_B [width, r] = B.T`` (DoRA: ``...embed_tokens.lora_magnitude_vector
[width]``); HF's saved copy of the adapted table (``...embed_tokens.base_layer.weight``) is
read and must equal the base model's. ``lora_bias``: ``...<module>.lora_B.bias [out]``.
``trainable_token_indices``: ``...<table>.token_adapter.trainable_tokens_delta [n, width]``
(the rows themselves, not a difference; ``<table>`` is ``shared`` on T5,
``model.embed_tokens`` on LLaMA).

``modules_to_save`` (every method; :mod:`peft_jax.peft.modules_to_save`) is mapped here, for
every method: the trained copies are ``<prefix><hf module>.weight`` (HF PEFT drops the
``modules_to_save.default.`` part when saving), the exported ``modules_to_save`` lists the
exact ``transformers`` module names. The ``<module>.base_layer.weight`` that HF PEFT saves
beside LoRA on ``lm_head`` / embeddings (``save_embedding_layers="auto"``) must equal the
model's weight (it would replace it in HF), else the import stops with one line.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from peft_jax.models.family import family_of
from peft_jax.peft import targets
from peft_jax.peft.base import PeftConfigError, PeftState, apply_peft, flatten, unflatten

PREFIX = "base_model.model."

#: fields of every HF PEFT config that do not change the adapted model
COMMON_FIELDS = ("task_type", "peft_type", "auto_mapping", "peft_version",
                 "base_model_name_or_path", "revision", "inference_mode")
USED, NOOP = "used", "noop"

#: tensor name fragments of HF PEFT features that no mapping here reads
UNSUPPORTED_TENSORS = (
    ("modules_to_save", "modules_to_save (fully trained module copies)"),
)


class Tracked(dict):
  """The adapter's tensors; records every name read with ``[]`` in ``used`` (shared
  with the views made by :func:`unprefixed`, which map back through ``origin``)."""

  def __init__(self, items, used=None, origin=None):
    super().__init__(items)
    self.used = set() if used is None else used
    self.origin = origin or {}

  def __getitem__(self, k):
    v = super().__getitem__(k)
    self.used.add(self.origin.get(k, k))
    return v


def unprefixed(tensors) -> Tracked:
  """The tensors named without :data:`PREFIX`; reads count as reads of the originals."""
  names = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): k for k in tensors}
  used = tensors.used if isinstance(tensors, Tracked) else None
  return Tracked({n: dict.__getitem__(tensors, k) for n, k in names.items()}, used, names)


def regex(names: List[str]) -> str:
  return "(" + "|".join(re.escape(n) for n in names) + ")"


def np32(x):
  a = np.asarray(x)
  return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def common_config(cfg) -> Dict[str, Any]:
  return {"task_type": family_of(cfg).hf_task_type, "inference_mode": True,
          "base_model_name_or_path": None, "revision": None}


def hf_prefix_rows(cfg, n_layers: int, submodules: int):
  """Rows of HF's ``[2L]`` prefix block that decoder layer ``l`` reads: ``[(key, value)]``."""
  if submodules == 2:
    return [((4 * l) % (2 * n_layers), (4 * l + 1) % (2 * n_layers)) for l in range(n_layers)]
  return [(2 * l, 2 * l + 1) for l in range(n_layers)]


# ----------------------------------------------------------------------------- export

def export_hf_peft(state: PeftState, params, out_dir: str,
                   base_model_name_or_path: Optional[str] = None) -> str:
  """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` for HF PEFT through the
  method's own mapping (``Method.hf_peft_type``, ``Method.hf_export``).

  ``base_model_name_or_path`` defaults to the run's base checkpoint (``state.base_model``:
  ``model.checkpoint``, a local directory made absolute, or a hub id), so that
  ``AutoPeftModelForCausalLM`` / ``AutoPeftModelForSeq2SeqLM`` load the directory; runs on
  a random-weight preset write null."""
  from safetensors.numpy import save_file
  method = state.method
  if method.hf_peft_type is None:
    raise PeftConfigError(f"HF PEFT export supports {', '.join(hf_methods())}, not "
                          f"{method.name!r}")
  fields, tensors = method.hf_export(state, params)
  if state.saved:
    from peft_jax.peft import modules_to_save
    fields["modules_to_save"], more = modules_to_save.hf_export(state, params, PREFIX)
    tensors.update(more)
  conf = dict(common_config(state.model_cfg), peft_type=method.hf_peft_type, **fields)
  if base_model_name_or_path is None:
    base_model_name_or_path = getattr(state, "base_model", "") or None
  conf["base_model_name_or_path"] = base_model_name_or_path
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(conf, f, indent=2, sort_keys=True)
  return out_dir


def hf_methods() -> List[str]:
  """The registered methods with an HF PEFT mapping."""
  from peft_jax.peft.base import _REGISTRY
  return sorted(n for n, m in _REGISTRY.items() if m.hf_peft_type is not None)


# ----------------------------------------------------------------------------- import

def _read(path):
  cf = os.path.join(path, "adapter_config.json")
  if not os.path.exists(cf):
    raise PeftConfigError(f"no adapter_config.json in {path}; expected an HF PEFT adapter directory")
  conf = json.load(open(cf))
  st = os.path.join(path, "adapter_model.safetensors")
  if os.path.exists(st):
    from safetensors.numpy import load_file
    tensors = load_file(st)
  elif os.path.exists(os.path.join(path, "adapter_model.bin")):
    import torch
    tensors = {k: v.float().numpy() for k, v in
               torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu",
                          weights_only=True).items()}
  else:
    raise PeftConfigError(f"no adapter_model.safetensors or adapter_model.bin in {path}")
  return conf, {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _module_index(cfg, mods):
  idx = {}
  for m in mods:
    for l in (range(m.n_layers) if m.stacked else [None]):
      idx[targets.hf_module_name(cfg, m, l)] = (m, l)
  return idx


def _strip(key, suffix):
  k = key[: -len(suffix)]
  return k[len(PREFIX):] if k.startswith(PREFIX) else k


def selection(found: Dict[str, Tuple[Any, set]]):
  """{path: (module, layers)} -> hp ``target_modules`` + ``layers_to_transform``: per stack
  when the modules of each stack share their layers, else per module (an adapter whose
  regex chose different layers for different modules, or one that mixes a layer
  selection with modules outside the layer stack)."""
  tg = "(" + "|".join(re.escape(p) for p in sorted(found)) + ")"
  per_stack: Dict[str, set] = {}
  shared, full = True, True
  for p, (m, layers) in found.items():
    if not m.stacked:
      continue
    if m.stack in per_stack and per_stack[m.stack] != layers:
      shared = False
    per_stack.setdefault(m.stack, layers)
    full = full and len(layers) == m.n_layers
  hp = {"target_modules": tg}
  if full:
    return hp
  if shared and all(m.stacked for m, _ in found.values()):
    hp["layers_to_transform"] = {s: sorted(v) for s, v in per_stack.items()}
  else:
    hp["layers_to_transform"] = {
        p: (sorted(layers) if m.stacked and len(layers) < m.n_layers else "all")
        for p, (m, layers) in sorted(found.items())}
  return hp


def import_hf_peft(path: str, model_cfg, base_params) -> Tuple[PeftState, Any]:
  """Reads an HF PEFT adapter directory through the mapping of the method whose
  ``hf_peft_type`` is the adapter's ``peft_type``."""
  from peft_jax.peft.base import _REGISTRY
  conf, tensors = _read(path)
  ptype = str(conf.get("peft_type", "")).upper()
  owners = [m for _, m in sorted(_REGISTRY.items()) if m.hf_peft_type == ptype]
  if not owners:
    types = sorted({m.hf_peft_type for m in _REGISTRY.values() if m.hf_peft_type})
    raise PeftConfigError(f"HF PEFT import supports peft_type {', '.join(types)}, not "
                          f"peft_type={conf.get('peft_type')!r}")
  method = owners[0]
  conf = dict(conf)
  saved = conf.pop("modules_to_save", None)
  check_fields(conf, method.hf_fields, ptype)
  check_known_tensors(tensors)
  tracked = Tracked(tensors)
  from peft_jax.peft import modules_to_save
  modules_to_save.check_hf_base_layers(model_cfg, base_params, tracked, PREFIX)
  out = method.hf_import(conf, tracked, model_cfg, base_params, path)
  if saved:
    out = modules_to_save.hf_import(saved, tracked, out, base_params, PREFIX)
  unread = sorted(set(tensors) - tracked.used)
  if unread:
    raise PeftConfigError(f"adapter tensor {unread[0]} is not understood by peft-jax's {ptype} "
                          f"import ({len(unread)} such tensor(s)); it reads only the tensors of "
                          "the modules its mapping names")
  return out


def need(tensors, key: str):
  """``tensors[key]``, or one line saying the adapter file lacks it."""
  if key not in tensors:
    raise PeftConfigError(f"adapter tensor {key} is missing from the adapter file")
  return tensors[key]


def check_fields(conf, rules, ptype: str) -> None:
  """Each field of ``adapter_config.json`` is common, used or a no-op by ``rules``
  (``{field: USED | NOOP | (accepted values, why others are refused)}``); None: the
  method declares no rules yet (only its tensors are checked)."""
  if rules is None:
    return
  for k in sorted(conf):
    v = conf[k]
    if k in COMMON_FIELDS or rules.get(k) in (USED, NOOP):
      continue
    if k not in rules:
      raise PeftConfigError(f"adapter_config.json field {k}={v!r} is unknown to peft-jax's {ptype} "
                            f"import; it knows {', '.join(sorted(set(rules) | set(COMMON_FIELDS)))}")
    accepted, why = rules[k]
    if not any(v == a and type(v) is type(a) or (v is None and a is None) for a in accepted):
      raise PeftConfigError(f"adapter_config.json {k}={v!r} is not supported ({why}); peft-jax "
                            f"imports {k} only as {' or '.join(repr(a) for a in accepted)}")


def check_known_tensors(tensors) -> None:
  """One line for the first tensor of a feature that no mapping reads."""
  for k in sorted(tensors):
    for frag, what in UNSUPPORTED_TENSORS:
      if frag in k:
        raise PeftConfigError(f"adapter tensor {k}: {what} is not supported by peft-jax's import")


def found_modules(model_cfg, base_flat, tensors, suffix: str, modules=None):
  """``{path: (module, {layers})}`` of the tensors named ``<prefix><hf module><suffix>``;
  a module that does not exist in the model is one error line."""
  if modules is None:
    modules = targets.linear_modules(base_flat) + targets.tied_head_modules(model_cfg, base_flat)
  idx = _module_index(model_cfg, modules)
  found: Dict[str, Tuple[Any, set]] = {}
  for k in tensors:
    if k.endswith(suffix):
      hf = _strip(k, suffix)
      if hf not in idx:
        raise PeftConfigError(f"adapter tensor {k}: module {hf!r} does not exist in this model")
      m, l = idx[hf]
      found.setdefault(m.path, (m, set()))[1].add(l)
  return found


def set_layer(arr, layer, value, what):
  a = np.array(arr)
  target = a[layer] if layer is not None else a
  if tuple(value.shape) != tuple(target.shape):
    raise PeftConfigError(f"adapter tensor for {what} has shape {tuple(value.shape)}, the model "
                          f"expects {tuple(target.shape)}")
  if layer is None:
    return value.astype(a.dtype)
  a[layer] = value
  return a
