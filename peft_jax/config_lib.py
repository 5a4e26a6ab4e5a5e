"""The experiment config: its schema, the config files in ``configs/``, and the command line.

A config is an ``ml_collections.ConfigDict`` with the sections ``model``, ``data``,
``peft``, ``train``, ``eval``, ``mesh`` and the field ``tokenizer``. Every field is a
:class:`~peft_jax.fields.Field` declared where its meaning lives:

* ``model``, ``train``, ``eval``, ``mesh``, ``tokenizer`` and the common ``data`` fields:
  :data:`SCHEMA` below;
* ``peft``: ``method`` plus the chosen method's ``hparams`` (its own module);
* ``data``: plus the chosen data set's loader knobs (``peft_jax.data.sources.KNOBS``,
  and :data:`LOCAL_KNOBS` for the two formats read here).

:func:`load` reads ``configs/<file>.py[:<variant>]``, applies ``--config.<section>.<field>
=<value>`` overrides and checks every field before any weights or data are touched; a
problem is one :class:`ConfigError` line (``train.py`` prints it as ``error: ...`` and exits 2).
Setting ``peft.method`` (or ``data.name``) to another value switches to that method's (data
set's) defaults: the previous one's own fields are dropped, and a note says so.
``train.py --print_config`` prints the resolved config with each field's doc.

``base_config()`` holds the defaults the family files start from; ``parse_variant`` turns
``"t5-large,rte,lora_qv"`` into named parts.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ml_collections

from peft_jax.fields import Field, FieldError, did_you_mean


class ConfigError(ValueError):
  """A bad config file, variant, field or value (named in the message)."""


_DTYPES = ("float32", "bfloat16", "float16")


def _preset_ok(name):
  from peft_jax.models import PRESETS
  if name and name not in PRESETS:
    return f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
  return None


def _mesh_axis(v):
  return None if v == -1 or v >= 1 else "expected -1 (the rest of the devices) or a size >= 1"


def _size_ok(v):
  if v in ("", None):
    return None
  from peft_jax.data.common import DataError, resolve_size
  try:
    resolve_size(v)
  except DataError:
    return "expected an int >= 1, low, medium or high (or empty: all rows)"
  return None


def _regex_ok(v):
  import re
  try:
    re.compile(str(v or ""))
  except re.error as e:
    return f"expected a regex ({e})"
  return None


def _schema():
  from peft_jax.metrics import CLASSIFICATION_METRICS, INSTANCE_METRICS
  from peft_jax.models.layers import REMAT_POLICIES
  return {
      "model": {
          "name": Field("", "a model preset (peft_jax.models.PRESETS), e.g. t5-large; "
                        "random weights unless checkpoint is set", check_fn=_preset_ok),
          "checkpoint": Field("", "pretrained weights: a Hugging Face checkpoint directory "
                              "(or a hub id when online)"),
          "dtype": Field("float32", "compute dtype of activations", choices=_DTYPES),
          "param_dtype": Field("float32", "storage dtype of the base weights", choices=_DTYPES),
          "remat": Field("none", "activation rematerialisation policy of the layer scan",
                         choices=tuple(REMAT_POLICIES)),
          "dropout_rate": Field(0.1, "T5 dropout rate (LLaMA has none)", ge=0, lt=1),
          "attention_impl": Field("", "the attention kernel: '' (CPU: einsum; elsewhere JAX's choice), einsum (peft-jax's heads-major contractions, models/layers.py), xla (jax.nn.dot_product_attention's), or cudnn (fused, GPU, bf16/fp16; T5 training with dropout always takes einsum)",
                                  choices=("", "einsum", "xla", "cudnn")),
          "vocab_size": Field(None, "override the vocabulary size of the preset", "int", ge=1),
          "quantize": Field("none", "store the frozen base kernels quantized (QLoRA: nf4; "
                            "peft_jax/quantize.py): none, int8 (per output channel), int4 or "
                            "nf4 (blocks of quantize_block input rows)",
                            choices=("none", "int8", "int4", "nf4")),
          "quantize_targets": Field("", "regex over kernel paths quantized; empty: every "
                                    "linear kernel of the layer stacks (not lm_head nor the "
                                    "embeddings)", check_fn=_regex_ok),
          "quantize_double": Field(False, "QLoRA's double quantization: the block scales "
                                   "stored as 8-bit codes (blocks of 256) around their mean"),
          "quantize_block": Field(64, "input rows per scale of int4 / nf4", ge=1),
      },
      "data": {
          "name": Field("", "the data set: quickstart, jsonl, or a loader of "
                        "peft_jax.data.sources (superni, tulu, boolq, ...)",
                        choices=_data_names()),
          "path": Field("", "where the data set lies (its original layout, a datasets "
                        "folder or hub id); empty: $PEFT_JAX_DATA_DIR/<name>"),
          "size": Field("", "training rows to keep: an int, or low/medium/high = "
                        "100/1,000/10,000 (seed 002); empty: all", "any", check_fn=_size_ok),
          "seed": Field(0, "seed of the data subsets and orders"),
          "max_source_len": Field(512, "tokens kept of each input (the prompt)", ge=1),
          "max_target_len": Field(128, "tokens kept of each target", ge=1),
          "max_train_examples": Field(0, "> 0: keep only the first N training rows", ge=0),
          "max_eval_examples": Field(0, "> 0: keep only the first N evaluation rows", ge=0),
          "eval_size": Field(0, "> 0: evaluate on a data.seed-chosen subset of N rows of the "
                             "evaluation split (the same rows for every method; seed 002 caps "
                             "validation and test at 2,500)", ge=0),
          "eval_split": Field("validation", "the split evaluated during and after training"),
          "pack": Field("auto", "pack each training batch's examples into fewer rows "
                        "(segment-masked attention, per-segment positions; the same examples "
                        "and loss per step): true, false, or auto: on when the method allows "
                        "it and it saves >= 20% of the padded tokens (peft_jax/data/packing.py)",
                        "bool_or_str", choices=("auto",)),
      },
      "train": {
          "batch_size": Field(32, "examples per optimizer step (the effective batch)", ge=1),
          "micro_batch_size": Field(0, "> 0: accumulate gradients over batch_size / "
                                    "micro_batch_size micro-batches", ge=0),
          "micro_batch_per_device": Field(0, "> 0: rows per device in each forward pass "
                                          "instead: the micro-batch is this times the devices "
                                          "the batch is split over (data x fsdp), at most "
                                          "batch_size; overrides micro_batch_size", ge=0),
          "drop_last": Field(False, "drop each epoch's last partial batch (default: every "
                             "example is seen each epoch; the last batch is padded with "
                             "zero-weight rows)"),
          "num_steps": Field(0, "optimizer steps; 0: num_epochs epochs", ge=0),
          "num_epochs": Field(3, "epochs when num_steps is 0", ge=0),
          "min_steps": Field(0, "at least this many steps (small data sets)", ge=0),
          "learning_rate": Field(1e-4, "peak learning rate", "float", gt=0),
          "schedule": Field("linear", "learning-rate schedule: warmup to learning_rate, then "
                            "linear or cosine decay to end_learning_rate, or constant",
                            choices=("linear", "cosine", "constant", "constant_warmup")),
          "warmup_ratio": Field(0.03, "fraction of the steps spent warming up", ge=0, le=1),
          "warmup_steps": Field(0, "> 0: warmup steps (instead of warmup_ratio)", ge=0),
          "init_learning_rate": Field(0.0, "learning rate the warmup starts from", "float", ge=0),
          "end_learning_rate": Field(0.0, "learning rate the decay ends at (linear, cosine)",
                                     "float", ge=0),
          "weight_decay": Field(0.0, "AdamW weight decay (not on biases, norms, scales)",
                                "float", ge=0),
          "grad_clip": Field(1.0, "clip the global gradient norm to this; 0: no clipping",
                             "float", ge=0),
          "seed": Field(0, "seed of initialisation, data order and dropout"),
          "log_every": Field(50, "log training metrics every N steps", ge=1),
          "eval_every": Field(0, "> 0: evaluate and checkpoint every N steps", ge=0),
          "save_every": Field(0, "> 0: checkpoint every N steps", ge=0),
          "keep_last": Field(2, "checkpoints kept besides the best", ge=1),
          "early_stopping_patience": Field(0, "> 0: stop after N evaluations without a lower "
                                           "validation loss", ge=0),
          "eval_at_start": Field(False, "evaluate the untuned model before training"),
          "stop_at_step": Field(0, "> 0: stop there as if interrupted (resume drills)", ge=0),
      },
      "eval": {
          "batch_size": Field(32, "examples per generation batch", ge=1),
          "max_new_tokens": Field(128, "tokens generated per example", ge=1),
          "num_beams": Field(1, "beam width; 1: greedy", ge=1),
          "metric": Field("rougeL", "the metric reported and used to pick the best checkpoint",
                          choices=tuple(INSTANCE_METRICS) + tuple(CLASSIFICATION_METRICS)),
          "suite_data_dir": Field("", "eval.py --suite: the benchmarks' directory, laid out "
                                  "like open-instruct's data/eval (gsm8k/, bbh/, mmlu/, "
                                  "tydiqa/, codex_humaneval/, alpaca_eval/)"),
          "suite_tasks": Field("", "eval.py --suite: comma-separated tasks or benchmarks "
                               "(empty: all; peft_jax.evals.benchmarks.SUITE)"),
          "suite_chat": Field("auto", "eval.py --suite: the TULU chat template (true), plain "
                              "prompts (false), or auto: chat for a tuned TULU model, plain "
                              "for the base model alone", choices=("auto", "true", "false")),
          "suite_settings": Field("", "eval.py --suite: settings over the TULU defaults, "
                                  "'<task or benchmark>.<key>=<JSON or text>; ...', e.g. "
                                  "'tydiqa.missing_shots=borrow_dev; gsm8k.n_shot=4'"),
          "suite_batch_size": Field(8, "eval.py --suite: prompts per generation batch (each "
                                    "row holds a key/value cache of up to the model's "
                                    "positions: 8 x 4,096 tokens is 16 GiB for LLaMA-2-7B in "
                                    "bf16)", ge=1),
          "suite_max_examples": Field(0, "eval.py --suite: > 0 caps every subsampling setting "
                                      "(smoke runs; 0: the protocol's)", ge=0),
          "suite_max_new_tokens": Field(0, "eval.py --suite: > 0 caps the new tokens of every "
                                        "output (smoke runs; 0: the protocol's)", ge=0),
      },
      "mesh": {
          "data": Field(1, "devices on the data axis (-1: the rest)", check_fn=_mesh_axis),
          "fsdp": Field(-1, "devices on the fsdp axis (-1: the rest)", check_fn=_mesh_axis),
          "tensor": Field(1, "devices on the tensor axis (-1: the rest)", check_fn=_mesh_axis),
          "num_devices": Field(0, "use the first N devices; 0: all", ge=0),
          "rules": Field("", "logical-axis rules over the defaults, 'mlp=tensor, embed=fsdp'"),
          "param_rules": Field("", "regex rules over parameter paths, 'lora_B$ -> _,_,tensor; "
                               "...' (first match wins)"),
      },
  }


def _data_names():
  from peft_jax.data.sources import DATASETS
  return tuple(LOCAL_KNOBS) + tuple(DATASETS)


#: the two formats ``run.dataset`` reads itself, and their knobs
LOCAL_KNOBS: Dict[str, Dict[str, Field]] = {
    "quickstart": {},
    "jsonl": {
        "train_file": Field("", "JSONL of {input, target} rows for training"),
        "validation_file": Field("", "JSONL of {input, target} rows for evaluation"),
    },
}

TOP = {"tokenizer": Field("", "a tokenizer directory in the Hugging Face layout (empty: the "
                          "checkpoint's)")}
SECTIONS = ("model", "data", "peft", "train", "eval", "mesh")
_SCHEMA: Optional[dict] = None


def schema() -> Dict[str, Dict[str, Field]]:
  """The fixed sections' fields (``peft`` and the data knobs depend on the config)."""
  global _SCHEMA
  if _SCHEMA is None:
    _SCHEMA = _schema()
  return _SCHEMA


