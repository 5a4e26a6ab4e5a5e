"""The benchmark's config: ``configs/bench.py[:variant]`` plus ``--config.<field>=<value>``.

Three sections:

* ``run``: what to run and how long (declared in :data:`RUN`, each a
  :class:`~peft_jax.fields.Field` with its range and doc);
* ``models``: named models, each ``{family, batch_size, source_len, target_len, remat,
  <transformers config kwargs>}``; the kwargs build the random-weight Hugging Face
  checkpoint that both sides load (``AutoConfig.for_model(family, **kwargs)``);
* ``methods``: named methods, each ``{"method": <peft-jax method>, <its hyperparameters>}``.

Overrides name an existing field (``--config.run.blocks=5``, ``--config.models.t5.num_layers=2``)
or a hyperparameter of the method (``--config.methods.lora.lora_dropout=0.1``); the value is
parsed by the field's declaration (``run``, method hyperparameters) or by the type of the
value in the file (model dimensions). Everything is checked here, before any compute:
unknown names, bad values, and each (model, method) pair is applied abstractly
(:func:`peft_jax.peft.describe`), so a bad hyperparameter is one ``error: ...`` line.

Which library a method is compared with (:func:`reference`): ``full`` -> plain torch;
a method with an HF PEFT mapping -> HF PEFT; the bottleneck adapters -> AdapterHub
(when its interpreter is configured and present); anything else runs on peft-jax alone.
"""

from __future__ import annotations

import ast
import copy
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from peft_jax.config_lib import ConfigError, load_file
from peft_jax.fields import Field, FieldError, did_you_mean

SECTIONS = ("run", "models", "methods")
#: the AdapterHub classes of peft-jax's bottleneck adapters (their defaults mirror them)
ADAPTERHUB = {"houlsby": "DoubleSeqBnConfig", "pfeiffer": "SeqBnConfig", "parallel": "ParBnConfig"}

RUN: Dict[str, Field] = {
    "models": Field("t5,llama", "comma list of the models sections to run"),
    "methods": Field("lora,full", "comma list of the methods sections to run (each on every model)"),
    "dtype": Field("float32", "parameters and compute dtype of both sides",
                   choices=("float32", "bfloat16")),
    "warmup_steps": Field(1, "training steps run and not timed after compilation", ge=1),
    "steps_per_block": Field(2, "training steps per timed block", ge=1),
    "blocks": Field(3, "timed training blocks per side (the sides take turns)", ge=1),
    "block_warmup": Field(1, "untimed training steps (and generation calls) each side runs "
                          "at the start of each of its turns: the first step after the other "
                          "side's turn is not steady state (freed memory faulted in again)",
                          ge=0),
    "n_batches": Field(2, "distinct random batches the steps cycle through", ge=1),
    "new_tokens": Field(32, "tokens generated per row (greedy, no EOS stop)", ge=1),
    "infer_blocks": Field(2, "timed generation calls per side and kind (0: no inference)", ge=0),
    "merged": Field(True, "also time generation after merging (mergeable methods)"),
    "learning_rate": Field(1e-4, "AdamW learning rate (constant)", "float", gt=0),
    "seed": Field(0, "seed of the random weights and batches"),
    "hf_threads": Field(0, "torch intra-op threads (0: torch's default)", ge=0),
    "adapterhub_python": Field(".venv-adapters/bin/python", "interpreter with AdapterHub "
                               "(adapters) for the bottleneck adapters' reference; empty: none"),
    "together": Field(True, "both sides' processes alive together, taking turns (false: one "
                      "side after the other, for accelerators that do not hold both)"),
    "timeout_s": Field(3600, "longest wait for one worker command (seconds)", ge=1),
    "peak_tflops": Field(0.0, "the device's peak TFLOP/s at run.dtype, for model FLOPs "
                         "utilisation (0: not reported)", "float", ge=0),
}
#: the fields of a model section that are not transformers config kwargs
MODEL_KEYS: Dict[str, Field] = {
    "family": Field("t5", "t5 or llama", choices=("t5", "llama")),
    "batch_size": Field(8, "rows per training step and per generation call", ge=1),
    "source_len": Field(256, "T5: encoder tokens; LLaMA: prompt tokens (no loss)", ge=1),
    "target_len": Field(64, "T5: decoder tokens; LLaMA: tokens after the prompt (with loss)",
                        ge=1),
    "remat": Field("none", "peft-jax's rematerialisation policy of the layer scan"),
    "attention_impl": Field("", "peft-jax's attention kernel (model.attention_impl: '', "
                            "einsum, xla, cudnn)", choices=("", "einsum", "xla", "cudnn")),
}


def load(spec: str, overrides: Sequence[Tuple[str, str]] = ()) -> Dict[str, Any]:
  """The checked benchmark config (a plain dict) of ``--config=spec`` and the overrides."""
  raw = load_file(spec)
  return resolve(raw, overrides)


