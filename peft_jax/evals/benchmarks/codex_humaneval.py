"""Codex HumanEval as open-instruct runs it (``eval/codex_humaneval``): sample ``n`` = 20
completions per problem, run each against the problem's tests, report the unbiased pass@k.

Protocol (PROTOCOLS.md section 5, open-instruct at f7f3d3f):

* **Data.** ``<data_dir>/codex_humaneval/HumanEval.jsonl.gz`` (open-instruct's default
  name; preferred when both exist) or ``HumanEval.jsonl``: one problem per line with
  ``task_id``, ``prompt``, ``entry_point``, ``canonical_solution``, ``test``; blank lines
  are skipped as human-eval's reader does. The prediction id is the ``task_id``.
  ``max_num_examples`` (off by default and in TULU jobs) is ``random.seed(42)`` then
  ``random.sample``.
* **Prompt.** Non-chat (both TULU groups): the ``prompt`` field as-is. Chat
  (``chat=True``): if ``humanevalpack.jsonl`` lies next to the data (open-instruct's
  ``--data_file_hep``), the user message is that task's HumanEvalPack ``instruction``
  and the assistant turn is pre-filled with ``Here is the function:\\n\\n```python\\n``
  + prompt; otherwise (the case here: the pack is not collected) the user message is
  ``Complete the following python function.\\n\\n\\n`` + prompt and the pre-fill is
  ``Here is the completed function:\\n\\n\\n```python\\n``.
* **Decoding.** ``n`` samples (``unbiased_sampling_size_n``, 20), the task's
  temperature (suite: 0.1 or 0.8), ``top_p`` 0.95, at most 512 new tokens, stop at
  ``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint`` (the Codex paper's) and, in
  chat mode, a newline followed by the closing code fence (:data:`CHAT_STOP`).
* **Execution.** The program is prompt + completion + ``\\n`` + test + ``\\n`` +
  ``check(<entry_point>)``, in every mode, as open-instruct does. In chat mode without
  the pack the model's text follows the opened code fence and usually restates the whole
  function; prompt + completion still runs because the prompt alone is a valid function
  (a signature and a docstring) and the restated one replaces it. A quirk kept on
  purpose: the ``\\ndef`` stop usually cuts such a restatement after its imports, so
  that variant scores far lower (open-instruct warns about it).
  Each program runs in :mod:`peft_jax.evals.sandbox` (3.0 s, ``timeout``), not in
  human-eval's in-process "reliability guard": the verdicts agree except in corners the
  guard handles differently. Here the program runs as ``__main__`` (a top-level
  ``if __name__ == "__main__":`` cannot survive the ``\\nif`` stop anyway), ``os.remove``
  and friends work inside the sample's own directory, memory is capped at
  ``memory_mb`` (2 GiB; upstream has no cap), and a failing status names the exception
  type (``failed: AssertionError``; upstream: ``failed: `` + ``str(e)``).
* **Metric.** Per problem the unbiased estimator :func:`pass_at_k`, averaged over
  problems, for each ``k`` in ``k`` (1, 5, 10, 20) that no problem's sample count is
  below (human-eval's rule). ``score`` is pass@1; the suite reports pass@1 at T=0.1 and
  pass@10 at T=0.8.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import random
from typing import Dict, List, Sequence

import numpy as np

from peft_jax.data.common import DataError
from peft_jax.evals import sandbox
from peft_jax.evals.benchmarks import Request, chat_prompt, common

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
CHAT_STOP = "\n```"
CHAT_INSTRUCTION = "Complete the following python function.\n\n\n"
CHAT_PREFILL = "Here is the completed function:\n\n\n```python\n"
PACK_PREFILL = "Here is the function:\n\n```python\n"
TOP_P = 0.95
MAX_NEW_TOKENS = 512
FILES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")
PACK_FILE = "humanevalpack.jsonl"
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")

DEFAULTS = {
    "chat": False,
    "temperature": 0.1,
    "unbiased_sampling_size_n": 20,
    "k": (1, 5, 10, 20),
    "max_num_examples": None,
    "timeout": 3.0,
    "memory_mb": 2048,
    "workers": None,
}


def resolve_settings(settings: Dict) -> Dict:
  """``DEFAULTS`` updated with ``settings``, checked (:func:`common.resolve_settings`)."""
  return common.resolve_settings(BENCHMARK, settings)


# ----------------------------------------------------------------------------- data

def _read_jsonl(path: str) -> List[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  records = []
  with opener(path, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: not JSON ({e.msg}); expected one object per line")
      if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: a {type(record).__name__}; expected a JSON object")
      records.append(record)
  return records


def data_file(data_dir) -> str:
  folder = os.path.join(os.fspath(data_dir), "codex_humaneval")
  for name in FILES:
    path = os.path.join(folder, name)
    if os.path.exists(path):
      return path
  raise DataError(f"no HumanEval data in {folder}; expected {FILES[1]} or {FILES[0]}")


def _attach_pack(items: List[dict], folder: str) -> None:
  """HumanEvalPack instructions (``Python/N`` -> ``HumanEval/N``), when the pack exists."""
  path = os.path.join(folder, PACK_FILE)
  if not os.path.exists(path):
    return
  pack = {}
  for record in _read_jsonl(path):
    if "task_id" not in record or "instruction" not in record:
      raise DataError(f"{path}: a record without task_id/instruction; expected HumanEvalPack rows")
    pack[str(record["task_id"]).replace("Python", "HumanEval")] = record["instruction"]
  for item in items:
    if item["id"] not in pack:
      raise DataError(f"{path}: no instruction for {item['id']}; expected every HumanEval task")
    item["instruction"] = pack[item["id"]]


def load(data_dir, settings: Dict, subsample: bool = True) -> List[dict]:
  """The problems (each with ``id`` = ``task_id``), subsampled as open-instruct does."""
  s = resolve_settings(settings)
  path = data_file(data_dir)
  items, seen = [], set()
  for number, record in enumerate(_read_jsonl(path), 1):
    missing = [f for f in FIELDS if not isinstance(record.get(f), str)]
    if missing:
      raise DataError(f"{path}: problem {number} lacks string field(s) {missing}; "
                      f"expected {list(FIELDS)}")
    if record["task_id"] in seen:
      raise DataError(f"{path}: task_id {record['task_id']!r} appears twice; expected unique ids")
    seen.add(record["task_id"])
    items.append({"id": record["task_id"], **record})
  _attach_pack(items, os.path.dirname(path))
  limit = s["max_num_examples"]
  if subsample and limit is not None and len(items) > limit:
    items = random.Random(42).sample(items, limit)   # = random.seed(42); random.sample.
  return items


# ----------------------------------------------------------------------------- prompts

def build_prompt(item: dict, chat: bool) -> str:
  if not chat:
    return item["prompt"]
  if "instruction" in item:
    return chat_prompt(item["instruction"], PACK_PREFILL + item["prompt"])
  return chat_prompt(CHAT_INSTRUCTION + item["prompt"], CHAT_PREFILL)


def requests(items: Sequence[dict], settings: Dict, tokenizer=None) -> List[Request]:
  """One sampling request per problem (no length rule, so ``tokenizer`` is unused)."""
  s = resolve_settings(settings)
  stop = STOP + ((CHAT_STOP,) if s["chat"] else ())
  return [Request(id=item["id"], prompt=build_prompt(item, s["chat"]),
                  max_new_tokens=MAX_NEW_TOKENS, stop=stop, temperature=float(s["temperature"]),
                  top_p=TOP_P, n=s["unbiased_sampling_size_n"]) for item in items]


# ----------------------------------------------------------------------------- scoring

def program(item: dict, completion: str) -> str:
  """What human-eval executes for one completion."""
  return (item["prompt"] + completion + "\n" + item["test"] + "\n"
          + f"check({item['entry_point']})")


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased estimator 1 - C(n-c, k) / C(n, k) of the chance that at least one of
  k samples out of n (c of them correct) passes, computed as human-eval does."""
  if not (0 <= c <= n and k >= 1):
    raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _check_outputs(items: Sequence[dict], outputs: Dict[str, Sequence[str]]) -> None:
  ids = {item["id"] for item in items}
  unknown = sorted(set(outputs) - ids)
  if unknown:
    raise DataError(f"codex_humaneval: outputs for unknown task id(s) {unknown[:5]}; "
                    f"expected ids of the loaded problems")
  for item in items:
    texts = outputs.get(item["id"])
    if not texts:
      raise DataError(f"codex_humaneval: no completions for {item['id']}; expected every "
                      f"problem attempted")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise DataError(f"codex_humaneval: the completions of {item['id']} are not a list of "
                      f"strings; expected one string per sample")


