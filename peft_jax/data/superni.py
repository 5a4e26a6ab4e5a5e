"""Super-NaturalInstructions (allenai/natural-instructions layout) as text-to-text rows.

Layout read: ``<root>/tasks/<task>.json`` and the default split lists
``<root>/splits/default/{train,test}_tasks.txt`` (``<root>/splits/{train,test}_tasks.txt``
is accepted too).

Splits (seed 000's setup):

* ``train`` / ``validation``: the default train task list (756 names in the released
  split file) is divided by ``split_seed`` into ``n_validation_tasks`` (50) validation
  tasks and the rest (706) training tasks; ``num_train_tasks`` keeps a ``split_seed``-
  chosen subset of the training tasks, nested: the first N of one fixed permutation, so
  for one ``split_seed`` the 50 tasks are among the 100, the 100 among the 200 (seed 000's
  Figure 3; from a ``datasets`` source, the subset of its train split's sorted task
  names). The validation tasks do not change with N. Per task,
  ``instances_per_task`` (100) instances are drawn by ``seed``.
* ``train_unseen``: the training tasks' *next* ``instances_per_task`` instances of the
  same per-task permutation, disjoint from ``train`` (seed 000's task-level
  memorisation test).
* ``test``: the 119 English test tasks; per task the first 100 instances, which the
  natural-instructions authors put first and label-balanced (Tk-Instruct
  ``ni_dataset.py``); fewer when ``instances_per_task`` < 100 (a seeded subset of them).

Prompt: Tk-Instruct's definition-only encoding (``ni_collator.py`` with
``add_task_definition=True``, no examples), character for character::

    "Definition: " + definition.strip() [+ "." if it does not end in punctuation] + "\\n\\n"
    + "Now complete the following example -\\n"
    + "Input: " + input.strip() [+ "." if it does not end in punctuation] + "\\n"
    + "Output: "

(note the trailing space after ``Output:``, kept as in Tk-Instruct). Target: for
``train`` one of the instance's outputs chosen by ``seed`` (Tk-Instruct picks one at
random); for the other splits the first output. ``references`` holds all outputs.
``meta``: ``task``, ``category`` (``Categories[0]``), ``categories``, ``id``.

Task files listed in a split but absent are skipped; their names and count are in
``rows.info['missing_tasks']`` / ``['n_missing_tasks']`` and logged.
"""

from __future__ import annotations

import json
import os
import string
from typing import Dict, List, Optional, Sequence

from peft_jax.fields import Field

from peft_jax.data.common import (COMMON_KNOBS, DataError, Rows, carve, check_split, get_field, hf_examples,
                                  is_hf_source, logger, make_row, resolve_root, rng_for,
                                  subsample)

DATASET = "superni"
SPLITS = ("train", "validation", "test", "train_unseen")
TEST_POOL = 100  # first instances of a test task (label-balanced by the authors)

#: the options of :func:`load_superni` (``--config.data.<knob>``)
KNOBS = {
    **COMMON_KNOBS,
    "instances_per_task": Field(100, "instances drawn per task (by data.seed)", ge=1),
    "n_validation_tasks": Field(50, "training tasks held out (by split_seed) for validation",
                                ge=0),
    "num_train_tasks": Field(None, "keep this many training tasks (a nested split_seed "
                             "subset; seed 000's Figure 3)", "int", ge=1),
    "tasks": Field(None, "an explicit task list instead of the split's", "strs"),
}


def _end_punct(s: str) -> str:
  return s if s and s[-1] in string.punctuation else s + "."


def superni_prompt(definition, task_input: str) -> str:
  """Tk-Instruct's definition-only source text (see the module docstring)."""
  if isinstance(definition, (list, tuple)):
    definition = definition[0] if definition else ""
  d = _end_punct("Definition: " + str(definition).strip()) + "\n\n"
  x = _end_punct("Now complete the following example -\n" + f"Input: {task_input.strip()}")
  return d + x + "\n" + "Output: "


def _split_file(root: str, which: str) -> str:
  for cand in (os.path.join(root, "splits", "default", f"{which}_tasks.txt"),
               os.path.join(root, "splits", f"{which}_tasks.txt")):
    if os.path.isfile(cand):
      return cand
  raise DataError(f"{DATASET}: split list not found: {root}/splits/default/{which}_tasks.txt; "
                  f"expected the natural-instructions layout (tasks/<name>.json and "
                  f"splits/default/{{train,test}}_tasks.txt)")


