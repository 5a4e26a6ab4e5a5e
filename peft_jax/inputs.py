"""What a run reads, from its config: the model config, the base weights (and their
fingerprint), the tokenizer, the data rows, the method's hyperparameters, the device mesh.
Used by :mod:`peft_jax.builder` and the entry points; the command line is
:mod:`peft_jax.cli`."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models import family_of, get_preset, init_params


from peft_jax.config_lib import ConfigError  # noqa: E402  (one error type for bad configs)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(p: str) -> str:
  """Paths in configs are relative to the repository root unless absolute."""
  if not p or os.path.isabs(p) or os.path.exists(p):
    return p
  cand = os.path.join(REPO, p)
  return cand if os.path.exists(cand) else p


def model_config(cfg):
  """The model config from ``model.name`` (a preset) or ``model.checkpoint`` (HF dir/id)."""
  m = cfg.model
  if m.get("checkpoint"):
    from peft_jax.checkpoint.hf import config_from_hf, read_hf_config, resolve_checkpoint_dir
    mc = config_from_hf(read_hf_config(resolve_checkpoint_dir(resolve_path(m.checkpoint))))
  elif m.get("name"):
    try:
      mc = get_preset(m.name)
    except ValueError as e:
      raise ConfigError(f"config.model.name: {e}") from None
  else:
    raise ConfigError("config.model needs `name` (a preset) or `checkpoint` (a local directory "
                     "or hub id)")
  kw = {k: m[k] for k in ("dtype", "param_dtype", "remat", "vocab_size", "attention_impl",
                          "quantize", "quantize_targets", "quantize_block") if m.get(k)}
  if m.get("quantize_double"):
    kw["quantize_double"] = bool(m.quantize_double)
  if family_of(mc).has_dropout and m.get("dropout_rate") is not None:
    kw["dropout_rate"] = m.dropout_rate
  return mc.replace(**kw)


def base_params(cfg, mc, rng, shardings=None):
  """Pretrained weights from ``model.checkpoint``, else a random init (presets).

  With ``shardings`` (a tree matching the base parameters) each leaf is created or
  read straight into its shards (see :mod:`peft_jax.sharding`)."""
  if cfg.model.get("checkpoint"):
    from peft_jax.checkpoint.hf import load_hf
    _, params = load_hf(resolve_path(cfg.model.checkpoint), cfg=mc, shardings=shardings)
    if shardings is not None:
      return params
    return jax.tree_util.tree_map(jnp.asarray, params)
  if shardings is not None:
    from peft_jax.sharding import init_sharded
    return init_sharded(mc, rng, shardings)
  return init_params(mc, rng)


def base_key(cfg):
  """The PRNG key of a preset's random base weights (the one derivation: train, eval, plan)."""
  return jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 0)


def fingerprint(base_params, n_leaves: int = 4, n_values: int = 1024) -> str:
  """A short hash identifying base weights: the first ``n_values`` entries (as float32) of
  ``n_leaves`` leaves spread over the sorted paths. Equal for equal weights whatever the
  mesh; cheap (a few KB leave the devices)."""
  import hashlib
  from peft_jax.peft.base import flatten
  from peft_jax.sharding import gather
  flat = flatten(base_params)
  paths = sorted(flat)
  picks = sorted({paths[round(i * (len(paths) - 1) / max(n_leaves - 1, 1))]
                  for i in range(min(n_leaves, len(paths)))})
  head = jax.jit(lambda a: jnp.ravel(a)[:n_values].astype(jnp.float32))
  h = hashlib.sha256()
  for p in picks:
    h.update(p.encode())
    h.update(np.ascontiguousarray(gather(head(flat[p]))).tobytes())
  return h.hexdigest()[:16]


