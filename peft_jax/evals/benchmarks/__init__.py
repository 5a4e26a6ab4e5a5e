"""The open-instruct (TULU) evaluation benchmarks: one module per benchmark.

Every benchmark module (``gsm8k``, ``bbh``, ``mmlu``, ``tydiqa``, ``codex_humaneval``,
``alpaca_eval``) defines ``BENCHMARK``, an object with

- ``name``: the scoring name (``python -m peft_jax.evals.score --benchmark=<name>``);
- ``defaults``: its settings with the values of the standard TULU jobs (shots, subsampling,
  decoding); a suite task (:data:`SUITE`) overrides some of them;
- ``load(data_dir, settings) -> [item]``: the items to evaluate from a directory laid out like
  ``../shared/data/open_instruct_eval``, subsampled as open-instruct does
  (``random.seed(42)`` once, then ``random.sample``). Every item is a dict with a string
  ``"id"`` (the prediction id, see :mod:`peft_jax.evals.score`);
  ``load(data_dir, settings, subsample=False)`` returns every item (the scorer looks ids up);
- ``requests(items, settings, tokenizer) -> [Request]``: what to ask the model, one
  :class:`Request` per item (the tokenizer measures prompts for the length rules; ``None``
  skips those rules);
- ``score(items, outputs, settings) -> dict``: ``outputs`` maps an id to its list of raw
  model texts (one per sample); returns ``{"score": headline in [0, 1], ...breakdowns}``.

The model side (batched generation, next-token choices, resumption) is
:mod:`peft_jax.evals.engine`; the suite that runs tasks and writes reports is
:mod:`peft_jax.evals.suite`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Dict, Tuple

#: scoring name -> module
MODULES = {
    "gsm8k": "peft_jax.evals.benchmarks.gsm8k",
    "bbh": "peft_jax.evals.benchmarks.bbh",
    "mmlu": "peft_jax.evals.benchmarks.mmlu",
    "tydiqa": "peft_jax.evals.benchmarks.tydiqa",
    "codex_humaneval": "peft_jax.evals.benchmarks.codex_humaneval",
    "alpaca_eval": "peft_jax.evals.benchmarks.alpaca_eval",
}


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt for the model.

  ``prompt`` is the full text (the chat template already applied when the task runs in chat
  mode), without BOS: the engine tokenises it with the tokenizer's special tokens, as
  open-instruct does. ``choices`` non-empty makes it a next-token choice (MMLU): one
  forward pass, the candidate whose *last* token of ``tokenizer.encode(choice)`` has the
  highest probability at the last position wins, and its text (stripped) is the output.
  Otherwise ``n`` texts are generated: greedy when ``temperature == 0``, else sampled with
  ``temperature`` and ``top_p``; each is cut before the first of ``stop`` (stop strings
  are matched on the decoded text) and limited to ``max_new_tokens``."""
  id: str
  prompt: str
  max_new_tokens: int = 512
  stop: Tuple[str, ...] = ()
  temperature: float = 0.0
  top_p: float = 1.0
  n: int = 1
  choices: Tuple[str, ...] = ()


def benchmark(name: str):
  """The ``BENCHMARK`` object of a scoring name (KeyError listing the names)."""
  if name not in MODULES:
    raise KeyError(f"unknown benchmark {name!r}; expected one of {sorted(MODULES)}")
  return importlib.import_module(MODULES[name]).BENCHMARK


# ----------------------------------------------------------------------------- chat format

USER, ASSISTANT = "<|user|>\n", "<|assistant|>\n"


def chat_prompt(user: str, answer_prefix: str = "") -> str:
  """open-instruct's TULU template for one user turn (no system turn, no literal BOS), then
  the generation cue and the task's answer prefix (``Answer:``, ``A:``...). The template
  ends in a newline, so the prefix follows with no space."""
  return USER + user + "\n" + ASSISTANT + answer_prefix


# ----------------------------------------------------------------------------- suite tasks

@dataclasses.dataclass(frozen=True)
class SuiteTask:
  """A row of the suite: a benchmark with settings (``chat`` is decided by the suite unless
  ``settings`` fixes it) and the headline reported for it: ``headline`` is a key of
  ``score``'s result holding a fraction in [0, 1] (shown as a percentage), ``label`` says
  what it is."""
  name: str
  benchmark: str
  settings: Dict[str, Any]
  headline: str
  label: str


#: The standard TULU job groups (open-instruct ``scripts/submit_eval_jobs.py``), by task name.
#: HumanEval runs without the chat format in those groups, AlpacaEval always with it.
SUITE: Dict[str, SuiteTask] = {t.name: t for t in (
    SuiteTask("mmlu_0shot", "mmlu", {"n_shot": 0}, "score", "accuracy (0-shot)"),
    SuiteTask("mmlu_5shot", "mmlu", {"n_shot": 5}, "score", "accuracy (5-shot)"),
    SuiteTask("gsm8k_cot", "gsm8k", {"n_shot": 8, "cot": True}, "score", "EM (8-shot, CoT)"),
    SuiteTask("bbh_cot", "bbh", {"cot": True}, "score", "EM (3-shot, CoT), task average"),
    SuiteTask("tydiqa_goldp_1shot", "tydiqa", {"n_shot": 1, "no_context": False}, "score",
              "F1 (1-shot, gold passage), language average"),
    SuiteTask("tydiqa_no_context_1shot", "tydiqa", {"n_shot": 1, "no_context": True}, "score",
              "F1 (1-shot, no context), language average"),
    SuiteTask("codex_humaneval_t0.1", "codex_humaneval", {"temperature": 0.1, "chat": False},
              "pass@1", "pass@1 (T=0.1, 20 samples)"),
    SuiteTask("codex_humaneval_t0.8", "codex_humaneval", {"temperature": 0.8, "chat": False},
              "pass@10", "pass@10 (T=0.8, 20 samples)"),
    SuiteTask("alpaca_eval", "alpaca_eval", {"chat": True}, "score",
              "outputs for the AlpacaEval judge"),
)}

#: Seed 000's Table 3: (column, metric, suite task, key of the task's result).
TABLE3 = (
    ("MMLU (factuality)", "EM (0-shot)", "mmlu_0shot", "score"),
    ("GSM (reasoning)", "EM (8-shot, CoT)", "gsm8k_cot", "score"),
    ("BBH (reasoning)", "EM (3-shot, CoT)", "bbh_cot", "score"),
    ("TydiQA (multilinguality)", "F1 (1-shot, GP)", "tydiqa_goldp_1shot", "score"),
    ("Codex-Eval (coding)", "P@10 (0-shot)", "codex_humaneval_t0.8", "pass@10"),
)
