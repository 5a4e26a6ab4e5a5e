"""Evaluate a run's checkpoint (the best on validation by default) or an adapter on a split.

  python eval.py --checkpoint=/tmp/quickstart                    # best checkpoint, validation
  python eval.py --checkpoint=/tmp/quickstart --split=test       # seed 000's reported number
  python eval.py --checkpoint=/tmp/quickstart --step=last        # or --step=N
  python eval.py --config=configs/quickstart.py --checkpoint=/tmp/quickstart/adapter

``--checkpoint`` is a train.py workdir or an adapter directory:

- A workdir: ``--step=best`` (default) is the checkpoint ``<workdir>/selection.json`` names
  as best on validation (peft_jax/selection.py), ``last`` the newest, ``N`` step N. The
  step's manifest is verified first, its trainable leaves are restored onto the built
  state (the trainer's own restore) and the base is checked against the one the run
  recorded. ``--config`` defaults to the run's ``config.json``; one given must agree with
  it on model, tokenizer, peft and train.seed.
- An adapter directory (``<workdir>/adapter``, the final step): ``--config`` is required and
  ``--step`` is refused. The adapter records its base weights; a different base stops with
  one line.

``--split`` defaults to the config's ``data.eval_split`` (``validation``): the split the run
selected on, so that eval.py reproduces the logged score; the test split is evaluated only
when asked for, as a number to report once the checkpoint is chosen (peeking at test while
choosing would make it a second validation set). Any split the data set has is accepted.

Writes ``eval.json`` and ``eval.md`` (both recording split and step) next to the checkpoint
(the workdir, or the adapter's parent) or to ``--output``, and prints, as the last line,
the metrics with ``split`` and ``step`` as one JSON object.

``--suite=tulu`` runs the open-instruct evaluation suite instead (seed 000's Table 3: MMLU,
GSM8K, BBH, TyDiQA, Codex HumanEval, AlpacaEval outputs; ``peft_jax/evals/suite.py``)::

  python eval.py --config=configs/tulu.py:lora --checkpoint=runs/tulu_lora --suite=tulu
  python eval.py --config=configs/tulu.py:lora --suite=tulu --output=/tmp/base   # base alone

``--checkpoint`` may then also be a Hugging Face PEFT adapter directory, or be left out (the
base model alone). The config's ``eval.suite_*`` fields choose the data directory, the
tasks, the prompt format and smoke-run caps. Reports go to ``<checkpoint>/suite/<step or
adapter>/`` or to ``--output``; a rerun resumes. The last line printed is one JSON object:
each task's headline and seed 000's Table 3.
"""

from __future__ import annotations

import json

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "configs/<file>.py[:<variant>] (default for a workdir: the "
                    "run's config.json); set any field with --config.<section>.<field>=<value>")
flags.DEFINE_string("checkpoint", None, "a train.py workdir, or an adapter directory "
                    "(<workdir>/adapter)")
flags.DEFINE_string("step", None, "with a workdir: best (default: best on validation), last, or "
                    "a step number")
flags.DEFINE_string("split", None, "the split to evaluate: validation, test or any split of the "
                    "data set (default: the config's data.eval_split, i.e. validation)")
flags.DEFINE_string("output", None, "where eval.json / eval.md go (default: the workdir, or the "
                    "adapter's parent)")
flags.DEFINE_enum("suite", None, ["tulu"], "run the open-instruct evaluation suite (seed "
                  "000's Table 3) instead of the config's evaluation split")


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from peft_jax import cli
  from peft_jax.config_lib import ConfigError
  from peft_jax import compile_cache
  compile_cache.enable()          # compiled programs from disk (peft_jax/compile_cache.py)
  if FLAGS.suite:
    from peft_jax.evals.suite import evaluate_suite
    if FLAGS.split is not None:
      raise ConfigError("--split chooses the data set's split; the suite has its own "
                        "benchmarks (leave --split out with --suite)")
    res = evaluate_suite(FLAGS.checkpoint, FLAGS.config, cli.CONFIG_OVERRIDES, step=FLAGS.step,
                         output=FLAGS.output)
    print(json.dumps({"output": res["output"],
                      "tasks": {k: v["value"] for k, v in res["tasks"].items()},
                      "table3_average": res["table3"]["average"]}))
    return
  if FLAGS.checkpoint is None:
    raise ConfigError("--checkpoint is required (a train.py workdir or an adapter directory)")
  from peft_jax.selection import evaluate_checkpoint
  res, lines = evaluate_checkpoint(FLAGS.checkpoint, FLAGS.config, cli.CONFIG_OVERRIDES,
                                   step=FLAGS.step, split=FLAGS.split, output=FLAGS.output)
  print("\n".join(lines))
  metrics = {k: v for k, v in res.items() if isinstance(v, (int, float))
             and k not in ("step", "examples")}
  print(json.dumps(metrics | {"split": res["split"], "step": res["step"],
                              "chosen": res["chosen"]}))


if __name__ == "__main__":
  from peft_jax.cli import run_cli
  run_cli(main)
