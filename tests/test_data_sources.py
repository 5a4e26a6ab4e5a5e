"""Loaders for SuperGLUE (BoolQ/RTE/COPA), CNN/DailyMail, AG News, CoLA, E2E NLG, SAMSum
and the registry: real samples in ../shared/data (skipped when absent), tiny files in
the original formats, the `datasets` format, and the error messages."""
import json

import pytest

from peft_jax.data.common import DataError, Rows
from peft_jax.data.sources import DATASETS, TEMPLATES, load_dataset_rows


def _ids(rows, key="input"):
  return [r[key] for r in rows]


# ----------------------------------------------------------------------------- real samples

SHARED_COUNTS = [
    ("boolq", "superglue/boolq", "train", 32), ("boolq", "superglue/boolq", "validation", 3270),
    ("boolq", "superglue/boolq", "dev32", 32),
    ("rte", "superglue/rte", "train", 2490), ("rte", "superglue/rte", "validation", 277),
    ("rte", "superglue/rte", "test", 3000),
    ("copa", "superglue/copa", "train", 32), ("copa", "superglue/copa", "validation", 100),
    ("copa", "superglue/copa", "dev32", 32),
    ("cnn_dailymail", "cnn_dailymail", "train", 100),
    ("ag_news", "ag_news", "test", 7600),
    ("cola", "glue_cola", "train", 7250), ("cola", "glue_cola", "validation", 1301),
    ("cola", "glue_cola", "test", 1043),
    ("e2e_nlg", "e2e_nlg", "validation", 547),
    ("samsum", "samsum", "validation", 818),
]


@pytest.mark.shared_data
@pytest.mark.parametrize("name,folder,split,n", SHARED_COUNTS)
def test_shared_counts_and_row_shape(shared_data, name, folder, split, n):
  rows = load_dataset_rows(name, split, path=shared_data / folder)
  assert isinstance(rows, Rows) and len(rows) == n == rows.info["n"]
  for r in rows[:50]:
    assert isinstance(r["input"], str) and r["input"]
    assert isinstance(r["target"], str) and r["target"]
    assert r["references"] and all(isinstance(x, str) for x in r["references"])
    assert r["meta"]["dataset"] == name


@pytest.mark.shared_data
def test_shared_superglue_exact_text(shared_data):
  rte = {r["meta"]["idx"]: r for r in load_dataset_rows("rte", "validation",
                                                         path=shared_data / "superglue/rte")}
  assert rte[0]["input"] == (
      "rte hypothesis: Christopher Reeve had an accident. premise: Dana Reeve, the widow of "
      "the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
      "Christopher Reeve Foundation.")
  assert rte[0]["target"] == "not_entailment"
  test = load_dataset_rows("rte", "test", path=shared_data / "superglue/rte")
  assert {r["target"] for r in test} == {"<unk>"} and test[0]["meta"]["label"] is None

  copa = {r["meta"]["idx"]: r for r in load_dataset_rows("copa", "validation",
                                                          path=shared_data / "superglue/copa")}
  assert copa[0]["input"] == ("copa choice1: The toilet filled with water. choice2: Water flowed "
                              "from the spout. premise: The man turned on the faucet. "
                              "question: effect")
  assert copa[0]["target"] == "choice2"

  boolq = {r["meta"]["idx"]: r for r in load_dataset_rows("boolq", "validation",
                                                           path=shared_data / "superglue/boolq")}
  with open(shared_data / "superglue/boolq/val.jsonl") as f:
    raw = json.loads(f.readline())
  assert boolq[0]["input"] == f"boolq passage: {raw['passage']} question: {raw['question']}"
  assert boolq[0]["input"].startswith("boolq passage: Ethanol fuel -- All biomass goes through")
  assert boolq[0]["input"].endswith(" question: does ethanol take more energy make that produces")
  assert boolq[0]["target"] == "False"
  labels = [r["target"] for r in boolq.values()]
  assert set(labels) == {"False", "True"}


