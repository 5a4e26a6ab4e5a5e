"""Efficiency benchmark: peft-jax side by side with Hugging Face PEFT on the same weights.

  python bench.py --config=configs/bench.py                        # default: 2 CPU cores
  python bench.py --config=configs/bench.py --out=docs/benchmarks.md    # the docs page (+ PNG)
  python bench.py --config=configs/bench.py:smoke                  # tiny, seconds
  python bench.py --config=configs/bench.py:gpu                    # T5-Large, LLaMA-2-7B sizes
  python bench.py --config=configs/bench.py --config.run.methods=lora,full --config.run.blocks=5
  python bench.py --config=configs/bench.py --print_config

For each (model, method) of the config: trainable parameters, peak memory, compile time,
training tokens/s (steady state), generation tokens/s (unmerged, merged) and the ratios
peft-jax / HF, each side in its own process, the two taking turns (see
peft_jax/bench/runner.py). Prints the tables, writes a PNG of the ratios, and prints as
its last line a JSON object ``{"rows": [...], "machine": ..., "load": ...}``.
"""

from __future__ import annotations

import os
import sys

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "configs/bench.py[:<variant>] (variants: default, gpu, "
                    "smoke); set any field with --config.<section>.<field>=<value> (sections "
                    "run, models, methods)")
flags.DEFINE_string("out", "", "write the results page (markdown) here, e.g. "
                    "docs/benchmarks.md; the PNG goes next to it")
flags.DEFINE_string("png", "", "the ratios' bar chart (default: next to --out, else "
                    "bench_ratios.png in the working directory)")
flags.DEFINE_string("json_out", "", "also write the JSON object to this file")
flags.DEFINE_bool("print_config", False, "print the resolved config and exit")
flags.DEFINE_bool("keep_work", False, "keep the work directory (checkpoints, workers' logs)")
flags.mark_flag_as_required("config")


def _command() -> str:
  args = [a for a in sys.argv[1:] if not a.startswith(("--keep_work", "--json_out"))]
  return " ".join(["python", "bench.py"] + args)


def main(argv):
  del argv
  import json
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from peft_jax import cli
  from peft_jax.bench import config as bench_config
  from peft_jax.bench import report
  from peft_jax.bench.runner import run
  from peft_jax.inputs import writable_dir

  bench = bench_config.load(FLAGS.config, cli.CONFIG_OVERRIDES)
  if FLAGS.print_config:
    print(json.dumps(bench, indent=2, default=str))
    return
  png = FLAGS.png or (os.path.splitext(FLAGS.out)[0] + ".png" if FLAGS.out else
                      "bench_ratios.png")
  for path, flag in ((FLAGS.out, "--out"), (png, "--png"), (FLAGS.json_out, "--json_out")):
    if path:
      writable_dir(os.path.dirname(os.path.abspath(path)), flag, "a writable directory")
  say = lambda s: print(s, file=sys.stderr, flush=True)
  result = run(bench, say=say, keep=FLAGS.keep_work)
  report.plot(result, png)
  print(report.speed_table(result))
  print()
  print(report.memory_table(result))
  print()
  print(f"machine: {report.describe_machine(result['machine'])}")
  print(f"load: {report.describe_load(result['load'])}")
  for e in report.errors(result):
    print(f"failed: {e}")
  print(f"chart: {png}")
  if FLAGS.out:
    rel = os.path.relpath(os.path.abspath(png), os.path.dirname(os.path.abspath(FLAGS.out)))
    with open(FLAGS.out, "w") as f:
      f.write(report.page(result, _command(), rel))
    print(f"page: {FLAGS.out}")
  line = report.json_line(result)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)


if __name__ == "__main__":
  from peft_jax.cli import run_cli
  run_cli(main, huge_pages=False)   # the orchestrator: its peft-jax worker gets them