def read_task_list(path: str) -> List[str]:
  with open(path, encoding="utf-8") as f:
    return [ln.strip() for ln in f if ln.strip()]


def task_lists(root: str, *, n_validation_tasks: int = 50, num_train_tasks: Optional[int] = None,
               split_seed: int = 0) -> Dict[str, List[str]]:
  """{'train', 'validation', 'test'}: task names, as the module docstring describes."""
  train_all = read_task_list(_split_file(root, "train"))
  test = read_task_list(_split_file(root, "test"))
  if not 0 <= n_validation_tasks < len(train_all):
    raise DataError(f"{DATASET}: n_validation_tasks={n_validation_tasks}; expected 0 <= n < "
                    f"{len(train_all)} (the number of listed training tasks)")
  train, val = carve(train_all, n_validation_tasks, split_seed, "superni-validation-tasks")
  if num_train_tasks is not None:
    train = nested_tasks(train, num_train_tasks, split_seed)
  return {"train": train, "validation": val, "test": test}


def nested_tasks(names: Sequence[str], n: int, split_seed: int = 0) -> List[str]:
  """``n`` of ``names`` (in their listed order): the first ``n`` of one ``split_seed``
  permutation of the list, so for one list and seed a smaller set is always a subset of
  a larger one (Figure 3's growing task counts)."""
  names = list(names)
  if not 1 <= n <= len(names):
    raise DataError(f"{DATASET}: num_train_tasks={n}; expected 1..{len(names)} (the number "
                    f"of training tasks)")
  order = rng_for(split_seed, "superni-num-train-tasks").permutation(len(names))
  return [names[i] for i in sorted(order[:n].tolist())]


def read_task(path: str, task: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{DATASET}: {path} is not valid JSON ({e.msg} at line {e.lineno}); "
                    f"expected a natural-instructions task object") from None
  for key in ("Definition", "Instances"):
    if key not in data:
      raise DataError(f"{DATASET}: {path} lacks {key!r}; expected a natural-instructions task "
                      f"with Definition, Categories and Instances [{{id, input, output: [..]}}]")
  for i, inst in enumerate(data["Instances"]):
    if not isinstance(inst, dict) or "input" not in inst or "output" not in inst:
      raise DataError(f"{DATASET}: {path} instance {i} is malformed; expected "
                      f"{{'id', 'input': str, 'output': [str, ...]}}")
  data["Task"] = task
  return data


def _select(instances: List[dict], split: str, task: str, seed: int, k: int) -> List[dict]:
  if split == "test":
    pool = instances[:TEST_POOL]
    if k >= len(pool):
      return list(pool)
    order = rng_for(seed, "superni-test", task).permutation(len(pool))
    return [pool[i] for i in sorted(order[:k].tolist())]
  order = rng_for(seed, "superni-instances", task).permutation(len(instances))
  lo = k if split == "train_unseen" else 0
  return [instances[i] for i in order[lo:lo + k]]


def _rows_for_task(task_data: dict, split: str, seed: int, k: int, info: dict) -> List[dict]:
  task = task_data["Task"]
  cats = list(task_data.get("Categories") or [])
  out = []
  for inst in _select(task_data["Instances"], split, task, seed, k):
    outputs = inst["output"]
    if isinstance(outputs, str):
      outputs = [outputs]
    if not outputs:
      info["skipped_instances"] = info.get("skipped_instances", 0) + 1
      continue
    if split == "train":
      target = outputs[int(rng_for(seed, "superni-target", str(inst.get("id", ""))).integers(len(outputs)))]
    else:
      target = outputs[0]
    out.append(make_row(superni_prompt(task_data["Definition"], inst["input"]), target.strip(),
                        [o for o in outputs], dataset=DATASET, task=task,
                        category=cats[0] if cats else None, categories=cats,
                        id=inst.get("id")))
  return out


