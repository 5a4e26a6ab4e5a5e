"""The open-instruct suite (peft_jax/evals/suite.py, eval.py --suite=tulu): resumption,
task selection, reports, and the tiny TULU variant end to end on the shared items."""
import json
import os
import subprocess
import sys

import pytest

from peft_jax.config_lib import ConfigError
from peft_jax.evals import suite
from peft_jax.evals.benchmarks import SUITE, TABLE3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_task_names():
  assert suite.task_names(None) == list(SUITE)
  assert suite.task_names("mmlu") == ["mmlu_0shot", "mmlu_5shot"]
  assert suite.task_names("gsm8k_cot,mmlu_5shot,gsm8k") == ["gsm8k_cot", "mmlu_5shot"]
  with pytest.raises(ConfigError, match="unknown suite task 'gsm'"):
    suite.task_names("gsm")
  assert {t for _, _, t, _ in TABLE3} <= set(SUITE)


def test_task_settings_caps_and_fixed_chat():
  s = suite.task_settings("bbh_cot", chat=True, max_examples=2)
  assert s["chat"] is True and s["max_num_examples_per_task"] == 2 and s["cot"] is True
  assert suite.task_settings("gsm8k_cot")["max_num_examples"] == 200   # TULU's subsample
  assert suite.task_settings("codex_humaneval_t0.8", chat=True)["chat"] is False  # TULU groups
  assert suite.task_settings("alpaca_eval", chat=False)["chat"] is True
  with pytest.raises(ConfigError):
    suite.task_settings("gsm8k_cot", overrides={"n_shots": 3})


class _Counting:
  """An engine stand-in: deterministic texts, counts what it is asked."""

  def __init__(self):
    self.rows, self.tokenizer, self.seed, self.truncated = 0, None, 0, 0

  def generate(self, requests, samples=None, on_result=None, progress=None):
    out = {}
    for r in requests:
      for s in (samples or {}).get(r.id, range(r.n)):
        text = f" So the answer is {len(r.prompt) % 7}. ({s})"
        self.rows += 1
        on_result(r, s, text)
        out.setdefault(r.id, []).append(text)
    return out


@pytest.mark.shared_data
def test_rerun_resumes_and_refuses_other_settings(shared_data, tmp_path):
  data = str(shared_data / "open_instruct_eval")
  out = str(tmp_path / "suite")
  eng = _Counting()
  first = suite.run_suite(eng, data, out, "gsm8k_cot,bbh_cot", max_examples=2,
                          model_label="m", say=lambda s: None)
  n_rows = eng.rows
  assert n_rows == 2 + 2 * 27
  pred = os.path.join(out, "bbh_cot", suite.PREDICTIONS)
  lines = open(pred).read().splitlines()
  # a kill: one line lost and the next cut half-way
  with open(pred, "w") as f:
    f.write("\n".join(lines[:-2]) + "\n" + lines[-1][:17])
  eng2 = _Counting()
  again = suite.run_suite(eng2, data, out, "gsm8k_cot,bbh_cot", max_examples=2,
                          model_label="m", say=lambda s: None)
  assert eng2.rows == 2                                   # only the two missing outputs
  assert sorted(open(pred).read().splitlines()) == sorted(lines)
  assert again["tasks"] == first["tasks"]
  eng3 = _Counting()
  suite.run_suite(eng3, data, out, "gsm8k_cot", max_examples=2, model_label="m",
                  say=lambda s: None)
  assert eng3.rows == 0
  with pytest.raises(ConfigError, match=r"model: 'm' -> 'other'"):
    suite.run_suite(_Counting(), data, out, "gsm8k_cot", max_examples=2, model_label="other")
  with pytest.raises(ConfigError, match=r"settings.max_num_examples: 2 -> 3"):
    suite.run_suite(_Counting(), data, out, "gsm8k_cot", max_examples=3, model_label="m")
  md = open(os.path.join(out, "suite.md")).read()
  assert "| gsm8k_cot | gsm8k | 2 |" in md and "Table 3" in md


def test_a_bad_predictions_line_is_one_error(tmp_path):
  from peft_jax.data.common import DataError
  p = tmp_path / "predictions.jsonl"
  p.write_text('{"id": "0", "output": "a"}\nnot json\n{"id": "1", "output": "b"}\n')
  with pytest.raises(DataError, match="line 2"):
    suite.read_predictions(str(p))
  p.write_text('{"id": "0", "output": "a"}\n{"id": "1", "out')
  assert [r["id"] for r in suite.read_predictions(str(p))] == ["0"]
  assert p.read_text() == '{"id": "0", "output": "a"}\n'
