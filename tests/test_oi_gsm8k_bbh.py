"""open-instruct GSM8K and BBH (peft_jax.evals.benchmarks.{gsm8k,bbh,common}) and the scoring
command line (peft_jax.evals.score), against the real samples in
../shared/data/open_instruct_eval and the protocol in its PROTOCOLS.md."""

from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys
from collections import Counter

import pytest

from peft_jax.config_lib import ConfigError
from peft_jax.data.common import DataError
from peft_jax.evals import score as score_cli
from peft_jax.evals.benchmarks import bbh, common, gsm8k

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def oi(shared_data):
  return shared_data / "open_instruct_eval"


def settings(bm, **overrides):
  return common.resolve_settings(bm.BENCHMARK, overrides)


@pytest.fixture
def global_random():
  """Module-level ``random`` state restored after the test (it is reseeded here)."""
  state = random.getstate()
  yield
  random.setstate(state)


# ----------------------------------------------------------------------------- common

def test_exact_match_is_evaluate_with_case_and_punctuation_ignored():
  em = common.exact_match
  assert em(["-5"], ["5"]) == 1.0          # "-" is punctuation
  assert em(["3.5"], ["35"]) == 1.0        # so is "."
  assert em(["(A)"], ["A"]) == 1.0
  assert em(["TRUE"], ["true"]) == 1.0
  assert em(["5 "], ["5"]) == 0.0          # whitespace is kept
  assert em(["5", "6", "7", "x"], ["5", "6", "8", "y"]) == 0.5
  assert em(["A"], ["(A)"], ignore_punctuation=False) == 0.0
  assert em(["a"], ["A"], ignore_case=False) == 0.0
  with pytest.raises(ValueError, match="no predictions"):
    em([], [])
  with pytest.raises(ValueError, match="2 predictions for 1"):
    em(["a", "b"], ["a"])


def test_subsample_rule():
  items = list(range(10))
  rng = random.Random(42)
  assert common.subsample(items, None, rng) == items
  assert common.subsample(items, 0, rng) == items
  assert common.subsample(items, 10, rng) == items       # k >= len: all, in order
  assert common.subsample(items, 99, rng) == items
  assert rng.random() == random.Random(42).random()      # ... and no draw was made
  assert common.subsample(items, 3, random.Random(42)) == random.Random(42).sample(items, 3)


def test_seeded_rng_draws_what_module_level_random_draws(global_random):
  pop_a, pop_b = list(range(1319)), [f"x{i}" for i in range(250)]
  random.seed(42)
  expected = [random.sample(pop_a, 200), random.sample(pop_b, 40), random.sample(pop_b, 40)]
  rng = common.seeded_rng(42)
  got = [rng.sample(pop_a, 200), rng.sample(pop_b, 40), rng.sample(pop_b, 40)]
  assert got == expected
  assert expected[1] != expected[2]     # the second task's draw continues the sequence


def test_resolve_settings():
  s = settings(gsm8k)
  assert s == gsm8k.BENCHMARK.defaults and s is not gsm8k.BENCHMARK.defaults
  assert settings(gsm8k, n_shot=4, chat=True)["n_shot"] == 4
  assert settings(gsm8k, max_num_examples=None)["max_num_examples"] is None
  assert settings(gsm8k, additional_stop_sequence=["</s>"])["additional_stop_sequence"] == ("</s>",)
  with pytest.raises(ConfigError, match=r"unknown setting 'n_shots' for gsm8k; did you mean "
                     r"'n_shot'\?; known: additional_stop_sequence, chat, cot, max_new_tokens"):
    settings(gsm8k, n_shots=3)
  with pytest.raises(ConfigError, match="n_shot='8' of gsm8k: expected an integer"):
    settings(gsm8k, n_shot="8")
  with pytest.raises(ConfigError, match="cot=1 of bbh: expected true or false"):
    settings(bbh, cot=1)


