"""The production training step (``peft_jax.step.make_train_step``, what the trainer
runs) around a test's own loss, for the method tests."""
import jax

from peft_jax.step import make_train_step


def train_step(state, loss_fn, tx, has_aux=False):
  """``(opt, step)`` with ``step(params, opt_state, *batch) -> (params, opt_state, loss)``;
  ``loss_fn(params, *batch)`` returns the loss (``(loss, aux)`` with ``has_aux``)."""
  def loss(params, batch, rng):
    out = loss_fn(params, *batch)
    return (out[0] if has_aux else out), 1.0

  opt, step = make_train_step(state, None, tx, loss=loss, donate=False)
  key = jax.random.PRNGKey(0)

  def f(params, opt_state, *batch):
    params, opt_state, metrics = step(params, opt_state, tuple(batch), key)
    return params, opt_state, metrics["loss"]

  return opt, f
