"""GSM8K as open-instruct evaluates it (``eval/gsm/run_eval.py``): 8-shot chain of thought,
greedy decoding, exact match on the last number of the output.

PROTOCOLS.md section 1, reproduced step by step:

- data: ``<data_dir>/gsm8k/test.jsonl`` (``question``, ``answer``); the gold is the text after
  ``####``, stripped, with commas between digits removed, and must parse as a float.
  An item's id is its 0-based line number in ``test.jsonl`` (a string).
- subsample: ``random.seed(42)`` once, then ``random.sample(test, max_num_examples)`` when
  the file has more lines than that (:func:`common.subsample`); with ``n_shot`` below the
  8 exemplars, the shots are then ``random.sample(exemplars, n_shot)`` from the same
  generator. Both draws happen in :func:`load`, which puts the chosen exemplars on every
  item (``requests`` has no data directory).
- prompt: ``Answer the following questions.\\n\\n`` + demos joined by ``\\n\\n`` + ``\\n\\n``
  (0 shots: ``Answer the following question.\\n\\n``), then ``Question: `` + the stripped
  question and ``\\nAnswer:``; in chat mode the user turn ends after the question and
  ``Answer:`` follows the ``<|assistant|>`` cue. The direct (``cot=False``) demos keep the
  upstream typo ``Quesion:``.
- stop: non-chat ``\\n`` (``\\n\\n`` with ``stop_at_double_newline``); chat: none, or
  ``\\n\\n`` with ``stop_at_double_newline`` (PROTOCOLS.md; the upstream vLLM code at the
  reference commit adds nothing in chat mode even then, so with the flag on in chat mode
  this follows the protocol, not that code). ``additional_stop_sequence`` comes first in
  both modes.
- extraction (:func:`extract`) and metric: the last number of the output against the gold,
  ``exact_match`` ignoring case and punctuation (so ``-5`` matches ``5``).

One difference from upstream on purpose: upstream asserts the gold's float value is truthy,
which would also reject a gold of 0; no GSM8K test answer is 0, and 0 is accepted here.
"""

from __future__ import annotations

import re
import types
from typing import Any, Dict, List, Mapping, Optional, Sequence

from peft_jax.data.common import DataError
from peft_jax.evals.benchmarks import Request, chat_prompt
from peft_jax.evals.benchmarks import common

NAME = "gsm8k"
TEST_FILE = ("gsm8k", "test.jsonl")
EXEMPLAR_FILE = ("gsm8k", "cot_exemplars_open_instruct.json")

_DIGIT_COMMA = re.compile(r"(\d),(\d)")
_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")


def strip_digit_commas(text: str) -> str:
  """``1,000`` -> ``1000``: upstream's ``re.sub(r"(\\d),(\\d)", r"\\1\\2", ...)``, matches
  not overlapping (so ``1,2,3`` becomes ``12,3``, as upstream)."""
  return _DIGIT_COMMA.sub(r"\1\2", text)


def gold_answer(answer: str, where: str) -> str:
  """The gold of an upstream ``answer`` field: after the first ``####`` (and before any
  second one), stripped, digit commas removed; :class:`DataError` naming ``where`` if
  there is no ``####`` or the result is not a number."""
  parts = answer.split("####")
  if len(parts) < 2:
    raise DataError(f"{where}: the answer has no '####' line; expected '#### <number>' at "
                    "its end")
  gold = strip_digit_commas(parts[1].strip())
  try:
    float(gold)
  except ValueError:
    raise DataError(f"{where}: the gold answer {gold!r} is not a number; expected "
                    "'#### <number>'") from None
  return gold


def extract(output: str) -> str:
  """The prediction in a model output: digit commas removed, then the last match of
  ``[-+]?\\d*\\.\\d+|\\d+``; with no number, the raw output."""
  text = strip_digit_commas(output)
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else text


# ----------------------------------------------------------------------------- data

def _exemplars(data_dir: str) -> List[Dict[str, str]]:
  path = common.data_path(data_dir, *EXEMPLAR_FILE)
  ex = common.read_json(path)
  if not isinstance(ex, list):
    raise DataError(f"{path}: a JSON {type(ex).__name__}; expected a list of exemplars")
  for i, e in enumerate(ex):
    if not isinstance(e, dict):
      raise DataError(f"{path}: exemplar {i} is not an object; expected question, cot_answer, "
                      "short_answer")
    common.require_keys(e, ("question", "cot_answer", "short_answer"), f"{path}: exemplar {i}")
  return ex


