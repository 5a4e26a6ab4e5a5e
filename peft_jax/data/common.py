"""Shared pieces of the data-set loaders: rows, errors, readers, seeded sampling and
the bridges to other sources: Hugging Face ``datasets`` objects, tables under the Hugging
Face field names (parquet through pyarrow, JSONL, CSV/TSV; the hub's shard naming) and
prepared TFDS data sets (``tfds.data_source``, no TensorFlow for ArrayRecord). Which
split of such a source is which of ours is each loader's business (sources.SPLITS).

A loader returns a :class:`Rows` (a ``list`` of dicts) in which every row is
``{"input": str, "target": str, "references": [str, ...], "meta": {...}}``:
``target`` is the single training target (a string, what ``batching.encode`` needs),
``references`` all acceptable outputs for evaluation (a one-element list for
single-reference data). ``Rows.info`` says where the rows came from, how many were
available before sub-sampling, and anything that was skipped.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import re
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


def carve_by_content(items: List[Any], n_holdout: int, split_seed: int, key: str,
                     content) -> Tuple[List[Any], List[Any]]:
  """(rest, held_out) like :func:`carve`, but the hold-out is chosen by a seeded hash of
  each item's ``content(item)`` (a str), not its position: the same rows read from a
  TSV, a parquet file or TFDS (which stores rows in its own order) give the same
  validation rows. Both parts keep the input order."""
  def rank(i):
    text = content(items[i])
    h = hashlib.blake2b(f"{split_seed}\0{key}\0{text}".encode("utf-8"), digest_size=8).digest()
    return h, text
  order = sorted(range(len(items)), key=rank)
  held = set(order[:n_holdout])
  return ([x for i, x in enumerate(items) if i not in held],
          [x for i, x in enumerate(items) if i in held])


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
                  f"set's original layout, a parquet/JSONL/CSV file or folder of them, a "
                  f"`datasets` object or save_to_disk folder, 'hf:<hub id>' or "
                  f"'tfds:<name>/<config>') or $PEFT_JAX_DATA_DIR containing "
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


def hf_object(path, dataset: str, hf_config: Optional[str] = None):
  """(a datasets.Dataset or DatasetDict, description) from a ``datasets`` object, a
  ``save_to_disk`` folder or ``hf:<hub id>``."""
  datasets = _import_datasets(dataset)
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
  if not isinstance(obj, (datasets.Dataset, datasets.DatasetDict)):
    raise DataError(f"{dataset}: got a {type(obj).__name__}; expected a datasets.Dataset or "
                    f"DatasetDict")
  return obj, desc


def hf_rows(ds) -> Tuple[List[dict], Dict[str, List[str]]]:
  """(rows as dicts, {column: ClassLabel names}) of a datasets.Dataset."""
  import datasets
  class_names = {}
  for col, feat in (ds.features or {}).items():
    if isinstance(feat, datasets.ClassLabel):
      class_names[col] = list(feat.names)
  rows = ds.to_list()
  for i, r in enumerate(rows):
    r["_line"] = i
  return rows, class_names


def hf_examples(path, split: str, dataset: str, hf_config: Optional[str] = None,
                hf_split: Optional[str] = None) -> Tuple[List[dict], Dict[str, List[str]], str]:
  """(examples as dicts, {column: ClassLabel names}, description of the source)."""
  datasets = _import_datasets(dataset)
  obj, desc = hf_object(path, dataset, hf_config)
  if isinstance(obj, datasets.DatasetDict):
    obj = _pick_split(obj, hf_split or split, dataset)
  rows, class_names = hf_rows(obj)
  return rows, class_names, desc


# ----------------------------------------------------------------------------- tables and sources
# Files that hold a data set's rows under the Hugging Face field names: parquet (pyarrow,
# a dependency of `datasets`), JSON lines and CSV/TSV with a header line.

TABLE_EXTS = (".parquet", ".jsonl", ".csv", ".tsv")


def _plain(v):
  """numpy / bytes values (TFDS, pyarrow) -> plain Python ones."""
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, dict):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, np.ndarray):
    return [_plain(x) for x in v.tolist()]
  if isinstance(v, np.generic):
    return _plain(v.item())
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  return v


def _parquet_class_names(schema) -> Dict[str, List[str]]:
  """ClassLabel names that `datasets` writes into a parquet file's schema metadata."""
  meta = (schema.metadata or {}).get(b"huggingface")
  if not meta:
    return {}
  try:
    feats = json.loads(meta).get("info", {}).get("features", {})
  except (ValueError, AttributeError):
    return {}
  return {k: list(f["names"]) for k, f in feats.items()
          if isinstance(f, dict) and f.get("_type") == "ClassLabel" and "names" in f}


def read_parquet(paths: Sequence[str], dataset: str) -> Tuple[List[dict], Dict[str, List[str]]]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(f"{dataset}: reading parquet needs pyarrow; expected `pip install "
                    f"'peft-jax[data]'` (pyarrow comes with `datasets`)") from None
  rows, names = [], {}
  for fp in paths:
    try:
      table = pq.read_table(fp)
    except Exception as e:
      raise DataError(f"{dataset}: {fp} is not a readable parquet file ({type(e).__name__}: "
                      f"{str(e)[:200]}); expected a parquet file") from None
    names.update(_parquet_class_names(table.schema))
    for r in table.to_pylist():
      r["_line"] = len(rows)
      r["_file"] = fp
      rows.append(r)
  return rows, names


