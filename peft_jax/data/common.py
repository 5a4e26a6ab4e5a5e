"""Shared pieces of the data-set loaders: rows, errors, readers, seeded sampling and
the bridge from Hugging Face ``datasets`` objects.

A loader returns a :class:`Rows` (a ``list`` of dicts) in which every row is
``{"input": str, "target": str, "references": [str, ...], "meta": {...}}``:
``target`` is the single training target (a string, what ``batching.encode`` needs),
``references`` all acceptable outputs for evaluation (a one-element list for
single-reference data). ``Rows.info`` says where the rows came from, how many were
available before sub-sampling, and anything that was skipped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import zlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from peft_jax.fields import Field

logger = logging.getLogger("peft_jax.data")

# Seed 002's data scales.
SIZE_PRESETS = {"low": 100, "medium": 1000, "high": 10000}
SPLITS = ("train", "validation", "test")


class DataError(ValueError):
  """A data set cannot be loaded: unknown name, missing file or malformed row (the
  message names the problem and what was expected)."""


class Rows(list):
  """A list of rows with an ``info`` dict (source, counts, skipped items, notes)."""

  def __init__(self, rows: Iterable[dict] = (), info: Optional[dict] = None):
    super().__init__(rows)
    self.info: Dict[str, Any] = dict(info or {})


def make_row(input_text: str, target: str, references: Optional[Sequence[str]] = None,
             **meta) -> dict:
  refs = list(references) if references is not None else [target]
  return {"input": input_text, "target": target, "references": refs, "meta": meta}


# ----------------------------------------------------------------------------- sizes/seeds

def resolve_size(size: Union[None, int, str]) -> Optional[int]:
  """``None`` (all), an int >= 1, or one of seed 002's scales: low/medium/high =
  100/1,000/10,000 examples."""
  if size is None:
    return None
  if isinstance(size, str):
    key = size.strip().lower()
    if key in SIZE_PRESETS:
      return SIZE_PRESETS[key]
    if key.isdigit():
      size = int(key)
    else:
      raise DataError(f"size={size!r} is not understood; expected an int >= 1 or one of "
                      f"{sorted(SIZE_PRESETS)} (= {SIZE_PRESETS})")
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise DataError(f"size={size!r} is not understood; expected an int >= 1 or one of "
                    f"{sorted(SIZE_PRESETS)}")
  return int(size)


def stable_hash(s: str) -> int:
  """A process-independent 32-bit hash (``hash()`` of a str is salted per process)."""
  return zlib.crc32(s.encode("utf-8"))


def rng_for(seed: int, *keys: Union[int, str]) -> np.random.Generator:
  return np.random.default_rng([int(seed)] + [k if isinstance(k, int) else stable_hash(k)
                                              for k in keys])


def subsample(rows: List[dict], size: Union[None, int, str], seed: int, *, shuffle: bool = True,
              what: str = "rows", info: Optional[dict] = None) -> List[dict]:
  """A seeded permutation of ``rows`` (file order when ``shuffle`` is False and no
  ``size``), cut to ``size``. Nested by construction: for one seed the 100-row subset
  is the start of the 1,000-row one. When fewer rows exist than asked for, all are
  taken and the shortfall is logged and written to ``info['note']``."""
  n = resolve_size(size)
  if info is not None:
    info["n_available"] = len(rows)
    info["size_requested"] = n
  if shuffle or n is not None:
    order = rng_for(seed, "subsample").permutation(len(rows))
    rows = [rows[i] for i in order]
  if n is not None:
    if n > len(rows):
      note = (f"asked for {n} {what} but only {len(rows)} are available; "
              f"taking all {len(rows)}")
      logger.warning(note)
      if info is not None:
        info.setdefault("notes", []).append(note)
    rows = rows[:n]
  return rows


def carve(rows: List[Any], n_holdout: int, split_seed: int, key: str) -> Tuple[List[Any], List[Any]]:
  """(rest, held_out): a fixed seeded hold-out (``split_seed``), independent of the
  sampling seed, so validation sets stay the same across training seeds."""
  order = rng_for(split_seed, "carve", key).permutation(len(rows))
  held = sorted(order[:n_holdout].tolist())
  keep = sorted(order[n_holdout:].tolist())
  return [rows[i] for i in keep], [rows[i] for i in held]


def check_split(split: str, allowed: Sequence[str], dataset: str) -> str:
  if split not in allowed:
    raise DataError(f"{dataset}: unknown split {split!r}; expected one of {list(allowed)}")
  return split


# ----------------------------------------------------------------------------- readers

def _raise_csv_limit():
  limit = sys.maxsize
  while True:
    try:
      csv.field_size_limit(limit)
      return
    except OverflowError:
      limit //= 10


def require_file(path: str, dataset: str, expected: str) -> str:
  if not os.path.isfile(path):
    raise DataError(f"{dataset}: file not found: {path}; expected {expected}")
  return path


def iter_jsonl(path: str, dataset: str):
  """``(line number, parsed value)`` of each non-blank line; :class:`DataError` naming the
  file and line for a missing file, a directory, bytes that are not UTF-8, or bad JSON."""
  if os.path.isdir(path):
    raise DataError(f"{dataset}: {path} is a directory; expected a JSONL file")
  if not os.path.isfile(path):
    raise DataError(f"{dataset}: file not found: {path}; expected a JSONL file")
  try:
    f = open(path, "rb")
  except OSError as e:
    raise DataError(f"{dataset}: cannot read {path}: {e.strerror}") from None
  with f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{dataset}: {path} line {lineno} is not UTF-8 text (byte {e.start} of "
                        f"the line is 0x{raw[e.start]:02x}); expected UTF-8 JSON lines") from None
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{dataset}: {path} line {lineno} is not valid JSON ({e.msg} at column "
                        f"{e.colno}); expected one JSON object per line") from None


def read_jsonl(path: str, dataset: str, required: Sequence[str] = ()) -> List[dict]:
  rows = []
  for lineno, obj in iter_jsonl(path, dataset):
    if not isinstance(obj, dict):
      raise DataError(f"{dataset}: {path} line {lineno} is a JSON {type(obj).__name__}; "
                      f"expected a JSON object with fields {list(required)}")
    missing = [k for k in required if k not in obj]
    if missing:
      raise DataError(f"{dataset}: {path} line {lineno} lacks field(s) {missing}; "
                      f"expected fields {list(required)}")
    obj["_line"] = lineno
    rows.append(obj)
  return rows


def read_csv(path: str, dataset: str, *, header: Optional[Sequence[str]] = None,
             required: Sequence[str] = (), delimiter: str = ",",
             quoting: int = csv.QUOTE_MINIMAL) -> List[dict]:
  """Rows as dicts. With ``header`` the file has no header line and these are the
  columns; otherwise the first line is the header and must contain ``required``."""
  _raise_csv_limit()
  out = []
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    if header is None:
      try:
        cols = next(reader)
      except StopIteration:
        raise DataError(f"{dataset}: {path} is empty; expected a header line with "
                        f"columns {list(required)}") from None
      missing = [c for c in required if c not in cols]
      if missing:
        raise DataError(f"{dataset}: {path} header {cols} lacks column(s) {missing}; "
                        f"expected columns {list(required)}")
      start = 2
    else:
      cols = list(header)
      start = 1
    for lineno, rec in enumerate(reader, start):
      if not rec or (len(rec) == 1 and not rec[0].strip()):
        continue
      if len(rec) != len(cols):
        raise DataError(f"{dataset}: {path} record {lineno} has {len(rec)} field(s); "
                        f"expected {len(cols)} ({', '.join(c or '<index>' for c in cols)})")
      d = dict(zip(cols, rec))
      d["_line"] = lineno
      out.append(d)
  return out


def first_existing(root: str, names: Sequence[str]) -> Optional[str]:
  for n in names:
    p = os.path.join(root, n)
    if os.path.isfile(p):
      return p
  return None


def resolve_root(path, dataset: str, default_folder: str):
  """``path`` as given, else ``$PEFT_JAX_DATA_DIR/<default_folder>``."""
  if path is not None:
    return path
  base = os.environ.get("PEFT_JAX_DATA_DIR")
  if base:
    return os.path.join(base, default_folder)
  raise DataError(f"{dataset}: no data path given; expected path= (a folder in the data "
                  f"set's original layout, a file, a `datasets` object or save_to_disk "
                  f"folder, or 'hf:<hub id>') or $PEFT_JAX_DATA_DIR containing "
                  f"{default_folder}/")


# ----------------------------------------------------------------------------- HF datasets

HF_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val", "dev"),
                  "test": ("test",)}


def is_hf_source(path) -> bool:
  """A ``datasets`` object, a ``save_to_disk`` folder, or an ``hf:<hub id>`` string."""
  if path is None:
    return False
  if not isinstance(path, (str, os.PathLike)):
    mod = type(path).__module__ or ""
    return mod.startswith("datasets")
  p = os.fspath(path)
  if p.startswith("hf:"):
    return True
  return os.path.isdir(p) and (os.path.isfile(os.path.join(p, "dataset_dict.json"))
                               or os.path.isfile(os.path.join(p, "state.json")))


def _import_datasets(dataset: str):
  try:
    import datasets  # noqa: F401
    return datasets
  except ImportError:
    raise DataError(f"{dataset}: reading the Hugging Face `datasets` format needs the "
                    f"`datasets` package; expected `pip install datasets`, or pass a "
                    f"folder in the original format") from None


def _pick_split(dd, split: str, dataset: str):
  names = list(dd.keys())
  for cand in HF_SPLIT_NAMES.get(split, (split,)):
    if cand in dd:
      return dd[cand]
  raise DataError(f"{dataset}: the `datasets` DatasetDict has splits {names}; expected one "
                  f"named {list(HF_SPLIT_NAMES.get(split, (split,)))} for split {split!r}")


def hf_examples(path, split: str, dataset: str, hf_config: Optional[str] = None,
                hf_split: Optional[str] = None) -> Tuple[List[dict], Dict[str, List[str]], str]:
  """(examples as dicts, {column: ClassLabel names}, description of the source)."""
  datasets = _import_datasets(dataset)
  want = hf_split or split
  if isinstance(path, (str, os.PathLike)):
    p = os.fspath(path)
    if p.startswith("hf:"):
      hub_id = p[3:]
      try:
        obj = datasets.load_dataset(hub_id, hf_config)
      except Exception as e:  # offline, unknown id, ...
        raise DataError(f"{dataset}: could not load {hub_id!r} from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e)[:200]}); expected an online machine "
                        f"and a valid hub id, or a local folder") from None
      desc = f"hub:{hub_id}" + (f"/{hf_config}" if hf_config else "")
    else:
      try:
        obj = datasets.load_from_disk(p)
      except Exception as e:
        raise DataError(f"{dataset}: could not read the save_to_disk folder {p} "
                        f"({type(e).__name__}: {str(e)[:200]}); expected a folder written by "
                        f"Dataset.save_to_disk / DatasetDict.save_to_disk") from None
      desc = f"load_from_disk:{p}"
  else:
    obj, desc = path, f"datasets:{type(path).__name__}"
  if isinstance(obj, datasets.DatasetDict):
    obj = _pick_split(obj, want, dataset)
  if not isinstance(obj, datasets.Dataset):
    raise DataError(f"{dataset}: got a {type(obj).__name__}; expected a datasets.Dataset or "
                    f"DatasetDict")
  class_names = {}
  for col, feat in (obj.features or {}).items():
    if isinstance(feat, datasets.ClassLabel):
      class_names[col] = list(feat.names)
  rows = obj.to_list()
  for i, r in enumerate(rows):
    r["_line"] = i
  return rows, class_names, desc


def get_field(ex: dict, keys: Sequence[str], dataset: str, where: str, expected: str):
  for k in keys:
    if k in ex and ex[k] is not None:
      return ex[k]
  raise DataError(f"{dataset}: {where} lacks field {keys[0]!r}"
                  + (f" (or {list(keys[1:])})" if len(keys) > 1 else "")
                  + f"; expected {expected}")


def as_text(value, dataset: str, where: str, field: str) -> str:
  if isinstance(value, str):
    return value
  raise DataError(f"{dataset}: {where} field {field!r} is a {type(value).__name__}; "
                  f"expected a string")


# ----------------------------------------------------------------------------- knobs
# The keyword options of the loaders, declared once (peft_jax.fields.Field): each loader's
# ``KNOBS`` entry lists what ``--config.data.<knob>`` may set for that data set.
# ``path``, ``seed`` and ``size`` are the config's own data fields (config_lib).

COMMON_KNOBS = {
    "shuffle": Field(None, "shuffle the rows (none: only the training split)", "bool"),
    "split_seed": Field(0, "seed of the fixed hold-outs (carved validation rows or tasks)"),
    "hf_config": Field(None, "the Hugging Face datasets config name, for a hub id or a "
                       "save_to_disk folder as data.path", "str"),
    "hf_split": Field(None, "the Hugging Face datasets split to read (none: the usual name)",
                      "str"),
}
TEMPLATE_KNOB = {"template": Field(None, "the prompt template, with {field} placeholders "
                                   "(none: the data set's own)", "str")}