def method_fields(method: str) -> Dict[str, Field]:
  from peft_jax.peft import get_method, registered_methods
  from peft_jax.peft.base import PeftConfigError
  try:
    m = get_method(method)
  except PeftConfigError:
    raise ConfigError(f"peft.method: unknown PEFT method {method!r}"
                      f"{did_you_mean(method, registered_methods())} (known methods: "
                      f"{', '.join(registered_methods())})") from None
  return {"method": Field(method, "the PEFT method (peft_jax.peft)",
                          choices=tuple(registered_methods())), **m.hparams}


def data_knobs(name: str) -> Dict[str, Field]:
  if name in LOCAL_KNOBS:
    return LOCAL_KNOBS[name]
  from peft_jax.data.sources import KNOBS
  return KNOBS.get(name, {})


def fields_for(raw: dict) -> Dict[str, Dict[str, Field]]:
  """Every section's fields for a config whose method is ``raw['peft']['method']`` and
  whose data set is ``raw['data']['name']``."""
  import dataclasses
  out = {k: dict(v) for k, v in schema().items()}
  out["peft"] = method_fields(raw.get("peft", {}).get("method", "full"))
  name = raw.get("data", {}).get("name", "")
  out["data"]["name"] = dataclasses.replace(out["data"]["name"], default=name)
  out["data"].update(data_knobs(name))
  return out


