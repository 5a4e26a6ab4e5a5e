"""Super-NaturalInstructions loader: the real sample (15 task files + the default split
lists) and a tiny natural-instructions layout written to tmp_path."""
import json

import pytest

from peft_jax.data.common import DataError
from peft_jax.data.sources import load_dataset_rows
from peft_jax.data.superni import superni_prompt, task_lists


# ----------------------------------------------------------------------------- real sample

@pytest.mark.shared_data
def test_shared_task_split_counts(shared_data):
  lists = task_lists(str(shared_data / "superni"))
  assert len(lists["train"]) == 706 and len(lists["validation"]) == 50
  assert len(lists["test"]) == 119
  assert not set(lists["train"]) & set(lists["validation"])
  with open(shared_data / "superni/splits/train_tasks.txt") as f:
    assert set(lists["train"]) | set(lists["validation"]) == {ln.strip() for ln in f if ln.strip()}
  # split_seed fixes the task split; num_train_tasks subsets are nested
  assert task_lists(str(shared_data / "superni"), split_seed=1)["validation"] != lists["validation"]
  t50 = task_lists(str(shared_data / "superni"), num_train_tasks=50)["train"]
  t100 = task_lists(str(shared_data / "superni"), num_train_tasks=100)["train"]
  assert len(t50) == 50 and set(t50) < set(t100) < set(lists["train"])


@pytest.mark.shared_data
def test_shared_rows_counts_and_missing_tasks(shared_data):
  path = shared_data / "superni"
  tr = load_dataset_rows("superni", "train", path=path)
  va = load_dataset_rows("superni", "validation", path=path)
  te = load_dataset_rows("superni", "test", path=path)
  un = load_dataset_rows("superni", "train_unseen", path=path)
  assert (tr.info["n_tasks_listed"], tr.info["n_missing_tasks"], tr.info["n_tasks_loaded"]) == (706, 697, 9)
  assert (va.info["n_tasks_listed"], va.info["n_missing_tasks"], va.info["n_tasks_loaded"]) == (50, 49, 1)
  assert (te.info["n_tasks_listed"], te.info["n_missing_tasks"], te.info["n_tasks_loaded"]) == (119, 114, 5)
  assert len(te.info["missing_tasks"]) == 114
  sizes = {}
  for name in {r["meta"]["task"] for r in tr} | {r["meta"]["task"] for r in va} | {r["meta"]["task"] for r in te}:
    with open(path / "tasks" / f"{name}.json") as f:
      sizes[name] = len(json.load(f)["Instances"])
  for rows in (tr, va, te):
    per = {}
    for r in rows:
      per[r["meta"]["task"]] = per.get(r["meta"]["task"], 0) + 1
    assert per == {t: min(100, sizes[t]) for t in per}
  assert len(tr) == 894 and len(va) == 100 and len(te) == 500 and len(un) == 242
  # unseen instances of training tasks never overlap the training instances
  assert not {r["meta"]["id"] for r in tr} & {r["meta"]["id"] for r in un}
  assert {r["meta"]["task"] for r in un} <= {r["meta"]["task"] for r in tr}


@pytest.mark.shared_data
def test_shared_exact_prompt_and_metadata(shared_data):
  te = load_dataset_rows("superni", "test", path=shared_data / "superni")
  row = {r["meta"]["id"]: r for r in te}["task648-f3b6e5ecf0d54875b47af379a505cfd2"]
  assert row["input"] == (
      "Definition: You will see a sentence and a given pronoun. Answer with the word in the "
      "sentence to which the pronoun is referring.\n\n"
      "Now complete the following example -\nInput: text: the city councilmen refused the "
      "demonstrators a permit because they feared violence.; pronoun: they.\nOutput: ")
  assert row["target"] == "the city councilmen" and row["references"] == ["the city councilmen"]
  assert row["meta"]["category"] == "Coreference Resolution"
  one = load_dataset_rows("superni", "test", path=shared_data / "superni",
                          tasks=["task1426_country_independence_year"])
  row = {r["meta"]["id"]: r for r in one}["task1426-c8513878f1294b119e65580761fce73a"]
  assert row["input"] == (
      "Definition: In this task, you are given a country name, and you need to return the year "
      "in which the country became independent. Independence is a nation's independence or "
      "statehood, usually after ceasing to be a group or part of another nation or state, or "
      "more rarely after the end of military occupation.\n\n"
      "Now complete the following example -\nInput: Afghanistan.\nOutput: ")
  assert row["target"] == "1919" and row["references"] == ["1919"]
  assert row["meta"]["task"] == "task1426_country_independence_year"
  assert row["meta"]["category"] == "Misc."
  assert {r["meta"]["task"] for r in te} == {
      "task121_zest_text_modification", "task1562_zest_text_modification",
      "task393_plausible_result_generation", "task648_answer_generation",
      "task891_gap_coreference_resolution"}
  # test instances are each task's first 100 (190 in the file), independent of the seed
  with open(shared_data / "superni/tasks/task1426_country_independence_year.json") as f:
    first100 = [i["id"] for i in json.load(f)["Instances"][:100]]
  assert [r["meta"]["id"] for r in one] == first100
  te5 = load_dataset_rows("superni", "test", path=shared_data / "superni", seed=5)
  assert [r["input"] for r in te5] == [r["input"] for r in te]


