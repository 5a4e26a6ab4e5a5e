"""Helpers shared by the benchmark modules: the ``exact_match`` metric, open-instruct's
subsampling rule, settings resolution and strict readers of the data files.

Every benchmark module reproduces one open-instruct ``eval/<task>/run_eval.py`` (see
``../shared/data/open_instruct_eval/PROTOCOLS.md``). What they have in common lives here so
that the modules agree on it:

- :func:`exact_match` is HF ``evaluate``'s ``exact_match`` as open-instruct calls it
  (``ignore_case=True, ignore_punctuation=True``), written without the ``evaluate`` package;
- :func:`subsample` is open-instruct's ``random.sample`` rule, with an explicit
  ``random.Random`` in place of the module-level generator (``random.Random(42)`` draws
  exactly what ``random.seed(42)`` then the module-level ``random`` draws);
- :func:`resolve_settings` turns a module's ``defaults`` plus a task's overrides into the
  ``settings`` dict, refusing unknown keys, values of the wrong kind and, where the
  ``BENCHMARK`` declares them, values under its ``minimums``, outside its ``choices``, or
  None outside its ``nullable`` keys, with one :class:`ConfigError` (so every module's
  ``defaults`` lists all its keys, ``chat`` included);
- :func:`read_json` / :func:`read_jsonl` / :func:`read_text` raise a one-line
  :class:`DataError` naming the file (and the line);
- :func:`check_ids` / :func:`first_outputs` refuse ids that no item has and pair items
  with the first output of each predicted id, the selection every single-sample
  benchmark scores.
"""

from __future__ import annotations

import json
import os
import random
import string
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from peft_jax.config_lib import ConfigError
from peft_jax.data.common import DataError
from peft_jax.fields import did_you_mean

# ----------------------------------------------------------------------------- metric

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_for_match(text: str, ignore_case: bool = True,
                        ignore_punctuation: bool = True) -> str:
  """The text ``exact_match`` compares: lowercased first, then every ASCII
  ``string.punctuation`` character removed (``-``, ``.``, ``(`` and ``)`` included, so
  ``-5`` becomes ``5``, ``3.5`` becomes ``35`` and ``(A)`` becomes ``a``). Whitespace is kept.
  Trailing NUL characters are dropped, as numpy's string arrays (which ``evaluate`` uses)
  drop them."""
  text = text.rstrip("\x00")
  if ignore_case:
    text = text.lower()
  if ignore_punctuation:
    text = text.translate(_NO_PUNCTUATION)
  return text


def exact_match(predictions: Sequence[str], references: Sequence[str], ignore_case: bool = True,
                ignore_punctuation: bool = True) -> float:
  """The fraction in [0, 1] of predictions equal to their reference after
  :func:`normalize_for_match` (HF ``evaluate``'s ``exact_match`` with the same flags; its
  default flags are off, open-instruct turns both on). Empty or unequal-length inputs are
  a ``ValueError`` (``evaluate`` would return NaN or fail)."""
  if len(predictions) != len(references):
    raise ValueError(f"exact_match: {len(predictions)} predictions for {len(references)} "
                     "references; expected one prediction per reference")
  if not predictions:
    raise ValueError("exact_match: no predictions; expected at least one")
  hits = sum(normalize_for_match(p, ignore_case, ignore_punctuation)
             == normalize_for_match(r, ignore_case, ignore_punctuation)
             for p, r in zip(predictions, references))
  return hits / len(predictions)


# ----------------------------------------------------------------------------- sampling

def subsample(items: Sequence[Any], k: Optional[int], rng: random.Random) -> List[Any]:
  """open-instruct's subsampling: ``rng.sample(items, k)`` when ``k`` is set (not ``None``
  or 0) and smaller than ``len(items)``; otherwise every item in its original order, and
  ``rng`` is not touched.

  This is GSM8K's rule upstream exactly (``if max_num_examples and len(test) >
  max_num_examples``). Some upstream scripts (BBH) call ``random.sample`` without the
  length check, which fails when ``k > len`` and returns a shuffled copy (drawing from
  the generator) when ``k == len``; on the full upstream data ``k`` is always smaller, so
  the two agree there. ``rng.sample`` depends only on the population's length, so the
  positions drawn are the same for any list of that length."""
  if k and k < len(items):
    return rng.sample(list(items), k)
  return list(items)


def seeded_rng(seed: int = 42) -> random.Random:
  """The generator of one open-instruct script run: ``random.seed(42)`` at the start, then
  every ``random.sample`` in call order. A ``random.Random(seed)`` yields the same draws
  as the module-level generator after ``random.seed(seed)``."""
  return random.Random(seed)


# ----------------------------------------------------------------------------- settings

def _type_error(benchmark: str, key: str, value: Any, default: Any) -> Optional[str]:
  """Why ``value`` cannot replace ``default`` (None when it can)."""
  want = None
  if isinstance(default, bool):
    ok, want = isinstance(value, bool), "true or false"
  elif value is None:
    ok = True            # None switches an optional number or text off (upstream's default)
  elif isinstance(default, int):
    ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
  elif isinstance(default, float):
    ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
  elif isinstance(default, str):
    ok, want = isinstance(value, str), "a string"
  elif isinstance(default, (tuple, list)):
    ok, want = isinstance(value, (tuple, list)), "a list"
  else:
    ok = True
  if ok:
    return None
  return f"setting {key}={value!r} of {benchmark}: expected {want}"