def test_read_jsonl_names_file_and_line(tmp_path):
  p = tmp_path / "x.jsonl"
  p.write_text('{"a": 1}\n\n{"a": 2}\n')
  with pytest.raises(DataError, match=r"x.jsonl:2: blank line"):
    common.read_jsonl(str(p))
  assert common.read_jsonl(str(p), allow_blank=True) == [(1, {"a": 1}), (3, {"a": 2})]
  p.write_text('{"a": 1}\n[1]\n')
  with pytest.raises(DataError, match=r"x.jsonl:2: a JSON list; expected a JSON object"):
    common.read_jsonl(str(p))
  p.write_text('{"a": 1}\n{"a": \n')
  with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
    common.read_jsonl(str(p))
  # A raw U+2028 inside a string (str.splitlines would split there); no final newline.
  p.write_text('{"a": "x\u2028y"}\n{"a": 2}', encoding="utf-8")
  assert common.read_jsonl(str(p)) == [(1, {"a": "x\u2028y"}), (2, {"a": 2})]
  with pytest.raises(DataError, match="nope.jsonl: no such file"):
    common.read_jsonl(str(tmp_path / "nope.jsonl"))


# ----------------------------------------------------------------------------- GSM8K

def test_gsm8k_extract():
  assert gsm8k.extract("So the answer is 1,234.") == "1234"
  assert gsm8k.extract("4 apples, then 12 - 3.5 = -8.5") == "-8.5"
  assert gsm8k.extract("it costs $.5") == ".5"
  assert gsm8k.extract("10 then 20\nQuestion: 30 more") == "30"   # the last number, even here
  assert gsm8k.extract("no number here") == "no number here"
  assert gsm8k.strip_digit_commas("1,000,000 and 1,2,3") == "1000000 and 12,3"   # upstream's re.sub


@pytest.mark.shared_data
def test_gsm8k_load(oi):
  items = gsm8k.load(str(oi), settings(gsm8k), subsample=True)
  lines = (oi / "gsm8k" / "test.jsonl").read_text().splitlines()
  assert len(items) == len(lines) == 40                  # 40 <= 200: all, in file order
  assert [it["id"] for it in items] == [str(i) for i in range(40)]
  assert items[0]["answer"] == "694" and items[1]["answer"] == "35"
  for it, line in zip(items, lines):
    assert it["question"] == json.loads(line)["question"]
  assert len(items[0]["exemplars"]) == 8
  exemplars = json.loads((oi / "gsm8k" / "cot_exemplars_open_instruct.json").read_text())
  assert items[0]["exemplars"] == exemplars              # n_shot=8 of 8: all, in file order


@pytest.mark.shared_data
def test_gsm8k_subsample_and_shots_follow_one_seeded_sequence(oi, global_random):
  items = gsm8k.load(str(oi), settings(gsm8k, max_num_examples=10, n_shot=3))
  exemplars = json.loads((oi / "gsm8k" / "cot_exemplars_open_instruct.json").read_text())
  random.seed(42)                                        # what run_eval.py does
  want_ids = [str(i) for i in random.sample(list(range(40)), 10)]
  want_shots = random.sample(exemplars, 3)
  assert [it["id"] for it in items] == want_ids
  assert items[0]["exemplars"] == want_shots
  assert gsm8k.load(str(oi), settings(gsm8k, n_shot=0))[0]["exemplars"] == []


@pytest.mark.shared_data
def test_gsm8k_bad_gold_names_the_line(tmp_path, oi):
  d = tmp_path / "gsm8k"
  d.mkdir()
  (d / "cot_exemplars_open_instruct.json").write_text(
      (oi / "gsm8k" / "cot_exemplars_open_instruct.json").read_text())
  (d / "test.jsonl").write_text('{"question": "q", "answer": "a\\n#### 1,000"}\n'
                                '{"question": "q", "answer": "a\\n#### ten"}\n')
  with pytest.raises(DataError, match=r"test.jsonl:2: the gold answer 'ten' is not a number"):
    gsm8k.load(str(tmp_path), settings(gsm8k))
  (d / "test.jsonl").write_text('{"question": "q", "answer": "a\\n#### 1,000"}\n'
                                '{"question": "q", "answer": "no marker"}\n')
  with pytest.raises(DataError, match=r"test.jsonl:2: the answer has no '####' line"):
    gsm8k.load(str(tmp_path), settings(gsm8k))


