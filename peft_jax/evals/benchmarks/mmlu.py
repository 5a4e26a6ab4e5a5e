"""MMLU (Hendrycks et al.) as open-instruct evaluates it (``eval/mmlu/run_eval.py``).

Data: ``mmlu/dev/<subject>_dev.csv`` (the shots) and ``mmlu/test/<subject>_test.csv``; the
subjects are every test file, sorted. Upstream reads the CSVs with
``pandas.read_csv(header=None)``; we read them with the stdlib :mod:`csv` module and then
render every cell the way ``"{}".format(df.iloc[i, j])`` renders pandas' value (see
:func:`read_csv`), so the prompt text is the same without pandas: CRLF records with bare
LF inside quoted fields, no final newline and leading spaces all come out as pandas has
them, and so do pandas' conversions (a cell ``None``/``NA``/empty becomes ``nan``, a column
of numbers becomes numbers: ``2`` prints as ``2.0`` in a column that also holds ``2.5``).

Prompt (the Hendrycks format, byte for byte)::

    The following are multiple choice questions (with answers) about  {sub ject}.\\n\\n
    {demo question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {letter}\\n\\n   (k times)
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:

(the double space after "about" is upstream's: every ``_``-separated word of the subject is
preceded by a space). The demos are the first k rows of the dev file. Chat: that text is
the user message and ``The answer is:`` follows the ``<|assistant|>`` cue. Length guard:
while the prompt (the final one, chat template included) is longer than
``max_prompt_tokens`` (2048) tokens without special tokens, k drops by one. Upstream would
loop forever if even k = 0 is too long (``gen_prompt`` treats k = -1 as "all rows"); we
stop at k = 0 and keep that prompt.

Answer: a next-token choice among ``" A"``..``" D"`` (:class:`Request` ``choices``; the
engine compares the probability of the *last* token of each). Metric: accuracy per
subject, subcategory and category (:data:`SUBCATEGORIES`, :data:`CATEGORIES`, open-instruct's
``eval/mmlu/categories.py``), the micro average over questions (``average_acc``, the
headline) and the macro average over subjects.

``n_instances`` (off in the TULU jobs) follows upstream's ``test_df.sample(n,
random_state=42)`` per subject: numpy's ``RandomState(42).permutation(rows)[:n]``, in that
order, rather than ``random.sample``.
"""

from __future__ import annotations

import csv
import math
import os
import re
import types
from typing import Dict, List, Optional, Sequence

from peft_jax.data.common import DataError
from peft_jax.evals.benchmarks import Request, chat_prompt
from peft_jax.evals.benchmarks.common import resolve_settings

NAME = "mmlu"
DEFAULTS = {"n_shot": 0, "chat": False, "max_prompt_tokens": 2048, "n_instances": None}
LETTERS = ("A", "B", "C", "D")
CHAT_ANSWER_PREFIX = "The answer is:"

#: subject -> subcategory (open-instruct ``eval/mmlu/categories.py``, from hendrycks/test).
SUBCATEGORIES = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics",
    "business_ethics": "business", "clinical_knowledge": "health", "college_biology": "biology",
    "college_chemistry": "chemistry", "college_computer_science": "computer science",
    "college_mathematics": "math", "college_medicine": "health", "college_physics": "physics",
    "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering",
    "elementary_mathematics": "math", "formal_logic": "philosophy", "global_facts": "other",
    "high_school_biology": "biology", "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science", "high_school_european_history": "history",
    "high_school_geography": "geography", "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics", "high_school_mathematics": "math",
    "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math",
    "high_school_us_history": "history", "high_school_world_history": "history",
    "human_aging": "health", "human_sexuality": "culture", "international_law": "law",
    "jurisprudence": "law", "logical_fallacies": "philosophy", "machine_learning": "computer science",
    "management": "business", "marketing": "business", "medical_genetics": "health",
    "miscellaneous": "other", "moral_disputes": "philosophy", "moral_scenarios": "philosophy",
    "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics",
    "security_studies": "politics", "sociology": "culture", "us_foreign_policy": "politics",
    "virology": "health", "world_religions": "philosophy",
}

#: category -> its subcategories (the same file; the last name is upstream's, verbatim).
CATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other (business, health, misc.)": ("other", "business", "health"),
}


# ----------------------------------------------------------------------------- settings

# ----------------------------------------------------------------------------- CSV like pandas

# pandas' default NA strings (pandas >= 2.0, which added "None").
_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                 "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INF = re.compile(r"[+-]?inf(?:inity)?", re.IGNORECASE)
_INT64 = (-2 ** 63, 2 ** 63 - 1)


