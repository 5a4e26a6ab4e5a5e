"""Interop with Hugging Face PEFT adapter directories.

``export_hf_peft(state, params, out_dir)`` writes ``adapter_config.json`` +
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(model,
out_dir)`` loads onto the ``transformers`` model (``T5ForConditionalGeneration``
/ ``LlamaForCausalLM``) with the same logits; ``import_hf_peft(dir, cfg,
base_params)`` reads such a directory (ours or one HF PEFT saved) into a
:class:`PeftState` and tree.

Supported: lora, dora (``LoraConfig(use_dora=True)``), ia3, ln_tuning,
prompt_tuning, prefix_tuning. Layouts (torch ``[out, in]`` vs our ``[in, out]``):

* LoRA ``...<module>.lora_A.weight [r, in] = A.T``, ``lora_B.weight [out, r] = B.T``,
  DoRA ``...lora_magnitude_vector [out]``; IA3 ``...ia3_l`` ``[out, 1]`` or
  ``[1, in]`` (feed-forward); LN tuning ``...<norm>.ln_tuning_layers.weight``.
  The export names the exact modules (and layers) with a ``target_modules``
  regex, so sub-layer and layer selections round-trip.
* prompt tuning: ``prompt_embeddings [P, d_model]`` (export:
  ``num_transformer_submodules=1``; import: first ``P`` rows).
* prefix tuning: ``prompt_embeddings [P, 2 L token_dim]`` (the folded prefixes,
  ``prefix_projection=False`` in the exported config), row ``2l`` / ``2l+1`` =
  key / value of layer ``l`` for LLaMA; for T5 HF's seq2seq row mapping
  (``4l mod 2L``, ``4l+1 mod 2L``), see ``prefix_tuning.py``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Tuple

import numpy as np

from peft_jax.peft import targets
from peft_jax.peft.base import PeftConfigError, PeftState, apply_peft, flatten, unflatten

PREFIX = "base_model.model."


def _regex(names: List[str]) -> str:
  return "(" + "|".join(re.escape(n) for n in names) + ")"


def _np(x):
  a = np.asarray(x)
  return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def _common(cfg) -> Dict[str, Any]:
  return {"task_type": "SEQ_2_SEQ_LM" if targets.is_t5(cfg) else "CAUSAL_LM", "inference_mode": True,
          "base_model_name_or_path": None, "revision": None}


def hf_prefix_rows(cfg, n_layers: int, submodules: int):
  """Rows of HF's ``[2L]`` prefix block that decoder layer ``l`` reads: ``[(key, value)]``."""
  if submodules == 2:
    return [((4 * l) % (2 * n_layers), (4 * l + 1) % (2 * n_layers)) for l in range(n_layers)]
  return [(2 * l, 2 * l + 1) for l in range(n_layers)]


# ----------------------------------------------------------------------------- export

