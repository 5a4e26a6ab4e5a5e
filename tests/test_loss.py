"""The training loss's token cross entropy (``step.token_nll``): the value and the gradient of
``-log_softmax(logits)[target]``, in float32 for bfloat16 logits too."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.step import token_nll


def _reference(logits, targets):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-6)])
def test_token_nll_value_and_gradient(dtype, tol):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  logits = (jax.random.normal(k1, (3, 7, 97)) * 4).astype(dtype)
  targets = jax.random.randint(k2, (3, 7), 0, 97)
  w = jax.random.normal(k3, (3, 7))
  ours = token_nll(logits, targets)
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, _reference(logits, targets), atol=tol, rtol=tol)
  g = jax.grad(lambda x: (token_nll(x, targets) * w).sum())(logits)
  ref = jax.grad(lambda x: (_reference(x, targets) * w).sum())(logits)
  assert g.dtype == dtype
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32),
                             atol=tol if dtype == jnp.float32 else 1e-2)
  # the gradient is softmax - one_hot: each position's row sums to zero
  np.testing.assert_allclose(np.asarray(g, np.float32).sum(-1), 0, atol=1e-5 if dtype == jnp.float32 else 5e-2)


def test_token_nll_under_jit_and_vmap():
  logits = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 11))
  targets = jnp.arange(20).reshape(4, 5) % 11
  a = jax.jit(token_nll)(logits, targets)
  b = jax.vmap(token_nll)(logits, targets)
  np.testing.assert_allclose(a, _reference(logits, targets), atol=2e-6)
  np.testing.assert_allclose(b, a, atol=1e-6)