def _as_float(cell: str) -> Optional[float]:
  """pandas' float reading of a cell (surrounding blanks allowed, ``inf`` spelled out only
  without them), or None."""
  if _INF.fullmatch(cell):
    return -math.inf if cell.startswith("-") else math.inf
  core = cell.strip(" \t")
  return float(core) if _FLOAT.fullmatch(core) else None


def _column_kind(values: List[str], has_na: bool) -> str:
  """The dtype pandas infers from a column's non-NA cells: ``bool`` (all true/false, any
  case), ``int`` (all integers within int64 or uint64), ``float`` (all numbers, or integers
  with an NA), else ``text`` (integers out of range stay text too)."""
  if all(v.lower() in ("true", "false") for v in values):
    return "bool"
  if all(_INT.fullmatch(v.strip(" \t")) for v in values):
    if has_na:
      return "float"
    ints = [int(v) for v in values]
    in_range = all(_INT64[0] <= i <= _INT64[1] for i in ints) or all(0 <= i < 2 ** 64 for i in ints)
    return "int" if in_range else "text"
  return "float" if all(_as_float(v) is not None for v in values) else "text"


def _render(cell: str, kind: str) -> str:
  """``"{}".format`` of pandas' value of one non-NA cell of a column of ``kind``."""
  if kind == "bool":
    return "True" if cell.lower() == "true" else "False"
  if kind == "int":
    return str(int(cell))
  if kind == "float":
    return repr(_as_float(cell))
  return cell


def _render_column(cells: List[str]) -> List[str]:
  """The column as pandas' default ``read_csv`` values print: NA strings -> ``nan``, then
  :func:`_column_kind` of the rest."""
  values = [c for c in cells if c not in _NA]
  kind = _column_kind(values, has_na=len(values) < len(cells)) if values else "float"
  return ["nan" if c in _NA else _render(c, kind) for c in cells]


def read_csv(path: str, n_columns: int = 6) -> List[List[str]]:
  """The rows of an MMLU CSV (no header) as ``pandas.read_csv(header=None)`` sees them,
  each cell as ``"{}".format`` prints it. Blank lines are skipped, as pandas does; a row
  with a different number of columns is a DataError naming the file and row."""
  rows: List[List[str]] = []
  with open(path, newline="", encoding="utf-8-sig") as f:
    for record in csv.reader(f):
      if not record or (len(record) == 1 and not record[0].strip()):
        continue
      if len(record) != n_columns:
        raise DataError(f"{NAME}: {path} row {len(rows)} has {len(record)} columns; expected "
                        f"{n_columns} (question, A, B, C, D, answer)")
      rows.append(record)
  columns = [_render_column([r[j] for r in rows]) for j in range(n_columns)]
  return [[columns[j][i] for j in range(n_columns)] for i in range(len(rows))]


# ----------------------------------------------------------------------------- load

def _subjects(data_dir: str) -> List[str]:
  test_dir = os.path.join(data_dir, "test")
  if not os.path.isdir(test_dir):
    raise DataError(f"{NAME}: no directory {test_dir}; expected mmlu/test/<subject>_test.csv files")
  subjects = sorted(f[: -len("_test.csv")] for f in os.listdir(test_dir) if f.endswith("_test.csv"))
  if not subjects:
    raise DataError(f"{NAME}: {test_dir} has no <subject>_test.csv files")
  return subjects


def _question(path: str, i: int, row: List[str]) -> dict:
  if row[5] not in LETTERS:
    raise DataError(f"{NAME}: {path} row {i} has answer {row[5]!r}; expected one of A, B, C, D")
  return {"question": row[0], "choices": list(row[1:5]), "answer": row[5]}


def _instance_rows(n_rows: int, n: Optional[int]) -> List[int]:
  """Upstream's ``test_df.sample(n, random_state=42)`` when ``n`` < rows: the first n of
  numpy ``RandomState(42).permutation(rows)``, in that order; else every row in order."""
  if not n or n >= n_rows:
    return list(range(n_rows))
  import numpy as np
  return [int(i) for i in np.random.RandomState(42).permutation(n_rows)[:n]]


def load(data_dir: str, settings: Optional[dict] = None, subsample: bool = True) -> List[dict]:
  """The test questions of every subject (sorted), each with its subject's first
  ``n_shot`` dev rows as ``shots``; id ``<subject>/<0-based row of the test csv>``."""
  s = resolve_settings(BENCHMARK, settings)
  root = os.path.join(os.fspath(data_dir), "mmlu")
  items = []
  for subject in _subjects(root):
    shots: List[dict] = []
    if s["n_shot"]:
      dev_path = os.path.join(root, "dev", f"{subject}_dev.csv")
      if not os.path.isfile(dev_path):
        raise DataError(f"{NAME}: no file {dev_path}; expected the dev rows of {subject} for "
                        f"n_shot={s['n_shot']}")
      dev = read_csv(dev_path)
      if len(dev) < s["n_shot"]:
        raise DataError(f"{NAME}: {dev_path} has {len(dev)} rows; expected at least "
                        f"n_shot={s['n_shot']}")
      shots = [_question(dev_path, i, r) for i, r in enumerate(dev[: s["n_shot"]])]
    test_path = os.path.join(root, "test", f"{subject}_test.csv")
    test = read_csv(test_path)
    for i in _instance_rows(len(test), s["n_instances"] if subsample else None):
      items.append({"id": f"{subject}/{i}", "subject": subject, **_question(test_path, i, test[i]),
                    "shots": shots})
  return items


