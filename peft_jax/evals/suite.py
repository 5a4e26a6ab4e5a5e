"""The open-instruct (TULU) evaluation suite on one model: seed 000's Table 3 and more.

:func:`run_suite` runs suite tasks (:data:`peft_jax.evals.benchmarks.SUITE`) with an
:class:`~peft_jax.evals.engine.Engine` and writes, under ``out_dir``::

  suite.json, suite.md          a row per task (its headline and item count), seed 000's
                                Table 3 (the five columns and their average), and each task's
                                breakdowns (per subject / category, per task, per language)
  <task>/settings.json          the task's settings and the model it ran on
  <task>/predictions.jsonl      one line per generated text: {"id", "sample", "output"}, with
                                the prompt on sample 0 (and the choice probabilities for MMLU);
                                the format `python -m peft_jax.evals.score` reads
  <task>/metrics.json           the benchmark's score (headline "score" and breakdowns)
  alpaca_eval/model_outputs.json  AlpacaEval's format, ready for its judge

**Resumable.** Predictions are appended as each batch finishes. A rerun with the same
command reads them back and generates only what is missing (a sample of a HumanEval problem
included: samples are drawn from per-sample keys, so they do not depend on the batch). A
line cut short by a kill is dropped. A rerun with different settings or another model in
the same directory stops with one line instead of mixing predictions.

**Chat format.** ``chat=None`` lets each task use its default; a task whose settings fix
``chat`` (HumanEval: plain prompts as in the TULU job groups; AlpacaEval: the chat template)
keeps it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from peft_jax.config_lib import ConfigError
from peft_jax.data.common import DataError
from peft_jax.evals.benchmarks import SUITE, TABLE3, benchmark

PREDICTIONS = "predictions.jsonl"
#: the settings that subsample items; a smoke run's ``max_examples`` caps each of them
_SUBSAMPLE_KEYS = ("max_num_examples", "max_num_examples_per_task", "max_num_examples_per_lang",
                   "n_instances")


def task_names(spec: str | Sequence[str] | None) -> List[str]:
  """Suite task names from ``"a,b"`` (empty or None: all, in suite order); a benchmark's
  name selects all of its tasks. One ConfigError for an unknown name."""
  if spec is None or spec == "" or spec == []:
    return list(SUITE)
  names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
  out: List[str] = []
  for n in names:
    hit = [n] if n in SUITE else [t for t, task in SUITE.items() if task.benchmark == n]
    if not hit:
      raise ConfigError(f"unknown suite task {n!r}; expected task names {list(SUITE)} or "
                        f"benchmark names {sorted({t.benchmark for t in SUITE.values()})}")
    out += [h for h in hit if h not in out]
  return out


def parse_settings(spec: str, names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
  """``eval.suite_settings`` -> ``{task: {key: value}}`` for the tasks ``names``:
  ``'<task or benchmark>.<key>=<value>; ...'``, values parsed as JSON when they parse (else
  text). One ConfigError for a malformed part or a name that selects none of ``names``."""
  out: Dict[str, Dict[str, Any]] = {}
  for part in (p.strip() for p in (spec or "").split(";")):
    if not part:
      continue
    head, eq, value = part.partition("=")
    who, dot, key = head.strip().rpartition(".")
    if not eq or not dot or not who or not key:
      raise ConfigError(f"eval.suite_settings part {part!r}; expected "
                        "'<task or benchmark>.<key>=<value>'")
    hit = [n for n in names if n == who or SUITE[n].benchmark == who]
    if not hit:
      raise ConfigError(f"eval.suite_settings names {who!r}, which selects none of the tasks "
                        f"that run ({', '.join(names)})")
    try:
      v = json.loads(value)
    except ValueError:
      v = value.strip()
    for n in hit:
      out.setdefault(n, {})[key.strip()] = v
  return out


def task_settings(name: str, chat: Optional[bool] = None, max_examples: int = 0,
                  overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """The settings a suite task runs with: the benchmark's defaults (the TULU jobs'), the
  task's own, ``chat`` unless the task fixes it, ``overrides``, and ``max_examples`` (> 0)
  capping every subsampling setting (smoke runs)."""
  from peft_jax.evals.benchmarks.common import resolve_settings
  task = SUITE[name]
  bench = benchmark(task.benchmark)
  s = dict(task.settings)
  if chat is not None and "chat" not in task.settings:
    s["chat"] = bool(chat)
  s.update(overrides or {})
  s = resolve_settings(bench, s)
  if max_examples > 0:
    for k in _SUBSAMPLE_KEYS:
      if k in s:
        s[k] = min(s[k], max_examples) if s[k] else max_examples
  return s


# ----------------------------------------------------------------------------- predictions

def read_predictions(path: str) -> List[dict]:
  """The lines of a predictions file. Every line is written with its newline in one call,
  so text after the last newline is a line cut short by a kill: it is dropped from the
  file. Any other bad line is one DataError."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    text = f.read()
  whole, _, partial = text.rpartition("\n")
  rows = []
  for i, line in enumerate(whole.split("\n") if whole else []):
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or "id" not in row or "output" not in row:
        raise ValueError("expected an object with 'id' and 'output'")
    except ValueError as e:
      raise DataError(f"{path} line {i + 1}: {e}; remove the file to generate again") from None
    rows.append(row)
  if partial:
    with open(path, "w", encoding="utf-8") as f:
      f.write(whole + "\n" if whole else "")
  return rows


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _check_resume(task_dir: str, record: Dict[str, Any], write: bool = True) -> None:
  """A task directory records what made its predictions; a rerun must match it."""
  record = json.loads(json.dumps(record))       # as the file holds it (tuples are lists)
  path = os.path.join(task_dir, "settings.json")
  if os.path.exists(path):
    with open(path) as f:
      old, new = _flat(json.load(f)), _flat(record)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
      shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:3])
      raise ConfigError(
          f"{task_dir} holds predictions made otherwise ({shown}); pass another --output, "
          "or remove that directory to start over")
  elif write:
    os.makedirs(task_dir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- one task

def run_task(engine, name: str, data_dir: str, out_dir: str, settings: Dict[str, Any],
             model_label: str = "", max_new_tokens: int = 0, say=print) -> Dict[str, Any]:
  """Runs one suite task (resuming), scores it and writes its files; returns the metrics."""
  import dataclasses
  task = SUITE[name]
  bench = benchmark(task.benchmark)
  items = bench.load(data_dir, settings)
  requests = bench.requests(items, settings, engine.tokenizer)
  if max_new_tokens > 0:
    requests = [dataclasses.replace(r, max_new_tokens=min(r.max_new_tokens, max_new_tokens))
                for r in requests]
  task_dir = os.path.join(out_dir, name)
  _check_resume(task_dir, _record(name, settings, model_label, max_new_tokens, engine.seed))
  pred_path = os.path.join(task_dir, PREDICTIONS)
  have: Dict[str, Dict[int, str]] = {}
  for row in read_predictions(pred_path):
    have.setdefault(str(row["id"]), {})[int(row.get("sample", 0))] = row["output"]
  todo, missing = [], {}
  for r in requests:
    got = have.get(r.id, {})
    need = [s for s in range(1 if r.choices else r.n) if s not in got]
    if need:
      todo.append(r)
      missing[r.id] = need
  rows_left = sum(len(v) for v in missing.values())
  if have and rows_left:
    say(f"{name}: resuming, {sum(len(v) for v in have.values())} outputs done, "
        f"{rows_left} to go")

  with open(pred_path, "a", encoding="utf-8") as f:
    def on_result(req, sample, res):
      row = {"id": req.id, "sample": sample}
      row.update(res if isinstance(res, dict) else {"output": res})
      if sample == 0:
        row["prompt"] = req.prompt
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
      f.flush()
      have.setdefault(req.id, {})[sample] = row["output"]

    if todo:
      bar = _bar(rows_left, f"{name}: compiling")
      def progress(n):
        bar.set_description(f"{name}: {'scoring choices' if todo[0].choices else 'generating'}")
        bar.update(n)
      try:
        if todo[0].choices:
          engine.choose(todo, on_result=on_result, progress=progress)
        else:
          engine.generate(todo, samples=missing, on_result=on_result, progress=progress)
      finally:
        bar.close()
  outputs = {r.id: [have[r.id][s] for s in sorted(have.get(r.id, {}))] for r in requests}
  metrics = bench.score(items, outputs, settings)
  if task.benchmark == "alpaca_eval":
    from peft_jax.evals.benchmarks import alpaca_eval
    alpaca_eval.write_model_outputs(
        os.path.join(task_dir, "model_outputs.json"),
        alpaca_eval.model_outputs(items, outputs, settings.get("generator", "peft-jax")))
  metrics = dict(metrics, n_items=len(items))
  with open(os.path.join(task_dir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics


def _record(name, settings, model_label, max_new_tokens, seed) -> Dict[str, Any]:
  return {"task": name, "benchmark": SUITE[name].benchmark, "model": model_label,
          "settings": settings, "max_new_tokens_cap": max_new_tokens, "seed": seed}


def _bar(total: int, desc: str):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


# ----------------------------------------------------------------------------- the suite

def run_suite(engine, data_dir: str, out_dir: str, tasks=None, chat: Optional[bool] = None,
              max_examples: int = 0, max_new_tokens: int = 0, model_label: str = "",
              overrides: Optional[Dict[str, Dict[str, Any]]] = None,
              say: Callable[[str], None] = print) -> Dict[str, Any]:
  """Runs ``tasks`` (names or ``"a,b"``; None: all) and writes the reports (module
  docstring). ``overrides[task]``: settings for one task. Returns suite.json's content."""
  names = task_names(tasks)
  if not os.path.isdir(data_dir):
    raise ConfigError(f"the suite's data directory {data_dir} does not exist; expected the "
                      "layout of open-instruct's data/eval (gsm8k/, bbh/, mmlu/, tydiqa/, "
                      "codex_humaneval/, alpaca_eval/)")
  settings = {n: task_settings(n, chat, max_examples, (overrides or {}).get(n)) for n in names}
  os.makedirs(out_dir, exist_ok=True)
  results: Dict[str, Any] = {}
  for n in names:
    results[n] = run_task(engine, n, data_dir, out_dir, settings[n], model_label,
                          max_new_tokens, say)
    head = results[n].get(SUITE[n].headline)
    say(f"{n}: {SUITE[n].label} = {_pct(head)} ({results[n]['n_items']} items)")
  summary = {"model": model_label, "data_dir": os.path.abspath(data_dir),
             "tasks": {n: {"benchmark": SUITE[n].benchmark, "headline": SUITE[n].headline,
                           "label": SUITE[n].label, "value": results[n].get(SUITE[n].headline),
                           "n_items": results[n]["n_items"], "settings": settings[n]}
                       for n in names},
             "table3": table3(results), "results": results,
             "truncated_prompts": engine.truncated,
             "max_examples": max_examples, "max_new_tokens_cap": max_new_tokens}
  with open(os.path.join(out_dir, "suite.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(out_dir, "suite.md"), "w") as f:
    f.write("\n".join(markdown(summary)) + "\n")
  return summary


def table3(results: Dict[str, Any]) -> Dict[str, Any]:
  """Seed 000's Table 3 from the task results: each column in percent (None when its task
  did not run) and the average of the columns that ran."""
  cols = {}
  for col, metric, task, key in TABLE3:
    v = results.get(task, {}).get(key)
    cols[col] = {"metric": metric, "task": task, "value": None if v is None else 100 * v}
  ran = [c["value"] for c in cols.values() if c["value"] is not None]
  return {"columns": cols, "average": sum(ran) / len(ran) if ran else None,
          "complete": len(ran) == len(TABLE3)}


def _pct(v) -> str:
  return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4f}"
  return "" if v is None else str(v)


def markdown(summary: Dict[str, Any]) -> List[str]:
  """suite.md: the task rows, Table 3, then each task's breakdowns."""
  lines = [f"# open-instruct evaluation suite: {summary['model'] or 'model'}", "",
           f"data: {summary['data_dir']}"]
  if summary.get("max_examples"):
    lines.append(f"smoke run: at most {summary['max_examples']} items per subsample "
                 "setting (not the protocol's numbers)")
  if summary.get("max_new_tokens_cap"):
    lines.append(f"smoke run: at most {summary['max_new_tokens_cap']} new tokens per output")
  if summary.get("truncated_prompts"):
    lines.append(f"{summary['truncated_prompts']} prompts were longer than the model's "
                 "positions and were cut from the left")
  lines += ["", "| task | benchmark | items | metric | value (%) |", "|---|---|---|---|---|"]
  for n, t in summary["tasks"].items():
    lines.append(f"| {n} | {t['benchmark']} | {t['n_items']} | {t['label']} | "
                 f"{_pct(t['value'])} |")
  t3 = summary["table3"]
  lines += ["", "Seed 000, Table 3 (percent):", "",
            "| " + " | ".join(list(t3["columns"]) + ["Average"]) + " |",
            "|" + "---|" * (len(t3["columns"]) + 1),
            "| " + " | ".join(c["metric"] for c in t3["columns"].values()) + " | |",
            "| " + " | ".join("n/a" if c["value"] is None else f"{c['value']:.1f}"
                              for c in t3["columns"].values())
            + f" | {'n/a' if t3['average'] is None else format(t3['average'], '.2f')}"
            + ("" if t3["complete"] else " (of the columns that ran)") + " |"]
  for n, res in summary["results"].items():
    for key, val in res.items():
      if isinstance(val, dict) and val:      # a breakdown
        title, col = _TITLES.get(key, (key.replace("_", " "), key.split("_")[-1]))
        lines += ["", f"## {n}: {title}", ""] + _breakdown(col, val)
  return lines


#: breakdown key -> (section title, first column)
_TITLES = {"per_task": ("per task", "task"), "per_language": ("per language", "language"),
           "subject_acc": ("accuracy per subject", "subject"),
           "subcat_acc": ("accuracy per subcategory", "subcategory"),
           "cat_acc": ("accuracy per category", "category")}


def _breakdown(name: str, table: Dict[str, Any]) -> List[str]:
  rows = sorted(table.items())
  if all(isinstance(v, dict) for _, v in rows):
    cols = [c for c in dict.fromkeys(k for _, v in rows for k in v)
            if all(not isinstance(v.get(c), (dict, list)) for _, v in rows)]
    out = [f"| {name} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    out += [f"| {k} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |" for k, v in rows]
    return out
  return [f"| {name} | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]


# ----------------------------------------------------------------------------- eval.py --suite

def _chat(mode: Optional[bool], ld) -> bool:
  """auto (None): a model tuned on TULU's chat format talks in it; the base alone does not."""
  if mode is not None:
    return mode
  return ld.kind != "base" and ld.cfg.data.get("name") == "tulu"


def _suite_dir(out: str, output: Optional[str], ld) -> str:
  """``--output`` as given, else one directory per evaluated checkpoint under the run's."""
  if output is not None:
    return out
  sub = f"step_{ld.step}" if ld.kind == "workdir" else os.path.basename(
      os.path.normpath(ld.where))
  return os.path.join(out, "suite", sub)


def evaluate_suite(checkpoint: Optional[str], config: Optional[str] = None,
                   overrides=(), step: Optional[str] = None, output: Optional[str] = None,
                   say: Callable[[str], None] = print) -> Dict[str, Any]:
  """``eval.py --suite=tulu``: loads the checkpoint (a workdir's step, an adapter, an HF PEFT
  adapter, or the base model alone), then runs the suite with the config's ``eval.suite_*``
  fields. Bad input is one ConfigError / DataError before any compute."""
  from peft_jax import inputs
  from peft_jax.evals.engine import Engine
  from peft_jax.selection import load_for_eval
  holder: Dict[str, Any] = {}

  def before_weights(cfg, tok, default_out, partial):
    e = cfg.eval
    data_dir = inputs.resolve_path(e.get("suite_data_dir") or "")
    if not data_dir:
      raise ConfigError("eval.suite_data_dir is empty; set --config.eval.suite_data_dir=<dir> "
                        "laid out like open-instruct's data/eval")
    names = task_names(e.get("suite_tasks") or None)
    chat = {"auto": None, "true": True, "false": False}[e.get("suite_chat") or "auto"]
    over = parse_settings(e.get("suite_settings") or "", names)
    holder.update(data_dir=data_dir, names=names, chat_mode=chat, overrides=over)
    if output is None and default_out is None:
      raise ConfigError("--output is required when evaluating the base model alone")
    holder["out"] = inputs.writable_dir(output or default_out, "--output",
                                        "a directory for the suite's reports")
    if not os.path.isdir(data_dir):
      raise ConfigError(f"eval.suite_data_dir {data_dir} does not exist; expected the layout "
                        "of open-instruct's data/eval (gsm8k/, bbh/, mmlu/, tydiqa/, "
                        "codex_humaneval/, alpaca_eval/)")
    out = _suite_dir(holder["out"], output, partial)
    for n in names:         # every task's data and earlier predictions, before the weights
      s = task_settings(n, _chat(chat, partial), int(e.get("suite_max_examples") or 0),
                        over.get(n))
      benchmark(SUITE[n].benchmark).load(data_dir, s)
      _check_resume(os.path.join(out, n), _record(
          n, s, partial.describe(), int(e.get("suite_max_new_tokens") or 0),
          int(cfg.train.seed)), write=False)

  ld = load_for_eval(checkpoint, config, overrides, step=step, say=say,
                     before_weights=before_weights)
  cfg = ld.cfg
  chat = _chat(holder["chat_mode"], ld)
  out = _suite_dir(holder["out"], output, ld)
  engine = Engine(ld.model, ld.params, ld.tokenizer, batch_size=int(cfg.eval.suite_batch_size),
                  seed=int(cfg.train.seed))
  say(f"suite: {ld.describe()}; {'chat' if chat else 'plain'} prompts; "
      f"{len(holder['names'])} tasks; reports in {out}")
  return run_suite(engine, holder["data_dir"], out, holder["names"], chat=chat,
                   max_examples=int(cfg.eval.get("suite_max_examples") or 0),
                   max_new_tokens=int(cfg.eval.get("suite_max_new_tokens") or 0),
                   model_label=ld.describe(), overrides=holder["overrides"],
                   say=say) | {"output": out}
