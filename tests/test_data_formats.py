"""One data set, many source kinds: the original layout, a `datasets` DatasetDict (in
memory, save_to_disk, a stand-in for the hub), folders of parquet / JSONL / CSV files
under the Hugging Face field and split names (also the hub's data/<split>-00000-of-
00001.parquet naming), a single parquet file, and TFDS data sets built here in TFDS's
on-disk format. Built from the same rows, every kind gives the same train, validation
(carved where the source has none) and test rows, following the split table of
peft_jax.data.sources (CoLA: test = GLUE dev = the HF/TFDS validation split)."""
import json
import sys

import numpy as np
import pytest

from peft_jax.data.common import DataError
from peft_jax.data.sources import SPLITS, load_dataset_rows

datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")


def _pairs(rows):
  return [(r["input"], r["target"]) for r in rows]


def _splits(name, path, ordered=True, **kw):
  """{split: (input, target) pairs}: evaluation splits in source order, train sorted (it is
  shuffled by seed); all sorted when not ``ordered`` (TFDS stores rows in its own order)."""
  out = {}
  for split in ("train", "validation", "test"):
    rows = load_dataset_rows(name, split, path=path, shuffle=False, **kw)
    keep = ordered and split != "train"
    out[split] = _pairs(rows) if keep else sorted(_pairs(rows))
  return out


def _write_tables(dd, root, fmt, hub_naming=False):
  """Each split of DatasetDict ``dd`` as root/<split>.<fmt> (or the hub's shard names)."""
  root.mkdir(parents=True, exist_ok=True)
  for split, ds in dd.items():
    if hub_naming:
      (root / "data").mkdir(exist_ok=True)
      ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    elif fmt == "parquet":
      ds.to_parquet(str(root / f"{split}.parquet"))
    elif fmt == "jsonl":
      ds.to_json(str(root / f"{split}.jsonl"))
    elif fmt == "csv":
      ds.to_csv(str(root / f"{split}.csv"), index=False)
  return root


def _kinds(dd, tmp_path, formats=("parquet", "jsonl", "csv")):
  """The source kinds built from one DatasetDict: {kind: data.path}."""
  out = {"datasets object": dd}
  dd.save_to_disk(str(tmp_path / "saved"))
  out["save_to_disk"] = str(tmp_path / "saved")
  out["hub shards"] = _write_tables(dd, tmp_path / "hub", "parquet", hub_naming=True)
  for fmt in formats:
    out[fmt] = _write_tables(dd, tmp_path / fmt, fmt)
  return out


# ----------------------------------------------------------------------------- CoLA

COLA_TRAIN = [("gj04", i % 2, f"Sentence number {i} is {'fine' if i % 2 else 'wrong'}.")
              for i in range(24)]
COLA_DEV = [("gj04", 0, "Them is here."), ("gj04", 1, "They are here."), ("x", 1, "Dev three.")]
COLA_TEST = ["Hidden one.", "Hidden two."]


def _cola_layout(root):
  root.mkdir(parents=True)
  (root / "train.tsv").write_text("".join(f"{s}\t{y}\t{'' if y else '*'}\t{t}\n"
                                          for s, y, t in COLA_TRAIN))
  (root / "dev.tsv").write_text("".join(f"{s}\t{y}\t{'' if y else '*'}\t{t}\n"
                                        for s, y, t in COLA_DEV))
  (root / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{t}\n" for i, t in
                                                               enumerate(COLA_TEST)))
  return root


def _cola_hf():
  feats = datasets.Features({"sentence": datasets.Value("string"),
                             "label": datasets.ClassLabel(names=["unacceptable", "acceptable"]),
                             "idx": datasets.Value("int32")})

  def ds(rows):
    return datasets.Dataset.from_dict({"sentence": [t for _, _, t in rows],
                                       "label": [y for _, y, _ in rows],
                                       "idx": list(range(len(rows)))}, features=feats)
  # the Hugging Face glue/cola: validation = GLUE dev, test unlabelled (-1)
  return datasets.DatasetDict({"train": ds(COLA_TRAIN), "validation": ds(COLA_DEV),
                               "test": ds([("", -1, t) for t in COLA_TEST])})


def test_split_table_documents_cola():
  assert SPLITS["cola"] == {"train": "train", "validation": None, "test": "validation"}
  import peft_jax.data.sources as src
  row = [ln for ln in src.__doc__.splitlines() if ln.strip().startswith("cola ")][0]
  assert "train - carve" in row and "GLUE dev" in row


