"""Optimizer and gradient helpers that train only what a method makes trainable.

* :func:`make_optimizer`: ``optax.multi_transform`` with the given transform on
  trainable leaves and ``optax.set_to_zero()`` (no state) on frozen ones; leaves
  a method trains only in part (selected layers) get their updates masked.
* :func:`value_and_grad`: differentiates the loss w.r.t. the trainable subtree
  only (the frozen subtree is a constant), returns a full-structure gradient
  tree whose frozen leaves are zeros (``jnp.zeros`` constants under jit) so it
  feeds the multi-transform optimizer.
* :class:`HookedOptState`: the optimizer state of methods with per-step hooks.

The training step itself is :func:`peft_jax.step.make_train_step` (one for the
trainer and the tests).
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


# ----------------------------------------------------------------------------- per-step hooks

class HookedOptState(NamedTuple):
  """Optimizer state of a method with per-step hooks (AdaLoRA): the masked optimizer's state,
  the method's hook state and the number of updates applied so far."""
  inner: Any
  hook: Any
  count: Any
