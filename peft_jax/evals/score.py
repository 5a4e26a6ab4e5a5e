"""Score a predictions file against one open-instruct benchmark, without a model.

  python -m peft_jax.evals.score --benchmark=gsm8k --data_dir=../shared/data/open_instruct_eval \\
      --predictions=preds.jsonl [--setting cot=false] [--setting k=[1,10]]

Each line of the predictions file is ``{"id": ..., "output": ...}`` (other keys are ignored);
an id may have several lines (samples, as HumanEval needs), collected in file order. Ids
are strings (an integer id is read as its decimal string). Blank lines are skipped.

The scorer loads every item of the benchmark (``load(..., subsample=False)``), so any id
of the data can be scored, and scores the ids present in the file with the benchmark's
own ``score``; the benchmark modules decide the metric (:mod:`peft_jax.evals.benchmarks`).
``--setting key=value`` overrides one of the benchmark's settings (the value is JSON, or
else taken as a string), e.g. ``--setting k=[1,10]``.

Prints readable lines, then as the last line one JSON object: ``"score"`` (the headline,
in [0, 1]) with the benchmark's breakdowns beside it. A bad input (unknown benchmark or
setting, missing file, a line that is not JSON or lacks ``id``/``output``, an id not in the
data) is one ``error: ...`` line on stderr and exit status 2 (:func:`peft_jax.cli.run_cli`).
:func:`score_file` and :func:`read_predictions` are the same steps for the suite.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from peft_jax.config_lib import ConfigError
from peft_jax.data.common import DataError
from peft_jax.evals import benchmarks
from peft_jax.evals.benchmarks import common


def read_predictions(path: str) -> Dict[str, List[str]]:
  """``{id: [output, ...]}`` from a predictions JSONL file, outputs in file order; a
  :class:`DataError` names the file and line of a bad line, or says the file is empty."""
  preds: Dict[str, List[str]] = {}
  for n, row in common.read_jsonl(path, allow_blank=True,
                                     what="a predictions file (JSONL)"):
    where = f"{path}:{n}"
    common.require_keys(row, ("id", "output"), where)
    pid, out = row["id"], row["output"]
    if isinstance(pid, int) and not isinstance(pid, bool):
      pid = str(pid)
    if not isinstance(pid, str):
      raise DataError(f"{where}: id {pid!r} is a {type(pid).__name__}; expected a string")
    if not isinstance(out, str):
      raise DataError(f"{where}: output is a {type(out).__name__}; expected a string")
    preds.setdefault(pid, []).append(out)
  if not preds:
    raise DataError(f"{path}: no predictions; expected lines of {{\"id\": ..., \"output\": ...}}")
  return preds


def get_benchmark(name: str):
  """The ``BENCHMARK`` of a scoring name; an unknown name is a :class:`ConfigError`."""
  if name not in benchmarks.MODULES:
    raise ConfigError(f"unknown benchmark {name!r}; expected one of "
                      f"{', '.join(sorted(benchmarks.MODULES))}")
  try:
    return benchmarks.benchmark(name)
  except ModuleNotFoundError as e:
    if e.name != benchmarks.MODULES[name]:
      raise
    raise ConfigError(f"benchmark {name!r} is not implemented in this checkout "
                      f"({e.name} is missing)") from None


def score_outputs(bm, items: Sequence[Mapping[str, Any]], outputs: Mapping[str, List[str]],
                  settings: Mapping[str, Any]) -> Dict[str, Any]:
  """``bm.score`` of the items ``outputs`` covers, after checking that every id in
  ``outputs`` is an item's id (a predictions file of a subsample scores that subsample)."""
  common.check_ids(items, outputs, bm.name)
  return bm.score([it for it in items if it["id"] in outputs], outputs, settings)


def score_file(benchmark: str, data_dir: str, predictions_path: str,
               settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """The benchmark's score dict for a predictions file (``settings`` overrides the
  benchmark's defaults), with ``benchmark`` added."""
  bm = get_benchmark(benchmark)
  resolved = common.resolve_settings(bm, settings)
  outputs = read_predictions(predictions_path)
  items = bm.load(data_dir, resolved, subsample=False)
  return {"benchmark": bm.name, **score_outputs(bm, items, outputs, resolved)}


def parse_settings(pairs: Sequence[str]) -> Dict[str, Any]:
  """``["key=value", ...]`` -> dict; values are JSON (``8``, ``true``, ``[1,10]``, ``null``),
  anything that is not JSON is a string."""
  out = {}
  for pair in pairs:
    key, sep, raw = pair.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"--setting {pair!r}: expected key=value, e.g. --setting n_shot=8")
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    out[key.strip()] = value
  return out


def summary_lines(result: Mapping[str, Any]) -> List[str]:
  """Readable lines: one per number, an indented block per breakdown dict."""
  lines = []
  for key, value in result.items():
    if isinstance(value, dict):
      lines.append(f"{key}:")
      lines.extend(f"  {k}: {_fmt(v)}" for k, v in value.items())
    else:
      lines.append(f"{key}: {_fmt(value)}")
  return lines


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4f}"
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(value)
  return str(value)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("benchmark", None, f"one of {', '.join(sorted(benchmarks.MODULES))}")
  flags.DEFINE_string("data_dir", None, "the benchmark data folder, laid out like "
                      "../shared/data/open_instruct_eval")
  flags.DEFINE_string("predictions", None, "a JSONL file of {\"id\": ..., \"output\": ...} lines")
  flags.DEFINE_multi_string("setting", [], "key=value (JSON value) overriding one of the "
                            "benchmark's settings; repeatable")
  flags.mark_flags_as_required(["benchmark", "data_dir", "predictions"])
  return flags.FLAGS


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {' '.join(argv[1:])}; expected only flags")
  result = score_file(FLAGS.benchmark, FLAGS.data_dir, FLAGS.predictions,
                      parse_settings(FLAGS.setting))
  print("\n".join(summary_lines(result)))
  print(json.dumps(result))


if __name__ == "__main__":
  from peft_jax.cli import run_cli
  _define_flags()
  run_cli(main)
