"""Optimizer, schedules, loss and the jitted training step.

The step differentiates only the trainable subtree and masks the optimizer with
``optax.multi_transform`` (frozen branch ``set_to_zero``, no state); see
:mod:`peft_jax.peft.training`. It is one ``jax.jit`` with the parameter and
optimizer buffers donated.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from peft_jax.models import T5Config

NO_DECAY = re.compile(r"(bias|scale|norm|embedding_scale|ia3|magnitude)")


def make_schedule(tc) -> optax.Schedule:
  """``linear`` (warmup then linear decay to 0), ``constant``, ``constant_warmup``."""
  total = max(int(tc.total_steps), 1)
  warm = int(round(tc.warmup_ratio * total))
  lr = tc.learning_rate
  if tc.schedule == "linear":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)),
                                 optax.linear_schedule(lr, 0.0, max(total - warm, 1))], [warm])
  if tc.schedule == "constant":
    return optax.constant_schedule(lr)
  if tc.schedule == "constant_warmup":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)),
                                 optax.constant_schedule(lr)], [warm])
  raise ValueError(f"unknown schedule {tc.schedule!r}; expected linear, constant or constant_warmup")


def make_tx(tc, params) -> optax.GradientTransformation:
  """AdamW (+ clipping); no weight decay on biases, norms, scales and embeddings' scales."""
  from peft_jax.peft.base import flatten, unflatten
  decay_mask = unflatten({p: not NO_DECAY.search(p) for p in flatten(params)})
  parts = []
  if tc.grad_clip and tc.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(optax.adamw(make_schedule(tc), b1=0.9, b2=0.999, eps=1e-8,
                           weight_decay=tc.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def loss_fn(model, params, batch, rng, deterministic: bool):
  """Token-level cross entropy averaged over target tokens; returns (loss, n_tokens)."""
  rngs = None if deterministic else {"dropout": rng}
  if isinstance(model.cfg, T5Config):
    logits = model.apply({"params": params}, batch["inputs"], batch["input_mask"],
                         batch["decoder_inputs"], None, deterministic, rngs=rngs)
  else:
    logits = model.apply({"params": params}, batch["inputs"], batch["input_mask"], None,
                         deterministic, rngs=rngs)
  # methods that prepend tokens (prompt tuning on LLaMA) lengthen the output: keep the tail
  logits = logits[:, -batch["targets"].shape[1]:]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  m = batch["target_mask"].astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  return (nll * m).sum() / n, m.sum()


def make_train_step(state, model, tx, deterministic=False):
  """``step(params, opt_state, batch, rng) -> (params, opt_state, metrics)``, jitted, donated."""
  from peft_jax.peft.training import make_train_step as peft_step

  def loss(params, batch, rng):
    return loss_fn(model, state.prepare(params), batch, rng, deterministic)

  opt, step = peft_step(state, loss, tx, has_aux=True)

  def wrapped(params, opt_state, batch, rng):
    new, opt_state, (l, ntok) = step(params, opt_state, batch, rng)
    return new, opt_state, {"loss": l, "tokens": ntok}

  return opt, jax.jit(wrapped, donate_argnums=(0, 1))


def make_eval_loss(state, model):
  @jax.jit
  def f(params, batch):
    return loss_fn(model, state.prepare(params), batch, None, True)
  return f