@pytest.mark.shared_data
def test_shared_seed002_exact_text(shared_data):
  ag = load_dataset_rows("ag_news", "test", path=shared_data / "ag_news", shuffle=False)
  assert ag.info["label_base"] == 0
  assert ag[0]["input"] == (
      "Classify the topic of this news article as one of: World, Sports, Business, Sci/Tech."
      "\n\nbrown in line after livingston sack preston , livingston have sacked allan preston as "
      "manager . the former hearts and st johnstone defender and his assistant , alan kernaghan "
      ", were dismissed after a run of seven defeats left the club")
  assert ag[0]["target"] == "Sports"
  counts = {}
  for r in ag:
    counts[r["target"]] = counts.get(r["target"], 0) + 1
  assert counts == {"World": 1900, "Sports": 1900, "Business": 1900, "Sci/Tech": 1900}

  cola = load_dataset_rows("cola", "validation", path=shared_data / "glue_cola", shuffle=False)
  assert cola[2]["input"] == ("Is the following sentence grammatically acceptable or "
                              "unacceptable?\n\nThe car honked down the road.")
  assert cola[2]["target"] == "unacceptable" and cola[0]["target"] == "acceptable"

  e2e = load_dataset_rows("e2e_nlg", "validation", path=shared_data / "e2e_nlg")
  assert e2e.info["n_pairs"] == 4672
  first = e2e[0]
  assert first["input"] == ("Describe the restaurant from its attributes.\n\n"
                            "name[Alimentum], area[city centre], familyFriendly[no]")
  assert first["references"][:3] == [
      "There is a place in the city centre, Alimentum, that is not family-friendly.",
      "In the city centre there is a venue name Alimentum, this is not a family-friendly venue.",
      "Alimentum is not a family-friendly place, located in city centre."]
  assert first["target"] == first["references"][0]
  assert sum(len(r["references"]) for r in e2e) == 4672
  flat = load_dataset_rows("e2e_nlg", "validation", path=shared_data / "e2e_nlg",
                           group_references=False)
  assert len(flat) == 4672 and all(len(r["references"]) == 1 for r in flat)

  sam = {r["meta"]["id"]: r for r in load_dataset_rows("samsum", "validation",
                                                        path=shared_data / "samsum")}
  r = sam["13817023"]
  assert r["input"].startswith("Summarize the following dialogue.\n\nA: Hi Tom, are you busy "
                               "tomorrow’s afternoon?\nB: I’m pretty sure I am. What’s up?\n")
  assert "\r" not in r["input"]
  assert r["target"] == ("A will go to the animal shelter tomorrow to get a puppy for her son. "
                         "They already visited the shelter last Monday and the son chose the puppy.")

  cnn = {r["meta"]["id"]: r for r in load_dataset_rows("cnn_dailymail", "train",
                                                        path=shared_data / "cnn_dailymail")}
  r = cnn["0001d1afc246a7964130f43ae940af6bc6c57f01"]
  assert r["input"].startswith("summarize: By . Associated Press . PUBLISHED: . 14:11 EST, 25 "
                               "October 2013 .")
  assert r["target"] == (
      "Bishop John Folda, of North Dakota, is taking time off after being diagnosed .\n"
      "He contracted the infection through contaminated food in Italy .\n"
      "Church members in Fargo, Grand Forks and Jamestown could have been exposed .")


@pytest.mark.shared_data
def test_shared_seeded_subsets(shared_data):
  path = shared_data / "ag_news"
  a = load_dataset_rows("ag_news", "test", path=path, seed=1, size="low")
  b = load_dataset_rows("ag_news", "test", path=path, seed=1, size="low")
  c = load_dataset_rows("ag_news", "test", path=path, seed=2, size="low")
  med = load_dataset_rows("ag_news", "test", path=path, seed=1, size="medium")
  assert len(a) == 100 and len(med) == 1000
  assert _ids(a) == _ids(b) and _ids(a) != _ids(c)
  assert _ids(med)[:100] == _ids(a)          # nested: low ⊂ medium for one seed
  high = load_dataset_rows("ag_news", "test", path=path, size="high")
  assert len(high) == 7600 and "only 7600" in high.info["notes"][0]
  # training rows are shuffled by seed; eval rows keep file order unless asked
  t1 = load_dataset_rows("cola", "train", path=shared_data / "glue_cola", seed=0)
  t2 = load_dataset_rows("cola", "train", path=shared_data / "glue_cola", seed=3)
  assert _ids(t1) != _ids(t2) and sorted(_ids(t1)) == sorted(_ids(t2))
  v = load_dataset_rows("cola", "validation", path=shared_data / "glue_cola", seed=3)
  assert v[0]["input"].endswith("Bill broke the bathtub.")
  small = load_dataset_rows("boolq", "train", path=shared_data / "superglue/boolq", size=100)
  assert len(small) == 32 and small.info["n_available"] == 32 and small.info["notes"]