@pytest.mark.shared_data
def test_shared_seeded_instances(shared_data):
  path = shared_data / "superni"
  a = load_dataset_rows("superni", "train", path=path, seed=0)
  b = load_dataset_rows("superni", "train", path=path, seed=0)
  c = load_dataset_rows("superni", "train", path=path, seed=1)
  assert [r["input"] for r in a] == [r["input"] for r in b]
  assert {r["meta"]["id"] for r in a} != {r["meta"]["id"] for r in c}
  k = load_dataset_rows("superni", "train", path=path, instances_per_task=10, size=50, seed=3)
  assert len(k) == 50 and k.info["n_available"] == 90


# ----------------------------------------------------------------------------- tiny layout

def _task(name, definition, instances, categories=("Misc.",)):
  return {"Definition": definition, "Categories": list(categories), "Positive Examples": [],
          "Negative Examples": [], "Instances": instances, "Input_language": ["English"]}


def _layout(root, train_tasks, test_tasks, files):
  (root / "splits/default").mkdir(parents=True)
  (root / "tasks").mkdir()
  (root / "splits/default/train_tasks.txt").write_text("\n".join(train_tasks) + "\n")
  (root / "splits/default/test_tasks.txt").write_text("\n".join(test_tasks) + "\n")
  for name, data in files.items():
    (root / "tasks" / f"{name}.json").write_text(json.dumps(data))
  return root


def _insts(prefix, n, outs=None):
  return [{"id": f"{prefix}-{i}", "input": f"x{i}", "output": outs or [f"y{i}"]} for i in range(n)]


def test_prompt_template_rules():
  assert superni_prompt(["Say hi"], "  Hello?  ") == (
      "Definition: Say hi.\n\nNow complete the following example -\nInput: Hello?\nOutput: ")
  assert superni_prompt("Answer!", "") == (
      "Definition: Answer!\n\nNow complete the following example -\nInput: .\nOutput: ")


def test_tiny_layout_splits(tmp_path):
  files = {f"task{i}_t": _task(f"task{i}_t", [f"Do thing {i}"], _insts(f"t{i}", 30),
                               categories=["Cat A" if i % 2 else "Cat B"]) for i in range(6)}
  files["task9_test"] = _task("task9_test", ["Test it."], _insts("t9", 120, ["a", "b"]))
  root = _layout(tmp_path / "ni", [f"task{i}_t" for i in range(6)] + ["task7_missing"],
                 ["task9_test"], files)
  kw = dict(path=root, n_validation_tasks=2, instances_per_task=10)
  tr = load_dataset_rows("superni", "train", **kw)
  va = load_dataset_rows("superni", "validation", **kw)
  un = load_dataset_rows("superni", "train_unseen", **kw)
  te = load_dataset_rows("superni", "test", **kw)
  assert va.info["n_tasks_listed"] == 2
  assert tr.info["n_tasks_listed"] + va.info["n_tasks_listed"] == 7
  assert tr.info["n_missing_tasks"] + va.info["n_missing_tasks"] == 1
  assert len(tr) + len(va) == 60
  assert len(un) == len(tr) and not {r["meta"]["id"] for r in tr} & {r["meta"]["id"] for r in un}
  idx = [int(r["meta"]["id"].split("-")[1]) for r in te]
  assert len(idx) == 10 and idx == sorted(idx) and max(idx) < 100   # a subset of the first 100
  te100 = load_dataset_rows("superni", "test", path=root, instances_per_task=500)
  assert [r["meta"]["id"] for r in te100] == [f"t9-{i}" for i in range(100)]
  assert te[0]["references"] == ["a", "b"] and te[0]["target"] == "a"
  assert {r["target"] for r in tr} == {r["references"][0] for r in tr}
  r = tr[0]
  assert r["input"].startswith("Definition: Do thing ") and r["meta"]["category"] in ("Cat A", "Cat B")
  # custom task list, and all-missing is an error
  only = load_dataset_rows("superni", "test", path=root, tasks=["task1_t"])
  assert len(only) == 30 and only.info["n_tasks_loaded"] == 1
  with pytest.raises(DataError, match=r"none of the 1 test task files exist"):
    load_dataset_rows("superni", "test", path=root, tasks=["task_nope"])