def resolve(raw: Dict[str, Any], overrides: Sequence[Tuple[str, str]] = ()) -> Dict[str, Any]:
  raw = copy.deepcopy(raw)
  unknown = sorted(set(raw) - set(SECTIONS))
  if unknown:
    raise ConfigError(f"unknown config section {unknown[0]!r}{did_you_mean(unknown[0], SECTIONS)}"
                      f" (a benchmark config has {', '.join(SECTIONS)})")
  for s in SECTIONS:
    raw.setdefault(s, {})
  for key, text in overrides:
    _override(raw, key, text)
  run = {}
  bad = sorted(set(raw["run"]) - set(RUN))
  if bad:
    raise ConfigError(f"unknown config field 'run.{bad[0]}'{did_you_mean(bad[0], RUN)}")
  for name, f in RUN.items():
    run[name] = _check(f"run.{name}", f, raw["run"].get(name, f.default))
  out = {"run": run, "models": {}, "methods": {}}
  for name in names(run["models"], "run.models"):
    if name not in raw["models"]:
      raise ConfigError(f"run.models names {name!r}, which is not a models section"
                        f"{did_you_mean(name, raw['models'])} (models: {', '.join(raw['models'])})")
    out["models"][name] = _model(name, raw["models"][name])
  for name in names(run["methods"], "run.methods"):
    if name not in raw["methods"]:
      raise ConfigError(f"run.methods names {name!r}, which is not a methods section"
                        f"{did_you_mean(name, raw['methods'])} (methods: "
                        f"{', '.join(raw['methods'])})")
    out["methods"][name] = _method(name, raw["methods"][name])
  for m in out["models"]:
    for k in out["methods"]:
      check_pair(out, m, k)
  return out


def names(text: str, key: str) -> List[str]:
  out = [p.strip() for p in str(text).split(",") if p.strip()]
  if not out:
    raise ConfigError(f"{key} is empty; expected a comma list of section names")
  return out


def _override(raw, key: str, text: str) -> None:
  parts = key.split(".")
  if parts[0] not in SECTIONS:
    raise ConfigError(f"unknown config field {key!r}; a benchmark config has the sections "
                      f"{', '.join(SECTIONS)} (e.g. --config.run.blocks=5)")
  if parts[0] == "run":
    if len(parts) != 2 or parts[1] not in RUN:
      raise ConfigError(f"unknown config field {key!r}{did_you_mean(parts[-1], RUN)}")
    try:
      raw["run"][parts[1]] = RUN[parts[1]].parse(text)
    except FieldError as e:
      raise ConfigError(f"{key}: {e}") from None
    return
  section = raw[parts[0]]
  if len(parts) != 3 or parts[1] not in section:
    have = ", ".join(section) or "none"
    raise ConfigError(f"unknown config field {key!r}; expected {parts[0]}.<name>.<field> with "
                      f"a name of the config ({have})")
  entry, field = section[parts[1]], parts[2]
  if parts[0] == "methods" and field != "method":
    f = _method_fields(entry.get("method", parts[1]), key).get(field)
    if f is None:
      raise ConfigError(f"unknown config field {key!r}: method {entry.get('method')!r} has no "
                        f"hyperparameter {field!r}"
                        f"{did_you_mean(field, _method_fields(entry.get('method'), key))}")
    try:
      entry[field] = f.parse(text)
    except FieldError as e:
      raise ConfigError(f"{key}: {e}") from None
    return
  if field not in entry:
    raise ConfigError(f"unknown config field {key!r}{did_you_mean(field, entry)} "
                      f"({parts[0]}.{parts[1]} has {', '.join(sorted(entry))})")
  entry[field] = _like(entry[field], text, key)


def _like(old, text: str, key: str):
  """``text`` parsed as the type of the value it replaces."""
  t = text.strip()
  try:
    if isinstance(old, bool):
      if t.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return t.lower() in ("true", "1")
    if isinstance(old, int):
      return int(t)
    if isinstance(old, float):
      return float(t)
    if isinstance(old, str):
      return t
    return ast.literal_eval(t)
  except (ValueError, SyntaxError):
    raise ConfigError(f"{key}={text!r}: expected a {type(old).__name__} like {old!r}") from None


def _check(key, f: Field, value):
  try:
    return f.normalise(value)
  except FieldError as e:
    raise ConfigError(f"{key}={e}") from None


def _model(name: str, entry: Dict[str, Any]) -> Dict[str, Any]:
  entry = dict(entry)
  out = {k: _check(f"models.{name}.{k}", f, entry.pop(k, f.default))
         for k, f in MODEL_KEYS.items()}
  from peft_jax.models.layers import REMAT_POLICIES
  if out["remat"] not in REMAT_POLICIES:
    raise ConfigError(f"models.{name}.remat={out['remat']!r}: expected one of "
                      f"{', '.join(REMAT_POLICIES)}")
  out["hf_config"] = entry
  return out