# ----------------------------------------------------------------------------- tiny files

def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


def _jsonl(path, rows):
  return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_superglue_tiny(tmp_path):
  _jsonl(tmp_path / "boolq/train.jsonl", [
      {"question": "is it", "passage": "P1", "label": True, "idx": 0},
      {"question": "is it not", "passage": "P2", "label": False, "idx": 1}])
  _jsonl(tmp_path / "boolq/val.jsonl", [{"question": "q", "passage": "p", "label": 1, "idx": 0}])
  rows = load_dataset_rows("boolq", "train", path=tmp_path / "boolq", shuffle=False)
  assert [(r["input"], r["target"]) for r in rows] == [
      ("boolq passage: P1 question: is it", "True"),
      ("boolq passage: P2 question: is it not", "False")]
  assert load_dataset_rows("boolq", "validation", path=tmp_path / "boolq")[0]["target"] == "True"

  _jsonl(tmp_path / "rte/train.jsonl", [
      {"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": "entailment", "idx": 0},
      {"premise": "A", "hypothesis": "B", "label": 1, "idx": 1}])
  _jsonl(tmp_path / "rte/test.jsonl", [{"premise": "A", "hypothesis": "B", "idx": 0}])
  rows = load_dataset_rows("rte", "train", path=tmp_path / "rte", shuffle=False)
  assert rows[0]["input"] == "rte hypothesis: A person rests. premise: A man sleeps."
  assert [r["target"] for r in rows] == ["entailment", "not_entailment"]
  assert load_dataset_rows("rte", "test", path=tmp_path / "rte")[0]["target"] == "<unk>"

  _jsonl(tmp_path / "copa/train.jsonl", [
      {"premise": "I fell.", "choice1": "I slipped.", "choice2": "I flew.", "question": "cause",
       "label": 0, "idx": 7}])
  r = load_dataset_rows("copa", "train", path=tmp_path / "copa")[0]
  assert r["input"] == "copa choice1: I slipped. choice2: I flew. premise: I fell. question: cause"
  assert r["target"] == "choice1" and r["meta"]["idx"] == 7
  # a single file is read as the requested split; a custom template
  r = load_dataset_rows("copa", "test", path=tmp_path / "copa/train.jsonl",
                        template="{premise} ({question}) 1: {choice1} 2: {choice2}")[0]
  assert r["input"] == "I fell. (cause) 1: I slipped. 2: I flew."


def test_cnn_dailymail_tiny(tmp_path):
  _write(tmp_path / "cnn/train.csv",
         ',id,article,highlights\n0,abc,"An article, with a comma.","Line one .\nLine two ."\n'
         '1,def,Second article.,Short .\n')
  rows = load_dataset_rows("cnn_dailymail", "train", path=tmp_path / "cnn", shuffle=False)
  assert rows[0]["input"] == "summarize: An article, with a comma."
  assert rows[0]["target"] == "Line one .\nLine two ." and rows[0]["meta"]["id"] == "abc"
  assert len(rows) == 2


