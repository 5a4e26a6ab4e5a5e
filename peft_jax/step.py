"""Optimizer, schedules, loss and the jitted training step.

The step differentiates only the trainable subtree and masks the optimizer with
``optax.multi_transform`` (frozen branch ``set_to_zero``, no state); see
:mod:`peft_jax.peft.optimizer`. It is one ``jax.jit`` with the parameter and
optimizer buffers donated.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from peft_jax.models import family_of
from peft_jax.models.family import loss_targets

#: leaves never decayed whatever the method: biases and norm scales (a method adds its own,
#: e.g. (IA)^3's scaling vectors, through ``Method.leaf_roles``)
NO_DECAY = re.compile(r"(bias|scale|norm)")


def make_schedule(tc) -> optax.Schedule:
  """Warmup from ``init_learning_rate`` to ``learning_rate`` over ``warmup_steps`` (or
  ``warmup_ratio`` of the steps), then: ``linear`` or ``cosine`` decay to
  ``end_learning_rate`` at the last step; ``constant_warmup``: stay; ``constant``: no
  warmup at all. (Seed 002: 3e-4 -> 3e-3 -> 3e-4 is init 3e-4, peak 3e-3, end 3e-4.)"""
  total = max(int(tc.total_steps), 1)
  warm = int(tc.get("warmup_steps") or 0) or int(round(tc.warmup_ratio * total))
  warm = min(warm, total)
  lr = tc.learning_rate
  lr0, lr1 = float(tc.get("init_learning_rate") or 0.0), float(tc.get("end_learning_rate") or 0.0)
  if tc.schedule == "constant":
    return optax.constant_schedule(lr)
  warmup = optax.linear_schedule(lr0, lr, max(warm, 1))
  decay_steps = max(total - warm, 1)
  if tc.schedule == "linear":
    after = optax.linear_schedule(lr, lr1, decay_steps)
  elif tc.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=lr1 / lr)
  elif tc.schedule == "constant_warmup":
    after = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown schedule {tc.schedule!r}; expected linear, cosine, constant or "
                     "constant_warmup")
  return optax.join_schedules([warmup, after], [warm])


def make_tx(tc, params, no_decay=()) -> optax.GradientTransformation:
  """AdamW (+ clipping); no weight decay on biases and norm scales (:data:`NO_DECAY`) and on
  the leaves in ``no_decay`` (``PeftState.no_decay``: the method's own choice)."""
  from peft_jax.peft.base import flatten, unflatten
  no_decay = set(no_decay)
  decay_mask = unflatten({p: not (NO_DECAY.search(p) or p in no_decay) for p in flatten(params)})
  parts = []
  if tc.grad_clip and tc.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(optax.adamw(make_schedule(tc), b1=0.9, b2=0.999, eps=1e-8,
                           weight_decay=tc.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


@jax.custom_vjp
def token_nll(logits, targets):
  """``-log softmax(logits)[targets]`` per position, in float32 whatever the logits' dtype.

  One pass over the vocabulary each way: the forward keeps the logits (in their own dtype)
  and the log-normaliser; the backward forms ``softmax - one_hot`` in one elementwise
  expression. (``log_softmax`` then ``take_along_axis`` keeps a float32 copy of the log
  probabilities and differentiates the gather into a zero-filled ``[B, T, vocab]``
  scatter: two more vocabulary-sized buffers per step.)
  """
  return _nll_fwd(logits, targets)[0]


def _nll_fwd(logits, targets):
  x = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  return lse - picked, (logits, lse, targets)


def _nll_bwd(res, g):
  logits, lse, targets = res
  x = logits.astype(jnp.float32)
  hit = jax.lax.broadcasted_iota(targets.dtype, x.shape, x.ndim - 1) == targets[..., None]
  grad = (jnp.exp(x - lse[..., None]) - hit.astype(jnp.float32)) * g[..., None]
  return grad.astype(logits.dtype), None


token_nll.defvjp(_nll_fwd, _nll_bwd)


def loss_fn(model, params, batch, rng, deterministic: bool):
  """Token-level cross entropy averaged over target tokens; returns (loss, n_tokens)."""
  rngs = None if deterministic else {"dropout": rng}
  logits = family_of(model.cfg).logits(model, params, batch, deterministic, rngs)
  targets, mask = loss_targets(batch)
  nll = token_nll(logits, targets)
  m = mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  return (nll * m).sum() / n, m.sum()


def make_train_step(state, model, tx, accum_steps: int = 1, deterministic: bool = False,
                    mesh=None, param_shardings=None, rules=None, loss=None, donate: bool = True,
                    micro_rows: Optional[int] = None):
  """Returns ``(opt, step)``; ``step(params, opt_state, batch, rng) -> (params, opt_state, metrics)``.

  The one training step: the trainer runs it (through :mod:`peft_jax.builder`), the
  tests exercise it. ``loss(params, batch, rng) -> (mean loss, n tokens)`` replaces the
  model's token cross entropy (``params``: the stored tree; apply ``state.prepare`` in it,
  e.g. with :func:`peft_jax.peft.apply_fn`); ``donate=False`` keeps the input buffers.

  * Only the trainable subtree is differentiated; partly trained leaves (layer
    selection) have their gradients masked; the optimizer is the method-masked
    ``multi_transform`` of :func:`peft_jax.peft.make_optimizer`.
  * ``accum_steps > 1``: the batch's leading axis is split into that many
    micro-batches, scanned; gradients and loss are token-weighted, so the update
    equals the one for the whole batch at once. Only trainable gradients are carried.
  * ``micro_rows``: the micro-batch's rows instead; a batch of ``rows`` rows (traced per
    shape) runs as ``rows // micro_rows`` micro-batches, or one pass when ``rows <=
    micro_rows``: packed batches (:mod:`peft_jax.data.packing`) have fewer rows than the
    configured batch and so fewer micro-batches.
  * A non-finite loss or gradient leaves params and optimizer state unchanged and
    reports ``finite = False`` (the loop stops; the last good state is kept).
  * Jitted with the parameter and optimizer buffers donated.
  * With a ``mesh`` (and ``param_shardings``, see :mod:`peft_jax.sharding`): jitted with
    in/out shardings for parameters, optimizer state (mirroring the parameters) and
    the batch (split over ``data x fsdp``); activations are constrained by the
    models' logical names; micro-batches are taken strided (rows ``a, a+A, ...``)
    so that each stays split over the same devices as the whole batch.
  """
  from peft_jax.peft.base import flatten, join, split_trainable, unflatten
  from peft_jax.peft.optimizer import make_optimizer

  base_opt = make_optimizer(state, tx)
  masks = {k: jnp.asarray(m) for k, m in state.update_masks.items()}
  trainable_mask = state.trainable
  hooked = state.has_step_hooks       # methods with per-step hooks (AdaLoRA); the loop never
  if hooked:                          # names them: regulariser + after-step update
    from peft_jax.peft.optimizer import HookedOptState

    def _init(p):
      st = HookedOptState(base_opt.init(p), state.init_hook_state(p), jnp.zeros((), jnp.int32))
      # own buffers: the step donates the state, and no two leaves may share one
      return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), st)

    opt = optax.GradientTransformation(_init, base_opt.update)
  else:
    opt = base_opt

  def extra_loss(t, fr):
    r = state.loss_terms(join(t, fr))
    return jnp.zeros((), jnp.float32) if r is None else r

  def grads_of(params, batch, rng):
    tr, fr = split_trainable(params, trainable_mask)

    def f(t):
      if loss is None:
        value, ntok = loss_fn(model, state.prepare(join(t, fr)), batch, rng, deterministic)
      else:
        value, ntok = loss(join(t, fr), batch, rng)
        ntok = jnp.asarray(ntok, jnp.float32)
      return value * ntok, ntok       # summed NLL: micro-batches add up exactly

    (tot, ntok), g = jax.value_and_grad(f, has_aux=True)(tr)
    g = {k: (jnp.where(masks[k], v, 0) if k in masks else v) for k, v in g.items()}
    return tot, ntok, _constrain_flat(g), fr

  def micro_count(batch) -> int:
    if micro_rows is None:
      return accum_steps
    rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if rows > micro_rows and rows % micro_rows:
      raise ValueError(f"a batch of {rows} rows does not split into micro-batches of "
                       f"{micro_rows} rows")
    return max(rows // micro_rows, 1)

  flat_sh = None
  if mesh is not None:
    if param_shardings is None:
      raise ValueError("make_train_step: a mesh needs param_shardings")
    flat_sh = flatten(param_shardings)

  def _constrain_flat(d):
    if flat_sh is None:
      return d
    return {k: jax.lax.with_sharding_constraint(v, flat_sh[k]) for k, v in d.items()}

  def step(params, opt_state, batch, rng):
    from peft_jax.sharding import activation_sharding
    with activation_sharding(mesh, rules):
      return _step(params, opt_state, batch, rng)

  def _step(params, opt_state, batch, rng):
    inner = opt_state.inner if hooked else opt_state
    accum = micro_count(batch)
    if accum == 1:
      tot, ntok, g, fr = grads_of(params, batch, rng)
    else:
      # strided: micro-batch a = rows a, a+A, a+2A, ... (stays on the batch's devices)
      micro = jax.tree_util.tree_map(
          lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1),
          batch)
      if mesh is not None:
        from peft_jax.sharding import BATCH
        from jax.sharding import NamedSharding, PartitionSpec
        micro = jax.lax.with_sharding_constraint(
            micro, NamedSharding(mesh, PartitionSpec(None, BATCH)))
      tr0, fr = split_trainable(params, trainable_mask)
      zero = _constrain_flat({k: jnp.zeros(v.shape, jnp.float32) for k, v in tr0.items()})

      def body(carry, xs):
        gs, ts, ns = carry
        b, i = xs
        t, n, g, _ = grads_of(params, b, jax.random.fold_in(rng, i))
        return (_constrain_flat({k: gs[k] + g[k].astype(jnp.float32) for k in gs}), ts + t,
                ns + n), None

      (g, tot, ntok), _ = jax.lax.scan(body, (zero, 0.0, 0.0), (micro, jnp.arange(accum)))
      g = {k: v.astype(tr0[k].dtype) for k, v in g.items()}
    denom = jnp.maximum(ntok, 1.0)
    g = {k: v / denom.astype(v.dtype) for k, v in g.items()}
    loss = tot / denom
    if hooked:   # once per step (not per micro-batch): e.g. AdaLoRA's orthogonality term
      tr_now, _ = split_trainable(params, trainable_mask)
      reg, rg = jax.value_and_grad(extra_loss)(tr_now, fr)
      g = {k: v + rg[k].astype(v.dtype) for k, v in g.items()}
      loss = loss + reg
    full = dict({k: jnp.zeros(v.shape, v.dtype) for k, v in fr.items()}, **g)  # frozen: DCE'd
    updates, new_opt = base_opt.update(unflatten(full), inner, params)
    new = optax.apply_updates(params, updates)
    if hooked:
      new, hs = state.after_step(opt_state.count, new, unflatten(full), opt_state.hook)
      new_opt = HookedOptState(new_opt, hs, opt_state.count + 1)
    gnorm = optax.tree.norm(g)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda n, o: jnp.where(finite, n, o)
    new = jax.tree_util.tree_map(lambda m, n, o: keep(n, o) if m else o, trainable_mask, new, params)
    new_opt = jax.tree_util.tree_map(keep, new_opt, opt_state)
    return new, new_opt, {"loss": loss, "tokens": ntok, "grad_norm": gnorm, "finite": finite}

  donated = (0, 1) if donate else ()
  if mesh is None:
    return opt, jax.jit(step, donate_argnums=donated)
  from peft_jax.sharding import batch_sharding, replicated
  opt_sh = opt_state_shardings(opt, state.params, param_shardings, mesh)
  repl = replicated(mesh)
  return opt, jax.jit(step, donate_argnums=donated,
                      in_shardings=(param_shardings, opt_sh, batch_sharding(mesh), repl),
                      out_shardings=(param_shardings, opt_sh, repl))


def opt_state_shardings(opt, params, param_shardings, mesh):
  """Shardings of ``opt.init(params)``: moments follow their parameters, the rest is
  replicated (computed from shapes only)."""
  from peft_jax.sharding import like_params
  abstract = jax.eval_shape(opt.init, params)
  return like_params(abstract, params, param_shardings, mesh)


def make_eval_loss(state, model, mesh=None, param_shardings=None):
  """``f(params, batch) -> (summed NLL, n target tokens)`` for a validation pass (with a
  mesh: parameters in their shardings, the batch replicated)."""
  def f(params, batch):
    loss, n = loss_fn(model, state.prepare(params), batch, None, True)
    return loss * n, n
  if mesh is None:
    return jax.jit(f)
  from peft_jax.sharding import replicated
  return jax.jit(f, in_shardings=(param_shardings, replicated(mesh)),
                 out_shardings=replicated(mesh))