# ----------------------------------------------------------------------------- loading

def split_spec(spec: str) -> Tuple[str, str]:
  path, _, variant = (spec or "").partition(":")
  return path, variant


def load_file(spec: str) -> dict:
  """``configs/<file>.py[:<variant>]`` -> the plain dict of its ``get_config(variant)``."""
  from peft_jax.inputs import resolve_path
  path, variant = split_spec(spec)
  if not path:
    raise ConfigError("--config is required: configs/<file>.py[:<variant>]")
  full = resolve_path(path)
  if not os.path.isfile(full):
    raise ConfigError(f"config file {path!r} does not exist; expected configs/<file>.py"
                      f"[:<variant>], e.g. configs/quickstart.py")
  modspec = importlib.util.spec_from_file_location(
      "peft_jax_config_" + os.path.splitext(os.path.basename(full))[0], full)
  mod = importlib.util.module_from_spec(modspec)
  try:
    modspec.loader.exec_module(mod)
  except Exception as e:  # a broken config file: say which one, in one line
    raise ConfigError(f"config file {path!r} failed to import: {type(e).__name__}: {e}") from None
  fn = getattr(mod, "get_config", None)
  if fn is None:
    raise ConfigError(f"config file {path!r} has no get_config()")
  takes_variant = bool(inspect.signature(fn).parameters)
  if variant and not takes_variant:
    raise ConfigError(f"config file {path!r} takes no variant; got {variant!r}")
  try:
    cfg = fn(variant) if takes_variant else fn()
  except ValueError as e:
    raise ConfigError(f"config {spec!r}: {e}") from None
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def parse_override(arg: str) -> Tuple[str, str]:
  """``"train.num_steps=50"`` (or ``config.train.num_steps=50``) -> ``("train.num_steps", "50")``."""
  key, eq, value = arg.partition("=")
  key = key.strip()
  if key.startswith("--"):
    key = key[2:]
  if key.startswith("config."):
    key = key[len("config."):]
  if not eq or not key:
    raise ConfigError(f"override {arg!r} is not <section>.<field>=<value>")
  return key, value