def test_ag_news_tiny_original_format(tmp_path):
  root = tmp_path / "ag"
  _write(root / "classes.txt", "World\nSports\nBusiness\nSci/Tech\n")
  lines = ['"3","Wall St. Bears Claw Back","Reuters - Short-sellers, Wall Street\'s dwindling band"']
  lines += [f'"{1 + i % 4}","Title {i}","Description {i}"' for i in range(40)]
  _write(root / "train.csv", "\n".join(lines) + "\n")
  _write(root / "test.csv", '"2","Match","A ""great"" game"\n')
  test = load_dataset_rows("ag_news", "test", path=root)
  assert test.info["label_base"] == 1
  assert test[0]["input"] == ("Classify the topic of this news article as one of: World, Sports, "
                              "Business, Sci/Tech.\n\nMatch A \"great\" game")
  assert test[0]["target"] == "Sports"
  # no validation file: carved from train by split_seed, disjoint from train
  tr = load_dataset_rows("ag_news", "train", path=root, validation_size=5)
  va = load_dataset_rows("ag_news", "validation", path=root, validation_size=5)
  assert len(tr) == 36 and len(va) == 5
  assert not set(_ids(tr)) & set(_ids(va))
  assert set(_ids(tr)) | set(_ids(va)) == set(_ids(load_dataset_rows(
      "ag_news", "test", path=root / "train.csv")))
  assert _ids(va) == _ids(load_dataset_rows("ag_news", "validation", path=root, seed=9,
                                            validation_size=5))   # seed-independent
  first = [r for r in load_dataset_rows("ag_news", "test", path=root / "train.csv")
           if "Wall St." in r["input"]][0]
  assert first["target"] == "Business"
  assert first["input"].endswith("\n\nWall St. Bears Claw Back Reuters - Short-sellers, "
                                 "Wall Street's dwindling band")


def test_cola_tiny(tmp_path):
  root = tmp_path / "CoLA"
  rows = ['gj04\t1\t\tThe "quoted" word stays.', "gj04\t0\t*\tWord the order wrong."]
  rows += [f"src\t{i % 2}\t{'' if i % 2 else '*'}\tSentence {i}." for i in range(20)]
  _write(root / "train.tsv", "\n".join(rows) + "\n")
  _write(root / "dev.tsv", "gj04\t0\t*\tThem is here.\n")
  _write(root / "test.tsv", "index\tsentence\n0\tUnlabelled one.\n")
  test = load_dataset_rows("cola", "test", path=root)
  assert [(r["input"], r["target"]) for r in test] == [
      ("Is the following sentence grammatically acceptable or unacceptable?\n\nThem is here.",
       "unacceptable")]
  tr = load_dataset_rows("cola", "train", path=root, shuffle=False, validation_size=4)
  va = load_dataset_rows("cola", "validation", path=root, validation_size=4)
  assert len(tr) == 18 and len(va) == 4 and tr.info["carved_validation"]["n"] == 4
  full = load_dataset_rows("cola", "train", path=root / "train.tsv", shuffle=False)
  assert full[0]["input"].endswith('\n\nThe "quoted" word stays.') and full[0]["target"] == "acceptable"
  unl = load_dataset_rows("cola", "test", path=root / "test.tsv")
  assert unl[0]["target"] == "<unk>" and unl[0]["meta"]["label"] is None


def test_e2e_tiny(tmp_path):
  root = tmp_path / "e2e"
  _write(root / "trainset.csv", 'mr,ref\n"name[A], food[Thai]",A serves Thai food.\n'
         '"name[A], food[Thai]","Thai food, at A."\n"name[B]",B is a place.\n')
  _write(root / "devset.csv", 'mr,ref\n"name[A], food[Thai]",A serves Thai food.\n'
         '"name[B]",B is a place.\n"name[A], food[Thai]","Thai food, at A."\n')
  tr = load_dataset_rows("e2e_nlg", "train", path=root)
  assert len(tr) == 3 and all(len(r["references"]) == 1 for r in tr)
  dev = load_dataset_rows("e2e_nlg", "validation", path=root)
  assert [(r["meta"]["mr"], r["references"]) for r in dev] == [
      ("name[A], food[Thai]", ["A serves Thai food.", "Thai food, at A."]),
      ("name[B]", ["B is a place."])]
  assert dev[0]["input"] == "Describe the restaurant from its attributes.\n\nname[A], food[Thai]"
  with pytest.raises(DataError, match=r"file not found: .*testset_w_refs\.csv"):
    load_dataset_rows("e2e_nlg", "test", path=root)


