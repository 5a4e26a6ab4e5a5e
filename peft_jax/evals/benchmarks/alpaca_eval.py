"""AlpacaEval as open-instruct runs it (``eval/alpaca_farm/run_eval.py``): generate an answer
to each instruction; the judging (GPT-4 win rate through the ``alpaca_eval`` package) needs
an API and is out of scope, so this module stops at AlpacaEval's input file.

Data: ``alpaca_eval/alpaca_eval.jsonl``, one dataset row per line (``instruction``,
``output``, ``generator``, ``dataset``; the HF ``tatsu-lab/alpaca_eval`` set); id = the
0-based line number. ``max_num_examples`` (off upstream, which runs all 805) takes
``random.sample`` after ``random.seed(42)``.

Prompt: the instruction alone as the user message of the TULU template (``chat`` True; no
system turn, no shots; ``chat`` False sends the bare instruction, as upstream without
``--use_chat_format``). Greedy, ``max_new_tokens`` 8192, no stop string (EOS only).

Output: :func:`model_outputs` makes upstream's records, the dataset row with ``output``
replaced by the generation (unstripped, as upstream) and ``generator`` set to
``{generator}-greedy-long``; :func:`write_model_outputs` writes them as AlpacaEval's
``model_outputs.json``: a JSON array, keys in the order of AlpacaEval's results files
(``dataset, instruction, output, generator``, then any others), UTF-8 with
``ensure_ascii=False`` and a 2-space indent. (The results files on GitHub are pandas'
dumps: no space after the colon and ``\\/`` escapes; any JSON reader, AlpacaEval's
included, reads both the same.) :func:`score` has no local metric: ``score`` is None.
"""

from __future__ import annotations

import json
import os
import random
import types
from typing import Dict, List, Optional, Sequence

from peft_jax.data.common import DataError
from peft_jax.evals.benchmarks import Request, chat_prompt
from peft_jax.evals.benchmarks.common import resolve_settings

NAME = "alpaca_eval"
DEFAULTS = {"max_new_tokens": 8192, "chat": True, "max_num_examples": None, "generator": "peft-jax"}
DATA_FILE = os.path.join("alpaca_eval", "alpaca_eval.jsonl")
#: the key order of AlpacaEval's ``results/<model>/model_outputs.json``
KEY_ORDER = ("dataset", "instruction", "output", "generator")
NOTE = "judged by alpaca_eval (API); see model_outputs.json"


def load(data_dir: str, settings: Optional[dict] = None, subsample: bool = True) -> List[dict]:
  """Every row (or ``max_num_examples`` of them): ``{"id", "instruction", "row"}`` where
  ``row`` is the whole dataset row."""
  s = resolve_settings(BENCHMARK, settings)
  path = os.path.join(os.fspath(data_dir), DATA_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{NAME}: no file {path}; expected AlpacaEval's rows as JSON lines")
  items = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{NAME}: {path} line {i} is not JSON ({e}); expected one row per line") from None
      if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
        raise DataError(f"{NAME}: {path} line {i} has no string 'instruction'; expected a row "
                        "with instruction, output, generator, dataset")
      items.append({"id": str(i), "instruction": row["instruction"], "row": row})
  n = s["max_num_examples"] if subsample else None
  if n and n < len(items):
    items = random.Random(42).sample(items, n)
  return items


def requests(items: Sequence[dict], settings: Optional[dict] = None, tokenizer=None) -> List[Request]:
  s = resolve_settings(BENCHMARK, settings)
  return [Request(id=it["id"], prompt=chat_prompt(it["instruction"]) if s["chat"] else it["instruction"],
                  max_new_tokens=s["max_new_tokens"]) for it in items]


def score(items: Sequence[dict], outputs: Dict[str, List[str]], settings: Optional[dict] = None) -> dict:
  """No local metric (the judge is an API): ``score`` None, with the counts and the mean
  output length in characters (AlpacaEval's ``avg_length``)."""
  resolve_settings(BENCHMARK, settings)
  texts = [(outputs.get(it["id"]) or [""])[0] for it in items]
  return {"score": None, "n": len(items), "missing": sum(it["id"] not in outputs for it in items),
          "avg_length": sum(map(len, texts)) / len(texts) if texts else 0.0, "note": NOTE}


def model_outputs(items: Sequence[dict], outputs: Dict[str, List[str]], generator: str) -> List[dict]:
  """Upstream's records: each item's dataset row with ``output`` = its first generated text
  ("" when absent) and ``generator`` = ``{generator}-greedy-long``."""
  return [{**it["row"], "output": (outputs.get(it["id"]) or [""])[0],
           "generator": f"{generator}-greedy-long"} for it in items]


def write_model_outputs(path: str, records: Sequence[dict]) -> None:
  """Writes ``records`` as AlpacaEval's ``model_outputs.json`` (see the module docstring)."""
  ordered = [{**{k: r[k] for k in KEY_ORDER if k in r}, **{k: v for k, v in r.items() if k not in KEY_ORDER}}
             for r in records]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(ordered, f, ensure_ascii=False, indent=2)
    f.write("\n")


BENCHMARK = types.SimpleNamespace(
    name=NAME, defaults=DEFAULTS, load=load, requests=requests, score=score,
    model_outputs=model_outputs, write_model_outputs=write_model_outputs,
    minimums={"max_new_tokens": 1, "max_num_examples": 1})
