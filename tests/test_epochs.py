"""Every example is seen each epoch (the last, partial batch is padded with zero-weight
rows, as seed 002 needs at 100 examples and batch 64), ``train.drop_last`` restores the
dropping; ``data.eval_size`` evaluates on a seeded subset, the same rows for every run."""
import importlib.util
import os


from peft_jax import inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart():
  spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_every_example_each_epoch_and_drop_last():
  from peft_jax.trainer import Trainer
  c = _quickstart()
  c.data.max_train_examples = 20
  c.data.max_eval_examples = 8
  c.train.batch_size = 8
  c.train.num_steps = 0
  c.train.num_epochs = 2
  t = Trainer(c, None)
  assert t.steps_per_epoch == 3 and t.total == 6      # ceil(20 / 8), not 20 // 8 = 2
  seen, it = [], t.batches(0, 0)
  for _ in range(3):
    ep, i, host, _ = next(it)
    rows = host["input_mask"].sum(1) > 0
    seen.append(int(rows.sum()))
    assert ep == 0 and host["inputs"].shape[0] == 8
  it.close()
  assert seen == [8, 8, 4]            # 20 rows: the last batch has 4 real rows + 4 padding
  # the rows of one epoch are all 20 training rows, each once
  from peft_jax.data.batching import epoch_order
  order = epoch_order(20, c.train.seed, 0)
  assert sorted(order.tolist()) == list(range(20))
  c.train.drop_last = True
  t2 = Trainer(c, None)
  assert t2.steps_per_epoch == 2 and t2.total == 4


def test_eval_size_is_a_seeded_subset():
  c = _quickstart()
  _, full = inputs.dataset(c)
  c.data.eval_size = 10
  _, a = inputs.dataset(c)
  _, b = inputs.dataset(c)
  assert len(a) == 10 and a == b                         # the same rows every time
  assert a != full[:10]                                  # a random subset, not the first rows
  assert all(r in full for r in a)
  c.data.seed = 1
  _, other = inputs.dataset(c)
  assert other != a
  c.data.eval_size = len(full) + 5                       # larger than the split: all rows
  _, everything = inputs.dataset(c)
  assert everything == full


def test_micro_batch_per_device():
  """A per-device micro-batch (the survey's Table 3, one GPU each) scales with the devices
  the batch is split over, capped at the batch; one error line when it cannot divide it."""
  from peft_jax.builder import build
  c = _quickstart()
  c.train.batch_size = 32
  c.train.micro_batch_per_device = 1          # 8 devices (tests/conftest.py): 8 rows, 4 passes
  assert build(c).micro_batch == 8
  c.train.micro_batch_per_device = 32         # more than the batch: one pass of 32
  assert build(c).micro_batch == 32
  c.train.micro_batch_per_device = 3          # 24 rows do not divide 32
  import pytest
  with pytest.raises(inputs.ConfigError, match="micro_batch_per_device=3 on 8"):
    build(c)
