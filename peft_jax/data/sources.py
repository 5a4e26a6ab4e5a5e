"""The data-set registry and the loaders for SuperGLUE (BoolQ, RTE, COPA),
CNN/DailyMail, AG News, CoLA, E2E NLG and SAMSum.

``load_dataset_rows(name, split, path=..., seed=0, size=None, ...)`` returns a
:class:`~peft_jax.data.common.Rows` of ``{"input", "target", "references", "meta"}``
for ``name`` in :data:`DATASETS`; SuperNI and TÜLU live in their own modules.

``path`` (``data.path``) is any of these source kinds:

* a folder in the data set's original layout (file names below);
* a folder of tables under the Hugging Face split and field names:
  ``<split>.parquet`` / ``.jsonl`` / ``.csv`` / ``.tsv``, or parquet shards named as on
  the hub (``data/<split>-00000-of-00001.parquet``; also in the folder itself or in
  ``<hf_config>/``). A folder holding any original-layout file is read as that layout;
* a single file: the original format (``.jsonl`` SuperGLUE, ``.tsv`` CoLA, ``.csv``
  CNN/DailyMail, AG News, E2E, SAMSum, ``.json`` SAMSum) or a parquet / JSONL / CSV
  table with the Hugging Face fields; read as whatever split is asked for (no carve);
* a ``datasets.Dataset`` / ``DatasetDict``, a ``save_to_disk`` folder, or
  ``"hf:<hub id>"`` (with ``hf_config``, e.g. ``hf:glue`` + ``hf_config=cola``; needs the
  hub);
* ``"tfds:<name>[/<config>][:<version>]"`` (``tfds:super_glue/rte``,
  ``tfds:glue/cola``, ``tfds:ag_news_subset``; ``tfds:cnn_dailymail/3.0.0`` means version
  3.0.0): a TFDS data set already prepared in ``tfds_data_dir`` (else
  ``$TFDS_DATA_DIR``, else TFDS's default). Nothing is downloaded. ArrayRecord data are
  read through ``tfds.data_source`` without TensorFlow; TFRecord data need TensorFlow.
  Needs the ``[tfds]`` extra.

Without ``path``, ``$PEFT_JAX_DATA_DIR/<folder>`` is used. Field names: the original
ones or the Hugging Face ones (AG News ``text,label``, or TFDS's ``title,description``
joined by a space; CoLA ``sentence,label,idx``; SuperGLUE ``premise,hypothesis,idx,
label`` etc.; CNN/DailyMail ``article,highlights,id``; SAMSum ``id,dialogue,summary``;
E2E ``meaning_representation,human_reference``). ``ClassLabel`` names (datasets, TFDS,
the parquet metadata `datasets` writes) name integer labels.

One meaning of train / validation / test per data set, whatever the source. "HF/TFDS"
is the split read from a hub id, DatasetDict, save_to_disk folder, folder of tables or
TFDS data set; "carve" is ``validation_size`` rows of that source's train, chosen by
``split_seed`` and removed from train::

  data set       | train            | validation                    | test
  ---------------+------------------+-------------------------------+--------------------------
  boolq/rte/copa | train            | validation (layout: val.jsonl)| test (unlabelled: <unk>)
  cnn_dailymail  | train            | validation                    | test
  ag_news        | train - carve    | carve (none published)        | test
  cola           | train - carve    | carve (layout: val.tsv if     | GLUE dev: HF/TFDS
                 |                  |   present, else carve)        |   validation, dev.tsv
  e2e_nlg        | train            | validation (devset.csv)       | test (testset_w_refs.csv)
  samsum         | train            | validation (val.csv)          | test
  dev32 (FewGLUE, boolq/copa): the original layout only.

A source without the validation split gets one carved when ``validation_size`` is set
(default 1,000 for AG News and CoLA, where the carve *is* the validation split; none
elsewhere, where a missing validation split is an error naming the knob; E2E carves
whole meaning representations). The carve ranks rows by a ``split_seed``-keyed hash of
their text (input and target), not by position, so the same rows give the same
validation split from every source kind (TFDS stores rows in its own order) and across
training seeds. ``hf_split`` reads the named HF/TFDS split as it is (no table, no carve).

Text-to-text formats (input template -> target; ``template=`` overrides the input
template, a ``str.format`` string over the fields in braces)::

  boolq          "boolq passage: {passage} question: {question}"  ->  "False" | "True"
  rte            "rte hypothesis: {hypothesis} premise: {premise}"  ->  "entailment" | "not_entailment"
  copa           "copa choice1: {choice1} choice2: {choice2} premise: {premise} question: {question}"
                   ->  "choice1" | "choice2"
  cnn_dailymail  "summarize: {article}"  ->  highlights
  ag_news        "Classify the topic of this news article as one of: {options}.\\n\\n{text}"
                   ->  class name ({options} = the class names joined by ", ":
                       "World, Sports, Business, Sci/Tech")
  cola           "Is the following sentence grammatically acceptable or unacceptable?\\n\\n{sentence}"
                   ->  "acceptable" | "unacceptable"
  e2e_nlg        "Describe the restaurant from its attributes.\\n\\n{mr}"  ->  ref
                   (``references``: all refs of that mr when grouped)
  samsum         "Summarize the following dialogue.\\n\\n{dialogue}"  ->  summary

The SuperGLUE and CNN/DailyMail inputs are exactly T5's (``t5.data.preprocessors.glue``:
benchmark name, then every feature other than ``idx``/``label`` as ``"<key>: <value>"``
in *sorted key order*, joined by single spaces; label names from TFDS ``super_glue``;
unlabelled rows get T5's ``<unk>`` target and ``meta['label'] = None``;
``preprocessors.summarize``: ``"summarize: " + article``). The seed-002 prompts (AG News,
CoLA, E2E, SAMSum) are this project's choice: a one-line instruction, a blank line,
then the raw text (SAMSum's ``\\r\\n`` line ends become ``\\n``; AG News's original
3-column CSV becomes ``title + " " + description``). Targets are ``.strip()``-ed.

Original-layout files per split (first existing wins; see the table for carving):

* SuperGLUE: ``train.jsonl``, ``val.jsonl`` (``validation.jsonl``), ``test.jsonl``
  (unlabelled in SuperGLUE), ``dev32.jsonl`` (FewGLUE split ``dev32``).
* CNN/DailyMail: ``train.csv`` (``train_sample.csv``), ``validation.csv``, ``test.csv``
  with columns ``,id,article,highlights``.
* AG News: ``train.csv``, ``test.csv``: as distributed, ``label,title,description``
  without header and labels 1-4; or a ``text,label`` header (a copy derived from the
  Hugging Face version, labels 0-3 -- detected by a 0 label, ``rows.info['label_base']``).
  Class names from ``classes.txt`` (else World, Sports, Business, Sci/Tech).
* CoLA (GLUE TSV without header: source, label, mark, sentence): ``train.tsv``,
  ``val.tsv`` (else carved), ``test`` = ``dev.tsv`` (GLUE dev; GLUE's test is unlabelled).
* E2E NLG (CSV ``mr,ref``): ``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``.
  ``group_references`` (default: on except for train) gives one row per distinct
  ``mr`` with all its refs as ``references``; otherwise one row per (mr, ref).
* SAMSum (CSV ``id,summary,dialogue`` or the corpus JSON): ``train``, ``val``, ``test``
  ``.csv``/``.json``.

For HF/TFDS sources ``validation`` also matches ``val``/``dev``.

``size`` = an int or seed 002's ``low``/``medium``/``high`` (100/1,000/10,000): a
``seed``-chosen subset (nested across sizes); when fewer rows exist all are taken and
``rows.info['notes']`` says so. Rows are shuffled by ``seed`` for ``train`` (``shuffle``
overrides).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from peft_jax.fields import Field

from peft_jax.data.common import (COMMON_KNOBS, HF_SPLIT_NAMES, SOURCE_KNOBS, TABLE_EXTS,
                                  TEMPLATE_KNOB, DataError, Rows, as_text, carve_by_content,
                                  check_split, first_existing, get_field, hf_object, hf_rows,
                                  is_hf_source, make_row, read_csv, read_jsonl, read_table,
                                  resolve_root, subsample, table_splits, tfds_splits)

TEMPLATES = {
    "boolq": "boolq passage: {passage} question: {question}",
    "rte": "rte hypothesis: {hypothesis} premise: {premise}",
    "copa": "copa choice1: {choice1} choice2: {choice2} premise: {premise} question: {question}",
    "cnn_dailymail": "summarize: {article}",
    "ag_news": "Classify the topic of this news article as one of: {options}.\n\n{text}",
    "cola": "Is the following sentence grammatically acceptable or unacceptable?\n\n{sentence}",
    "e2e_nlg": "Describe the restaurant from its attributes.\n\n{mr}",
    "samsum": "Summarize the following dialogue.\n\n{dialogue}",
}
LABELS = {
    "boolq": ["False", "True"],
    "rte": ["entailment", "not_entailment"],
    "copa": ["choice1", "choice2"],
    "ag_news": ["World", "Sports", "Business", "Sci/Tech"],
    "cola": ["unacceptable", "acceptable"],
}
UNK = "<unk>"  # T5's target for unlabelled rows

_SAME = {"train": "train", "validation": "validation", "test": "test"}
#: {data set: {our split: the Hugging Face / TFDS split it is read from}}; validation
#: None or absent from the source: carved from train (``validation_size``, ``split_seed``)
SPLITS: Dict[str, Dict[str, Optional[str]]] = {
    "boolq": _SAME, "rte": _SAME, "copa": _SAME, "cnn_dailymail": _SAME, "ag_news": _SAME,
    "e2e_nlg": _SAME, "samsum": _SAME,
    # GLUE's test labels are hidden: our test is GLUE dev (HF/TFDS "validation"), as in
    # the original layout (dev.tsv); our validation is carved from train
    "cola": {"train": "train", "validation": None, "test": "validation"},
}


# ----------------------------------------------------------------------------- helpers

def _fill(template: str, dataset: str, **fields) -> str:
  try:
    return template.format(**fields)
  except (KeyError, IndexError) as e:
    raise DataError(f"{dataset}: template {template!r} uses an unknown field {e}; expected "
                    f"fields among {sorted(fields)}") from None


def _label(value, names: Sequence[str], dataset: str, where: str) -> Optional[str]:
  """A label value (bool, int index, or name) -> its name; None when unlabelled."""
  if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == -1):
    return None
  if isinstance(value, bool):
    return names[int(value)]
  if isinstance(value, int) and 0 <= value < len(names):
    return names[value]
  if isinstance(value, str):
    if value in names:
      return value
    low = value.strip().lower()
    for n in names:
      if n.lower() == low:
        return n
    if low.lstrip("-").isdigit():
      return _label(int(low), names, dataset, where)
  raise DataError(f"{dataset}: {where} has label {value!r}; expected one of {list(names)} "
                  f"(or an index 0..{len(names) - 1})")


def _where(ex: dict) -> str:
  return f"{ex['_file']} line {ex['_line']}" if "_file" in ex else f"example {ex['_line']}"


def _text(ex: dict, keys: Sequence[str], dataset: str, expected: str) -> str:
  return as_text(get_field(ex, keys, dataset, _where(ex), expected), dataset, _where(ex), keys[0])


class _Src:
  """Split-addressable examples. ``kind``: ``layout`` (the original file names, split
  names are ours), ``hf`` (Hugging Face / TFDS split names, translated by the data set's
  split table) or ``single`` (one file or Dataset: whatever split is asked for)."""

  def __init__(self, kind, desc, splits, root=None):
    self.kind, self.desc, self.splits, self.root = kind, desc, splits, root

  def find(self, name: Optional[str]) -> Optional[str]:
    if name is None:
      return None
    for cand in (HF_SPLIT_NAMES.get(name, (name,)) if self.kind == "hf" else (name,)):
      if cand in self.splits:
        return cand
    return None


def _open_source(dataset, root, files, reader, hf_config, tfds_data_dir, layout_exts) -> _Src:
  if isinstance(root, str) and root.startswith("tfds:"):
    readers, names, desc = tfds_splits(root[5:], dataset, tfds_data_dir)
    return _Src("hf", desc, {k: (lambda r=r: (r(), names, desc)) for k, r in readers.items()})
  if is_hf_source(root):
    obj, desc = hf_object(root, dataset, hf_config)
    if hasattr(obj, "keys"):                       # DatasetDict
      return _Src("hf", desc, {k: (lambda k=k: (*hf_rows(obj[k]), desc)) for k in obj.keys()})
    return _Src("single", desc, {None: lambda: (*hf_rows(obj), desc)})
  root = os.fspath(root)

  def read(fp):
    exs = reader(fp)
    for e in exs:
      e["_file"] = fp
    return exs, {}, fp

  if os.path.isfile(root):
    ext = os.path.splitext(root)[1].lower()
    if ext in TABLE_EXTS and ext not in layout_exts:
      return _Src("single", root, {None: lambda: (*read_table(root, dataset), root)})
    return _Src("single", root, {None: lambda: read(root)}, os.path.dirname(root))
  if not os.path.isdir(root):
    raise DataError(f"{dataset}: path not found: {root}; expected a folder with "
                    f"{files['train'][0]} (the original layout) or train.parquet/.jsonl/.csv, "
                    f"a file, hf:<hub id> or tfds:<name>/<config>")
  layout = {s: fp for s, names in files.items() for fp in [first_existing(root, names)] if fp}
  tables = {} if layout else table_splits(root, hf_config)
  if tables:
    return _Src("hf", f"tables:{root}",
                {k: (lambda fs=fs: (*read_table(fs, dataset), ", ".join(fs)))
                 for k, fs in tables.items()})
  return _Src("layout", root, {s: (lambda fp=fp: read(fp)) for s, fp in layout.items()}, root)


def _source(dataset: str, split: str, path, folder: str, files: Dict[str, Sequence[str]],
            reader: Callable[[str], List[dict]], expected: str, info: dict, *,
            validation_size: Optional[int] = None, split_seed: int = 0, hf_config=None,
            hf_split=None, tfds_data_dir=None, layout_exts: Sequence[str] = ()
            ) -> Tuple[List[dict], Dict[str, List[str]], Optional[str], Optional[dict]]:
  """(raw examples, ClassLabel names, the local folder of an original-layout source or
  None, the carve to apply to the loaded rows or None). The split read follows
  :data:`SPLITS` (HF / TFDS names) or ``files`` (original layout); a source without a
  validation split gets ``validation_size`` rows carved from train (``_finish``)."""
  root = resolve_root(path, dataset, folder)
  src = _open_source(dataset, root, files, reader, hf_config, tfds_data_dir, layout_exts)

  def load(name):
    exs, names, desc = src.splits[name]()
    info["source"] = desc
    if src.kind == "hf":
      info["source_split"] = name
    return exs, names

  if src.kind == "single":
    exs, names = load(None)
    return exs, names, src.root, None
  if src.kind == "hf" and hf_split:
    name = src.find(hf_split)
    if name is None:
      raise DataError(f"{dataset}: {src.desc} has splits {sorted(src.splits)}; expected one named "
                      f"hf_split={hf_split!r}")
    exs, names = load(name)
    return exs, names, src.root, None
  table = SPLITS[dataset] if src.kind == "hf" else {s: s for s in files}
  val = src.find(table.get("validation"))
  carving = split in ("train", "validation") and val is None and validation_size is not None
  want = table.get("train") if carving else table.get(split)
  name = src.find(want)
  if name is None:
    if src.kind == "layout":
      cands = files.get(want, ())
      if not cands:
        raise DataError(f"{dataset}: the original layout has no {split} file; expected "
                        f"validation_size=N to carve one from the train file")
      hint = ("; or validation_size=N to carve it from the train file"
              if split == "validation" else "")
      raise DataError(f"{dataset}: file not found: {os.path.join(src.root, cands[0])}; expected "
                      f"{' or '.join(cands)} for split {split!r} ({expected}), or a folder of "
                      f"{split}.parquet/.jsonl/.csv{hint}")
    if want is None and split == "validation":
      raise DataError(f"{dataset}: {src.desc} has no split that is this data set's "
                      f"validation; expected validation_size=N to carve one from train")
    if want is None:
      raise DataError(f"{dataset}: split {split!r} exists only in the original layout; "
                      f"expected a folder with {' or '.join(files.get(split, ()))}")
    hint = "; or validation_size=N to carve it from train" if split == "validation" else ""
    raise DataError(f"{dataset}: {src.desc} has splits {sorted(src.splits)}; expected one named "
                    f"{list(HF_SPLIT_NAMES.get(want, (want,)))} for split {split!r} (see the "
                    f"split table in peft_jax.data.sources){hint}")
  exs, names = load(name)
  carve_spec = None
  if carving:
    carve_spec = {"from": info["source"], "n": validation_size, "split_seed": split_seed,
                  "part": split}
  return exs, names, src.root, carve_spec


def _finish(rows: List[dict], info: dict, split: str, seed: int, size, shuffle,
            carve_spec: Optional[dict] = None, dataset: str = "",
            content=lambda r: r["input"] + "\0" + r["target"]) -> Rows:
  if carve_spec is not None:
    n = carve_spec["n"]
    if not 0 < n < len(rows):
      raise DataError(f"{dataset}: validation_size={n} cannot be carved from {len(rows)} "
                      f"training rows of {carve_spec['from']}; expected 0 < validation_size < "
                      f"{len(rows)}")
    train, val = carve_by_content(rows, n, carve_spec["split_seed"], dataset + "-validation",
                                  content)
    rows = val if split == "validation" else train
    info["carved_validation"] = {k: carve_spec[k] for k in ("from", "n", "split_seed")}
  shuffle = (split == "train") if shuffle is None else shuffle
  rows = subsample(rows, size, seed, shuffle=shuffle, info=info)
  info["n"] = len(rows)
  return Rows(rows, info)


def _info(dataset, split, seed, template):
  return {"dataset": dataset, "split": split, "seed": seed, "template": template}


# ----------------------------------------------------------------------------- SuperGLUE

SUPERGLUE_FILES = {"train": ("train.jsonl",), "validation": ("val.jsonl", "validation.jsonl"),
                   "test": ("test.jsonl",), "dev32": ("dev32.jsonl",)}
SUPERGLUE_FIELDS = {"boolq": ("passage", "question"), "rte": ("hypothesis", "premise"),
                    "copa": ("choice1", "choice2", "premise", "question")}


def _load_superglue(name: str, split: str, *, path=None, seed: int = 0, size=None,
                    shuffle: Optional[bool] = None, template: Optional[str] = None,
                    split_seed: int = 0, validation_size: Optional[int] = None,
                    hf_config: Optional[str] = None, hf_split: Optional[str] = None,
                    tfds_data_dir: Optional[str] = None) -> Rows:
  check_split(split, tuple(SUPERGLUE_FILES), name)
  template = template or TEMPLATES[name]
  fields = SUPERGLUE_FIELDS[name]
  expected = f"SuperGLUE {name} jsonl rows with {', '.join(fields)}, label"
  info = _info(name, split, seed, template)
  exs, class_names, _, carved = _source(
      name, split, path, f"superglue/{name}", SUPERGLUE_FILES,
      lambda fp: read_jsonl(fp, name, fields), expected, info, hf_config=hf_config,
      hf_split=hf_split, validation_size=validation_size, split_seed=split_seed,
      tfds_data_dir=tfds_data_dir, layout_exts=(".jsonl",))
  names = class_names.get("label") or LABELS[name]
  info["classes"] = list(names)
  rows = []
  for ex in exs:
    vals = {k: _text(ex, (k,), name, expected) for k in fields}
    label = _label(ex.get("label"), names, name, _where(ex))
    tgt = label if label is not None else UNK
    rows.append(make_row(_fill(template, name, **vals), tgt, dataset=name, label=label,
                         idx=ex.get("idx"), classes=list(names)))
  return _finish(rows, info, split, seed, size, shuffle, carved, name)


def load_boolq(split, **kw) -> Rows:
  return _load_superglue("boolq", split, **kw)


def load_rte(split, **kw) -> Rows:
  return _load_superglue("rte", split, **kw)


def load_copa(split, **kw) -> Rows:
  return _load_superglue("copa", split, **kw)


# ----------------------------------------------------------------------------- CNN/DailyMail

def load_cnn_dailymail(split: str, *, path=None, seed: int = 0, size=None,
                       shuffle: Optional[bool] = None, template: Optional[str] = None,
                       split_seed: int = 0, validation_size: Optional[int] = None,
                       hf_config: Optional[str] = None, hf_split: Optional[str] = None,
                       tfds_data_dir: Optional[str] = None) -> Rows:
  name = "cnn_dailymail"
  check_split(split, ("train", "validation", "test"), name)
  template = template or TEMPLATES[name]
  expected = "CSV with header ,id,article,highlights"
  info = _info(name, split, seed, template)
  files = {"train": ("train.csv", "train_sample.csv"), "validation": ("validation.csv", "val.csv"),
           "test": ("test.csv",)}
  exs, _, _, carved = _source(
      name, split, path, "cnn_dailymail", files,
      lambda fp: read_csv(fp, name, required=("article", "highlights")), expected, info,
      hf_config=hf_config, hf_split=hf_split, validation_size=validation_size,
      split_seed=split_seed, tfds_data_dir=tfds_data_dir, layout_exts=(".csv",))
  rows = []
  for ex in exs:
    art = _text(ex, ("article",), name, expected)
    hl = _text(ex, ("highlights",), name, expected)
    rows.append(make_row(_fill(template, name, article=art), hl.strip(), dataset=name,
                         id=ex.get("id")))
  return _finish(rows, info, split, seed, size, shuffle, carved, name)


# ----------------------------------------------------------------------------- AG News

def _read_ag_news(fp: str) -> List[dict]:
  with open(fp, encoding="utf-8", newline="") as f:
    first = next(csv.reader(f), None)
  if first is None:
    raise DataError(f"ag_news: {fp} is empty; expected CSV rows label,title,description")
  if [c.strip().lower() for c in first] == ["text", "label"]:
    rows = read_csv(fp, "ag_news", required=("text", "label"))
    for r in rows:
      r["_header"] = True
    return rows
  rows = read_csv(fp, "ag_news", header=("label", "title", "description"))
  for r in rows:
    r["text"] = r.pop("title") + " " + r.pop("description")
  return rows


def _ag_news_label_base(exs: List[dict], n_classes: int, info: dict) -> int:
  """The original 3-column CSV is 1-based (1-4). A ``text,label`` copy (derived from
  the Hugging Face version, e.g. ../shared/data/ag_news) is 0-based when a 0 occurs."""
  if not exs or not exs[0].get("_header"):
    return 1
  labels = {str(e.get("label")).strip() for e in exs}
  if "0" in labels:
    return 0
  if str(n_classes) in labels:
    return 1
  info.setdefault("notes", []).append("text,label CSV without a 0 or a 4 label: assuming "
                                      "0-based labels")
  return 0


def load_ag_news(split: str, *, path=None, seed: int = 0, size=None,
                 shuffle: Optional[bool] = None, template: Optional[str] = None,
                 validation_size: Optional[int] = 1000, split_seed: int = 0,
                 hf_config: Optional[str] = None, hf_split: Optional[str] = None,
                 tfds_data_dir: Optional[str] = None) -> Rows:
  name = "ag_news"
  check_split(split, ("train", "validation", "test"), name)
  template = template or TEMPLATES[name]
  expected = "AG News CSV: class index (1-4), title, description (or a text,label header)"
  info = _info(name, split, seed, template)
  files = {"train": ("train.csv",), "validation": (), "test": ("test.csv",)}
  exs, class_names, root, carved = _source(
      name, split, path, "ag_news", files, _read_ag_news, expected, info,
      validation_size=validation_size, split_seed=split_seed, hf_config=hf_config,
      hf_split=hf_split, tfds_data_dir=tfds_data_dir, layout_exts=(".csv",))
  if root is None:                       # HF / TFDS / tables: 0-based (ClassLabel names)
    names, offset = class_names.get("label") or LABELS[name], 0
  else:                                  # CSV: labels named by classes.txt
    cls = os.path.join(root, "classes.txt")
    if os.path.isfile(cls):
      with open(cls, encoding="utf-8") as f:
        names = [ln.strip() for ln in f if ln.strip()]
    else:
      names = LABELS[name]
      info.setdefault("notes", []).append(f"{cls} not found; using the standard AG News "
                                          f"class names {names}")
    offset = _ag_news_label_base(exs, len(names), info)
  info["label_base"] = offset
  info["classes"] = list(names)
  options = ", ".join(names)
  rows = []
  for ex in exs:
    if "text" not in ex and "title" in ex and "description" in ex:   # TFDS ag_news_subset
      text = (_text(ex, ("title",), name, expected) + " "
              + _text(ex, ("description",), name, expected))
    else:
      text = _text(ex, ("text",), name, expected)
    raw = ex.get("label")
    try:
      idx = int(raw) - offset
    except (TypeError, ValueError):
      idx = -1
    if not 0 <= idx < len(names):
      raise DataError(f"{name}: {_where(ex)} has label {raw!r}; expected a class index "
                      f"{offset}..{len(names) - 1 + offset}")
    rows.append(make_row(_fill(template, name, text=text, options=options), names[idx],
                         dataset=name, label=names[idx], classes=list(names)))
  return _finish(rows, info, split, seed, size, shuffle, carved, name)


# ----------------------------------------------------------------------------- CoLA

def _read_cola(fp: str) -> List[dict]:
  with open(fp, encoding="utf-8", newline="") as f:
    first = next(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), None)
  if first is None:
    raise DataError(f"cola: {fp} is empty; expected TSV rows source, label, mark, sentence")
  if [c.strip().lower() for c in first] == ["index", "sentence"]:   # GLUE test.tsv
    return read_csv(fp, "cola", required=("sentence",), delimiter="\t", quoting=csv.QUOTE_NONE)
  return read_csv(fp, "cola", header=("source", "label", "mark", "sentence"), delimiter="\t",
                  quoting=csv.QUOTE_NONE)


def load_cola(split: str, *, path=None, seed: int = 0, size=None, shuffle: Optional[bool] = None,
              template: Optional[str] = None, validation_size: Optional[int] = 1000,
              split_seed: int = 0, hf_config: Optional[str] = None,
              hf_split: Optional[str] = None, tfds_data_dir: Optional[str] = None) -> Rows:
  name = "cola"
  check_split(split, ("train", "validation", "test"), name)
  template = template or TEMPLATES[name]
  expected = "GLUE CoLA TSV without header: source, label (0/1), mark, sentence"
  info = _info(name, split, seed, template)
  files = {"train": ("train.tsv", "in_domain_train.tsv"), "validation": ("val.tsv",),
           "test": ("dev.tsv", "in_domain_dev.tsv")}
  exs, class_names, _, carved = _source(
      name, split, path, "glue_cola", files, _read_cola, expected, info,
      validation_size=validation_size, split_seed=split_seed, hf_config=hf_config,
      hf_split=hf_split, tfds_data_dir=tfds_data_dir, layout_exts=(".tsv",))
  names = class_names.get("label") or LABELS[name]
  info["classes"] = list(names)
  rows = []
  for ex in exs:
    sent = _text(ex, ("sentence",), name, expected)
    label = _label(ex.get("label"), names, name, _where(ex))
    rows.append(make_row(_fill(template, name, sentence=sent), label if label is not None else UNK,
                         dataset=name, label=label, source=ex.get("source"),
                         classes=list(names)))
  return _finish(rows, info, split, seed, size, shuffle, carved, name)


# ----------------------------------------------------------------------------- E2E NLG

def _read_e2e(fp: str) -> List[dict]:
  rows = read_csv(fp, "e2e_nlg")
  if rows:
    for pair in (("mr", "meaning_representation"), ("ref", "human_reference")):
      if not any(k in rows[0] for k in pair):
        raise DataError(f"e2e_nlg: {fp} header lacks column {pair[0]!r} (or {pair[1]!r}); "
                        f"expected columns mr,ref or meaning_representation,human_reference")
  return rows


def load_e2e_nlg(split: str, *, path=None, seed: int = 0, size=None,
                 shuffle: Optional[bool] = None, template: Optional[str] = None,
                 group_references: Optional[bool] = None, split_seed: int = 0,
                 validation_size: Optional[int] = None, hf_config: Optional[str] = None,
                 hf_split: Optional[str] = None, tfds_data_dir: Optional[str] = None) -> Rows:
  name = "e2e_nlg"
  check_split(split, ("train", "validation", "test"), name)
  template = template or TEMPLATES[name]
  expected = "E2E CSV with header mr,ref (or meaning_representation,human_reference)"
  info = _info(name, split, seed, template)
  files = {"train": ("trainset.csv", "train.csv"),
           "validation": ("devset.csv", "dev.csv", "validation.csv"),
           "test": ("testset_w_refs.csv", "test.csv")}
  exs, _, _, carved = _source(
      name, split, path, "e2e_nlg", files, _read_e2e, expected, info, hf_config=hf_config,
      hf_split=hf_split, validation_size=validation_size, split_seed=split_seed,
      tfds_data_dir=tfds_data_dir, layout_exts=(".csv",))
  group = (split != "train") if group_references is None else group_references
  info["group_references"] = group
  pairs = [(_text(ex, ("mr", "meaning_representation"), name, expected),
            _text(ex, ("ref", "human_reference"), name, expected).strip()) for ex in exs]
  if carved is not None:     # carve whole meaning representations (validation_size of them)
    units: Dict[str, List[Tuple[str, str]]] = {}
    for mr, ref in pairs:
      units.setdefault(mr, []).append((mr, ref))
    n = carved["n"]
    if not 0 < n < len(units):
      raise DataError(f"{name}: validation_size={n} cannot be carved from {len(units)} "
                      f"meaning representations of {carved['from']}; expected 0 < "
                      f"validation_size < {len(units)}")
    rest, held = carve_by_content(list(units.values()), n, carved["split_seed"],
                                  name + "-validation", lambda u: u[0][0])
    pairs = [p for u in (held if split == "validation" else rest) for p in u]
    info["carved_validation"] = {k: carved[k] for k in ("from", "n", "split_seed")}
  rows = []
  if group:
    refs: Dict[str, List[str]] = {}
    for mr, ref in pairs:
      refs.setdefault(mr, []).append(ref)
    for mr, rs in refs.items():
      rows.append(make_row(_fill(template, name, mr=mr), rs[0], rs, dataset=name, mr=mr))
  else:
    for mr, ref in pairs:
      rows.append(make_row(_fill(template, name, mr=mr), ref, dataset=name, mr=mr))
  info["n_pairs"] = len(pairs)
  return _finish(rows, info, split, seed, size, shuffle)


# ----------------------------------------------------------------------------- SAMSum

def _read_samsum(fp: str) -> List[dict]:
  if fp.endswith(".json"):
    try:
      with open(fp, encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"samsum: {fp} is not valid JSON ({e.msg}); expected a list of "
                      f"{{id, summary, dialogue}}") from None
    if not isinstance(data, list):
      raise DataError(f"samsum: {fp} holds a {type(data).__name__}; expected a list of "
                      f"{{id, summary, dialogue}}")
    for i, d in enumerate(data):
      if not isinstance(d, dict):
        raise DataError(f"samsum: {fp} item {i} is not an object; expected {{id, summary, "
                        f"dialogue}}")
      d["_line"] = i
    return data
  return read_csv(fp, "samsum", required=("summary", "dialogue"))


def load_samsum(split: str, *, path=None, seed: int = 0, size=None,
                shuffle: Optional[bool] = None, template: Optional[str] = None,
                split_seed: int = 0, validation_size: Optional[int] = None,
                hf_config: Optional[str] = None, hf_split: Optional[str] = None,
                tfds_data_dir: Optional[str] = None) -> Rows:
  name = "samsum"
  check_split(split, ("train", "validation", "test"), name)
  template = template or TEMPLATES[name]
  expected = "SAMSum CSV id,summary,dialogue (or the corpus JSON list)"
  info = _info(name, split, seed, template)
  files = {"train": ("train.csv", "train.json"),
           "validation": ("val.csv", "validation.csv", "val.json"),
           "test": ("test.csv", "test.json")}
  exs, _, _, carved = _source(
      name, split, path, "samsum", files, _read_samsum, expected, info, hf_config=hf_config,
      hf_split=hf_split, validation_size=validation_size, split_seed=split_seed,
      tfds_data_dir=tfds_data_dir, layout_exts=(".csv", ".json"))
  rows = []
  for ex in exs:
    dia = _text(ex, ("dialogue",), name, expected).replace("\r\n", "\n")
    summ = _text(ex, ("summary",), name, expected)
    rows.append(make_row(_fill(template, name, dialogue=dia), summ.strip(), dataset=name,
                         id=ex.get("id")))
  return _finish(rows, info, split, seed, size, shuffle, carved, name)


# ----------------------------------------------------------------------------- registry

def _superni(split, **kw):
  from peft_jax.data.superni import load_superni
  return load_superni(split, **kw)


def _tulu(split, **kw):
  from peft_jax.data.tulu import load_tulu
  return load_tulu(split, **kw)


LOADERS: Dict[str, Callable[..., Rows]] = {
    "superni": _superni, "tulu": _tulu, "boolq": load_boolq, "rte": load_rte, "copa": load_copa,
    "cnn_dailymail": load_cnn_dailymail, "ag_news": load_ag_news, "cola": load_cola,
    "e2e_nlg": load_e2e_nlg, "samsum": load_samsum,
}
DATASETS = tuple(LOADERS)


def _validation_size(default, doc):
  return {"validation_size": Field(default, doc, "int", ge=0)}


def _knobs():
  from peft_jax.data import superni, tulu
  base = {**COMMON_KNOBS, **TEMPLATE_KNOB, **SOURCE_KNOBS}
  optional = ("held out (by split_seed) as the validation split where the source has none "
              "(none: no carve, a missing validation split is an error)")
  seq = {**base, **_validation_size(None, "training rows " + optional)}
  return {
      "superni": superni.KNOBS, "tulu": tulu.KNOBS,
      "boolq": seq, "rte": seq, "copa": seq, "cnn_dailymail": seq, "samsum": seq,
      "ag_news": {**base, **_validation_size(1000, "training rows held out (by split_seed) as "
                                             "the validation split")},
      "cola": {**base, **_validation_size(1000, "training rows held out (by split_seed) as the "
                                          "validation split (unless the layout has val.tsv)")},
      "e2e_nlg": {**base, **_validation_size(None, "meaning representations of train " + optional),
                  "group_references": Field(
          None, "one row per meaning representation with all its references (none: on "
          "evaluation splits)", "bool")},
  }


#: ``{data set: {knob: Field}}``: the loader options each data set accepts
KNOBS: Dict[str, Dict[str, Field]] = _knobs()


def load_dataset_rows(name: str, split: str, *, path=None, seed: int = 0, size=None,
                      **kwargs) -> Rows:
  """Rows of data set ``name`` (one of :data:`DATASETS`) for ``split``; see the module
  docstrings of this module, ``superni`` and ``tulu`` for formats and keyword options."""
  if name not in LOADERS:
    raise DataError(f"unknown data set {name!r}; expected one of {list(DATASETS)}")
  try:
    return LOADERS[name](split, path=path, seed=seed, size=size, **kwargs)
  except TypeError as e:
    if "unexpected keyword" in str(e):
      raise DataError(f"{name}: {e}; see the loader's signature for its options") from None
    raise
