"""The training loop's clock and keys (peft_jax/trainer.py): steady-state tokens/s with
compiling steps, evaluations and saves left out (on a fake clock: no timing), and the
per-step dropout keys computed a block at a time, bitwise those of an eager fold_in."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.trainer import _StepClock, _StepKeys


class FakeTime:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock_time(monkeypatch):
  fake = FakeTime()
  monkeypatch.setattr(time, "perf_counter", fake)
  return fake


def test_steady_rate_leaves_out_compiling_steps_and_stops(clock_time):
  p, clock = jnp.zeros(()), _StepClock()
  small, big = {"x": np.ones((4,))}, {"x": np.ones((8,))}

  def step(batch, seconds, tokens):
    c = clock.step_begins(batch, p)
    clock_time.now += seconds
    clock.step_ends(p, c, tokens)
    return c

  assert step(small, 5.0, 999)                 # compiles: neither timed nor counted
  assert clock.compile_seconds == 5.0 and clock.tokens == 0 and clock.steps == 0
  assert clock.window_rate() is None           # nothing timed yet
  assert not step(small, 1.0, 100) and not step(small, 1.0, 100)
  assert clock.window_rate() == pytest.approx(200 / 2.0)
  assert clock.window_rate() is None           # no timed step since
  clock_time.now += 1.0                        # host work after the window: timed
  clock.stop(p)                                # an evaluation: 12 s not timed
  clock_time.now += 12.0
  assert not step(small, 2.0, 50)
  assert clock.window_rate() == pytest.approx(50 / 3.0)
  assert step(big, 4.0, 999)                   # a new length bucket compiles
  assert clock.compile_seconds == 9.0 and clock.seconds == pytest.approx(5.0)
  assert clock.steps == 3 and clock.tokens == 250
  assert clock.tokens_per_s() == pytest.approx(250 / 5.0)
  assert clock.train_seconds(5) == pytest.approx(5.0 / 3 * 5, abs=1e-4)
  assert _StepClock().tokens_per_s() is None


@pytest.mark.parametrize("seed", [0, 7])
def test_step_keys_are_eager_fold_in_bitwise(seed):
  rng = jax.random.PRNGKey(seed)
  keys = _StepKeys(rng)
  for s in (0, 1, 5, 1023, 1024, 1025, 3000, 2, 2047):     # across blocks, and back
    got = keys(s)
    assert isinstance(got, np.ndarray) and got.dtype == np.uint32
    np.testing.assert_array_equal(got, np.asarray(jax.random.fold_in(rng, 1000 + s)))
