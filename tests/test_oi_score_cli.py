"""``python -m peft_jax.evals.score`` on every benchmark of ../shared/data/open_instruct_eval:
gold answers, read straight from the upstream files (not through our loaders), score 1.0
(HumanEval: the canonical solutions pass in the sandbox); the same answers moved to other
items score near chance."""
import csv
import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.shared_data


def _gold(name, d):
  """[(id, gold output)] from the raw files, in the ids of the scorer's contract."""
  if name == "gsm8k":
    with open(os.path.join(d, "gsm8k", "test.jsonl")) as f:
      return [(str(i), json.loads(line)["answer"]) for i, line in enumerate(f)]
  if name == "bbh":
    out = []
    for path in sorted(glob.glob(os.path.join(d, "bbh", "bbh", "*.json"))):
      task = os.path.basename(path)[:-5]
      ex = json.load(open(path))["examples"]
      out += [(f"{task}/{i}", f"Let's think step by step. So the answer is {e['target']}.")
              for i, e in enumerate(ex)]
    return out
  if name == "mmlu":
    out = []
    for path in sorted(glob.glob(os.path.join(d, "mmlu", "test", "*_test.csv"))):
      subject = os.path.basename(path)[:-len("_test.csv")]
      with open(path, newline="", encoding="utf-8") as f:
        out += [(f"{subject}/{i}", row[5]) for i, row in enumerate(csv.reader(f))]
    return out
  if name == "tydiqa":
    data = json.load(open(os.path.join(d, "tydiqa", "tydiqa-goldp-v1.1-dev.json")))["data"]
    return [(qa["id"], qa["answers"][0]["text"]) for art in data for p in art["paragraphs"]
            for qa in p["qas"]]
  with open(os.path.join(d, "codex_humaneval", "HumanEval.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["task_id"], r["canonical_solution"]) for r in rows]


def _score(name, d, pairs, tmp_path):
  p = tmp_path / f"{name}.jsonl"
  p.write_text("".join(json.dumps({"id": i, "output": o}) + "\n" for i, o in pairs))
  r = subprocess.run([sys.executable, "-m", "peft_jax.evals.score", f"--benchmark={name}",
                      f"--data_dir={d}", f"--predictions={p}"], cwd=REPO, capture_output=True,
                     text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


# chance for answers moved to other items: MMLU, 4 letters; BBH, a few labels per task;
# free-form answers (GSM8K numbers, TyDiQA spans, HumanEval bodies) almost never coincide
CHANCE = {"gsm8k": 0.1, "bbh": 0.5, "mmlu": 0.5, "tydiqa": 0.1, "codex_humaneval": 0.15}


@pytest.mark.parametrize("name", sorted(CHANCE))
def test_gold_scores_one_and_moved_answers_score_near_chance(name, shared_data, tmp_path):
  d = str(shared_data / "open_instruct_eval")
  gold = _gold(name, d)
  assert len(gold) >= 16
  res = _score(name, d, gold, tmp_path)
  assert res["score"] == 1.0, res
  moved = [(i, gold[(k + 1) % len(gold)][1]) for k, (i, _) in enumerate(gold)]
  if name == "mmlu":    # letters: move by subject so that some coincide (about 1 in 4)
    moved = [(i, gold[(k + 7) % len(gold)][1]) for k, (i, _) in enumerate(gold)]
  low = _score(name, d, moved, tmp_path)
  assert low["score"] < CHANCE[name], low