def load(spec: str, overrides: Sequence[Tuple[str, str]] = ()):
  """(resolved ``ConfigDict``, notes) for a config spec and ``[(dotted key, text)]``."""
  return resolve(load_file(spec), overrides)


def resolve(raw: dict, overrides: Sequence[Tuple[str, str]] = ()):
  """Applies ``overrides`` to a config dict and checks every field; returns (the resolved
  ``ConfigDict`` with every field of the schema, notes for the user)."""
  raw = copy.deepcopy(raw)
  for s in SECTIONS:
    raw.setdefault(s, {})
  notes: List[str] = []
  unknown_top = sorted(k for k in raw if k not in SECTIONS and k not in TOP)
  if unknown_top:
    raise ConfigError(f"unknown config section {unknown_top[0]!r}"
                      f"{did_you_mean(unknown_top[0], list(SECTIONS) + list(TOP))} (expected "
                      f"{', '.join(SECTIONS + tuple(TOP))})")
  overrides = list(overrides)
  # switching the method or the data set first: its fields replace the previous one's
  for key, switch_fields in (("peft.method", lambda v: method_fields(v)),
                             ("data.name", lambda v: data_knobs(v))):
    section, name = key.split(".")
    for k, text in overrides:
      if k != key:
        continue
      new = text.strip()
      if key == "data.name":
        try:
          new = schema()["data"]["name"].normalise(new)
        except FieldError as e:
          raise ConfigError(f"data.name={e}") from None
      old = raw[section].get(name, "full" if key == "peft.method" else "")
      if new == old:
        continue
      switch_fields(new)      # an unknown method is one error line here
      keep = set(schema()["data"]) if section == "data" else set()   # the common data fields
      dropped = sorted(f for f in raw[section] if f != name and f not in keep)
      if section == "peft":
        raw["peft"] = {"method": new}
      else:
        raw["data"] = {f: v for f, v in raw["data"].items() if f not in dropped}
        raw["data"]["name"] = new
      notes.append(f"{key}: {old} -> {new}" + (f"; dropped {old}'s fields {', '.join(dropped)}"
                                              if dropped else "") +
                   f" ({new}'s defaults apply)")
  fields = fields_for(raw)
  # overrides
  for k, text in overrides:
    if k in ("peft.method", "data.name"):
      continue
    section, field = _locate(k, fields)
    f = fields[section][field] if section else TOP[field]
    try:
      value = f.parse(text)
    except FieldError as e:
      raise ConfigError(f"{k}: {e}") from None
    if section:
      raw[section][field] = value
    else:
      raw[field] = value
  # every field from the file and the command line, checked; defaults filled in
  out: Dict[str, Any] = {}
  for name, f in TOP.items():
    out[name] = _check(name, f, raw.get(name, f.default))
  for section in SECTIONS:
    given = raw[section]
    if not isinstance(given, dict):
      raise ConfigError(f"config.{section} is {given!r}; expected a section of fields")
    unknown = sorted(set(given) - set(fields[section]))
    if unknown:
      what = (f"method {raw['peft'].get('method', 'full')!r}" if section == "peft" else
              f"data set {raw['data'].get('name')!r}" if section == "data" else None)
      raise ConfigError(_unknown(f"{section}.{unknown[0]}", fields, what))
    out[section] = {n: _check(f"{section}.{n}", f, given.get(n, f.default))
                    for n, f in fields[section].items()}
  cfg = ml_collections.ConfigDict(out)
  return cfg, notes


