"""Fine-tune T5 / LLaMA with a PEFT method from an ml-collections config.

  python train.py --config=configs/quickstart.py --workdir=/tmp/quickstart
  python train.py --config=configs/quickstart.py --config.peft.r=4 --config.train.num_steps=100
  python train.py --config=configs/quickstart.py --dry_run      # counts only, no weights, no data
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:<variant>]", lock_config=True)
flags.DEFINE_string("workdir", None, "where metrics, TensorBoard logs and adapters are written")
flags.DEFINE_bool("dry_run", False, "build the parameter tree abstractly, print the parameter "
                  "table and, as the last line, a JSON object with the counts; no weights, no data")
flags.mark_flag_as_required("config")


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from peft_jax import run
  from peft_jax.peft import describe
  from peft_jax.trainer import Trainer

  cfg = FLAGS.config
  if FLAGS.dry_run:
    mc = run.model_config(cfg)
    info = describe(mc, cfg.peft.method, run.peft_overrides(cfg))
    print(info["table"])
    print(json.dumps({k: info[k] for k in ("total_params", "trainable_params", "changed_params",
                                           "trainable_percent")} | {"method": cfg.peft.method}))
    return
  res = Trainer(cfg, FLAGS.workdir).train()
  if res.get("interrupted_at"):
    print(json.dumps(res))
    return
  m = res["metric"]
  if res["untuned"] is not None:
    print(f"untuned {m}: {res['untuned']:.4f}")
  print(f"tuned {m}: {res['tuned']:.4f}")
  print(json.dumps(res))


if __name__ == "__main__":
  from peft_jax.run import run_cli
  run_cli(main)