def base_info(cfg, base_params) -> Dict[str, Any]:
  """What an adapter records about its base: the checkpoint, or the preset and the seed
  of its random init, and the weights' fingerprint."""
  ck = cfg.model.get("checkpoint") or ""
  return {"checkpoint": os.path.abspath(resolve_path(ck)) if ck and os.path.exists(resolve_path(ck))
                        else ck,
          "preset": "" if ck else cfg.model.get("name", ""),
          "init_seed": None if ck else int(cfg.train.seed),
          "param_dtype": cfg.model.get("param_dtype", "float32"),
          "fingerprint": fingerprint(base_params)}


def writable_dir(path: str, flag: str, expected: str) -> str:
  """``path`` exists (or is created) as a writable directory; one :class:`ConfigError`
  line otherwise (``flag`` names the option, ``expected`` what it should be)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{flag} {path} is a file; expected {expected}")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"cannot create {flag} {path}: {e.strerror}") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f"{flag} {path} is not writable")
  return path


def check_finite_base(params, info: Dict[str, Any]) -> None:
  """One :class:`ConfigError` line when the base weights hold NaN or infinity (a damaged
  or overflowed checkpoint), before any step would blame the learning rate."""
  from peft_jax.tree import flatten
  flat = {k: v for k, v in flatten(params).items() if jnp.issubdtype(v.dtype, jnp.inexact)}
  ok = jax.device_get(jax.jit(lambda t: {k: jnp.all(jnp.isfinite(v)) for k, v in t.items()})(flat))
  bad = sorted(k for k, v in ok.items() if not bool(v))
  if bad:
    more = f" (and {len(bad) - 1} more leaves)" if len(bad) > 1 else ""
    raise ConfigError(f"the base weights ({describe_base(info)}) hold non-finite values in "
                      f"{bad[0]}{more}; the checkpoint is damaged or overflowed its dtype")


def describe_base(info: Dict[str, Any]) -> str:
  if info.get("checkpoint"):
    return f"checkpoint {info['checkpoint']} ({info.get('param_dtype')})"
  return (f"preset {info.get('preset')!r} with random weights of train.seed="
          f"{info.get('init_seed')} ({info.get('param_dtype')})")


def check_base(recorded: Optional[Dict[str, Any]], current: Dict[str, Any], what: str) -> None:
  """One :class:`ConfigError` line when ``what`` was made on other base weights."""
  if not recorded or not recorded.get("fingerprint"):
    return
  if recorded["fingerprint"] != current["fingerprint"]:
    raise ConfigError(f"{what} was trained on {describe_base(recorded)} (fingerprint "
                      f"{recorded['fingerprint']}), but this run's base is "
                      f"{describe_base(current)} (fingerprint {current['fingerprint']}); use "
                      f"the same model.checkpoint / model.name, train.seed and param_dtype")


def make_mesh(cfg):
  """The device mesh of ``config.mesh`` (``num_devices``: use the first n; 0 = all)."""
  from peft_jax.sharding import ShardingError, make_mesh as _make
  m = cfg.get("mesh")
  n = int(m.get("num_devices") or 0) if m is not None else 0
  devices = jax.devices()
  if n > len(devices):
    raise ConfigError(f"config.mesh.num_devices={n} but only {len(devices)} devices are visible")
  try:
    return _make(m, devices[:n] if n else devices)
  except ShardingError as e:
    raise ConfigError(f"config.mesh: {e}") from None


def tokenizer(cfg, mc=None):
  """``AutoTokenizer`` from ``config.tokenizer`` or the checkpoint directory (a generic
  ``tokenizers`` directory directly, see :func:`_generic_tokenizer_class`). A bare
  vocabulary (e.g. only ``tokenizer.json``) gets its EOS/pad tokens from the model config."""
  path = cfg.get("tokenizer") or cfg.model.get("checkpoint")
  if not path:
    raise ConfigError("config.tokenizer (or model.checkpoint) must name a tokenizer directory")
  path = resolve_path(path)
  if not os.path.isdir(path):
    raise ConfigError(f"config.tokenizer: {path} is not a directory; expected a tokenizer "
                      "saved in the Hugging Face layout")
  cls = _generic_tokenizer_class(path)
  if cls is None:
    from transformers import AutoTokenizer
    cls = AutoTokenizer
  tok = cls.from_pretrained(path)
  if mc is not None:
    if tok.eos_token_id is None and mc.eos_token_id is not None:
      tok.eos_token = tok.convert_ids_to_tokens(int(mc.eos_token_id))
    if tok.pad_token_id is None:
      pad = mc.pad_token_id if mc.pad_token_id is not None else tok.eos_token_id
      if pad is not None:
        tok.pad_token = tok.convert_ids_to_tokens(int(pad))
  return tok


#: ``tokenizer_config.json`` classes that name the generic ``tokenizers``-backed tokenizer
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _generic_tokenizer_class(path: str):
  """transformers' generic tokenizer class when ``path`` holds a ``tokenizer.json`` whose
  ``tokenizer_config.json`` names that class and nothing else could change the choice (no
  ``config.json`` with a model type, no ``auto_map``), else ``None`` (then
  ``AutoTokenizer`` decides). AutoTokenizer's module imports torch (3 s of a quickstart's
  start on 2 CPU cores); this class loads the same tokenizer without it."""
  import json
  files = ("tokenizer.json", "tokenizer_config.json")
  if os.path.exists(os.path.join(path, "config.json")) or \
      not all(os.path.isfile(os.path.join(path, f)) for f in files):
    return None
  try:
    with open(os.path.join(path, "tokenizer_config.json")) as f:
      tc = json.load(f)
  except (OSError, ValueError):
    return None               # AutoTokenizer reports it
  if not isinstance(tc, dict) or tc.get("tokenizer_class") not in GENERIC_TOKENIZERS or \
      "auto_map" in tc:
    return None
  from transformers import PreTrainedTokenizerFast
  return PreTrainedTokenizerFast


def read_jsonl(path, what: str = "data") -> List[Dict[str, Any]]:
  """``{input, target}`` rows of a JSONL file, each checked: one :class:`DataError` line
  naming the file, the line and the problem."""
  from peft_jax.data.common import DataError, iter_jsonl
  rows = []
  for lineno, obj in iter_jsonl(path, what):
    where = f"{what}: {path} line {lineno}"
    if not isinstance(obj, dict):
      raise DataError(f"{where} is a JSON {type(obj).__name__}; expected an object "
                      '{"input": "...", "target": "..."}')
    for k in ("input", "target"):
      if k not in obj:
        raise DataError(f"{where} lacks {k!r}; expected an object with string fields 'input' "
                        "and 'target'")
      if not isinstance(obj[k], str):
        raise DataError(f"{where}: {k!r} is a {type(obj[k]).__name__}; expected a string")
    rows.append(obj)
  if not rows:
    raise DataError(f"{what}: {path} has no rows; expected JSON lines of "
                    '{"input": "...", "target": "..."}')
  return rows


def dataset(cfg) -> Tuple[List[dict], List[dict]]:
  """(train rows, evaluation rows) for ``config.data``: its common fields plus the data
  set's own knobs (``config_lib.data_knobs``), passed to the loader."""
  from peft_jax.config_lib import data_knobs
  d = cfg.data
  knobs = {k: (d[k].to_dict() if hasattr(d[k], "to_dict") else d[k])
           for k in data_knobs(d.name) if k in d}
  if d.name == "quickstart":
    root = resolve_path(d.get("path") or "data/quickstart")
    if not os.path.isdir(root):
      from peft_jax.data.common import DataError
      raise DataError(f"quickstart: data.path {root} is {'a file' if os.path.exists(root) else 'missing'}"
                      "; expected a folder with train.jsonl and validation.jsonl")
    train = read_jsonl(os.path.join(root, "train.jsonl"), "quickstart")
    split = d.get("eval_split") or "validation"     # <split>.jsonl (eval.py --split)
    if not os.path.isfile(os.path.join(root, f"{split}.jsonl")):
      from peft_jax.data.common import DataError
      have = sorted(n[:-6] for n in os.listdir(root) if n.endswith(".jsonl"))
      raise DataError(f"quickstart: data.eval_split={split!r} but {root} has no {split}.jsonl; "
                      f"expected a JSONL file of {{input, target}} rows per split (splits "
                      f"there: {', '.join(have) or 'none'})")
    val = read_jsonl(os.path.join(root, f"{split}.jsonl"), "quickstart")
  elif d.name == "jsonl":
    if not knobs.get("train_file") or not knobs.get("validation_file"):
      raise ConfigError("data.name='jsonl' needs data.train_file and data.validation_file "
                        "(JSONL files of {input, target} rows)")
    if (d.get("eval_split") or "validation") != "validation":
      raise ConfigError(f"data.name='jsonl' evaluates data.validation_file only, not "
                        f"data.eval_split={d.eval_split!r}; point data.validation_file at "
                        "that split's file instead")
    train = read_jsonl(resolve_path(knobs["train_file"]), "data.train_file")
    val = read_jsonl(resolve_path(knobs["validation_file"]), "data.validation_file")
  else:
    from peft_jax.data.sources import load_dataset_rows
    kw = {"path": resolve_path(d.path) if d.get("path") else None, "seed": d.get("seed", 0)}
    kw.update({k: v for k, v in knobs.items() if v is not None})
    size = d.get("size") or None
    train = load_dataset_rows(d.name, "train", size=size, **kw)
    val = load_dataset_rows(d.name, d.get("eval_split") or "validation", **kw)
    for rows in (train, val):
      info = getattr(rows, "info", {}) or {}
      if info.get("n_missing_tasks"):
        missing = list(info.get("missing_tasks") or [])
        warn(f"{d.name} {info.get('split', '')}: {info['n_missing_tasks']} task file(s) named by "
             f"the split list are missing (e.g. {', '.join(missing[:3])}); training uses the "
             "tasks found")
    train, val = list(train), list(val)
  if d.get("max_train_examples"):
    train = train[: d.max_train_examples]
  if d.get("eval_size") and d.eval_size < len(val):
    from peft_jax.data.common import subsample     # seeded: the same rows for every run
    val = subsample(val, int(d.eval_size), int(d.get("seed") or 0), what="evaluation rows")
  if d.get("max_eval_examples"):
    val = val[: d.max_eval_examples]
  if not train:
    raise ConfigError(f"config.data: data set {d.name!r} gave no training rows")
  if not val:
    raise ConfigError(f"config.data: data set {d.name!r} gave no evaluation rows "
                      f"(split {d.get('eval_split') or 'validation'!r})")
  return train, val


def warn(msg: str) -> None:
  """One ``warning: ...`` line (process 0)."""
  import jax
  if jax.process_index() == 0:
    print(f"warning: {msg}", flush=True)


def peft_overrides(cfg):
  """Method hyperparameters from ``config.peft`` (all fields but ``method``), each in the
  canonical type of its declared Field (``"q,v"`` -> ``["q", "v"]``; ``"all-linear"`` and
  regexes stay strings, as in HF PEFT)."""
  from peft_jax.fields import FieldError
  from peft_jax.peft import get_method
  from peft_jax.peft.base import PeftConfigError
  fields = get_method(cfg.peft.method).hparams
  out = {}
  for k, v in cfg.peft.items():
    if k == "method":
      continue
    if hasattr(v, "to_dict"):
      v = v.to_dict()
    if k in fields:
      try:
        v = fields[k].normalise(v)
      except FieldError as e:
        raise PeftConfigError(f"peft.{k}={e}") from None
    out[k] = v
  return out


def layout(mc) -> str:
  return family_of(mc).layout


def start_and_pad(mc, tok):
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  start = family_of(mc).start_token(mc, pad)
  return pad, start