def export_hf_peft(state: PeftState, params, out_dir: str) -> str:
  from safetensors.numpy import save_file
  cfg, hp, name = state.model_cfg, dict(state.hparams), state.method.name
  flat = flatten(params)
  tensors: Dict[str, np.ndarray] = {}
  conf = _common(cfg)
  if name in ("lora", "dora"):
    pl = state.method.placement(cfg, hp, flat)
    names = []
    for m in pl.modules:
      for l in pl.selected(m):
        hf = targets.hf_module_name(cfg, m, l)
        names.append(hf)
        sl = (lambda a: a[l]) if m.stacked else (lambda a: a)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = _np(sl(flat[f"{m.path}/lora_A"])).T
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = _np(sl(flat[f"{m.path}/lora_B"])).T
        if hp["use_dora"]:
          tensors[f"{PREFIX}{hf}.lora_magnitude_vector"] = _np(sl(flat[f"{m.path}/lora_magnitude"]))
    conf.update(peft_type="LORA", r=int(hp["r"]), lora_alpha=hp["lora_alpha"],
                lora_dropout=float(hp["lora_dropout"]), use_rslora=bool(hp["use_rslora"]),
                use_dora=bool(hp["use_dora"]), target_modules=_regex(names), bias="none",
                fan_in_fan_out=False, init_lora_weights=True, layers_to_transform=None,
                layers_pattern=None, rank_pattern={}, alpha_pattern={}, modules_to_save=None)
  elif name == "ia3":
    pl, ff = state.method.placement(cfg, hp, flat)
    names, ffn = [], []
    for m in pl.modules:
      for l in pl.selected(m):
        hf = targets.hf_module_name(cfg, m, l)
        names.append(hf)
        v = _np(flat[f"{m.path}/ia3_l"][l] if m.stacked else flat[f"{m.path}/ia3_l"])
        if m.path in ff:
          ffn.append(hf)
          tensors[f"{PREFIX}{hf}.ia3_l"] = v[None, :]
        else:
          tensors[f"{PREFIX}{hf}.ia3_l"] = v[:, None]
    conf.update(peft_type="IA3", target_modules=_regex(names),
                feedforward_modules=_regex(ffn) if ffn else [], fan_in_fan_out=False,
                init_ia3_weights=True, modules_to_save=None)
  elif name == "ln_tuning":
    names = []
    mods = {m.leaf: m for m in targets.norm_modules(flat)}
    for leaf in state.made_trainable:
      m = mods[leaf]
      for l in (range(m.n_layers) if m.stacked else [None]):
        hf = targets.hf_module_name(cfg, m, l)
        names.append(hf)
        tensors[f"{PREFIX}{hf}.ln_tuning_layers.weight"] = _np(flat[leaf][l] if m.stacked else flat[leaf])
    conf.update(peft_type="LN_TUNING", target_modules=_regex(names), modules_to_save=None)
  elif name == "prompt_tuning":
    from peft_jax.peft.prompt_tuning import prompt_leaf
    p = _np(flat[prompt_leaf(cfg)])
    tensors["prompt_embeddings"] = p
    conf.update(peft_type="PROMPT_TUNING", num_virtual_tokens=int(p.shape[0]), token_dim=int(p.shape[1]),
                num_transformer_submodules=1, num_attention_heads=_heads(cfg), num_layers=_layers(cfg),
                prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None)
  elif name == "prefix_tuning":
    from peft_jax.peft import prefix_tuning as PT
    state, params = PT.fold_projection(state, params)
    hp, flat = dict(state.hparams), flatten(params)
    if hp["prefix_positions"] != "shift":
      raise PeftConfigError("HF PEFT's prefix tuning shifts the token positions behind the prefix; "
                            "export needs prefix_positions='shift'")
    atts = PT.attentions(cfg, hp)
    if targets.is_t5(cfg) and [a[0] for a in atts] != ["decoder_self_attn"]:
      raise PeftConfigError("HF PEFT applies T5 prefixes to the decoder self-attention only; export "
                            f"needs prefix_attentions=['decoder_self_attn'], got {[a[0] for a in atts]}")
    _, path, L = atts[0]
    pk, pv = _np(flat[f"{path}/prefix_key"]), _np(flat[f"{path}/prefix_value"])   # [L, P, td]
    n, td = pk.shape[1], pk.shape[2]
    sub = 2 if targets.is_t5(cfg) else 1
    rows = np.zeros((2 * L, n, td), np.float32)
    written = {}
    for l, (rk, rv) in enumerate(hf_prefix_rows(cfg, L, sub)):
      for r, val in ((rk, pk[l]), (rv, pv[l])):
        if r in written and not np.array_equal(rows[r], val):
          raise PeftConfigError(
              f"HF PEFT's T5 prefix layout gives decoder layers {written[r]} and {l} the same prefix "
              f"(row {r} of {2 * L}; with an even number of decoder layers, layers l and l+L/2 share "
              "one); these layers have different prefixes, so HF PEFT cannot represent them")
        rows[r] = val
        written[r] = l
    tensors["prompt_embeddings"] = np.ascontiguousarray(np.transpose(rows, (1, 0, 2)).reshape(n, 2 * L * td))
    conf.update(peft_type="PREFIX_TUNING", num_virtual_tokens=int(n), token_dim=int(td),
                num_attention_heads=int(PT.token_dim(cfg) // (cfg.d_kv if targets.is_t5(cfg) else cfg.head_dim)),
                num_layers=int(L), num_transformer_submodules=sub, encoder_hidden_size=int(td),
                prefix_projection=False)
  else:
    raise PeftConfigError(f"HF PEFT export supports lora, dora, ia3, ln_tuning, prompt_tuning and "
                          f"prefix_tuning, not {name!r}")
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(conf, f, indent=2, sort_keys=True)
  return out_dir


def _heads(cfg):
  return cfg.num_heads if targets.is_t5(cfg) else cfg.num_attention_heads


def _layers(cfg):
  return cfg.num_layers if targets.is_t5(cfg) else cfg.num_hidden_layers


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


def _selection(found: Dict[str, Tuple[Any, set]]):
  """{path: (module, layers)} -> hp target_modules + layers_to_transform."""
  tg = "(" + "|".join(re.escape(p) for p in sorted(found)) + ")"
  per_stack: Dict[str, set] = {}
  full = True
  for p, (m, layers) in found.items():
    if not m.stacked:
      continue
    if m.stack in per_stack and per_stack[m.stack] != layers:
      raise PeftConfigError(f"adapter uses different layers for modules of the {m.stack} stack; "
                            "peft-jax selects layers per stack")
    per_stack[m.stack] = layers
    full = full and len(layers) == m.n_layers
  hp = {"target_modules": tg}
  if not full:
    if any(not m.stacked for m, _ in found.values()):
      raise PeftConfigError("adapter mixes a layer selection with modules outside the layer stack")
    hp["layers_to_transform"] = {s: sorted(v) for s, v in per_stack.items()}
  return hp


def import_hf_peft(path: str, model_cfg, base_params) -> Tuple[PeftState, Any]:
  conf, tensors = _read(path)
  cfg = model_cfg
  ptype = str(conf.get("peft_type", "")).upper()
  base = flatten(base_params)
  if conf.get("modules_to_save"):
    raise PeftConfigError(f"modules_to_save={conf['modules_to_save']} is not supported")
  if ptype == "LORA":
    for k in ("rank_pattern", "alpha_pattern"):
      if conf.get(k):
        raise PeftConfigError(f"LoRA {k}={conf[k]} is not supported (one rank/alpha for all modules)")
    if conf.get("bias", "none") != "none":
      raise PeftConfigError(f"LoRA bias={conf['bias']!r} is not supported")
    idx = _module_index(cfg, targets.linear_modules(base))
    found: Dict[str, Tuple[Any, set]] = {}
    for k in tensors:
      if k.endswith(".lora_A.weight"):
        hf = _strip(k, ".lora_A.weight")
        if hf not in idx:
          raise PeftConfigError(f"adapter tensor {k}: module {hf!r} does not exist in this model")
        m, l = idx[hf]
        found.setdefault(m.path, (m, set()))[1].add(l)
    if not found:
      raise PeftConfigError(f"no lora_A tensors in {path}")
    dora = bool(conf.get("use_dora"))
    hp = {"r": int(conf["r"]), "lora_alpha": conf["lora_alpha"],
          "lora_dropout": float(conf.get("lora_dropout") or 0.0),
          "use_rslora": bool(conf.get("use_rslora")), **_selection(found)}
    state = apply_peft(cfg, base_params, "dora" if dora else "lora", hp)
    flat = flatten(state.params)
    for p, (m, layers) in found.items():
      for l in layers:
        hf = targets.hf_module_name(cfg, m, l)
        vals = {"lora_A": tensors[f"{PREFIX}{hf}.lora_A.weight"].T,
                "lora_B": tensors[f"{PREFIX}{hf}.lora_B.weight"].T}
        if dora:
          vals["lora_magnitude"] = tensors[f"{PREFIX}{hf}.lora_magnitude_vector"]
        for nm, v in vals.items():
          flat[f"{p}/{nm}"] = _set(flat[f"{p}/{nm}"], l, v, f"{hf}.{nm}")
    return state, unflatten(flat)
  if ptype == "IA3":
    idx = _module_index(cfg, targets.linear_modules(base))
    found, ff = {}, set()
    for k in tensors:
      if k.endswith(".ia3_l"):
        hf = _strip(k, ".ia3_l")
        if hf not in idx:
          raise PeftConfigError(f"adapter tensor {k}: module {hf!r} does not exist in this model")
        m, l = idx[hf]
        found.setdefault(m.path, (m, set()))[1].add(l)
        if tensors[k].shape[0] == 1 and tensors[k].shape[1] == m.d_in and m.d_out != 1:
          ff.add(m.path)
    hp = _selection(found)
    hp["feedforward_modules"] = ("(" + "|".join(re.escape(p) for p in sorted(ff)) + ")") if ff else []
    state = apply_peft(cfg, base_params, "ia3", hp)
    flat = flatten(state.params)
    for p, (m, layers) in found.items():
      for l in layers:
        hf = targets.hf_module_name(cfg, m, l)
        flat[f"{p}/ia3_l"] = _set(flat[f"{p}/ia3_l"], l, tensors[f"{PREFIX}{hf}.ia3_l"].reshape(-1), hf)
    return state, unflatten(flat)
  if ptype == "LN_TUNING":
    mods = targets.norm_modules(base)
    idx = _module_index(cfg, mods)
    found = {}
    for k in tensors:
      if k.endswith(".ln_tuning_layers.weight"):
        hf = _strip(k, ".ln_tuning_layers.weight")
        if hf not in idx:
          raise PeftConfigError(f"adapter tensor {k}: norm {hf!r} does not exist in this model")
        m, l = idx[hf]
        found.setdefault(m.path, (m, set()))[1].add(l)
    for p, (m, layers) in found.items():
      if m.stacked and len(layers) != m.n_layers:
        raise PeftConfigError(f"LN tuning adapter covers only layers {sorted(layers)} of {p}")
    state = apply_peft(cfg, base_params, "ln_tuning",
                       {"target_modules": "(" + "|".join(re.escape(p) for p in sorted(found)) + ")"})
    flat = flatten(state.params)
    for p, (m, layers) in found.items():
      for l in layers:
        hf = targets.hf_module_name(cfg, m, l)
        flat[m.leaf] = _set(flat[m.leaf], l, tensors[f"{PREFIX}{hf}.ln_tuning_layers.weight"], hf)
    return state, unflatten(flat)
  if ptype == "PROMPT_TUNING":
    from peft_jax.peft.prompt_tuning import prompt_leaf
    n = int(conf["num_virtual_tokens"])
    emb = tensors["prompt_embeddings"][:n]
    state = apply_peft(cfg, base_params, "prompt_tuning", {"num_virtual_tokens": n})
    flat = flatten(state.params)
    flat[prompt_leaf(cfg)] = _set(flat[prompt_leaf(cfg)], None, emb, "prompt_embeddings")
    return state, unflatten(flat)
  if ptype == "PREFIX_TUNING":
    from peft_jax.peft import prefix_tuning as PT
    n = int(conf["num_virtual_tokens"])
    emb = tensors["prompt_embeddings"]
    L_hf = int(conf["num_layers"])
    td = int(conf["token_dim"])
    if td != PT.token_dim(cfg):
      raise PeftConfigError(f"prefix adapter token_dim={td}, but this model's attention keys are "
                            f"{PT.token_dim(cfg)} wide (kv_heads * head_dim)")
    state = apply_peft(cfg, base_params, "prefix_tuning", {"num_virtual_tokens": n})
    _, apath, L = PT.attentions(cfg, state.hparams)[0]
    if L_hf != L:
      raise PeftConfigError(f"prefix adapter has num_layers={L_hf}, the model's prefixed attention has "
                            f"{L} layers")
    if emb.shape != (n, 2 * L * td):
      raise PeftConfigError(f"prompt_embeddings has shape {emb.shape}, expected {(n, 2 * L * td)}")
    rows = emb.reshape(n, 2 * L, td).transpose(1, 0, 2)
    sub = int(conf.get("num_transformer_submodules") or (2 if targets.is_t5(cfg) else 1))
    flat = flatten(state.params)
    pk, pv = np.zeros((L, n, td), np.float32), np.zeros((L, n, td), np.float32)
    for l, (rk, rv) in enumerate(hf_prefix_rows(cfg, L, sub)):
      pk[l], pv[l] = rows[rk], rows[rv]
    flat[f"{apath}/prefix_key"] = pk.astype(flat[f"{apath}/prefix_key"].dtype)
    flat[f"{apath}/prefix_value"] = pv.astype(flat[f"{apath}/prefix_value"].dtype)
    return state, unflatten(flat)
  raise PeftConfigError(f"HF PEFT import supports LORA (incl. DoRA), IA3, LN_TUNING, PROMPT_TUNING "
                        f"and PREFIX_TUNING adapters, not peft_type={conf.get('peft_type')!r}")


def _set(arr, layer, value, what):
  a = np.array(arr)
  target = a[layer] if layer is not None else a
  if tuple(value.shape) != tuple(target.shape):
    raise PeftConfigError(f"adapter tensor for {what} has shape {tuple(value.shape)}, the model "
                          f"expects {tuple(target.shape)}")
  if layer is None:
    return value.astype(a.dtype)
  a[layer] = value
  return a
