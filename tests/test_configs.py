"""Every config string of every experiment family passes the dry run; a tiny-model
variant of each family trains a few steps and evaluates."""
import importlib.util
import itertools
import json
import os

import pytest

from peft_jax import inputs
from peft_jax.peft import describe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(family):
  spec = importlib.util.spec_from_file_location(f"cfg_{family}", os.path.join(REPO, "configs", f"{family}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def all_variants():
  out = []
  m = load("superni")
  out += [("superni", f"{a},{b}") for a, b in itertools.product(m.METHODS, [k for k in m.MODELS if k != "tiny"])]
  m = load("tulu")
  out += [("tulu", f"{a},7b") for a in m.METHODS]
  m = load("flan_t5")
  out += [("flan_t5", f"{t},{s},{me}") for t, s, me in
          itertools.product(m.TASKS, m.SIZES, list(m.METHODS) + list(m.ABLATIONS))]
  m = load("survey")
  out += [("survey", f"{mo},{t},{me}") for mo, t, me in
          itertools.product([x for x in m.MODELS if x != "tiny"], m.TASKS, m.METHODS)]
  return out


VARIANTS = all_variants()


def test_every_config_string_dry_runs():
  """The dry run's computation (abstract build + accounting) for all config strings."""
  failures = []
  for family, variant in VARIANTS:
    c = load(family).get_config(variant)
    try:
      info = describe(inputs.model_config(c), c.peft.method, inputs.peft_overrides(c))
      assert 0 < info["trainable_params"] <= info["total_params"]
    except Exception as e:  # collect all, report once
      failures.append(f"{family}:{variant}: {type(e).__name__}: {e}")
  assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} of {len(VARIANTS)} failed)"
  # superni 6 methods x 4 models, tulu 3, flan_t5 4 x 3 x (7 + 11), survey 3 x 4 x 17
  assert len(VARIANTS) == 24 + 3 + 216 + 204


def test_paper_trainable_ratios_reproduced():
  """Seed 000 Table 1 lists % trainable for the best settings on T5-3B LM-adapted."""
  for variant, pct in (("lora", 9.6), ("adapter", 6.6)):
    c = load("superni").get_config(variant)
    info = describe(inputs.model_config(c), c.peft.method, inputs.peft_overrides(c))
    assert round(info["trainable_percent"], 1) == pct, (variant, info["trainable_percent"])


def test_unknown_variant_part_is_a_clear_error():
  with pytest.raises(ValueError, match="'lorax' is not recognised; accepted: task"):
    load("flan_t5").get_config("cola,lorax")


def _tiny_train(family, variant, tmp_path, monkeypatch, data_dir, **data):
  from peft_jax.trainer import Trainer
  monkeypatch.setenv("PEFT_JAX_DATA_DIR", str(data_dir))
  c = load(family).get_config(variant)
  for k, v in data.items():
    c.data[k] = v
  t = Trainer(c, str(tmp_path / "wd"))
  res = t.train()
  assert res["steps"] == 3 and res["tuned"] is not None
  lines = [json.loads(l) for l in open(tmp_path / "wd" / "metrics.jsonl")]
  assert any("train/loss" in l for l in lines)
  assert (tmp_path / "wd" / "adapter").exists()
  return t, res


@pytest.mark.shared_data
@pytest.mark.parametrize("family,variant", [("superni", "lora,tiny"), ("flan_t5", "cola,low,ia3,tiny"),
                                            ("survey", "tiny,rte,houlsby")])
def test_tiny_variant_trains_and_evaluates(family, variant, shared_data, tmp_path, monkeypatch):
  t, res = _tiny_train(family, variant, tmp_path, monkeypatch, shared_data)
  if family == "superni":   # per-task and per-category breakdowns (seed 000)
    ev = t.evaluate(t.params)
    tasks = {r["meta"]["task"] for r in t.val_rows}
    assert set(ev["per_task"]) == tasks and ev["per_category"] and "rougeL" in ev["task_macro"]


@pytest.mark.shared_data
def test_tulu_tiny_trains_and_evaluates(shared_data, tmp_path, monkeypatch):
  f = tmp_path / "tulu.jsonl"
  rows = [{"dataset": "toy", "id": str(i), "messages": [
      {"role": "user", "content": f"Say the number {i}."},
      {"role": "assistant", "content": f"The number is {i}."}]} for i in range(20)]
  f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  for i, r in enumerate(rows):
    r["messages"] += [{"role": "user", "content": "And the next one?"},
                      {"role": "assistant", "content": f"It is {i + 1}."}]
  f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  t, _ = _tiny_train("tulu", "lora,tiny", tmp_path, monkeypatch, shared_data, path=str(f),
                     eval_split="train")
  # the whole conversation is trained on, with loss on every assistant turn
  assert t.chat is not None and len(t.chat) == 16     # tiny variant: 16 training rows
  for e in t.chat:   # two assistant turns -> two separate runs of loss tokens
    m = e["loss_mask"]
    assert sum(1 for a, b in zip([0] + m, m) if a == 0 and b == 1) == 2
