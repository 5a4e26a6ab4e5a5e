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


def test_parse_settings():
  names = suite.task_names("tydiqa,gsm8k_cot")
  got = suite.parse_settings("tydiqa.missing_shots=borrow_dev; gsm8k_cot.n_shot=4;"
                             " tydiqa_goldp_1shot.max_context_length=256", names)
  assert got == {"tydiqa_goldp_1shot": {"missing_shots": "borrow_dev", "max_context_length": 256},
                 "tydiqa_no_context_1shot": {"missing_shots": "borrow_dev"},
                 "gsm8k_cot": {"n_shot": 4}}
  with pytest.raises(ConfigError, match="selects none"):
    suite.parse_settings("mmlu.n_shot=3", names)
  with pytest.raises(ConfigError, match="expected"):
    suite.parse_settings("n_shot=3", names)


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


def _tulu_mixture(path, n=24):
  rows = [{"dataset": "toy", "id": str(i), "messages": [
      {"role": "user", "content": f"Say the number {i}."},
      {"role": "assistant", "content": f"The number is {i}."}]} for i in range(n)]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  r = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=1200)
  assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
  return r


@pytest.mark.slow
@pytest.mark.shared_data
def test_tiny_tulu_runs_the_whole_suite_end_to_end(shared_data, tmp_path):
  """configs/tulu.py:lora,tiny trained for two steps, then eval.py --suite=tulu on its
  workdir: every task of the suite runs on the shared items (one per subsampling setting,
  short outputs), writes its files, and its predictions re-score to the same numbers with
  ``python -m peft_jax.evals.score``. A rerun generates nothing."""
  mix = tmp_path / "mix.jsonl"
  _tulu_mixture(mix)
  wd = str(tmp_path / "run")
  _run("train.py", "--config=configs/tulu.py:lora,tiny", f"--config.data.path={mix}",
       f"--workdir={wd}", "--config.train.num_steps=2")
  caps = ["--config.eval.suite_max_examples=1", "--config.eval.suite_max_new_tokens=12",
          # the shared sample has train shots for 4 of TyDiQA's 9 languages
          "--config.eval.suite_settings=tydiqa.missing_shots=borrow_dev"]
  r = _run("eval.py", f"--checkpoint={wd}", "--suite=tulu", *caps)
  last = json.loads(r.stdout.strip().splitlines()[-1])
  out = last["output"]
  assert out == os.path.join(wd, "suite", "step_2")
  assert set(last["tasks"]) == set(SUITE)
  summary = json.load(open(os.path.join(out, "suite.json")))
  assert summary["table3"]["complete"] and 0 <= summary["table3"]["average"] <= 100
  data = str(shared_data / "open_instruct_eval")
  for name, task in SUITE.items():
    d = os.path.join(out, name)
    rows = [json.loads(x) for x in open(os.path.join(d, "predictions.jsonl"))]
    metrics = json.load(open(os.path.join(d, "metrics.json")))
    assert rows and metrics["n_items"] >= 1, name
    prompts = [x["prompt"] for x in rows if "prompt" in x]
    if task.benchmark in ("codex_humaneval",):
      assert not prompts[0].startswith("<|user|>")           # plain, as the TULU groups
      assert len(rows) == 20 * metrics["n_items"]            # 20 samples per problem
    else:
      assert prompts[0].startswith("<|user|>\n"), (name, prompts[0][:40])   # chat (auto)
    if task.benchmark == "mmlu":
      assert all(x["output"] in "ABCD" and len(x["probs"]) == 4 for x in rows)
    if task.benchmark == "alpaca_eval":
      outs = json.load(open(os.path.join(d, "model_outputs.json")))
      assert len(outs) == metrics["n_items"] and list(outs[0]) == [
          "dataset", "instruction", "output", "generator"]
      continue
    head = metrics[task.headline]
    assert 0 <= head <= 1, (name, head)
    s = _run("-m", "peft_jax.evals.score", f"--benchmark={task.benchmark}", f"--data_dir={data}",
             f"--predictions={os.path.join(d, 'predictions.jsonl')}")
    rescored = json.loads(s.stdout.strip().splitlines()[-1])
    assert rescored[task.headline] == pytest.approx(head), name
  md = open(os.path.join(out, "suite.md")).read()
  for section in ("Seed 000, Table 3", "## mmlu_0shot: accuracy per category",
                  "## bbh_cot: per task", "## tydiqa_goldp_1shot: per language"):
    assert section in md, section
  before = {n: open(os.path.join(out, n, "predictions.jsonl")).read() for n in SUITE}
  r2 = _run("eval.py", f"--checkpoint={wd}", "--suite=tulu", *caps)
  assert json.loads(r2.stdout.strip().splitlines()[-1]) == last
  assert {n: open(os.path.join(out, n, "predictions.jsonl")).read() for n in SUITE} == before


@pytest.mark.shared_data
def test_eval_loads_a_hugging_face_peft_adapter(shared_data, tmp_path):
  """eval.py's loader takes an HF PEFT adapter directory (adapter_config.json) on the
  config's base model: the loaded model computes what ours does with the same LoRA."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from peft_jax import config_lib
  from peft_jax.builder import build
  from peft_jax.models import build_model
  from peft_jax.peft import apply_peft
  from peft_jax.peft.hf_peft import export_hf_peft
  from peft_jax.selection import load_for_eval
  spec = os.path.join(REPO, "configs", "tulu.py") + ":lora,tiny"
  cfg, _ = config_lib.load(spec, [])
  base = build(cfg, peft={"method": "full"}, with_weights=True)
  st = apply_peft(base.mc, base.state.params, "lora",
                  {"r": 4, "lora_alpha": 8, "target_modules": "q,k"}, rng=jax.random.PRNGKey(1))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 if "lora_B" in jax.tree_util.keystr(p) else x, st.params)
  export_hf_peft(st, params, str(tmp_path / "hf"))
  ld = load_for_eval(str(tmp_path / "hf"), spec, say=lambda s: None)
  assert ld.kind == "hf_adapter" and ld.default_out == str(tmp_path)
  ids = jnp.arange(1, 9, dtype=jnp.int32)[None]
  want = build_model(base.mc, st.sites).apply({"params": st.prepare(params)}, ids)
  plain = base.model.apply({"params": base.state.params}, ids)
  got = ld.model.apply({"params": ld.params}, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert np.abs(np.asarray(plain) - np.asarray(want)).max() > 1e-3     # the adapter acts