# The question of test.jsonl line 1 (id "0"), literally.
TOULA = ("Toula went to the bakery and bought various types of pastries. She bought 3 dozen "
         "donuts which cost $68 per dozen, 2 dozen mini cupcakes which cost $80 per dozen, and "
         "6 dozen mini cheesecakes for $55 per dozen. How much was the total cost?")


@pytest.mark.shared_data
def test_gsm8k_prompts_byte_for_byte(oi):
  ex = json.loads((oi / "gsm8k" / "cot_exemplars_open_instruct.json").read_text())
  cot_demos = ""
  direct_demos = ""
  for e in ex:
    cot_demos += "Question: " + e["question"] + "\nAnswer: " + e["cot_answer"] + "\n\n"
    direct_demos += "Quesion: " + e["question"] + "\nAnswer: " + e["short_answer"] + "\n\n"
  assert cot_demos.startswith(
      "Question: There are 15 trees in the grove. Grove workers will plant trees in the grove "
      "today. After they are done, there will be 21 trees. How many trees did the grove workers "
      "plant today?\nAnswer: There are 15 trees originally. Then there were 21 trees after some "
      "more were planted. So there must have been 21 - 15 = 6. So the answer is 6.\n\nQuestion: ")
  items = gsm8k.load(str(oi), settings(gsm8k))
  assert items[0]["question"] == TOULA

  def the_prompt(**kw):
    (req,) = gsm8k.requests(items[:1], settings(gsm8k, **kw), None)
    return req

  req = the_prompt()
  assert req.prompt == ("Answer the following questions.\n\n" + cot_demos
                        + "Question: " + TOULA + "\nAnswer:")
  assert (req.id, req.stop, req.max_new_tokens, req.temperature, req.n) == ("0", ("\n",), 512, 0, 1)
  req = the_prompt(chat=True)
  assert req.prompt == ("<|user|>\nAnswer the following questions.\n\n" + cot_demos
                        + "Question: " + TOULA + "\n<|assistant|>\nAnswer:")
  assert req.stop == ()
  assert the_prompt(cot=False).prompt == ("Answer the following questions.\n\n" + direct_demos
                                          + "Question: " + TOULA + "\nAnswer:")
  assert the_prompt(cot=False, chat=True).prompt == (
      "<|user|>\nAnswer the following questions.\n\n" + direct_demos + "Question: " + TOULA
      + "\n<|assistant|>\nAnswer:")
  # 0 shots: the singular instruction; the question is stripped
  bare = {"id": "x", "question": "  How many?\n", "exemplars": []}
  (req,) = gsm8k.requests([bare], settings(gsm8k), None)
  assert req.prompt == "Answer the following question.\n\nQuestion: How many?\nAnswer:"
  (req,) = gsm8k.requests([bare], settings(gsm8k, chat=True), None)
  assert req.prompt == ("<|user|>\nAnswer the following question.\n\nQuestion: How many?\n"
                        "<|assistant|>\nAnswer:")


def test_gsm8k_stop_sequences():
  stop = lambda **kw: gsm8k.stop_sequences(settings(gsm8k, **kw))   # noqa: E731
  assert stop() == ("\n",)
  assert stop(stop_at_double_newline=True) == ("\n\n",)
  assert stop(chat=True) == ()
  assert stop(chat=True, stop_at_double_newline=True) == ("\n\n",)
  assert stop(additional_stop_sequence=("<|eot_id|>",)) == ("<|eot_id|>", "\n")
  assert stop(chat=True, additional_stop_sequence=("<|eot_id|>",)) == ("<|eot_id|>",)


