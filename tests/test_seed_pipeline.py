"""Issue 13's end-to-end check: each seed family's tiny variant runs as the papers ran
it, on the real-format samples of ``../shared/data``: sweep.py trains (two evaluations,
so a best checkpoint is chosen on validation), evaluates the best checkpoint on the
held-out split, and ``sweep.py --report`` turns the four sweeps into the papers' tables
(markdown) and figures (PNG). TULU runs with its default data settings (its validation
split carved from the mixture).

Held-out split per family: SuperNI's test tasks and CoLA's test (GLUE dev) are labelled;
SuperGLUE's test labels are hidden and the survey reports the validation split, so the
survey family evaluates its best checkpoint on validation, and the TULU mixture has no
test split (its benchmarks are issue 14's suite)."""
import json
import os

import pytest

from peft_jax import grid_search, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAMILIES = [  # (config, sweep name, held-out split, extra data setting)
    ("configs/superni.py:lora,tiny", "superni", "test", {}),
    ("configs/flan_t5.py:cola,low,lora,tiny", "flan_t5", "test", {}),
    ("configs/survey.py:tiny,rte,houlsby", "survey", "validation", {}),
    ("configs/tulu.py:lora,tiny", "tulu", "validation", "tulu"),
]


def _tulu_mixture(path, n=24):
  rows = [{"dataset": "toy", "id": str(i), "messages": [
      {"role": "user", "content": f"Say the number {i}."},
      {"role": "assistant", "content": f"The number is {i}."}]} for i in range(n)]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.slow
@pytest.mark.shared_data
def test_seed_families_train_select_test_report(shared_data, tmp_path, monkeypatch):
  monkeypatch.setenv("PEFT_JAX_DATA_DIR", str(shared_data))
  monkeypatch.chdir(REPO)
  sweeps = []
  for config, name, split, extra in FAMILIES:
    sets = {"train.num_steps": "4", "train.eval_every": "2"}
    if extra == "tulu":
      mix = tmp_path / "tulu_mix.jsonl"
      _tulu_mixture(mix)
      sets["data.path"] = str(mix)
    wd = str(tmp_path / name)
    status = grid_search.run_sweep(config, wd, {"train.learning_rate": ["1e-3"]}, seeds=[0],
                                   sets=sets, log=lambda s: None, select_split=split)
    assert not status["failed"], (name, [open(os.path.join(d, f)).read()[-2000:]
                                         for d in status["failed"]
                                         for f in ("failed.json", "eval_failed.json")
                                         if os.path.exists(os.path.join(d, f))])
    (pdir,) = status["done"]
    result = json.load(open(os.path.join(pdir, "result.json")))
    sel = json.load(open(os.path.join(pdir, "selection.json")))
    # two validation evaluations (steps 2 and 4); the best of them was evaluated on the split
    assert sorted(int(s) for s in sel["evaluations"]) == [2, 4], sel
    assert result["best_step"] == sel["best_step"] in (2, 4)
    held = json.load(open(os.path.join(pdir, f"{split}.json")))
    assert held["step"] == sel["best_step"] and isinstance(held["score"], float)
    assert result["train_seconds"] is None or result["train_seconds"] > 0
    sweeps.append(wd)

  rep = report.build_report(sweeps, str(tmp_path / "report"))
  assert {"000", "002", "003", "generic"} <= set(rep["shapes"]), rep["shapes"]
  md = open(rep["markdown"]).read()
  for title in ("Table 1", "Table 4", "Table 5", "Table 6"):
    assert title in md, title
  assert rep["figures"] and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in rep["figures"])
  # the sweeps' held-out scores are the ones reported (not the final validation score)
  assert rep["sources"].get("test") == 2, rep["sources"]
