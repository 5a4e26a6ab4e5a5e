"""BIG-Bench-Hard as open-instruct evaluates it (``eval/bbh/run_eval.py``): 27 tasks,
3-shot chain-of-thought prompts, greedy decoding, exact match per task, macro average.

PROTOCOLS.md section 2, reproduced step by step:

- data: ``<data_dir>/bbh/bbh/<task>.json`` (``{"canary", "examples": [{"input", "target"}]}``)
  and ``<data_dir>/bbh/cot-prompts/<task>.txt``. An item's id is ``<task>/<i>``, ``i`` the
  example's index in the task file (not in the sample).
- subsample: ``random.seed(42)`` once, then ``random.sample(examples, 40)`` task after task.
  Upstream visits the tasks in ``glob.glob`` order, which depends on the file system; here
  they are visited in **sorted** order, so the 40 examples of a task match an upstream run
  only where its glob order was sorted too. Upstream samples without checking the length
  (it would fail for a task with fewer than 40 examples); here such a task keeps all its
  examples in file order (:func:`common.subsample`), which only happens on small samples.
- few-shot text: the prompt file without its first 2 lines (canary, ``-----``). The direct
  variant (``cot=False``) rewrites every ``\\n\\n``-separated block that starts with ``Q:``
  to its question part, ``\\nA: `` and the text after the last ``So the answer is``,
  stripped, so the trailing period stays (``A: yes.``).
- prompt: the few-shot text stripped, ``\\n\\nQ: `` and the input, then ``\\nA:``; in chat
  mode the user turn ends after the input and ``A:`` follows the ``<|assistant|>`` cue.
- stop: ``additional_stop_sequence``, then ``\\n\\n`` in non-chat mode, or in chat mode with
  ``stop_at_double_newline``; greedy, 512 new tokens.
- extraction (:func:`extract`): group 1 of the first ``[t|T]he answer is (.*?)\\.`` match,
  stripped (the class also matches ``|``, as upstream), else the whole output stripped;
  metric: ``exact_match`` ignoring case and punctuation per task (``(A)`` matches ``A``), and
  ``average_exact_match``, the unweighted mean over the tasks scored.
"""

from __future__ import annotations

import glob
import os
import re
import types
from typing import Any, Dict, List, Mapping, Optional, Sequence

from peft_jax.data.common import DataError
from peft_jax.evals.benchmarks import Request, chat_prompt
from peft_jax.evals.benchmarks import common

NAME = "bbh"
TASK_DIR = ("bbh", "bbh")
PROMPT_DIR = ("bbh", "cot-prompts")

_ANSWER = re.compile(r"[t|T]he answer is (.*?)\.")


def extract(output: str) -> str:
  """The prediction in a model output (see the module docstring)."""
  m = _ANSWER.search(output)
  return m.group(1).strip() if m else output.strip()


# ----------------------------------------------------------------------------- data

def task_names(data_dir: str) -> List[str]:
  """The tasks with a ``bbh/bbh/<task>.json`` file, sorted (the name is the file name up
  to its first ``.``, as upstream)."""
  folder = common.data_path(data_dir, *TASK_DIR)
  files = sorted(glob.glob(os.path.join(glob.escape(folder), "*.json")))
  if not files:
    raise DataError(f"{folder}: no <task>.json files; expected the 27 BBH task files")
  return [os.path.basename(f).split(".")[0] for f in files]


def _examples(data_dir: str, task: str) -> List[Dict[str, str]]:
  path = common.data_path(data_dir, *TASK_DIR, task + ".json")
  doc = common.read_json(path)
  if not isinstance(doc, dict) or not isinstance(doc.get("examples"), list):
    raise DataError(f"{path}: no 'examples' list; expected {{\"examples\": [{{\"input\", "
                    "\"target\"}, ...]}")
  for i, ex in enumerate(doc["examples"]):
    where = f"{path}: example {i}"
    if not isinstance(ex, dict):
      raise DataError(f"{where} is not an object; expected input and target")
    common.require_keys(ex, ("input", "target"), where)
    if not isinstance(ex["input"], str) or not isinstance(ex["target"], str):
      raise DataError(f"{where}: input and target must be strings")
  return doc["examples"]