@pytest.mark.shared_data
def test_gsm8k_gold_scores_one_and_other_answers_score_near_zero(oi):
  items = gsm8k.load(str(oi), settings(gsm8k), subsample=False)
  lines = (oi / "gsm8k" / "test.jsonl").read_text().splitlines()
  raw = [json.loads(line)["answer"] for line in lines]
  # The upstream answer field (rationale, "<<calc>>" notes, "#### N"): its last number is N.
  for it, text in zip(items, raw):
    assert gsm8k.extract(text) == it["answer"]
  full = gsm8k.score(items, {it["id"]: [text] for it, text in zip(items, raw)})
  assert full == {"score": 1.0, "exact_match": 1.0, "n": 40}
  assert gsm8k.score(items, {it["id"]: [it["answer"]] for it in items})["score"] == 1.0
  # Only the first output of an id counts; ids not given are not scored.
  half = {it["id"]: [it["answer"], "0"] for it in items[:20]}
  assert gsm8k.score(items, half) == {"score": 1.0, "exact_match": 1.0, "n": 20}
  # Another item's answer: GSM8K answers are spread over hundreds of numbers (no value
  # appears more than twice in these 40), so a shifted answer matches almost never.
  rotated = {a["id"]: [b["answer"]] for a, b in zip(items, items[1:] + items[:1])}
  assert gsm8k.score(items, rotated)["score"] < 0.1
  with pytest.raises(DataError, match=r"gsm8k: 1 id\(s\) not in the data: '40'"):
    gsm8k.score(items, {"0": ["694"], "40": ["1"]})


# ----------------------------------------------------------------------------- BBH

def test_bbh_extract():
  assert bbh.extract("Let's think. So the answer is (B).") == "(B)"
  assert bbh.extract("the answer is  yes . And the answer is no.") == "yes"    # first match
  assert bbh.extract("|he answer is x.") == "x"           # "[t|T]" matches "|" too (upstream)
  assert bbh.extract("  no pattern here \n") == "no pattern here"
  assert bbh.extract("The answer is 3.5.") == "3"          # stops at the first period


@pytest.mark.shared_data
def test_bbh_load(oi, global_random):
  items = bbh.load(str(oi), settings(bbh))
  tasks = sorted(p.stem for p in (oi / "bbh" / "bbh").glob("*.json"))
  assert len(tasks) == 27 and len(items) == 27 * 5        # 5 < 40 examples: all of them
  assert [it["task"] for it in items] == [t for t in tasks for _ in range(5)]
  assert items[0]["id"] == "boolean_expressions/0"
  # Subsampling: tasks in sorted order, one seeded sequence; ids index the task file.
  small = bbh.load(str(oi), settings(bbh, max_num_examples_per_task=2))
  random.seed(42)
  for t in tasks:
    examples = json.loads((oi / "bbh" / "bbh" / f"{t}.json").read_text())["examples"]
    want = random.sample(list(range(len(examples))), 2)
    got = [it for it in small if it["task"] == t]
    assert [it["id"] for it in got] == [f"{t}/{i}" for i in want]
    assert [it["input"] for it in got] == [examples[i]["input"] for i in want]
    assert [it["target"] for it in got] == [examples[i]["target"] for i in want]


SPORTS_COT = (
    "Determine whether an artificially constructed sentence relating to sports is plausible or "
    "not.\n"
    "\n"
    "Q: Is the following sentence plausible? \"Bam Adebayo scored a reverse layup in the Western "
    "Conference Finals.\"\n"
    "A: Let's think step by step. Bam Adebayo is an American basketball player. Scoring a reverse "
    "layup in the Western Conference Finals is part of the NBA Finals. So the answer is yes.\n"
    "\n"
    "Q: Is the following sentence plausible? \"Santi Cazorla scored a touchdown.\"\n"
    "A: Let's think step by step. Santi Cazorla is a soccer player. Touchdown is part of American "
    "football and rugby. So the answer is no.\n"
    "\n"
    "Q: Is the following sentence plausible? \"DeMar DeRozan was called for the goal tend.\"\n"
    "A: Let's think step by step. DeMar DeRozan is an American basketball player. Goal tending is "
    "part of basketball. So the answer is yes.")

