"""Codex HumanEval: prompts and requests as open-instruct builds them, programs judged in
the sandbox, and the unbiased pass@k."""

from __future__ import annotations

import gzip
import json
import math
import random
import shutil

import pytest

from peft_jax.config_lib import ConfigError
from peft_jax.data.common import DataError
from peft_jax.evals import benchmarks
from peft_jax.evals.benchmarks import codex_humaneval as he

BENCHMARK = he.BENCHMARK


def _data_dir(shared_data):
  return shared_data / "open_instruct_eval"


def _raw_problems(shared_data):
  path = _data_dir(shared_data) / "codex_humaneval" / "HumanEval.jsonl"
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def items(shared_data):
  return BENCHMARK.load(_data_dir(shared_data), {})


def test_the_benchmark_is_registered():
  assert benchmarks.benchmark("codex_humaneval") is BENCHMARK
  assert BENCHMARK.name == "codex_humaneval"


# ----------------------------------------------------------------------------- pass@k

def test_pass_at_k_equals_the_closed_form():
  for n in range(1, 26):
    for c in range(n + 1):
      for k in range(1, n + 1):
        expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert he.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12), (n, c, k)
  assert he.pass_at_k(20, 3, 1) == pytest.approx(0.15)
  assert he.pass_at_k(20, 0, 20) == 0.0 and he.pass_at_k(20, 1, 20) == 1.0
  with pytest.raises(ValueError):
    he.pass_at_k(5, 6, 1)


# ----------------------------------------------------------------------------- data

@pytest.mark.shared_data
def test_load_keys_problems_by_task_id(shared_data, items):
  raw = _raw_problems(shared_data)
  assert len(items) == 16
  assert [i["id"] for i in items] == [p["task_id"] for p in raw]
  assert all({k: i[k] for k in he.FIELDS} == p for i, p in zip(items, raw))


@pytest.mark.shared_data
def test_load_reads_the_gzipped_upstream_file_too(shared_data, items, tmp_path):
  folder = tmp_path / "codex_humaneval"
  folder.mkdir()
  source = _data_dir(shared_data) / "codex_humaneval" / "HumanEval.jsonl"
  with gzip.open(folder / "HumanEval.jsonl.gz", "wb") as f:
    f.write(source.read_bytes())
  assert BENCHMARK.load(tmp_path, {}) == items


@pytest.mark.shared_data
def test_max_num_examples_samples_like_open_instruct(shared_data, items):
  raw = _raw_problems(shared_data)
  random.seed(42)
  expected = [p["task_id"] for p in random.sample(raw, 5)]
  got = BENCHMARK.load(_data_dir(shared_data), {"max_num_examples": 5})
  assert [i["id"] for i in got] == expected
  assert BENCHMARK.load(_data_dir(shared_data), {"max_num_examples": 5}, subsample=False) == items


def test_bad_data_and_settings_are_refused(tmp_path):
  with pytest.raises(DataError, match="HumanEval.jsonl"):
    BENCHMARK.load(tmp_path, {})
  (tmp_path / "codex_humaneval").mkdir()
  (tmp_path / "codex_humaneval" / "HumanEval.jsonl").write_text('{"task_id": "HumanEval/0"}\n')
  with pytest.raises(DataError, match="lacks"):
    BENCHMARK.load(tmp_path, {})
  with pytest.raises(ConfigError, match="unknown setting"):
    BENCHMARK.load(tmp_path, {"n_shot": 1})
  with pytest.raises(ConfigError, match="unbiased_sampling_size_n"):
    BENCHMARK.requests([], {"unbiased_sampling_size_n": 0}, None)


# ----------------------------------------------------------------------------- requests

@pytest.mark.shared_data
def test_the_base_prompt_is_the_prompt_field_byte_for_byte(shared_data, items):
  raw = {p["task_id"]: p for p in _raw_problems(shared_data)}
  reqs = BENCHMARK.requests(items, {"temperature": 0.8, "chat": False}, None)
  assert [r.id for r in reqs] == [i["id"] for i in items]
  req = next(r for r in reqs if r.id == "HumanEval/32")   # A prompt with a helper (poly).
  assert req.prompt.encode() == raw["HumanEval/32"]["prompt"].encode()
  assert req.prompt.startswith("import math\n\n\ndef poly(xs: list, x: float):\n")
  for r in reqs:
    assert r.prompt == raw[r.id]["prompt"]
    assert r.stop == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert (r.n, r.temperature, r.top_p, r.max_new_tokens) == (20, 0.8, 0.95, 512)
    assert r.choices == ()
  assert BENCHMARK.requests(items, {}, None)[0].temperature == 0.1


@pytest.mark.shared_data
def test_the_chat_prompt(items):
  req = next(r for r in BENCHMARK.requests(items, {"chat": True}, None) if r.id == "HumanEval/28")
  assert req.prompt == (
      "<|user|>\n"
      "Complete the following python function.\n\n\n"
      "from typing import List\n\n\n"
      "def concatenate(strings: List[str]) -> str:\n"
      '    """ Concatenate list of strings into a single string\n'
      "    >>> concatenate([])\n"
      "    ''\n"
      "    >>> concatenate(['a', 'b', 'c'])\n"
      "    'abc'\n"
      '    """\n'
      "\n"
      "<|assistant|>\n"
      "Here is the completed function:\n\n\n```python\n")
  assert req.stop == ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
  assert (req.n, req.top_p, req.max_new_tokens) == (20, 0.95, 512)