def few_shot_text(data_dir: str, task: str) -> str:
  """``cot-prompts/<task>.txt`` without its first 2 lines (upstream's
  ``"".join(f.readlines()[2:])``)."""
  path = common.data_path(data_dir, *PROMPT_DIR, task + ".txt")
  return "\n".join(common.read_text(path).split("\n")[2:])


def load(data_dir: str, settings: Mapping[str, Any], subsample: bool = True) -> List[dict]:
  """The items of every task, tasks in sorted order (each task's examples subsampled unless
  ``subsample=False``); every item carries its task's chain-of-thought few-shot text
  under ``"few_shot"`` (the same string for a task)."""
  rng = common.seeded_rng(42)
  items = []
  for task in task_names(data_dir):
    indexed = list(enumerate(_examples(data_dir, task)))
    if subsample:
      indexed = common.subsample(indexed, settings["max_num_examples_per_task"], rng)
    text = few_shot_text(data_dir, task)
    items.extend({"id": f"{task}/{i}", "task": task, "input": ex["input"],
                  "target": ex["target"], "few_shot": text} for i, ex in indexed)
  return items


# ----------------------------------------------------------------------------- prompts

def direct_few_shot(text: str, task: str = "?") -> str:
  """The few-shot text without chains of thought: every block starting with ``Q:`` becomes
  its question, ``\\nA: `` and the stripped text after its last ``So the answer is``."""
  blocks = []
  for block in text.split("\n\n"):
    if block.startswith("Q:"):
      if "So the answer is" not in block or "\nA:" not in block:
        raise DataError(f"cot-prompts/{task}.txt: a 'Q:' block without '\\nA:' or 'So the "
                        "answer is'; expected 'Q: ...\\nA: ... So the answer is X.'")
      block = (block.split("\nA:")[0].strip() + "\nA: "
               + block.split("So the answer is")[-1].strip())
    blocks.append(block)
  return "\n\n".join(blocks)


def prompt(item: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
  """The full prompt of one item (chat template applied in chat mode)."""
  text = item["few_shot"] if settings["cot"] else direct_few_shot(item["few_shot"], item["task"])
  user = text.strip() + "\n\nQ: " + item["input"]
  if settings["chat"]:
    return chat_prompt(user, "A:")
  return user + "\nA:"


def stop_sequences(settings: Mapping[str, Any]) -> tuple:
  """``additional_stop_sequence``, then ``\\n\\n`` unless in chat mode without
  ``stop_at_double_newline``."""
  extra = tuple(settings["additional_stop_sequence"] or ())
  if not settings["chat"] or settings["stop_at_double_newline"]:
    return extra + ("\n\n",)
  return extra


def requests(items: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
             tokenizer=None) -> List[Request]:
  """One greedy generation per item (BBH has no length rule, so ``tokenizer`` is unused)."""
  del tokenizer
  return common.greedy_requests(items, settings, prompt, stop_sequences(settings))


# ----------------------------------------------------------------------------- scoring

def score(items: Sequence[Mapping[str, Any]], outputs: Mapping[str, Any],
          settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Exact match per task of :func:`extract` (first output per id) against the target,
  over the ids in ``outputs``; ``average_exact_match`` (the headline ``score``) is the
  unweighted mean over the tasks that have outputs. An unknown id is a :class:`DataError`."""
  del settings
  by_task: Dict[str, tuple] = {}
  for it, out in common.first_outputs(items, outputs, NAME):
    preds, golds = by_task.setdefault(it["task"], ([], []))
    preds.append(extract(out))
    golds.append(it["target"])
  per_task = {t: common.exact_match(p, g) for t, (p, g) in by_task.items()}
  avg = sum(per_task.values()) / len(per_task)
  return {"score": avg, "average_exact_match": avg, "n": sum(len(p) for p, _ in by_task.values()),
          "n_tasks": len(per_task), "per_task": per_task}


#: The ``BENCHMARK`` object (peft_jax.evals.benchmarks): defaults of the TULU ``bbh_cot`` job.
BENCHMARK = types.SimpleNamespace(
    name=NAME,
    defaults={"cot": True, "max_num_examples_per_task": 40, "max_new_tokens": 512,
              "chat": False, "stop_at_double_newline": False, "additional_stop_sequence": ()},
    load=load, requests=requests, score=score, extract=extract,
    nullable=("max_num_examples_per_task",),
    minimums={"max_num_examples_per_task": 1, "max_new_tokens": 1})
