"""Optimizer and gradient helpers that train only what a method makes trainable.

* :func:`make_optimizer`: ``optax.multi_transform`` with the given transform on
  trainable leaves and ``optax.set_to_zero()`` (no state) on frozen ones; leaves
  a method trains only in part (selected layers) get their updates masked.
* :func:`value_and_grad`: differentiates the loss w.r.t. the trainable subtree
  only (the frozen subtree is a constant), returns a full-structure gradient
  tree whose frozen leaves are zeros (``jnp.zeros`` constants under jit) so it
  feeds the multi-transform optimizer.
* :func:`make_train_step`: ``(params, opt_state, *batch) -> (params, opt_state,
  loss)``; frozen leaves are passed through untouched (bitwise).
* :func:`apply_fn`: the model forward on the stored tree (applies the method's
  ``prepare`` reparameterisation, e.g. prefix tuning's MLP).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peft_jax.peft.base import PeftState, flatten, join, split_trainable, unflatten


def labels(state: PeftState):
  return jax.tree_util.tree_map(lambda t: "trainable" if t else "frozen", state.trainable)


def _mask_tree(state: PeftState, params):
  """Per-leaf element masks (None where the whole leaf trains)."""
  fl = flatten(params)
  return unflatten({k: state.update_masks.get(k) for k in fl})


def masked_updates(state: PeftState) -> optax.GradientTransformation:
  """Zeroes the updates of the untrained parts of partly trained leaves (stateless)."""
  masks = dict(state.update_masks)

  def init(params):
    return optax.EmptyState()

  def update(updates, st, params=None):
    if not masks:
      return updates, st
    fl = flatten(updates)
    for k, m in masks.items():
      if k in fl and not isinstance(fl[k], optax.MaskedNode):
        fl[k] = jnp.where(jnp.asarray(m), fl[k], jnp.zeros_like(fl[k]))
    return unflatten(fl), st

  return optax.GradientTransformation(init, update)


def make_optimizer(state: PeftState, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  return optax.multi_transform({"trainable": optax.chain(tx, masked_updates(state)),
                                "frozen": optax.set_to_zero()}, labels(state))


def apply_fn(state: PeftState, model=None) -> Callable:
  """``f(params, *args, **kw) = model.apply({'params': state.prepare(params)}, *args, **kw)``."""
  if model is None:
    from peft_jax.models import build_model
    model = build_model(state.model_cfg, state.sites)

  def f(params, *args, **kw):
    return model.apply({"params": state.prepare(params)}, *args, **kw)

  return f


def value_and_grad(loss_fn: Callable, state: PeftState, has_aux: bool = False) -> Callable:
  """``loss_fn(params, *batch)`` -> ``f(params, *batch) -> (value, grads)``.

  Only the trainable subtree is differentiated; ``grads`` has the structure of
  ``params`` with exact zeros on frozen leaves and on untrained slices.
  """
  mask = state.trainable
  masks = dict(state.update_masks)

  def f(params, *batch):
    tr, fr = split_trainable(params, mask)

    def inner(t):
      return loss_fn(join(t, fr), *batch)

    val, g = jax.value_and_grad(inner, has_aux=has_aux)(tr)
    for k, m in masks.items():
      if k in g:
        g[k] = jnp.where(jnp.asarray(m), g[k], jnp.zeros_like(g[k]))
    full = {k: jnp.zeros(v.shape, v.dtype) for k, v in fr.items()}
    full.update(g)
    return val, unflatten(full)

  return f


def make_train_step(state: PeftState, loss_fn: Callable, tx: optax.GradientTransformation,
                    has_aux: bool = False):
  """Returns ``(opt, step)``; ``step(params, opt_state, *batch) -> (params, opt_state, loss)``.

  Frozen leaves of the returned params are the input leaves themselves.
  """
  if state.has_step_hooks:
    return _make_hooked_train_step(state, loss_fn, tx, has_aux)
  opt = make_optimizer(state, tx)
  vg = value_and_grad(loss_fn, state, has_aux)
  mask = state.trainable

  def step(params, opt_state, *batch):
    val, grads = vg(params, *batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    new = jax.tree_util.tree_map(lambda m, n, o: n if m else o, mask, new, params)
    return new, opt_state, val

  return opt, step


# ----------------------------------------------------------------------------- per-step hooks

class HookedOptState(NamedTuple):
  """Optimizer state of a method with per-step hooks (AdaLoRA): the masked optimizer's state,
  the method's hook state and the number of updates applied so far."""
  inner: Any
  hook: Any
  count: Any


def with_loss_terms(loss_fn: Callable, state: PeftState, has_aux: bool = False) -> Callable:
  """``loss_fn`` plus the method's :meth:`~peft_jax.peft.base.Method.loss_terms` (if any)."""

  def f(params, *batch):
    out = loss_fn(params, *batch)
    extra = state.loss_terms(params)
    if extra is None:
      return out
    if has_aux:
      return (out[0] + extra.astype(out[0].dtype),) + tuple(out[1:])
    return out + extra.astype(out.dtype)

  return f


def _make_hooked_train_step(state: PeftState, loss_fn: Callable, tx, has_aux: bool):
  """Same contract as :func:`make_train_step` (``step(params, opt_state, *batch) -> (params,
  opt_state, loss)``, ``opt.init(params)``); ``opt_state`` is a :class:`HookedOptState`, the
  loss includes the method's ``loss_terms`` and ``after_step`` runs after each update."""
  inner = make_optimizer(state, tx)
  vg = value_and_grad(with_loss_terms(loss_fn, state, has_aux), state, has_aux)
  mask = state.trainable

  def init(params):
    return HookedOptState(inner.init(params), state.init_hook_state(params), jnp.zeros((), jnp.int32))

  def update(updates, opt_state, params=None):   # the plain optimizer update, without the hook
    u, st = inner.update(updates, opt_state.inner, params)
    return u, opt_state._replace(inner=st)

  opt = optax.GradientTransformation(init, update)

  def keep_frozen(new, old):
    return jax.tree_util.tree_map(lambda m, n, o: n if m else o, mask, new, old)

  def step(params, opt_state, *batch):
    val, grads = vg(params, *batch)
    updates, inner_state = inner.update(grads, opt_state.inner, params)
    new = keep_frozen(optax.apply_updates(params, updates), params)
    new, hook = state.after_step(opt_state.count, new, grads, opt_state.hook)
    new = keep_frozen(new, params)
    return new, HookedOptState(inner_state, hook, opt_state.count + 1), val

  return opt, step