def read_table(paths: Union[str, Sequence[str]], dataset: str) -> Tuple[List[dict], Dict[str, List[str]]]:
  """(rows, ClassLabel names) of parquet / JSONL / CSV / TSV file(s) with a header (the
  fields as the Hugging Face version of the data set names them). Several paths are
  shards of one split, read in order."""
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  paths = [os.fspath(p) for p in paths]
  ext = os.path.splitext(paths[0])[1].lower()
  if ext == ".parquet":
    return read_parquet(paths, dataset)
  rows = []
  for fp in paths:
    if ext == ".jsonl":
      part = read_jsonl(fp, dataset)
    elif ext in (".csv", ".tsv"):
      require_file(fp, dataset, "a CSV file with a header line")
      part = read_csv(fp, dataset, delimiter="\t" if ext == ".tsv" else ",")
    else:
      raise DataError(f"{dataset}: cannot read {fp}; expected a {'/'.join(TABLE_EXTS)} file")
    for r in part:
      r["_file"] = fp
    rows.extend(part)
  return rows, {}


def table_files(root: str, name: str, hf_config: Optional[str] = None) -> Optional[List[str]]:
  """The file(s) of split ``name`` in a folder of tables: ``<name>.parquet|jsonl|csv|tsv``,
  or parquet shards as the Hugging Face hub names them (``<name>-00000-of-00001.parquet``
  in the folder, in ``data/`` or in ``<hf_config>/``)."""
  for ext in TABLE_EXTS:
    fp = os.path.join(root, name + ext)
    if os.path.isfile(fp):
      return [fp]
  for sub in ("", "data", hf_config or ""):
    d = os.path.join(root, sub) if sub else root
    shards = sorted(glob.glob(os.path.join(glob.escape(d), f"{glob.escape(name)}-*.parquet")))
    shards = [f for f in shards if re.fullmatch(re.escape(name) + r"-\d+-of-\d+\.parquet",
                                                 os.path.basename(f))]
    if shards:
      return shards
  return None


def table_splits(root: str, hf_config: Optional[str] = None) -> Dict[str, List[str]]:
  """{split name: files} of a folder of tables (see :func:`table_files`)."""
  names = set()
  for sub in ("", "data", hf_config or ""):
    d = os.path.join(root, sub) if sub else root
    if not os.path.isdir(d):
      continue
    for f in os.listdir(d):
      base, ext = os.path.splitext(f)
      if ext.lower() not in TABLE_EXTS:
        continue
      m = re.fullmatch(r"(.+)-\d+-of-\d+", base)
      if m and ext.lower() == ".parquet":
        names.add(m.group(1))
      elif not sub:
        names.add(base)
  out = {}
  for n in sorted(names):
    files = table_files(root, n, hf_config)
    if files:
      out[n] = files
  return out


def _tfds_name(spec: str) -> str:
  """``name[/config][:version]``; ``name/3.0.0`` (a version where the config goes) is
  read as ``name:3.0.0``."""
  parts = spec.split("/")
  if len(parts) == 2 and re.fullmatch(r"\d+\.\d+\.\d+", parts[1]):
    return f"{parts[0]}:{parts[1]}"
  return spec


def tfds_splits(spec: str, dataset: str, data_dir: Optional[str] = None):
  """({split: reader()}, {feature: ClassLabel names}, description) of a prepared TFDS
  data set. ArrayRecord data are read with ``tfds.data_source`` (no TensorFlow);
  TFRecord data need TensorFlow (``as_dataset``). Nothing is downloaded."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"{dataset}: data.path=tfds:{spec} needs tensorflow-datasets; expected "
                    f"`pip install 'peft-jax[tfds]'`, or a local folder / hf:<id>") from None
  name = _tfds_name(spec)
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  where = data_dir or "TFDS's default data_dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise DataError(f"{dataset}: TFDS has no data set {name!r} in {where} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); expected "
                    f"tfds:<name>/<config> of a TFDS data set") from None
  if not builder.is_prepared():
    raise DataError(f"{dataset}: TFDS data set {name!r} is not prepared in {where}; expected "
                    f"it built there first (`tfds build {name} --data_dir=...`, needs the "
                    f"network) or data.tfds_data_dir / $TFDS_DATA_DIR naming where it is")
  feats = builder.info.features
  names = {}
  for k in getattr(feats, "keys", lambda: [])():
    f = feats[k]
    if isinstance(f, tfds.features.ClassLabel):
      names[k] = list(f.names)
  fmt = str(getattr(builder.info, "file_format", "") or "").lower()

  def reader(split):
    def read():
      if "tfrecord" not in fmt:
        src = builder.as_data_source(split=split)
        exs = [_plain(dict(src[i])) for i in range(len(src))]
      else:
        import importlib.util
        if importlib.util.find_spec("tensorflow") is None:   # as_dataset needs it
          raise DataError(f"{dataset}: TFDS data set {name!r} is stored as TFRecord, which "
                          f"needs TensorFlow to read; expected `pip install tensorflow`, or "
                          f"the data set prepared with file_format=array_record") from None
        exs = [_plain(ex) for ex in tfds.as_numpy(builder.as_dataset(split=split,
                                                                      shuffle_files=False))]
      for i, ex in enumerate(exs):
        ex["_line"] = i
      return exs
    return read

  splits = {s: reader(s) for s in builder.info.splits.keys()}
  return splits, names, f"tfds:{name}" + (f" ({data_dir})" if data_dir else "")


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
#: the source options of the loaders in peft_jax.data.sources
SOURCE_KNOBS = {
    "tfds_data_dir": Field(None, "TFDS's data_dir for a tfds:<name>/<config> data.path (none: "
                           "$TFDS_DATA_DIR, else TFDS's default)", "str"),
}