def test_cola_same_splits_from_every_source_kind(tmp_path, monkeypatch):
  local = _splits("cola", _cola_layout(tmp_path / "CoLA"), validation_size=5)
  assert len(local["train"]) == 19 and len(local["validation"]) == 5
  assert local["test"] == [("Is the following sentence grammatically acceptable or "
                            "unacceptable?\n\nThem is here.", "unacceptable"),
                           ("Is the following sentence grammatically acceptable or "
                            "unacceptable?\n\nThey are here.", "acceptable"),
                           ("Is the following sentence grammatically acceptable or "
                            "unacceptable?\n\nDev three.", "acceptable")]
  assert not set(local["train"]) & set(local["validation"])
  dd = _cola_hf()
  kinds = _kinds(dd, tmp_path)
  calls = []

  def fake_load_dataset(hub_id, config=None, **kw):    # the hub, without the network
    calls.append((hub_id, config))
    return dd
  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  kinds["hub"] = "hf:glue"
  for kind, path in kinds.items():
    got = _splits("cola", path, validation_size=5, hf_config="cola")
    assert got == local, kind
  assert calls and all(c == ("glue", "cola") for c in calls)
  # the unlabelled HF test split is never what `test` means; hf_split still reads it
  unl = load_dataset_rows("cola", "test", path=kinds["parquet"], hf_split="test")
  assert [r["target"] for r in unl] == ["<unk>", "<unk>"]
  info = load_dataset_rows("cola", "validation", path=kinds["jsonl"], validation_size=5).info
  assert info["carved_validation"]["n"] == 5 and info["source"].endswith("train.jsonl")
  test_info = load_dataset_rows("cola", "test", path=kinds["hub shards"]).info
  assert test_info["source_split"] == "validation"
  assert test_info["source"].endswith("validation-00000-of-00001.parquet")


def test_parquet_file_is_read_as_parquet(tmp_path):
  dd = _cola_hf()
  dd["validation"].to_parquet(str(tmp_path / "dev.parquet"))
  rows = load_dataset_rows("cola", "test", path=tmp_path / "dev.parquet")
  assert [r["target"] for r in rows] == ["unacceptable", "acceptable", "acceptable"]
  assert rows[0]["input"].endswith("\n\nThem is here.")
  # ClassLabel names come from the parquet metadata that `datasets` writes
  renamed = dd["validation"].cast_column("label", datasets.ClassLabel(names=["no", "yes"]))
  renamed.to_parquet(str(tmp_path / "renamed.parquet"))
  assert load_dataset_rows("cola", "test", path=tmp_path / "renamed.parquet").info["classes"] == [
      "no", "yes"]
  (tmp_path / "bad.parquet").write_text("not parquet\n")
  with pytest.raises(DataError, match=r"bad\.parquet is not a readable parquet file"):
    load_dataset_rows("cola", "test", path=tmp_path / "bad.parquet")


# ----------------------------------------------------------------------------- AG News

AG_TRAIN = [(i % 4, f"Title {i}", f"Description number {i}.") for i in range(30)]
AG_TEST = [(1, "Match", "A great game."), (3, "Chips", "Faster chips.")]


def _ag_layout(root):
  root.mkdir(parents=True)
  (root / "train.csv").write_text("".join(f'"{y + 1}","{t}","{d}"\n' for y, t, d in AG_TRAIN))
  (root / "test.csv").write_text("".join(f'"{y + 1}","{t}","{d}"\n' for y, t, d in AG_TEST))
  return root


def _ag_hf():
  feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(
      names=["World", "Sports", "Business", "Sci/Tech"])})

  def ds(rows):
    return datasets.Dataset.from_dict({"text": [f"{t} {d}" for _, t, d in rows],
                                       "label": [y for y, _, _ in rows]}, features=feats)
  return datasets.DatasetDict({"train": ds(AG_TRAIN), "test": ds(AG_TEST)})   # as on the hub


def test_ag_news_validation_carved_for_every_source_kind(tmp_path):
  local = _splits("ag_news", _ag_layout(tmp_path / "ag"), validation_size=6)
  assert len(local["train"]) == 24 and len(local["validation"]) == 6
  assert not set(local["train"]) & set(local["validation"])
  assert local["test"][0] == ("Classify the topic of this news article as one of: World, "
                              "Sports, Business, Sci/Tech.\n\nMatch A great game.", "Sports")
  for kind, path in _kinds(_ag_hf(), tmp_path).items():
    assert _splits("ag_news", path, validation_size=6) == local, kind
  # another split_seed, another carve; the training seed does not move it
  other = load_dataset_rows("ag_news", "validation", path=tmp_path / "parquet",
                            validation_size=6, split_seed=1)
  assert set(_pairs(other)) != set(local["validation"])
  assert _pairs(load_dataset_rows("ag_news", "validation", path=tmp_path / "parquet",
                                  validation_size=6, seed=7)) == local["validation"]