def _test_items(data_dir: str) -> List[Dict[str, Any]]:
  path = common.data_path(data_dir, *TEST_FILE)
  items = []
  for n, row in common.read_jsonl(path):
    where = f"{path}:{n}"
    common.require_keys(row, ("question", "answer"), where)
    if not isinstance(row["question"], str) or not isinstance(row["answer"], str):
      raise DataError(f"{where}: question and answer must be strings")
    items.append({"id": str(n - 1), "question": row["question"],
                  "answer": gold_answer(row["answer"], where)})
  if not items:
    raise DataError(f"{path}: no lines; expected GSM8K test items")
  return items


def load(data_dir: str, settings: Mapping[str, Any], subsample: bool = True) -> List[dict]:
  """The test items (all of them with ``subsample=False``), each with the shots its prompt
  uses under ``"exemplars"`` (the same list for every item)."""
  items = _test_items(data_dir)
  exemplars = _exemplars(data_dir)
  rng = common.seeded_rng(42)
  if subsample:
    items = common.subsample(items, settings["max_num_examples"], rng)
  n_shot = settings["n_shot"]
  if n_shot and len(exemplars) > n_shot:
    exemplars = rng.sample(exemplars, n_shot)
  elif not n_shot:
    exemplars = []
  for it in items:
    it["exemplars"] = exemplars
  return items


# ----------------------------------------------------------------------------- prompts

def prompt_prefix(exemplars: Sequence[Mapping[str, str]], cot: bool) -> str:
  """The instruction and demos before the test question (PROTOCOLS.md section 1)."""
  if not exemplars:
    return "Answer the following question.\n\n"
  if cot:
    demos = ["Question: " + e["question"] + "\nAnswer: " + e["cot_answer"] for e in exemplars]
  else:   # the upstream typo "Quesion" is part of the prompt
    demos = ["Quesion: " + e["question"] + "\nAnswer: " + e["short_answer"] for e in exemplars]
  return "Answer the following questions.\n\n" + "\n\n".join(demos) + "\n\n"


def prompt(item: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
  """The full prompt of one item (chat template applied in chat mode)."""
  user = prompt_prefix(item["exemplars"], settings["cot"]) + "Question: " + item["question"].strip()
  if settings["chat"]:
    return chat_prompt(user, "Answer:")
  return user + "\nAnswer:"


def stop_sequences(settings: Mapping[str, Any]) -> tuple:
  """``additional_stop_sequence``, then ``\\n`` (non-chat) or nothing (chat); with
  ``stop_at_double_newline``, ``\\n\\n`` in both modes."""
  extra = tuple(settings["additional_stop_sequence"] or ())
  if settings["stop_at_double_newline"]:
    return extra + ("\n\n",)
  return extra if settings["chat"] else extra + ("\n",)


def requests(items: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
             tokenizer=None) -> List[Request]:
  """One greedy generation per item (GSM8K has no length rule, so ``tokenizer`` is unused)."""
  del tokenizer
  return common.greedy_requests(items, settings, prompt, stop_sequences(settings))


# ----------------------------------------------------------------------------- scoring

def score(items: Sequence[Mapping[str, Any]], outputs: Mapping[str, Any],
          settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Exact match of :func:`extract` (first output per id) against the gold, over the ids in
  ``outputs``; an id that no item has is a :class:`DataError`."""
  del settings
  pairs = common.first_outputs(items, outputs, NAME)
  em = common.exact_match([extract(o) for _, o in pairs], [it["answer"] for it, _ in pairs])
  return {"score": em, "exact_match": em, "n": len(pairs)}


#: The ``BENCHMARK`` object (peft_jax.evals.benchmarks): defaults of the TULU ``gsm_cot`` job.
BENCHMARK = types.SimpleNamespace(
    name=NAME,
    defaults={"n_shot": 8, "cot": True, "max_num_examples": 200, "max_new_tokens": 512,
              "stop_at_double_newline": False, "chat": False, "additional_stop_sequence": ()},
    load=load, requests=requests, score=score, extract=extract,
    nullable=("max_num_examples",),
    minimums={"n_shot": 0, "max_num_examples": 1, "max_new_tokens": 1})