# ----------------------------------------------------------------------------- prompts

def format_subject(subject: str) -> str:
  """``abstract_algebra`` -> ``" abstract algebra"`` (a space before every word)."""
  return "".join(" " + word for word in subject.split("_"))


def format_question(q: dict, answer: bool) -> str:
  text = q["question"] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q["choices"]))
  return text + "\nAnswer:" + (f" {q['answer']}\n\n" if answer else "")


def prompt_text(item: dict, k: int) -> str:
  """The Hendrycks prompt of ``item`` with its first ``k`` shots (no chat template)."""
  header = f"The following are multiple choice questions (with answers) about {format_subject(item['subject'])}.\n\n"
  return header + "".join(format_question(q, True) for q in item["shots"][:k]) + format_question(item, False)


def _final_prompt(item: dict, k: int, chat: bool) -> str:
  text = prompt_text(item, k)
  return chat_prompt(text, CHAT_ANSWER_PREFIX) if chat else text


def choose_shots(item: dict, settings: dict, tokenizer) -> int:
  """The number of shots the length guard keeps (``n_shot`` without a tokenizer)."""
  k = min(settings["n_shot"], len(item["shots"]))
  if tokenizer is None:
    return k
  while k > 0 and len(tokenizer.encode(_final_prompt(item, k, settings["chat"]),
                                       add_special_tokens=False)) > settings["max_prompt_tokens"]:
    k -= 1
  return k


def requests(items: Sequence[dict], settings: Optional[dict] = None, tokenizer=None) -> List[Request]:
  s = resolve_settings(BENCHMARK, settings)
  out = []
  for item in items:
    k = choose_shots(item, s, tokenizer)
    out.append(Request(id=item["id"], prompt=_final_prompt(item, k, s["chat"]), max_new_tokens=1,
                       choices=tuple(" " + letter for letter in LETTERS)))
  return out


# ----------------------------------------------------------------------------- score

def _mean(xs: List[bool]) -> float:
  return sum(xs) / len(xs)


def score(items: Sequence[dict], outputs: Dict[str, List[str]], settings: Optional[dict] = None) -> dict:
  """Accuracy of the chosen letters (``outputs[id][0]``, stripped). An item without an
  output counts as wrong (``missing``), as does an output that is not A-D (``invalid``)."""
  resolve_settings(BENCHMARK, settings)
  if not items:
    raise ValueError(f"{NAME}: no items to score")
  by_subject: Dict[str, List[bool]] = {}
  missing = invalid = 0
  for item in items:
    texts = outputs.get(item["id"]) or []
    if not texts:
      missing += 1
    pred = texts[0].strip() if texts else ""
    if texts and pred not in LETTERS:
      invalid += 1
    by_subject.setdefault(item["subject"], []).append(pred == item["answer"])
  subcats: Dict[str, List[bool]] = {}
  cats: Dict[str, List[bool]] = {}
  for subject, cors in sorted(by_subject.items()):
    sub = SUBCATEGORIES.get(subject)
    if sub is None:
      continue   # A subject outside the 57 has no category (upstream would fail).
    subcats.setdefault(sub, []).extend(cors)
    for cat, members in CATEGORIES.items():
      if sub in members:
        cats.setdefault(cat, []).extend(cors)
  every = [c for cors in by_subject.values() for c in cors]
  micro = _mean(every)
  return {
      "score": micro, "accuracy": micro, "average_acc": micro,
      "macro_acc": sum(_mean(c) for c in by_subject.values()) / len(by_subject),
      "subject_acc": {k: _mean(v) for k, v in sorted(by_subject.items())},
      "subcat_acc": {k: _mean(v) for k, v in sorted(subcats.items())},
      "cat_acc": {k: _mean(cats[k]) for k in CATEGORIES if k in cats},
      "n": len(every), "missing": missing, "invalid": invalid,
  }


BENCHMARK = types.SimpleNamespace(
    name=NAME, defaults=DEFAULTS, load=load, requests=requests, score=score,
    nullable=("n_instances",), minimums={"n_shot": 0, "max_prompt_tokens": 1, "n_instances": 1})