# ----------------------------------------------------------------------------- RTE

RTE_LABELS = ["entailment", "not_entailment"]
RTE = {"train": [(f"Premise {i}.", f"Hypothesis {i}.", i % 2) for i in range(12)],
       "validation": [("A man sleeps.", "A person rests.", 0), ("A", "B", 1)],
       "test": [("Unseen premise.", "Unseen hypothesis.", -1)]}


def _rte_layout(root):
  root.mkdir(parents=True)
  for split, fname in (("train", "train.jsonl"), ("validation", "val.jsonl"),
                       ("test", "test.jsonl")):
    with open(root / fname, "w") as f:
      for i, (p, h, y) in enumerate(RTE[split]):
        row = {"premise": p, "hypothesis": h, "idx": i}
        if y >= 0:
          row["label"] = RTE_LABELS[y]
        f.write(json.dumps(row) + "\n")
  return root


def _rte_hf(splits=("train", "validation", "test")):
  feats = datasets.Features({"premise": datasets.Value("string"),
                             "hypothesis": datasets.Value("string"),
                             "idx": datasets.Value("int32"),
                             "label": datasets.ClassLabel(names=RTE_LABELS)})
  return datasets.DatasetDict({s: datasets.Dataset.from_dict(
      {"premise": [p for p, _, _ in RTE[s]], "hypothesis": [h for _, h, _ in RTE[s]],
       "idx": list(range(len(RTE[s]))), "label": [y for _, _, y in RTE[s]]}, features=feats)
      for s in splits})


def test_rte_same_splits_from_every_source_kind(tmp_path):
  local = _splits("rte", _rte_layout(tmp_path / "rte"))
  assert local["validation"][0] == ("rte hypothesis: A person rests. premise: A man sleeps.",
                                    "entailment")
  assert local["test"] == [("rte hypothesis: Unseen hypothesis. premise: Unseen premise.",
                            "<unk>")]
  for kind, path in _kinds(_rte_hf(), tmp_path).items():
    assert _splits("rte", path) == local, kind


def test_missing_validation_is_carved_only_when_asked(tmp_path):
  root = _write_tables(_rte_hf(("train", "test")), tmp_path / "rte", "parquet")
  with pytest.raises(DataError, match=r"rte: tables:.* has splits \['test', 'train'\]; expected "
                                      r"one named \['validation', 'val', 'dev'\] for split "
                                      r"'validation'.*validation_size=N to carve it"):
    load_dataset_rows("rte", "validation", path=root)
  assert len(load_dataset_rows("rte", "train", path=root)) == 12   # no carve asked: all of train
  tr = load_dataset_rows("rte", "train", path=root, validation_size=3)
  va = load_dataset_rows("rte", "validation", path=root, validation_size=3)
  assert len(tr) == 9 and len(va) == 3 and not set(_pairs(tr)) & set(_pairs(va))
  with pytest.raises(DataError, match=r"validation_size=12 cannot be carved from 12 training "
                                      r"rows"):
    load_dataset_rows("rte", "validation", path=root, validation_size=12)
  with pytest.raises(DataError, match=r"split 'dev32' exists only in the original layout"):
    load_dataset_rows("rte", "dev32", path=root)


def test_e2e_and_samsum_hf_field_names_in_files(tmp_path):
  (tmp_path / "e2e").mkdir()
  (tmp_path / "e2e/train.csv").write_text(
      'meaning_representation,human_reference\n"name[A], food[Thai]",A serves Thai.\n'
      '"name[A], food[Thai]",Thai at A.\nname[B],B is a place.\nname[C],C.\nname[D],D.\n')
  rows = load_dataset_rows("e2e_nlg", "train", path=tmp_path / "e2e", shuffle=False)
  assert [r["target"] for r in rows] == ["A serves Thai.", "Thai at A.", "B is a place.", "C.", "D."]
  # no validation split: whole meaning representations are carved when asked
  va = load_dataset_rows("e2e_nlg", "validation", path=tmp_path / "e2e", validation_size=2)
  tr = load_dataset_rows("e2e_nlg", "train", path=tmp_path / "e2e", validation_size=2)
  assert len(va) == 2 and {r["meta"]["mr"] for r in va}.isdisjoint({r["meta"]["mr"] for r in tr})
  assert sum(len(r["references"]) for r in va) + len(tr) == 5
  (tmp_path / "s").mkdir()
  with open(tmp_path / "s/test.jsonl", "w") as f:
    f.write(json.dumps({"id": "7", "dialogue": "A: hi\r\nB: yo", "summary": "Greetings. "}) + "\n")
  r = load_dataset_rows("samsum", "test", path=tmp_path / "s")[0]
  assert r["input"].endswith("A: hi\nB: yo") and r["target"] == "Greetings."