SPORTS_DIRECT = (
    "Determine whether an artificially constructed sentence relating to sports is plausible or "
    "not.\n"
    "\n"
    "Q: Is the following sentence plausible? \"Bam Adebayo scored a reverse layup in the Western "
    "Conference Finals.\"\n"
    "A: yes.\n"
    "\n"
    "Q: Is the following sentence plausible? \"Santi Cazorla scored a touchdown.\"\n"
    "A: no.\n"
    "\n"
    "Q: Is the following sentence plausible? \"DeMar DeRozan was called for the goal tend.\"\n"
    "A: yes.")

SPORTS_Q0 = "Is the following sentence plausible? \"Fernando Tatis Jr. earned a red card.\""


@pytest.mark.shared_data
def test_bbh_prompts_byte_for_byte(oi):
  items = [it for it in bbh.load(str(oi), settings(bbh)) if it["id"] == "sports_understanding/0"]
  assert items[0]["input"] == SPORTS_Q0

  def the_prompt(**kw):
    (req,) = bbh.requests(items, settings(bbh, **kw), None)
    return req

  req = the_prompt()
  assert req.prompt == SPORTS_COT + "\n\nQ: " + SPORTS_Q0 + "\nA:"
  assert (req.id, req.stop, req.max_new_tokens, req.temperature) == (
      "sports_understanding/0", ("\n\n",), 512, 0)
  req = the_prompt(chat=True)
  assert req.prompt == "<|user|>\n" + SPORTS_COT + "\n\nQ: " + SPORTS_Q0 + "\n<|assistant|>\nA:"
  assert req.stop == ()
  assert the_prompt(cot=False).prompt == SPORTS_DIRECT + "\n\nQ: " + SPORTS_Q0 + "\nA:"
  assert the_prompt(cot=False, chat=True).prompt == (
      "<|user|>\n" + SPORTS_DIRECT + "\n\nQ: " + SPORTS_Q0 + "\n<|assistant|>\nA:")
  assert the_prompt(chat=True, stop_at_double_newline=True).stop == ("\n\n",)
  assert the_prompt(stop_at_double_newline=True).stop == ("\n\n",)
  assert the_prompt(additional_stop_sequence=("</s>",)).stop == ("</s>", "\n\n")


@pytest.mark.shared_data
def test_bbh_direct_rewrite_of_every_task(oi):
  """Every task's direct text has 3 ``Q:`` blocks answered in one line ending in a period
  (the answers of multiple-choice tasks are ``(X).``)."""
  for t in bbh.task_names(str(oi)):
    direct = bbh.direct_few_shot(bbh.few_shot_text(str(oi), t), t)
    answers = [b.split("\nA: ")[-1] for b in direct.split("\n\n") if b.startswith("Q:")]
    assert len(answers) == 3, t
    assert all(a.endswith(".") and "\n" not in a and "step by step" not in a for a in answers), t


@pytest.mark.shared_data
def test_bbh_gold_scores_one_and_other_answers_score_near_chance(oi):
  items = bbh.load(str(oi), settings(bbh), subsample=False)
  gold = {it["id"]: [f"Let's think step by step. Some reasoning. So the answer is {it['target']}."]
          for it in items}
  res = bbh.score(items, gold)
  assert res["score"] == res["average_exact_match"] == 1.0
  assert res["n"] == 135 and res["n_tasks"] == 27 and set(res["per_task"].values()) == {1.0}
  # Each item gets the next item's target of the same task (the task's label mix is kept).
  # The chance level of such a guess is the probability that two different items of a
  # task share a label, averaged over tasks: about 0.5 for the yes/no tasks, 1/k for
  # k-way choices, ~0 for free-form targets (word sorting, Dyck, arithmetic). In these
  # samples it is 0.285, so a rotation must score near it and well below 0.5.
  by_task = {}
  for it in items:
    by_task.setdefault(it["task"], []).append(it)
  rotated, chance = {}, []
  for xs in by_task.values():
    for a, b in zip(xs, xs[1:] + xs[:1]):
      rotated[a["id"]] = [f"So the answer is {b['target']}."]
    n, counts = len(xs), Counter(x["target"] for x in xs)
    chance.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
  res = bbh.score(items, rotated)
  assert res["score"] < 0.5
  assert abs(res["score"] - sum(chance) / len(chance)) < 0.1
  assert res["per_task"]["word_sorting"] == res["per_task"]["multistep_arithmetic_two"] == 0.0
  # The average is over the tasks scored, unweighted.
  some = {"navigate/0": ["So the answer is No."], "navigate/1": ["So the answer is No."],
          "snarks/0": ["the answer is (A)."]}
  res = bbh.score(items, some)
  assert res["per_task"] == {"navigate": 0.5, "snarks": 1.0} and res["score"] == 0.75