def _check(key, f: Field, value):
  try:
    return f.normalise(value)
  except FieldError as e:
    raise ConfigError(f"{key}={e}") from None


def _locate(key: str, fields) -> Tuple[Optional[str], str]:
  if key in TOP:
    return None, key
  section, dot, field = key.partition(".")
  if not dot or section not in fields or field not in fields[section]:
    what = (f"method {fields['peft']['method'].default!r}" if section == "peft" else
            f"data set {fields['data']['name'].default!r}" if section == "data" else None)
    raise ConfigError(_unknown(key, fields, what))
  return section, field


def _unknown(key: str, fields, what: Optional[str]) -> str:
  every = [f"{s}.{n}" for s, fs in fields.items() for n in fs] + list(TOP)
  hint = did_you_mean(key, every)
  where = f" for {what}" if what else ""
  section = key.split(".")[0]
  if not hint and section in fields:
    hint = f"; {section} has {', '.join(sorted(fields[section]))}"
  return f"unknown config field {key!r}{where}{hint}"


def describe(cfg) -> str:
  """Every field of a resolved config with its value and doc (``--print_config``)."""
  raw = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
  fields = fields_for(raw)
  lines = []
  for name, f in TOP.items():
    lines.append(_line(name, raw[name], f))
  for section in SECTIONS:
    lines.append("")
    lines.append(f"[{section}]" + (f"  (method {raw['peft']['method']}: "
                                   f"{_method_reference(raw['peft']['method'])})"
                                   if section == "peft" else ""))
    for n, f in fields[section].items():
      lines.append(_line(f"{section}.{n}", raw[section][n], f))
  return "\n".join(lines)


