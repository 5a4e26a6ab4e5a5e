"""Attention kernels side by side on this machine: ``model.attention_impl`` = ``xla``
(``jax.nn.dot_product_attention``) vs ``einsum`` (peft-jax's heads-major contractions,
``peft_jax/models/layers.py``), one attention block with its projections at the
benchmark's sizes (T5: batch 8 x 256, 8 heads of 64, position bias, padding mask; LLaMA:
the same with 2 key/value heads and a causal mask). Prints the median forward and
forward-plus-backward milliseconds and the largest difference of the outputs.

  python scripts/bench_attention.py [--reps 15]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from peft_jax.models.layers import attention

B, T, D, N, H = 8, 256, 512, 8, 64


def block(kv, with_bias, causal):
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(ks[0], (B, T, D))
  w = [jax.random.normal(ks[1], (D, N * H)) * 0.04, jax.random.normal(ks[2], (D, kv * H)) * 0.04,
       jax.random.normal(ks[3], (D, kv * H)) * 0.04, jax.random.normal(ks[4], (N * H, D)) * 0.04]
  bias = jax.random.normal(ks[5], (1, N, T, T)) if with_bias else None
  valid = jnp.arange(T)[None] < (T - 8 * jnp.arange(B))[:, None]
  mask = valid[:, None, None, :]
  if causal:
    mask = mask & jnp.tril(jnp.ones((T, T), bool))[None, None]

  def f(x, w, impl):
    q = (x @ w[0]).reshape(B, T, N, H)
    k, v = (x @ w[1]).reshape(B, T, kv, H), (x @ w[2]).reshape(B, T, kv, H)
    out = attention(q, k, v, mask=mask, bias=bias, scale=1.0 if with_bias else None, impl=impl)
    return out.reshape(B, T, N * H) @ w[3]
  return f, x, w


def median_ms(fn, reps):
  jax.block_until_ready(fn())
  jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--reps", type=int, default=15)
  args = ap.parse_args()
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
  print("| block | kernel | forward ms | forward + backward ms | max abs diff vs xla |")
  print("|---|---|---|---|---|")
  for name, (kv, with_bias, causal) in {"T5 self-attention": (N, True, False),
                                        "LLaMA (GQA 8/2)": (2, False, True)}.items():
    f, x, w = block(kv, with_bias, causal)
    ref = jax.jit(f, static_argnums=2)(x, w, "xla")
    for impl in ("xla", "einsum"):
      fwd = jax.jit(lambda x, w: f(x, w, impl))
      grad = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w, impl) ** 2), argnums=(0, 1)))
      diff = float(jnp.max(jnp.abs(fwd(x, w) - ref)))
      print(f"| {name} | {impl} | {median_ms(lambda: fwd(x, w), args.reps):.1f} | "
            f"{median_ms(lambda: grad(x, w), args.reps):.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()