# ----------------------------------------------------------------------------- score CLI

def test_read_predictions(tmp_path):
  p = tmp_path / "p.jsonl"
  p.write_text('{"id": "a", "output": "x", "extra": 1}\n{"id": 3, "output": "y"}\n\n'
               '{"id": "a", "output": "z"}\n')
  assert score_cli.read_predictions(str(p)) == {"a": ["x", "z"], "3": ["y"]}
  p.write_text('{"id": "a", "output": "x"}\n{"id": "b"}\n')
  with pytest.raises(DataError, match=r"p.jsonl:2: no 'output' field"):
    score_cli.read_predictions(str(p))
  p.write_text('{"id": "a", "output": null}\n')
  with pytest.raises(DataError, match=r"p.jsonl:1: output is a NoneType; expected a string"):
    score_cli.read_predictions(str(p))
  p.write_text("\n")
  with pytest.raises(DataError, match="p.jsonl: no predictions"):
    score_cli.read_predictions(str(p))


@pytest.mark.shared_data
def test_score_file(oi, tmp_path):
  p = tmp_path / "p.jsonl"
  p.write_text('{"id": "0", "output": "So the answer is 694."}\n'
               '{"id": "1", "output": "So the answer is 36."}\n')
  res = score_cli.score_file("gsm8k", str(oi), str(p), {"cot": False})
  assert res == {"benchmark": "gsm8k", "score": 0.5, "exact_match": 0.5, "n": 2}
  with pytest.raises(ConfigError, match="unknown benchmark 'gsm9k'; expected one of"):
    score_cli.score_file("gsm9k", str(oi), str(p))
  with pytest.raises(ConfigError, match="unknown setting 'shots'"):
    score_cli.score_file("gsm8k", str(oi), str(p), {"shots": 1})
  assert score_cli.parse_settings(["k=[1,10]", "cot=false", "name=abc"]) == {
      "k": [1, 10], "cot": False, "name": "abc"}


def run_score(*args):
  return subprocess.run([sys.executable, "-m", "peft_jax.evals.score", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.shared_data
def test_score_command_line(oi, tmp_path):
  items = bbh.load(str(oi), settings(bbh), subsample=False)
  p = tmp_path / "bbh.jsonl"
  with open(p, "w") as f:
    for it in items:
      out = it["target"] if it["task"] != "navigate" else "So the answer is Maybe."
      f.write(json.dumps({"id": it["id"], "output": f"So the answer is {out}."}) + "\n")
  r = run_score("--benchmark=bbh", f"--data_dir={oi}", f"--predictions={p}",
                "--setting", "cot=false")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  res = json.loads(lines[-1])
  assert res["benchmark"] == "bbh" and res["per_task"]["navigate"] == 0.0
  assert res["score"] == pytest.approx(26 / 27) and res["n"] == 135
  assert "average_exact_match: 0.9630" in lines and "  navigate: 0.0000" in lines

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "0", "output": "694"}\n{"id": "1", "output": \n')
  r = run_score("--benchmark=gsm8k", f"--data_dir={oi}", f"--predictions={bad}")
  assert r.returncode == 2 and r.stdout == ""
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {bad}:2: not valid JSON"), r.stderr

  unknown = tmp_path / "unknown.jsonl"
  unknown.write_text('{"id": "0", "output": "694"}\n{"id": "nope", "output": "1"}\n')
  r = run_score("--benchmark=gsm8k", f"--data_dir={oi}", f"--predictions={unknown}",
                "--setting=n_shot=3")
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.strip().splitlines() == [
      "error: gsm8k: 1 id(s) not in the data: 'nope'; expected ids of the 40 items"]