def _method_reference(name):
  from peft_jax.peft import get_method
  return get_method(name).reference or "peft-jax"


def _line(key, value, f: Field) -> str:
  return f"{key} = {value!r}".ljust(48) + f"  # {f.doc} [{f.expected()}]"


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"name": "", "checkpoint": "", "dtype": "float32",
                                       "param_dtype": "float32", "remat": "none",
                                       "dropout_rate": 0.1})
  c.tokenizer = ""
  c.data = ml_collections.ConfigDict({
      "name": "", "path": "", "size": "", "seed": 0, "max_source_len": 512, "max_target_len": 128,
      "max_train_examples": 0, "max_eval_examples": 0, "eval_size": 0,
      "eval_split": "validation"})
  c.peft = ml_collections.ConfigDict({"method": "full"})
  c.train = ml_collections.ConfigDict({
      "batch_size": 32, "micro_batch_size": 0, "num_steps": 0, "num_epochs": 3, "min_steps": 0,
      "learning_rate": 1e-4, "schedule": "linear", "warmup_ratio": 0.03, "weight_decay": 0.0,
      "grad_clip": 1.0, "seed": 0, "log_every": 50, "eval_every": 0, "save_every": 0,
      "keep_last": 2, "early_stopping_patience": 0, "eval_at_start": False, "stop_at_step": 0})
  c.eval = ml_collections.ConfigDict({"batch_size": 32, "max_new_tokens": 128, "num_beams": 1,
                                      "metric": "rougeL"})
  # device mesh (peft_jax.sharding): -1 = the rest of the devices; the batch is split over
  # data x fsdp, base weights over fsdp (and tensor); rules: "logical=axes, ..." over the
  # defaults; param_rules: "regex -> dims; ..." over flattened paths (first match wins)
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "num_devices": 0,
                                      "rules": "", "param_rules": ""})
  return c


def parse_variant(variant: str, slots: Dict[str, Sequence[str]], defaults: Dict[str, str]):
  """``"a,b,c"`` -> ``{slot: value}``: each part is matched to the one slot that lists it.

  Unknown parts raise ``ValueError`` naming what each slot accepts.
  """
  out = dict(defaults)
  for part in [p.strip() for p in (variant or "").split(",") if p.strip()]:
    hits = [s for s, allowed in slots.items() if part in allowed]
    if len(hits) != 1:
      accepted = "; ".join(f"{s}: {', '.join(v)}" for s, v in slots.items())
      raise ValueError(f"config variant part {part!r} is not recognised; accepted: {accepted}")
    out[hits[0]] = part
  return out


def tiny_model(c: ml_collections.ConfigDict, preset: str, vocab_size: int):
  """Swaps the model for the tiny random ``preset`` with the vocabulary of the experiment's
  tokenizer (``vocab_size``)."""
  c.model.name = preset
  c.model.vocab_size = vocab_size
  c.train.batch_size = 4
  c.train.num_steps = 3
  c.train.num_epochs = 0
  c.train.log_every = 1
  c.data.max_source_len = 64
  c.data.max_target_len = 16
  c.data.max_train_examples = 16
  c.data.max_eval_examples = 4
  c.eval.batch_size = 4
  c.eval.max_new_tokens = 4
  c.mesh.num_devices = 1      # a smoke test: one device (micro-batches of 2 split no further)
  return c
