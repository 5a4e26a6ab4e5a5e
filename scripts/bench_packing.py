"""Training tokens/s with and without sequence packing on TULU-like conversation lengths.

Conversations of log-normal token lengths (TULU v2's mixture is long-tailed: most
conversations far shorter than the 2,048/4,096 cap, a few at it), scaled to ``--max_len``;
the loss sits on each conversation's last ``--answer_frac`` of tokens (the assistant turn).
Both runs take the same batches of the same examples in the same order (the trainer's
batching: :func:`peft_jax.data.tulu.chat_batch`, then :func:`peft_jax.data.packing.pack_batch`
for the packed run) through the production training step, LoRA on a random LLaMA.
Steady state: every batch shape is compiled (and run once) before the clock starts.
Reported: real tokens (non-padding) per second, the token slots each run computes, the
step time, and their ratios; the last line is one JSON object.

  python scripts/bench_packing.py                         # ~2 min on 2 CPU cores
  python scripts/bench_packing.py --hidden=512 --layers=8 --max_len=2048 --steps=20
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def tulu_like_lengths(n: int, max_len: int, seed: int = 0) -> np.ndarray:
  """Log-normal lengths shaped like TULU v2's conversations at a 4,096-token cap (an
  assumption, not a fit: median a tenth of the cap, sigma 1 in log space, so the mean is
  1.65 times the median and about 1% are cut at the cap), scaled to ``max_len``."""
  rng = np.random.default_rng(seed)
  x = rng.lognormal(mean=np.log(0.1 * max_len), sigma=1.0, size=n)
  return np.clip(x.astype(int), 8, max_len)


def conversations(n: int, max_len: int, vocab: int, answer_frac: float, seed: int = 0):
  """``tokenize_rows``-like rows: ``{"input_ids", "loss_mask"}`` (BOS = 1 first)."""
  rng = np.random.default_rng(seed + 1)
  rows = []
  for length in tulu_like_lengths(n, max_len, seed):
    ids = [1] + rng.integers(3, vocab, length - 1).tolist()
    k = max(1, int(round(answer_frac * length)))
    rows.append({"input_ids": ids, "loss_mask": [0] * (length - k) + [1] * k})
  return rows


def run(args) -> dict:
  import jax
  import optax
  from peft_jax.data.batching import epoch_order
  from peft_jax.data.packing import pack_batch
  from peft_jax.data.tulu import chat_batch
  from peft_jax.models import build_model, init_params
  from peft_jax.models.config import LlamaConfig
  from peft_jax.peft import apply_peft
  from peft_jax.step import make_train_step

  cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                    intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                    num_attention_heads=args.heads, num_key_value_heads=args.heads,
                    num_hidden_layers=args.layers, max_position_embeddings=args.max_len)
  base = init_params(cfg, jax.random.PRNGKey(0))
  rows = conversations(args.batch_size * args.steps, args.max_len, args.vocab, args.answer_frac)
  order = epoch_order(len(rows), 0, 0)
  unpacked = [chat_batch(rows, order[i:i + args.batch_size], 0, args.max_len)
              for i in range(0, len(rows), args.batch_size)]
  packed = [pack_batch(b, args.batch_size, 1, 0) for b in unpacked]
  out = {"config": {k: v for k, v in vars(args).items()}, "devices": jax.device_count()}
  for name, batches in (("unpacked", unpacked), ("packed", packed)):
    fresh = jax.tree_util.tree_map(lambda x: x.copy(), base)     # the step donates its input
    state = apply_peft(cfg, fresh, "lora", {"r": 8, "target_modules": "q,v"})
    opt, step = make_train_step(state, build_model(cfg, state.sites), optax.adamw(1e-4),
                                micro_rows=args.batch_size, deterministic=True)
    params = state.params
    opt_state = opt.init(params)
    seen, t_compile = set(), time.perf_counter()
    for b in batches:                  # compile (and run once) every shape, untimed
      shape = b["inputs"].shape
      if shape not in seen:
        seen.add(shape)
        params, opt_state, m = step(params, opt_state, b, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    t_compile = time.perf_counter() - t_compile
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
      params, opt_state, m = step(params, opt_state, b, jax.random.PRNGKey(i))
    jax.block_until_ready(params)
    dt = time.perf_counter() - t0
    real = sum(int(b["input_mask"].sum()) for b in batches)
    slots = sum(int(np.prod(b["inputs"].shape)) for b in batches)
    out[name] = {"tokens_per_s": round(real / dt, 1), "step_s": round(dt / len(batches), 4),
                 "real_tokens": real, "token_slots": slots, "fill": round(real / slots, 3),
                 "shapes": sorted(seen), "compile_and_first_steps_s": round(t_compile, 1)}
  out["speedup"] = round(out["packed"]["tokens_per_s"] / out["unpacked"]["tokens_per_s"], 3)
  out["load"] = os.getloadavg()
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--steps", type=int, default=12, help="timed steps (batches) per run")
  p.add_argument("--max_len", type=int, default=512)
  p.add_argument("--answer_frac", type=float, default=0.5)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--layers", type=int, default=2)
  args = p.parse_args()
  out = run(args)
  for name in ("unpacked", "packed"):
    r = out[name]
    print(f"{name:9s} {r['tokens_per_s']:>10,.0f} tokens/s  step {r['step_s']:.3f} s  "
          f"fill {r['fill']:.0%} of {r['token_slots']:,} slots  shapes {r['shapes']}")
  print(f"packed / unpacked tokens/s: {out['speedup']:.2f}x  (load average "
        f"{', '.join(f'{x:.2f}' for x in out['load'])})")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