def score(items: Sequence[dict], outputs: Dict[str, Sequence[str]], settings: Dict) -> dict:
  """Run every completion in the sandbox; pass@k per problem, averaged."""
  s = resolve_settings(settings)
  _check_outputs(items, outputs)
  programs = [program(item, text) for item in items for text in outputs[item["id"]]]
  results = iter(sandbox.run_programs(programs, timeout=float(s["timeout"]),
                                      memory_mb=s["memory_mb"], workers=s["workers"]))
  per_task = {}
  for item in items:
    verdicts = [next(results) for _ in outputs[item["id"]]]
    statuses = collections.Counter(v.status for v in verdicts)
    per_task[item["id"]] = {"correct": sum(v.passed for v in verdicts), "n": len(verdicts),
                            "statuses": dict(statuses.most_common())}
  counts = [(t["n"], t["correct"]) for t in per_task.values()]
  ks = sorted({k for k in list(s["k"]) + [1] if all(n >= k for n, _ in counts)})
  metrics = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks}
  return {"score": metrics["pass@1"], **metrics, "n": len(items), "samples": len(programs),
          "per_task": per_task}


class CodexHumanEval:
  """The ``BENCHMARK`` protocol object (see :mod:`peft_jax.evals.benchmarks`)."""
  name = "codex_humaneval"
  defaults = DEFAULTS
  nullable = ("max_num_examples", "workers")
  minimums = {"temperature": 0, "unbiased_sampling_size_n": 1, "k": 1, "max_num_examples": 1,
              "timeout": 0.01, "memory_mb": 64, "workers": 1}

  def load(self, data_dir, settings: Dict, subsample: bool = True) -> List[dict]:
    return load(data_dir, settings, subsample)

  def requests(self, items, settings: Dict, tokenizer=None) -> List[Request]:
    return requests(items, settings, tokenizer)

  def score(self, items, outputs, settings: Dict) -> dict:
    return score(items, outputs, settings)


BENCHMARK = CodexHumanEval()
