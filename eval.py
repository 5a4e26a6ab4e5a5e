"""Evaluate a trained adapter (or any method's saved leaves) on a config's validation split.

  python eval.py --config=configs/quickstart.py --checkpoint=/tmp/quickstart/adapter
  python eval.py --config=configs/quickstart.py --checkpoint=/tmp/quickstart   # its adapter/

The adapter records the base weights it was trained on; a different base (another
model.checkpoint, or another train.seed for a random preset) stops with one line.

Writes ``eval.json`` and ``eval.md`` next to the checkpoint (or to ``--output``) and
prints, as the last line, the metrics as one JSON object.
"""

from __future__ import annotations

import json
import os

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "configs/<file>.py[:<variant>]; set any field with "
                    "--config.<section>.<field>=<value> (see train.py --print_config)")
flags.DEFINE_string("checkpoint", None, "a train.py workdir, or an adapter directory "
                    "(<workdir>/adapter)")
flags.DEFINE_string("output", None, "where eval.json / eval.md go (default: the checkpoint's parent)")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)

  from peft_jax import cli, inputs
  from peft_jax.evals.generation import evaluate_generation
  from peft_jax.builder import build
  from peft_jax.peft.io import load_adapter_leaves

  cfg = cli.load_config(FLAGS.config)
  mc = inputs.model_config(cfg)
  adapter_dir = FLAGS.checkpoint
  if os.path.isdir(os.path.join(adapter_dir, "adapter")):
    adapter_dir = os.path.join(adapter_dir, "adapter")      # a train.py workdir
  if not os.path.isfile(os.path.join(adapter_dir, "peft_config.json")):
    raise inputs.ConfigError(f"--checkpoint {FLAGS.checkpoint} is neither a train.py workdir nor an "
                          "adapter directory (expected <workdir>/adapter/peft_config.json)")
  from peft_jax.peft.io import read_adapter_config, verify_adapter
  verify_adapter(adapter_dir)            # checksums first: never evaluate damaged bytes
  recorded = read_adapter_config(adapter_dir)
  out = inputs.writable_dir(FLAGS.output or os.path.dirname(os.path.abspath(adapter_dir)),
                            "--output", "a directory for eval.json and eval.md")
  tok = inputs.tokenizer(cfg, mc)
  _, val_rows = inputs.dataset(cfg)
  # the run's setup for the adapter's own method (mesh, shardings, base weights into shards)
  built = build(cfg, peft={"method": recorded["method"], **recorded["hparams"]},
                with_weights=True)
  inputs.check_base(recorded.get("base"), built.base_info, f"the adapter {adapter_dir}")
  state, params = built.state, load_adapter_leaves(adapter_dir, built.state,
                                                     verify=False)   # verified above
  model = built.model
  res = evaluate_generation(model, state.prepare(params), tok, mc, val_rows,
                            max_source_len=cfg.data.max_source_len,
                            max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams,
                            metric=cfg.eval.metric)
  metrics = {k: v for k, v in res.items() if isinstance(v, (int, float))}
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(res | {"checkpoint": adapter_dir, "method": state.method.name}, f, indent=2)
  lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" if isinstance(v, float)
                                              else f"| {k} | {v} |" for k, v in metrics.items()]
  for group in ("per_category", "per_task"):
    if group in res:   # SuperNI breakdowns
      names = sorted(next(iter(res[group].values()), {}))
      lines += ["", f"| {group[4:]} | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
      lines += [f"| {k} | " + " | ".join(f"{v.get(n, 0):.4f}" for n in names) + " |"
                for k, v in sorted(res[group].items())]
  with open(os.path.join(out, "eval.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(json.dumps(metrics))


if __name__ == "__main__":
  from peft_jax.cli import run_cli
  run_cli(main)