def test_tiny_layout_errors(tmp_path):
  with pytest.raises(DataError, match=r"task folder not found: .*tasks; expected the "
                                      r"natural-instructions layout"):
    load_dataset_rows("superni", "train", path=tmp_path)
  root = _layout(tmp_path / "ni", ["task1_bad"], ["task1_bad"], {})
  (root / "tasks/task1_bad.json").write_text(json.dumps({"Definition": ["d"]}))
  with pytest.raises(DataError, match=r"task1_bad\.json lacks 'Instances'"):
    load_dataset_rows("superni", "test", path=root)
  (root / "tasks/task1_bad.json").write_text("{not json")
  with pytest.raises(DataError, match=r"is not valid JSON"):
    load_dataset_rows("superni", "test", path=root)
  with pytest.raises(DataError, match=r"unknown split 'dev'"):
    load_dataset_rows("superni", "dev", path=root)
  (root / "splits/default/test_tasks.txt").unlink()
  with pytest.raises(DataError, match=r"split list not found"):
    load_dataset_rows("superni", "test", path=root)


def test_hf_flat_format():
  datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")
  ds = datasets.Dataset.from_dict({
      "task_name": ["task1_a", "task1_a", "task2_b"], "id": ["1", "2", "3"],
      "definition": ["Copy the input", "Copy the input", "Negate."],
      "inputs": ["hi", "yo", "yes"], "targets": ["hi", "yo", "no"]})
  rows = load_dataset_rows("superni", "test", path=ds)
  assert [r["target"] for r in rows] == ["hi", "yo", "no"]
  assert rows[0]["input"] == superni_prompt("Copy the input", "hi")
  assert rows.info["n_tasks_loaded"] == 2


# ----------------------------------------------------------------------------- Figure 3: task counts

@pytest.mark.shared_data
def test_shared_num_train_tasks_nested_chain(shared_data):
  """Every smaller task set is inside every larger one (one split_seed), the validation
  tasks never move, and another split_seed draws other sets."""
  root = str(shared_data / "superni")
  full = task_lists(root)
  sizes = (1, 10, 50, 100, 300, 706)
  sets = [task_lists(root, num_train_tasks=n) for n in sizes]
  for n, lists in zip(sizes, sets):
    assert len(lists["train"]) == n and lists["validation"] == full["validation"]
    assert lists["train"] == [t for t in full["train"] if t in set(lists["train"])]  # list order kept
  for small, big in zip(sets, sets[1:]):
    assert set(small["train"]) <= set(big["train"])
  assert sets[-1]["train"] == full["train"]
  assert task_lists(root, num_train_tasks=50, split_seed=1)["train"] != sets[2]["train"]
  with pytest.raises(DataError, match=r"num_train_tasks=707; expected 1\.\.706"):
    task_lists(root, num_train_tasks=707)


def test_tiny_layout_num_train_tasks_nested(tmp_path):
  names = [f"task{i}_t" for i in range(12)]
  files = {n: _task(n, [f"Do {n}"], _insts(n, 5)) for n in names}
  root = _layout(tmp_path / "ni", names, ["task0_t"], files)
  kw = dict(path=root, n_validation_tasks=2, instances_per_task=5)
  val = {r["meta"]["task"] for r in load_dataset_rows("superni", "validation", **kw)}
  prev = set()
  for n in range(1, 11):
    rows = load_dataset_rows("superni", "train", num_train_tasks=n, **kw)
    tasks = {r["meta"]["task"] for r in rows}
    assert len(tasks) == n and len(rows) == 5 * n and prev <= tasks and not tasks & val
    prev = tasks
  # the validation split does not depend on num_train_tasks
  assert {r["meta"]["task"] for r in load_dataset_rows("superni", "validation", num_train_tasks=3,
                                                       **kw)} == val
  # another split_seed: another (still nested) chain
  other = [{r["meta"]["task"] for r in load_dataset_rows(
      "superni", "train", num_train_tasks=n, split_seed=7, **{**kw})} for n in (3, 6)]
  assert other[0] <= other[1]
  with pytest.raises(DataError, match=r"num_train_tasks=11; expected 1\.\.10"):
    load_dataset_rows("superni", "train", num_train_tasks=11, **kw)


def test_hf_num_train_tasks_nested():
  datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")
  names = [f"task{i}_x" for i in range(8)]
  ds = datasets.Dataset.from_dict({
      "task_name": names, "id": [str(i) for i in range(8)], "definition": ["Copy."] * 8,
      "inputs": [f"in{i}" for i in range(8)], "targets": [f"out{i}" for i in range(8)]})
  got = [{r["meta"]["task"] for r in load_dataset_rows("superni", "train", path=ds,
                                                       num_train_tasks=n)} for n in (2, 5, 8)]
  assert [len(g) for g in got] == [2, 5, 8] and got[0] <= got[1] <= got[2]