# ----------------------------------------------------------------------------- TFDS

def _tfds():
  try:
    import tensorflow_datasets as tfds
    return tfds
  except ImportError:
    return None


tfds = _tfds()
needs_tfds = pytest.mark.skipif(tfds is None, reason="tensorflow-datasets is not installed "
                                "(pip install 'peft-jax[tfds]')")

if tfds is not None:
  class TinyGlue(tfds.core.GeneratorBasedBuilder):
    """glue/cola's features and splits, a few rows (built locally, nothing downloaded)."""
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="cola")]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "sentence": tfds.features.Text(), "idx": np.int32,
          "label": tfds.features.ClassLabel(names=["unacceptable", "acceptable"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(COLA_TRAIN),
              "validation": self._generate_examples(COLA_DEV),
              "test": self._generate_examples([("", -1, t) for t in COLA_TEST])}

    def _generate_examples(self, rows):
      for i, (_, y, t) in enumerate(rows):
        yield i, {"sentence": t, "idx": i, "label": y}

  class TinySuperGlue(tfds.core.GeneratorBasedBuilder):
    """super_glue/rte's features and splits."""
    VERSION = tfds.core.Version("1.0.3")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="rte")]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(), "idx": np.int32,
          "label": tfds.features.ClassLabel(names=RTE_LABELS)}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(RTE[s]) for s in RTE}

    def _generate_examples(self, rows):
      for i, (p, h, y) in enumerate(rows):
        yield i, {"premise": p, "hypothesis": h, "idx": i, "label": y}

  class TinyAgNewsSubset(tfds.core.GeneratorBasedBuilder):
    """ag_news_subset's features (title, description, label) and splits (train, test)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "title": tfds.features.Text(), "description": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(AG_TRAIN),
              "test": self._generate_examples(AG_TEST)}

    def _generate_examples(self, rows):
      for i, (y, t, d) in enumerate(rows):
        yield i, {"title": t, "description": d, "label": y}


def _build(cls, data_dir, **kw):
  builder = cls(data_dir=str(data_dir), file_format="array_record", **kw)
  builder.download_and_prepare()
  return builder


@needs_tfds
def test_tfds_sources_match_the_original_layouts(tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  _build(TinyGlue, data_dir, config="cola")
  _build(TinySuperGlue, data_dir, config="rte")
  _build(TinyAgNewsSubset, data_dir)
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  cola = _splits("cola", "tfds:tiny_glue/cola", False, validation_size=5,
                 tfds_data_dir=str(data_dir))
  assert cola == _splits("cola", _cola_layout(tmp_path / "CoLA"), False, validation_size=5)
  assert len(cola["validation"]) == 5 and len(cola["test"]) == 3
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))          # the env var instead of the knob
  rte = _splits("rte", "tfds:tiny_super_glue/rte", False)
  assert rte == _splits("rte", _rte_layout(tmp_path / "rte"), False)
  rows = load_dataset_rows("rte", "test", path="tfds:tiny_super_glue/rte:1.0.3")
  assert rows.info["source"].startswith("tfds:tiny_super_glue/rte:1.0.3")
  ag = _splits("ag_news", "tfds:tiny_ag_news_subset/1.0.0", False, validation_size=6)  # version
  assert ag == _splits("ag_news", _ag_layout(tmp_path / "ag"), False, validation_size=6)
  with pytest.raises(DataError, match=r"ag_news: tfds:tiny_ag_news_subset.* has splits "
                                      r"\['test', 'train'\]; expected one named "
                                      r"\['validation', 'val', 'dev'\] for split 'validation'"):
    load_dataset_rows("ag_news", "validation", path="tfds:tiny_ag_news_subset",
                      validation_size=None)


@needs_tfds
def test_tfds_errors_are_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(DataError) as e:
    load_dataset_rows("rte", "train", path="tfds:no_such_tfds_set/rte")
  assert str(e.value).startswith("rte: TFDS has no data set 'no_such_tfds_set/rte'")
  assert "\n" not in str(e.value)
  with pytest.raises(DataError, match=r"rte: TFDS data set 'tiny_super_glue/rte' is not "
                                      r"prepared in .*; expected it built there first"):
    load_dataset_rows("rte", "train", path="tfds:tiny_super_glue/rte")


def test_tfds_missing_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)    # import fails
  with pytest.raises(DataError, match=r"rte: data.path=tfds:super_glue/rte needs "
                                      r"tensorflow-datasets; expected `pip install "
                                      r"'peft-jax\[tfds\]'`"):
    load_dataset_rows("rte", "train", path="tfds:super_glue/rte")