def resolve_settings(benchmark, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """``{**benchmark.defaults, **overrides}``, checked: an unknown key is a
  :class:`ConfigError` naming it and the known ones, and a value of the wrong kind for its
  default (a string for an integer, a number for a flag) is one too. Lists become tuples
  so that settings stay hashable and printable the same way. ``benchmark`` is a
  ``BENCHMARK`` object (``name`` and ``defaults``)."""
  settings = dict(benchmark.defaults)
  nullable = set(getattr(benchmark, "nullable", ())) | {k for k, v in settings.items() if v is None}
  for key, value in dict(overrides or {}).items():
    if key not in settings:
      raise ConfigError(f"unknown setting {key!r} for {benchmark.name}"
                        f"{did_you_mean(key, settings)}; known: {', '.join(sorted(settings))}")
    problem = _type_error(benchmark.name, key, value, settings[key])
    if value is None and key not in nullable:
      problem = f"setting {key}=None of {benchmark.name}: expected a value"
    if problem:
      raise ConfigError(problem)
    settings[key] = tuple(value) if isinstance(value, list) else value
  for key, low in getattr(benchmark, "minimums", {}).items():
    v = settings[key]
    vals = v if isinstance(v, (tuple, list)) else () if v is None else (v,)
    if isinstance(v, (tuple, list)) and not v or any(
        isinstance(x, bool) or not isinstance(x, (int, float)) or x < low for x in vals):
      raise ConfigError(f"setting {key}={v!r} of {benchmark.name}: expected "
                        f"{'a non-empty list of numbers' if isinstance(v, tuple) else 'a number'}"
                        f" >= {low}")
  for key, allowed in getattr(benchmark, "choices", {}).items():
    if settings[key] not in allowed:
      raise ConfigError(f"setting {key}={settings[key]!r} of {benchmark.name}: expected one of "
                        f"{list(allowed)}")
  return settings


# ----------------------------------------------------------------------------- readers

def read_text(path: str, what: str = "the benchmark's data file") -> str:
  """A UTF-8 text file read as Python's text mode does (universal newlines); a missing
  or unreadable file is a :class:`DataError` naming it (and ``what`` was expected there)."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise DataError(f"{path}: no such file; expected {what} there") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot be read ({e}); expected a UTF-8 text file") from None


def read_json(path: str) -> Any:
  """One JSON document (:class:`DataError` naming the file if missing or malformed)."""
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def read_jsonl(path: str, allow_blank: bool = False,
               what: str = "the benchmark's data file") -> List[Tuple[int, dict]]:
  """``(1-based line number, object)`` for every line of a JSONL file. A line that is
  not a JSON object is a :class:`DataError` naming the file and the line; blank lines
  are too unless ``allow_blank`` (then they are skipped). Lines end at ``\n`` only, as
  when iterating over a file (``str.splitlines`` would also split at U+2028 and others,
  which JSON strings may hold raw); the final newline is optional."""
  text = read_text(path, what)
  lines = text.split("\n")
  if text.endswith("\n"):
    lines.pop()
  rows = []
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      if allow_blank:
        continue
      raise DataError(f"{path}:{n}: blank line; expected one JSON object per line")
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object "
                      "per line") from None
    if not isinstance(obj, dict):
      raise DataError(f"{path}:{n}: a JSON {type(obj).__name__}; expected a JSON object")
    rows.append((n, obj))
  return rows


def require_keys(obj: Mapping, keys: Sequence[str], where: str) -> None:
  """:class:`DataError` naming ``where`` and the first of ``keys`` missing in ``obj``."""
  for key in keys:
    if key not in obj:
      raise DataError(f"{where}: no {key!r} field; expected the fields {', '.join(keys)}")


def data_path(data_dir: str, *parts: str) -> str:
  """``data_dir/parts...``; a missing ``data_dir`` is a :class:`DataError`."""
  if not os.path.isdir(data_dir):
    raise DataError(f"{data_dir}: no such directory; expected the benchmark data folder "
                    "(laid out like ../shared/data/open_instruct_eval)")
  return os.path.join(data_dir, *parts)


# ----------------------------------------------------------------------------- outputs

def check_ids(items: Sequence[Mapping], outputs: Mapping[str, Any], benchmark: str) -> None:
  """:class:`DataError` when ``outputs`` is empty or names ids that no item has (the
  message names the first few)."""
  if not outputs:
    raise DataError(f"{benchmark}: no outputs to score; expected at least one id")
  known = {it["id"] for it in items}
  unknown = [i for i in outputs if i not in known]
  if unknown:
    shown = ", ".join(repr(i) for i in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
    raise DataError(f"{benchmark}: {len(unknown)} id(s) not in the data: {shown}; expected "
                    f"ids of the {len(known)} items")


def first_output(texts: Any) -> str:
  """The first text of an id's outputs (a list, one text per sample); no text at all
  scores as an empty output, as upstream scores a prompt vLLM returned nothing for."""
  if isinstance(texts, str):
    return texts
  return texts[0] if texts else ""


def first_outputs(items: Sequence[Mapping], outputs: Mapping[str, Any],
                  benchmark: str) -> List[Tuple[Mapping, str]]:
  """``(item, first output)`` for every item whose id is in ``outputs``, in item order,
  after :func:`check_ids`."""
  check_ids(items, outputs, benchmark)
  return [(it, first_output(outputs[it["id"]])) for it in items if it["id"] in outputs]


def greedy_requests(items: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], prompt,
                    stop: Tuple[str, ...]) -> List[Any]:
  """One greedy generation per item: ``prompt(item, settings)`` with the task's stop strings
  and ``settings["max_new_tokens"]`` (GSM8K, BBH)."""
  from peft_jax.evals.benchmarks import Request
  return [Request(id=it["id"], prompt=prompt(it, settings),
                  max_new_tokens=settings["max_new_tokens"], stop=stop) for it in items]