def test_samsum_tiny_csv_and_json(tmp_path):
  _write(tmp_path / "s/val.csv", 'id,summary,dialogue\n1,Ann says hi. ,"Ann: hi\r\nBob: hey"\n')
  r = load_dataset_rows("samsum", "validation", path=tmp_path / "s")[0]
  assert r["input"] == "Summarize the following dialogue.\n\nAnn: hi\nBob: hey"
  assert r["target"] == "Ann says hi." and r["meta"]["id"] == "1"
  _write(tmp_path / "j/train.json", json.dumps([{"id": "x", "summary": "S.",
                                                   "dialogue": "A: a\r\nB: b"}]))
  r = load_dataset_rows("samsum", "train", path=tmp_path / "j")[0]
  assert r["input"].endswith("A: a\nB: b") and r["target"] == "S."


# ----------------------------------------------------------------------------- errors

def test_errors_are_one_clear_message(tmp_path):
  with pytest.raises(DataError, match=r"unknown data set 'glue'; expected one of \['superni'"):
    load_dataset_rows("glue", "train", path=tmp_path)
  with pytest.raises(DataError, match=r"rte: unknown split 'dev'; expected one of"):
    load_dataset_rows("rte", "dev", path=tmp_path)
  with pytest.raises(DataError, match=r"rte: file not found: .*train\.jsonl; expected train\.jsonl"):
    load_dataset_rows("rte", "train", path=tmp_path)
  with pytest.raises(DataError, match=r"path not found"):
    load_dataset_rows("rte", "train", path=tmp_path / "nope")
  _write(tmp_path / "bad/train.jsonl", '{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{oops\n')
  with pytest.raises(DataError, match=r"train\.jsonl line 2 is not valid JSON"):
    load_dataset_rows("rte", "train", path=tmp_path / "bad")
  _jsonl(tmp_path / "miss/train.jsonl", [{"premise": "a", "label": "entailment"}])
  with pytest.raises(DataError, match=r"line 1 lacks field\(s\) \['hypothesis'\]"):
    load_dataset_rows("rte", "train", path=tmp_path / "miss")
  _jsonl(tmp_path / "lab/train.jsonl", [{"premise": "a", "hypothesis": "b", "label": "maybe"}])
  with pytest.raises(DataError, match=r"has label 'maybe'; expected one of \['entailment', "
                                      r"'not_entailment'\]"):
    load_dataset_rows("rte", "train", path=tmp_path / "lab")
  _write(tmp_path / "c/train.tsv", "src\t1\tonly three fields\n")
  with pytest.raises(DataError, match=r"record 1 has 3 field\(s\); expected 4"):
    load_dataset_rows("cola", "train", path=tmp_path / "c")
  _write(tmp_path / "ag/test.csv", '"7","t","d"\n')
  with pytest.raises(DataError, match=r"has label '7'; expected a class index 1\.\.4"):
    load_dataset_rows("ag_news", "test", path=tmp_path / "ag")
  _write(tmp_path / "s/val.csv", "id,dialogue\n1,hi\n")
  with pytest.raises(DataError, match=r"lacks column\(s\) \['summary'\]"):
    load_dataset_rows("samsum", "validation", path=tmp_path / "s")
  _jsonl(tmp_path / "ok/train.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}])
  with pytest.raises(DataError, match=r"template .* uses an unknown field 'sentence'"):
    load_dataset_rows("rte", "train", path=tmp_path / "ok", template="{sentence}")
  with pytest.raises(DataError, match=r"size='huge' is not understood"):
    load_dataset_rows("rte", "train", path=tmp_path / "ok", size="huge")
  with pytest.raises(DataError, match=r"unexpected keyword"):
    load_dataset_rows("rte", "train", path=tmp_path / "ok", instances_per_task=3)


def test_registry_names_and_env_default(tmp_path, monkeypatch):
  assert set(DATASETS) == {"superni", "tulu", "boolq", "rte", "copa", "cnn_dailymail",
                           "ag_news", "cola", "e2e_nlg", "samsum"}
  assert set(TEMPLATES) <= set(DATASETS)
  monkeypatch.delenv("PEFT_JAX_DATA_DIR", raising=False)
  with pytest.raises(DataError, match=r"no data path given"):
    load_dataset_rows("rte", "train")
  _jsonl(tmp_path / "superglue/rte/train.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}])
  monkeypatch.setenv("PEFT_JAX_DATA_DIR", str(tmp_path))
  assert load_dataset_rows("rte", "train")[0]["target"] == "entailment"
