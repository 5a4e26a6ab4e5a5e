"""Loaders reading the Hugging Face `datasets` format: in-memory Dataset/DatasetDict,
save_to_disk folders, and the hub path's error when offline."""
import pytest

from peft_jax.data.common import DataError
from peft_jax.data.sources import load_dataset_rows

datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")


def _ids(rows, key="input"):
  return [r[key] for r in rows]


def test_hf_dataset_objects_and_saved_folders(tmp_path):
  feats = datasets.Features({"premise": datasets.Value("string"),
                             "hypothesis": datasets.Value("string"),
                             "idx": datasets.Value("int32"),
                             "label": datasets.ClassLabel(names=["entailment", "not_entailment"])})
  train = datasets.Dataset.from_dict({"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"],
                                      "idx": [0, 1], "label": [0, 1]}, features=feats)
  test = datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "idx": [0],
                                     "label": [-1]}, features=feats)
  rows = load_dataset_rows("rte", "train", path=train, shuffle=False)
  assert [(r["input"], r["target"]) for r in rows] == [
      ("rte hypothesis: h0 premise: p0", "entailment"),
      ("rte hypothesis: h1 premise: p1", "not_entailment")]
  dd = datasets.DatasetDict({"train": train, "validation": train, "test": test})
  assert load_dataset_rows("rte", "test", path=dd)[0]["target"] == "<unk>"
  assert len(load_dataset_rows("rte", "validation", path=dd)) == 2
  dd.save_to_disk(str(tmp_path / "rte_dd"))
  got = load_dataset_rows("rte", "train", path=str(tmp_path / "rte_dd"), shuffle=False)
  assert _ids(got) == _ids(rows)
  assert got.info["source"].startswith("load_from_disk:")
  train.save_to_disk(str(tmp_path / "rte_ds"))
  assert _ids(load_dataset_rows("rte", "validation", path=str(tmp_path / "rte_ds"))) == _ids(rows)
  with pytest.raises(DataError, match=r"has splits \['train'\]; expected one named "
                                      r"\['validation', 'val', 'dev'\]"):
    load_dataset_rows("rte", "validation", path=datasets.DatasetDict({"train": train}))


def test_hf_seed002_column_conventions():
  ag = datasets.Dataset.from_dict(
      {"text": ["a match", "stocks fell"], "label": [1, 2]},
      features=datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(
          names=["World", "Sports", "Business", "Sci/Tech"])}))
  assert [r["target"] for r in load_dataset_rows("ag_news", "test", path=ag)] == ["Sports", "Business"]
  e2e = datasets.Dataset.from_dict({"meaning_representation": ["name[A]", "name[A]"],
                                    "human_reference": ["A.", "It is A."]})
  rows = load_dataset_rows("e2e_nlg", "test", path=e2e)
  assert len(rows) == 1 and rows[0]["references"] == ["A.", "It is A."]
  cola = datasets.Dataset.from_dict({"sentence": ["Good."], "label": [1], "idx": [0]})
  assert load_dataset_rows("cola", "validation", path=cola)[0]["target"] == "acceptable"
  sam = datasets.Dataset.from_dict({"id": ["1"], "dialogue": ["A: x\r\nB: y"], "summary": ["s"]})
  assert load_dataset_rows("samsum", "test", path=sam)[0]["input"].endswith("A: x\nB: y")
  boolq = datasets.Dataset.from_dict({"question": ["q"], "passage": ["p"], "idx": [0],
                                      "label": [True]})
  assert load_dataset_rows("boolq", "train", path=boolq)[0]["target"] == "True"


def test_hf_hub_offline_is_a_clear_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(DataError, match=r"could not load 'no-such-org/no-such-set' from the "
                                      r"Hugging Face hub"):
    load_dataset_rows("rte", "validation", path="hf:no-such-org/no-such-set")