def _method_fields(method: Optional[str], key: str) -> Dict[str, Field]:
  from peft_jax.config_lib import method_fields
  try:
    return method_fields(method or "")
  except ConfigError as e:
    raise ConfigError(f"{key}: {e}") from None


def _method(name: str, entry: Dict[str, Any]) -> Dict[str, Any]:
  entry = dict(entry)
  if "method" not in entry:
    raise ConfigError(f"methods.{name} has no 'method' (a peft-jax method, e.g. lora)")
  fields = _method_fields(entry["method"], f"methods.{name}.method")
  for k, v in entry.items():
    if k == "method":
      continue
    if k not in fields:
      raise ConfigError(f"methods.{name}.{k}: method {entry['method']!r} has no hyperparameter "
                        f"{k!r}{did_you_mean(k, fields)}")
    entry[k] = _check(f"methods.{name}.{k}", fields[k], v)
  return entry


def hf_config_dict(model: Dict[str, Any]) -> Dict[str, Any]:
  """The model's ``config.json`` as ``transformers`` writes it (no weights, no torch)."""
  import transformers
  try:
    return transformers.AutoConfig.for_model(model["family"], **model["hf_config"]).to_dict()
  except (TypeError, ValueError) as e:
    raise ConfigError(f"the {model['family']} config {model['hf_config']}: {e}") from None


def check_pair(bench, model_name: str, method_name: str) -> Dict[str, Any]:
  """Applies the method to the model abstractly; a bad pairing is a :class:`ConfigError`."""
  from peft_jax.checkpoint.hf import CheckpointError, config_from_hf
  from peft_jax.peft import describe
  from peft_jax.peft.base import PeftConfigError
  model = bench["models"][model_name]
  try:
    mc = config_from_hf(hf_config_dict(model))
  except CheckpointError as e:
    raise ConfigError(f"models.{model_name}: {e}") from None
  meth = bench["methods"][method_name]
  try:
    return describe(mc, meth["method"], {k: v for k, v in meth.items() if k != "method"})
  except PeftConfigError as e:
    raise ConfigError(f"methods.{method_name} on models.{model_name}: {e}") from None


def reference(bench, method_name: str) -> Tuple[Optional[str], str]:
  """(the Hugging Face side's kind, why): ``torch`` (full fine-tuning), ``peft`` (HF
  PEFT), ``adapterhub``, or None (peft-jax alone) with the reason."""
  from peft_jax.peft import get_method
  name = bench["methods"][method_name]["method"]
  if name == "full":
    return "torch", "full fine-tuning in plain torch"
  if get_method(name).hf_peft_type is not None:
    return "peft", "HF PEFT"
  if name in ADAPTERHUB:
    py = adapterhub_python(bench)
    if py:
      return "adapterhub", f"AdapterHub ({ADAPTERHUB[name]})"
    return None, (f"AdapterHub's interpreter {bench['run']['adapterhub_python']!r} is absent"
                  if bench["run"]["adapterhub_python"] else "run.adapterhub_python is empty")
  return None, f"neither HF PEFT nor the AdapterHub bottleneck adapters have {name!r}"


def adapterhub_python(bench) -> Optional[str]:
  from peft_jax.inputs import resolve_path
  p = bench["run"]["adapterhub_python"]
  if not p:
    return None
  p = resolve_path(p)
  return p if os.path.isfile(p) and os.access(p, os.X_OK) else None


def train_config(bench, model_name: str, method_name: str, checkpoint: str,
                 total_steps: int) -> Dict[str, Any]:
  """The ``train.py`` config of one row (``model.checkpoint`` = the benchmark's checkpoint)."""
  run, model = bench["run"], bench["models"][model_name]
  m = {"checkpoint": checkpoint, "dtype": run["dtype"], "param_dtype": run["dtype"],
       "remat": model["remat"], "attention_impl": model["attention_impl"]}
  dropout = hf_config_dict(model).get("dropout_rate")
  if dropout is not None:     # the families with dropout (model.dropout_rate)
    m["dropout_rate"] = float(dropout)
  return {"model": m,
          "data": {"name": "quickstart", "max_source_len": model["source_len"],
                   "max_target_len": model["target_len"]},
          "peft": dict(bench["methods"][method_name]),
          "train": {"batch_size": model["batch_size"], "num_steps": int(total_steps),
                    "num_epochs": 0, "learning_rate": run["learning_rate"],
                    "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
                    "grad_clip": 1.0, "seed": run["seed"]},
          "mesh": {"num_devices": 1}}
