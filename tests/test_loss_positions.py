"""Causal batches carry ``loss_positions``: the head and the loss run at the target tokens
alone (``batching.loss_positions``, ``Family.logits``, ``family.loss_targets``). The loss
and the gradients equal the full-sequence computation's, for LoRA on every linear layer
(the head included), and for prompt tuning, whose prepended tokens shift the positions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.data.batching import Encoded, loss_positions, make_batch
from peft_jax.models import build_model, get_preset, init_params
from peft_jax.peft import apply_peft
from peft_jax.peft.base import join, split_trainable
from peft_jax.step import loss_fn


def _examples(n, seed):
  rng = np.random.default_rng(seed)
  src = [rng.integers(3, 100, rng.integers(1, 40)).tolist() for _ in range(n)]
  tgt = [rng.integers(3, 100, rng.integers(0, 11)).tolist() + [1] for _ in range(n)]
  return Encoded(src, tgt, [{}] * n)


def test_loss_positions_lists_each_rows_targets_then_minus_one():
  m = np.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]])
  np.testing.assert_array_equal(loss_positions(m, 3), [[1, 2, -1], [-1, -1, -1], [0, 2, 4]])
  with pytest.raises(ValueError, match="row 2 has 3 loss tokens, more than 2"):
    loss_positions(m, 2)


def test_make_batch_adds_them_when_the_target_is_shorter_than_the_row():
  enc = _examples(6, 0)
  b = make_batch(enc, range(6), "causal", 0, 0, 48, 16, batch_size=8)
  n = b["inputs"].shape[1]
  assert b["loss_positions"].shape == (8, 16) and n > 16
  for r in range(8):
    lp = b["loss_positions"][r]
    np.testing.assert_array_equal(lp[lp >= 0], np.flatnonzero(b["target_mask"][r]))
  assert (b["loss_positions"][6:] == -1).all()          # padding rows: no loss position
  short = make_batch(enc, range(6), "causal", 0, 0, 4, 64, batch_size=8)
  assert "loss_positions" not in short                  # the target may fill the row
  s2s = make_batch(enc, range(6), "seq2seq", 0, 0, 48, 16)
  assert "loss_positions" not in s2s


@pytest.mark.parametrize("method,hp", [
    ("lora", {"r": 4, "lora_alpha": 8, "init_lora_weights": False,
              "target_modules": "q,k,v,o,gate,up,down,lm_head"}),
    ("prompt_tuning", {"num_virtual_tokens": 3}),
])
def test_loss_and_gradients_equal_the_full_sequence(method, hp):
  cfg = get_preset("llama-tiny")
  state = apply_peft(cfg, init_params(cfg, jax.random.PRNGKey(0)), method, dict(hp))
  model = build_model(cfg, state.sites)
  b = make_batch(_examples(6, 1), range(6), "causal", 0, 0, 48, 16, batch_size=8)
  assert b["inputs"].shape[1] > 16
  full = {k: v for k, v in b.items() if k != "loss_positions"}
  tr, fr = split_trainable(state.params, state.trainable)

  def f(t, batch):
    return loss_fn(model, state.prepare(join(t, fr)), batch, None, True)

  g = jax.jit(jax.value_and_grad(f, has_aux=True))
  (l1, n1), g1 = g(tr, full)
  (l2, n2), g2 = g(tr, b)
  assert float(n1) == float(n2) == float(b["target_mask"].sum()) > 10
  assert abs(float(l1) - float(l2)) < 1e-6, (float(l1), float(l2))
  for k in g1:
    np.testing.assert_allclose(np.asarray(g2[k]), np.asarray(g1[k]), rtol=1e-5, atol=1e-7,
                               err_msg=k)
  assert max(float(jnp.abs(v).max()) for v in g1.values()) > 1e-4      # not vacuous
  # the head really runs at the 16 positions only: the logits' shape in the traced step
  jaxpr = jax.make_jaxpr(lambda t: f(t, b))(tr)
  shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
  assert (8, 16, cfg.vocab_size) in shapes
  assert (8, b["inputs"].shape[1] + (3 if method == "prompt_tuning" else 0),
          cfg.vocab_size) not in shapes