@pytest.mark.shared_data
def test_the_chat_prompt_with_humanevalpack(shared_data, tmp_path):
  folder = tmp_path / "codex_humaneval"
  folder.mkdir()
  shutil.copy(_data_dir(shared_data) / "codex_humaneval" / "HumanEval.jsonl", folder)
  pack = [{"task_id": p["task_id"].replace("HumanEval", "Python"),
           "instruction": f"Write a Python function for {p['entry_point']}."}
          for p in _raw_problems(shared_data)]
  (folder / "humanevalpack.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pack))
  items = BENCHMARK.load(tmp_path, {"chat": True})
  req = next(r for r in BENCHMARK.requests(items, {"chat": True}, None) if r.id == "HumanEval/28")
  prompt = next(i["prompt"] for i in items if i["id"] == "HumanEval/28")
  assert req.prompt == ("<|user|>\nWrite a Python function for concatenate.\n<|assistant|>\n"
                        "Here is the function:\n\n```python\n" + prompt)
  assert req.stop[-1] == "\n```"
  assert BENCHMARK.requests(items, {}, None)[0].prompt == items[0]["prompt"]


# ----------------------------------------------------------------------------- scoring

@pytest.mark.shared_data
def test_canonical_solutions_pass_every_problem(items):
  outputs = {i["id"]: [i["canonical_solution"]] for i in items}
  result = BENCHMARK.score(items, outputs, {})
  assert result["score"] == result["pass@1"] == 1.0
  assert (result["n"], result["samples"]) == (16, 16)
  assert "pass@5" not in result   # k larger than the samples per problem is skipped.
  assert all(t == {"correct": 1, "n": 1, "statuses": {"passed": 1}}
             for t in result["per_task"].values())


@pytest.mark.shared_data
def test_solutions_of_other_problems_fail(items):
  ids = [i["id"] for i in items]
  solutions = [i["canonical_solution"] for i in items]
  outputs = {ids[j]: [solutions[(j + 1) % len(ids)]] for j in range(len(ids))}
  result = BENCHMARK.score(items, outputs, {})
  assert result["pass@1"] <= 1 / 16
  failures = sum(t["n"] - t["correct"] for t in result["per_task"].values())
  assert failures >= 15


@pytest.mark.shared_data
def test_a_mixed_set_gives_the_exact_unbiased_pass_at_k(items):
  item = next(i for i in items if i["id"] == "HumanEval/28")
  wrong = ["    return None\n"] * 14 + ["    while True:\n        pass\n"] * 2 + ["    return (\n"]
  samples = [item["canonical_solution"]] * 3 + wrong
  random.Random(0).shuffle(samples)
  other = next(i for i in items if i["id"] == "HumanEval/162")
  outputs = {"HumanEval/28": samples, "HumanEval/162": [other["canonical_solution"]] * 20}
  result = BENCHMARK.score([item, other], outputs, {"timeout": 0.5})
  for k in (1, 5, 10, 20):
    expected = (1.0 - math.comb(17, k) / math.comb(20, k) + 1.0) / 2
    assert result[f"pass@{k}"] == pytest.approx(expected, rel=1e-12)
  assert result["score"] == pytest.approx((3 / 20 + 1.0) / 2)
  task = result["per_task"]["HumanEval/28"]
  assert (task["correct"], task["n"]) == (3, 20)
  assert task["statuses"]["passed"] == 3
  assert task["statuses"]["failed: AssertionError"] == 14
  assert task["statuses"]["timed out"] == 2
  assert [s for s in task["statuses"] if s.startswith("failed: SyntaxError")]
  assert result["samples"] == 40


@pytest.mark.shared_data
def test_a_chat_completion_that_restates_the_function_passes(items):
  item = next(i for i in items if i["id"] == "HumanEval/28")
  restated = ("from typing import List\n\n\n"
              "def concatenate(strings: List[str]) -> str:\n    return ''.join(strings)\n")
  result = BENCHMARK.score([item], {"HumanEval/28": [restated, "    return ''\n"]},
                           {"chat": True})
  assert result["per_task"]["HumanEval/28"]["correct"] == 1
  assert result["pass@1"] == 0.5


@pytest.mark.shared_data
def test_outputs_must_match_the_problems(items):
  with pytest.raises(DataError, match="no completions"):
    BENCHMARK.score(items[:2], {items[0]["id"]: ["    pass\n"]}, {})
  with pytest.raises(DataError, match="unknown task id"):
    BENCHMARK.score(items[:1], {items[0]["id"]: ["    pass\n"], "HumanEval/999": ["x"]}, {})
  with pytest.raises(DataError, match="list of strings"):
    BENCHMARK.score(items[:1], {items[0]["id"]: "    pass\n"}, {})
