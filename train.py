"""Fine-tune T5 / LLaMA with a PEFT method from an ml-collections config.

  python train.py --config=configs/quickstart.py --workdir=/tmp/quickstart
  python train.py --config=configs/quickstart.py --config.peft.r=4 --config.train.num_steps=100
  python train.py --config=configs/quickstart.py --dry_run      # counts only, no weights, no data
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:<variant>]", lock_config=True)
flags.DEFINE_string("workdir", None, "where metrics, TensorBoard logs and adapters are written")
flags.DEFINE_bool("dry_run", False, "build the parameter tree abstractly, print the parameter "
                  "table and, as the last line, a JSON object with the counts; no weights, no data")
flags.mark_flag_as_required("config")


def peft_overrides(cfg):
  """Method hyperparameters from ``config.peft``; ``target_modules="q,v"`` (the command
  line form) becomes the list ``["q", "v"]``."""
  out = {}
  for k, v in cfg.peft.items():
    if k == "method":
      continue
    if hasattr(v, "to_dict"):
      v = v.to_dict()
    if k in ("target_modules", "feedforward_modules", "layers_to_transform") and isinstance(v, str) \
        and "," in v:
      v = [x.strip() for x in v.split(",") if x.strip()]
    out[k] = v
  return out


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  import jax
  import numpy as np
  from tqdm import tqdm

  from peft_jax import run
  from peft_jax.data.batching import encode, epoch_order, make_batch
  from peft_jax.evaluation import evaluate_generation
  from peft_jax.metrics_log import MetricsWriter
  from peft_jax.models import build_model
  from peft_jax.peft import apply_peft, describe, save_adapter, summary
  from peft_jax.training import make_train_step, make_tx

  cfg = FLAGS.config
  mc = run.model_config(cfg)
  method, overrides = cfg.peft.method, peft_overrides(cfg)

  if FLAGS.dry_run:
    info = describe(mc, method, overrides)
    print(info["table"])
    print(json.dumps({k: info[k] for k in ("total_params", "trainable_params", "changed_params",
                                           "trainable_percent")} | {"method": method}))
    return

  tc = cfg.train
  rng = jax.random.PRNGKey(tc.seed)
  tok = run.tokenizer(cfg)
  train_rows, val_rows = run.dataset(cfg)
  lay = run.layout(mc)
  pad, start = run.start_and_pad(mc, tok)
  d = cfg.data
  enc = encode(tok, train_rows, d.max_source_len, d.max_target_len, source_eos=lay == "seq2seq")

  # config errors surface here, before any weights are materialised
  from peft_jax.models import abstract_params
  apply_peft(mc, abstract_params(mc), method, overrides)
  base = run.base_params(cfg, mc, jax.random.fold_in(rng, 0))
  state = apply_peft(mc, base, method, overrides, rng=jax.random.fold_in(rng, 1))
  model = build_model(mc, state.sites)
  print(summary(state)["table"])

  steps_per_epoch = math.ceil(len(enc.source) / tc.batch_size)
  total = tc.num_steps if tc.num_steps > 0 else max(1, tc.num_epochs) * steps_per_epoch
  tc_total = tc.to_dict() | {"total_steps": total}
  from ml_collections import ConfigDict
  params = state.params
  opt, step_fn = make_train_step(state, model, make_tx(ConfigDict(tc_total), params))
  opt_state = opt.init(params)

  workdir = FLAGS.workdir
  writer = MetricsWriter(workdir)
  gen_kwargs = dict(max_source_len=d.max_source_len, max_new_tokens=cfg.eval.max_new_tokens,
                    batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams)

  untuned = evaluate_generation(model, state.prepare(params), tok, mc, val_rows, **gen_kwargs)
  print(f"untuned {cfg.eval.metric}: {untuned[cfg.eval.metric]:.4f}")
  writer.write(0, {f"eval/{k}": v for k, v in untuned.items() if isinstance(v, (int, float))})

  t0 = time.time()
  tokens = 0
  step = 0
  bar = tqdm(total=total, desc="train", dynamic_ncols=True, mininterval=1.0)
  epoch = 0
  while step < total:
    order = epoch_order(len(enc.source), tc.seed, epoch)
    for i in range(0, len(order) - tc.batch_size + 1 if len(order) >= tc.batch_size else 1,
                   tc.batch_size):
      if step >= total:
        break
      batch = make_batch(enc, order[i:i + tc.batch_size], lay, pad, start, d.max_source_len,
                         d.max_target_len, batch_size=tc.batch_size)
      params, opt_state, m = step_fn(params, opt_state, batch, jax.random.fold_in(rng, 1000 + step))
      step += 1
      tokens += int(batch["input_mask"].sum()) + int(batch["target_mask"].sum())
      if step % tc.log_every == 0 or step == total:
        loss = float(m["loss"])
        if not np.isfinite(loss):
          raise SystemExit(f"non-finite loss {loss} at step {step}; stopping (lower the learning "
                           "rate or enable gradient clipping)")
        tps = tokens / max(time.time() - t0, 1e-9)
        writer.write(step, {"train/loss": loss, "train/tokens_per_s": tps})
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
      bar.update(1)
    epoch += 1
  bar.close()

  tuned = evaluate_generation(model, state.prepare(params), tok, mc, val_rows, **gen_kwargs)
  writer.write(step, {f"eval/{k}": v for k, v in tuned.items() if isinstance(v, (int, float))})
  writer.close()
  if workdir:
    save_adapter(state, params, os.path.join(workdir, "adapter"))
  print(f"untuned {cfg.eval.metric}: {untuned[cfg.eval.metric]:.4f}")
  print(f"tuned {cfg.eval.metric}: {tuned[cfg.eval.metric]:.4f}")
  print(json.dumps({"untuned": untuned[cfg.eval.metric], "tuned": tuned[cfg.eval.metric],
                    "steps": step, "metric": cfg.eval.metric}))


if __name__ == "__main__":
  from peft_jax.run import run_cli
  run_cli(main)