def _from_hf(path, split, hf_config, hf_split, seed, k, info, num_train_tasks=None,
             split_seed=0) -> List[dict]:
  exs, _, desc = hf_examples(path, split, DATASET, hf_config, hf_split)
  info["source"] = desc
  by_task: Dict[str, dict] = {}
  expected = ("Tk-Instruct's builder fields (Task, Definition, Categories, Instance{input, "
              "output}) or the flat fields (task_name, definition, inputs, targets)")
  for ex in exs:
    where = f"example {ex['_line']}"
    if "Instance" in ex:
      task = get_field(ex, ("Task",), DATASET, where, expected)
      inst = ex["Instance"]
      defin = ex.get("Definition", "")
      cats = ex.get("Categories") or []
    else:
      task = get_field(ex, ("task_name", "task"), DATASET, where, expected)
      defin = get_field(ex, ("definition",), DATASET, where, expected)
      inputs = get_field(ex, ("inputs", "input"), DATASET, where, expected)
      targets = get_field(ex, ("targets", "output", "outputs"), DATASET, where, expected)
      inst = {"id": ex.get("id"), "input": inputs,
              "output": targets if isinstance(targets, list) else [targets]}
      cats = ex.get("categories") or []
    t = by_task.setdefault(task, {"Task": task, "Definition": defin, "Categories": cats,
                                  "Instances": []})
    t["Instances"].append(inst)
  names = list(by_task)
  if split == "train" and num_train_tasks is not None:   # nested, over the sorted task names
    names = nested_tasks(sorted(names), num_train_tasks, split_seed)
  rows = []
  for task in names:
    rows.extend(_rows_for_task(by_task[task], split, seed, k, info))
  info["n_tasks_loaded"] = len(names)
  return rows


def load_superni(split: str, *, path=None, seed: int = 0, size=None,
                 instances_per_task: int = 100, n_validation_tasks: int = 50,
                 num_train_tasks: Optional[int] = None, split_seed: int = 0,
                 shuffle: Optional[bool] = None, tasks: Optional[Sequence[str]] = None,
                 hf_config: Optional[str] = None, hf_split: Optional[str] = None) -> Rows:
  """Rows for ``split`` (see the module docstring). ``tasks`` overrides the task list.
  ``size`` caps the total number of rows (a ``seed``-chosen subset)."""
  check_split(split, SPLITS, DATASET)
  if instances_per_task < 1:
    raise DataError(f"{DATASET}: instances_per_task={instances_per_task}; expected >= 1")
  shuffle = (split == "train") if shuffle is None else shuffle
  info = {"dataset": DATASET, "split": split, "seed": seed,
          "instances_per_task": instances_per_task,
          "template": "Tk-Instruct definition-only (Definition: ...\\n\\nNow complete the "
                      "following example -\\nInput: ...\\nOutput: )"}
  root = resolve_root(path, DATASET, "superni")
  if is_hf_source(root):
    rows = _from_hf(root, split, hf_config, hf_split, seed, instances_per_task, info,
                    num_train_tasks, split_seed)
  else:
    root = os.fspath(root)
    tasks_dir = os.path.join(root, "tasks")
    if not os.path.isdir(tasks_dir):
      raise DataError(f"{DATASET}: task folder not found: {tasks_dir}; expected the "
                      f"natural-instructions layout (tasks/<name>.json, splits/default/...)")
    if tasks is None and split == "test":
      names = read_task_list(_split_file(root, "test"))
    elif tasks is None:
      lists = task_lists(root, n_validation_tasks=n_validation_tasks,
                         num_train_tasks=num_train_tasks, split_seed=split_seed)
      names = lists["train" if split == "train_unseen" else split]
    else:
      names = list(tasks)
    info.update(source=root, n_tasks_listed=len(names))
    rows, missing = [], []
    for name in names:
      fp = os.path.join(tasks_dir, name + ".json")
      if not os.path.isfile(fp):
        missing.append(name)
        continue
      rows.extend(_rows_for_task(read_task(fp, name), split, seed, instances_per_task, info))
    info.update(missing_tasks=missing, n_missing_tasks=len(missing),
                n_tasks_loaded=len(names) - len(missing))
    if missing:
      logger.warning("%s/%s: %d of %d listed task files are missing under %s; skipped them",
                     DATASET, split, len(missing), len(names), tasks_dir)
    if names and not info["n_tasks_loaded"]:
      raise DataError(f"{DATASET}: none of the {len(names)} {split} task files exist under "
                      f"{tasks_dir}; expected files named <task>.json from the split list")
  rows = subsample(rows, size, seed, shuffle=shuffle, what="rows", info=info)
  info["n"] = len(rows)
  return Rows(rows, info)
