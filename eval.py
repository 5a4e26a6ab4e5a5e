"""Evaluate a trained adapter (or any method's saved leaves) on a config's validation split.

  python eval.py --config=configs/quickstart.py --checkpoint=/tmp/quickstart/adapter

Writes ``eval.json`` and ``eval.md`` next to the checkpoint (or to ``--output``) and
prints, as the last line, the metrics as one JSON object.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:<variant>]", lock_config=True)
flags.DEFINE_string("checkpoint", None, "a directory written by train.py (<workdir>/adapter)")
flags.DEFINE_string("output", None, "where eval.json / eval.md go (default: the checkpoint's parent)")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  import jax

  from peft_jax import run
  from peft_jax.evaluation import evaluate_generation
  from peft_jax.models import build_model
  from peft_jax.peft import load_adapter

  cfg = FLAGS.config
  mc = run.model_config(cfg)
  if not os.path.isdir(FLAGS.checkpoint):
    raise run.ConfigError(f"--checkpoint {FLAGS.checkpoint} is not a directory; expected "
                          "<workdir>/adapter written by train.py")
  tok = run.tokenizer(cfg, mc)
  _, val_rows = run.dataset(cfg)
  # the base model straight into its shards on the config's mesh (peft_jax.sharding)
  from peft_jax import sharding as S
  from peft_jax.models import abstract_params
  mesh = run.make_mesh(cfg)
  m = cfg.get("mesh") or {}
  base_sh = S.param_shardings(mc, abstract_params(mc), mesh, m.get("rules"))
  base = run.base_params(cfg, mc, jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 0),
                         shardings=base_sh)
  state, params = load_adapter(FLAGS.checkpoint, mc, base)
  model = build_model(mc, state.sites)
  res = evaluate_generation(model, state.prepare(params), tok, mc, val_rows,
                            max_source_len=cfg.data.max_source_len,
                            max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams,
                            metric=cfg.eval.metric)
  out = FLAGS.output or os.path.dirname(os.path.abspath(FLAGS.checkpoint))
  os.makedirs(out, exist_ok=True)
  metrics = {k: v for k, v in res.items() if isinstance(v, (int, float))}
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(res | {"checkpoint": FLAGS.checkpoint, "method": state.method.name}, f, indent=2)
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
  from peft_jax.run import run_cli
  run_cli(main)
