"""Sequence packing (``peft_jax/data/packing.py``): a packed batch gives the unpacked batch's
loss and gradients on the same examples, tokens of different segments never attend to each
other, packing is deterministic and covers every example of an epoch once, and a method
that acts on whole rows is refused with one error."""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import inputs
from peft_jax.data.batching import Encoded, make_batch
from peft_jax.data.packing import first_fit, pack_batch, packing_problem, row_counts
from peft_jax.models import build_model, family_of, get_preset, init_params
from peft_jax.peft import apply_peft
from peft_jax.peft.base import join, split_trainable
from peft_jax.step import loss_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": "all-linear"}


def _examples(n, seed, max_src=40, max_tgt=12):
  """Token ids of varied lengths (ids 3..99; EOS = 1 ends each target)."""
  rng = np.random.default_rng(seed)
  src = [rng.integers(3, 100, rng.integers(1, max_src)).tolist() for _ in range(n)]
  tgt = [rng.integers(3, 100, rng.integers(0, max_tgt)).tolist() + [1] for _ in range(n)]
  return Encoded(src, tgt, [{}] * n)


def _setup(preset, method="lora", hp=LORA):
  cfg = get_preset(preset)
  state = apply_peft(cfg, init_params(cfg, jax.random.PRNGKey(0)), method, dict(hp))
  return cfg, state, build_model(cfg, state.sites)


def _batches(cfg, n=12, seed=0):
  fam = family_of(cfg)
  b = make_batch(_examples(n, seed), range(n), fam.layout, 0, 0, 48, 16, batch_size=n + 4)
  return b, pack_batch(b, micro_rows=n + 4, shards=1, pad_id=0)


# ----------------------------------------------------------------------------- the packer

def test_first_fit_decreasing_and_row_counts():
  rows = first_fit(np.array([3, 8, 5, 2, 6, 1]), [8])
  assert rows == [[1], [4, 3], [2, 0], [5]]           # longest first, each in the first row with room
  # an encoder-decoder row must hold both the input and the target
  two = first_fit(np.array([[4, 1], [4, 1], [1, 4], [1, 4]]), [8, 4])
  assert two == [[2], [3], [0, 1]]
  with pytest.raises(ValueError, match="exceeds the row capacity"):
    first_fit(np.array([9]), [8])
  assert row_counts(8, 8, 1) == [1, 2, 3, 4, 5, 6, 7, 8]
  assert row_counts(32, 32, 8) == [8, 16, 24, 32]            # multiples of the 8 devices
  # above the micro-batch (8 rows on 8 devices), multiples of it: at most 8 shapes
  assert row_counts(128, 8, 8) == [16, 32, 48, 64, 80, 96, 112, 128]
  assert row_counts(128, 8, 1) == [16, 32, 48, 64, 80, 96, 112, 128]
  assert row_counts(16, 8, 1) == [2, 4, 6, 8, 16]


@pytest.mark.parametrize("preset", ["llama-tiny", "t5-tiny"])
def test_pack_batch_keeps_every_example_once(preset):
  cfg = get_preset(preset)
  b, p = _batches(cfg)
  seq2seq = "decoder_inputs" in b
  assert p["inputs"].shape[0] < b["inputs"].shape[0]
  assert p["inputs"].shape[1:] == b["inputs"].shape[1:]              # never wider
  assert p["target_mask"].sum() == b["target_mask"].sum()
  assert p["input_mask"].sum() == b["input_mask"].sum()
  assert np.array_equal(p["input_mask"] != 0, p["segment_ids"] > 0)
  # each example's tokens (and targets, loss mask) are one segment, positions from 0
  found = []
  for r in range(p["inputs"].shape[0]):
    for s in range(1, p["segment_ids"][r].max() + 1):
      at = p["segment_ids"][r] == s
      assert np.array_equal(p["positions"][r][at], np.arange(at.sum()))
      src = tuple(p["inputs"][r][at])
      if seq2seq:
        dat = p["decoder_segment_ids"][r] == s
        assert p["decoder_inputs"][r][dat][0] == 0                 # the decoder start token
        assert np.array_equal(p["decoder_positions"][r][dat], np.arange(dat.sum()))
        found.append((src, tuple(p["targets"][r][dat])))
      else:
        found.append((src, tuple(p["targets"][r][at][p["target_mask"][r][at] > 0])))
  want = []
  for i in range(12):
    if seq2seq:
      n, m = b["input_mask"][i].sum(), b["target_mask"][i].sum()
      want.append((tuple(b["inputs"][i][:n]), tuple(b["targets"][i][:m])))
    else:
      n = b["input_mask"][i].sum()
      want.append((tuple(b["inputs"][i][:n]), tuple(b["targets"][i][b["target_mask"][i] > 0])))
  assert sorted(found) == sorted(want)
  again = pack_batch(b, micro_rows=16, shards=1, pad_id=0)           # deterministic
  assert all(np.array_equal(again[k], p[k]) for k in p)


# ----------------------------------------------------------------------------- the models

@pytest.mark.parametrize("preset", ["llama-tiny", "t5-tiny"])
def test_packed_loss_and_gradients_equal_unpacked(preset):
  cfg, state, model = _setup(preset)
  b, p = _batches(cfg)
  tr, fr = split_trainable(state.params, state.trainable)

  def f(t, batch):
    loss, n = loss_fn(model, state.prepare(join(t, fr)), batch, None, True)
    return loss, n

  g = jax.jit(jax.value_and_grad(f, has_aux=True))
  (l1, n1), g1 = g(tr, b)
  (l2, n2), g2 = g(tr, p)
  assert float(n1) == float(n2) > 20
  assert abs(float(l1) - float(l2)) < 1e-5, (float(l1), float(l2))
  for k in g1:
    np.testing.assert_allclose(np.asarray(g2[k]), np.asarray(g1[k]), rtol=1e-4, atol=1e-6,
                               err_msg=k)
  assert max(float(jnp.abs(v).max()) for v in g1.values()) > 1e-3     # gradients not vacuous


def _logits(model, state, batch):
  fam = family_of(model.cfg)
  f = jax.jit(lambda p, b: fam.logits(model, state.prepare(p), b, True))
  return np.asarray(f(state.params, batch))


@pytest.mark.parametrize("preset", ["llama-tiny", "t5-tiny"])
def test_segments_do_not_attend_to_each_other(preset):
  """Changing a token of segment 1 changes segment 1's logits and no other segment's;
  without the segment ids (one long sequence) it does change segment 2's (the check bites)."""
  cfg, state, model = _setup(preset)
  _, p = _batches(cfg)
  r = int(np.argmax([len(set(row[row > 0])) for row in p["segment_ids"]]))
  assert p["segment_ids"][r].max() >= 2
  dec_seg = p.get("decoder_segment_ids", p["segment_ids"])
  base = _logits(model, state, p)
  changed = {k: v.copy() for k, v in p.items()}
  first = np.flatnonzero(p["segment_ids"][r] == 1)[0]
  changed["inputs"][r, first] = 3 + (changed["inputs"][r, first] - 2) % 90
  out = _logits(model, state, changed)
  own, other = dec_seg[r] == 1, dec_seg[r] > 1
  assert np.abs(out[r][own] - base[r][own]).max() > 1e-3
  np.testing.assert_array_equal(out[r][other], base[r][other])
  others = [i for i in range(len(out)) if i != r]
  np.testing.assert_array_equal(out[others], base[others])
  # a decoder token of segment 1 (T5): the same
  if "decoder_inputs" in p:
    d = {k: v.copy() for k, v in p.items()}
    j = np.flatnonzero(own)[0]
    d["decoder_inputs"][r, j] = 3 + (d["decoder_inputs"][r, j] - 2) % 90
    out = _logits(model, state, d)
    np.testing.assert_array_equal(out[r][other], base[r][other])
    assert np.abs(out[r][own] - base[r][own]).max() > 1e-3
  # the control: the same rows as one sequence each leak from segment 1 into the others
  plain = {k: v for k, v in p.items() if "segment" not in k and "positions" not in k}
  leak_base = _logits(model, state, plain)
  leak = _logits(model, state, {**plain, "inputs": changed["inputs"]})
  assert np.abs(leak[r][other] - leak_base[r][other]).max() > 1e-4


def test_t5_relative_bias_per_row_matches_the_shared_one():
  """Per-row positions [B,T] give the bias of positions [T] when they are 0..T-1."""
  from peft_jax.models.t5 import RelativePositionBias
  cfg = get_preset("t5-tiny")
  mod = RelativePositionBias(cfg, bidirectional=True)
  pos = jnp.arange(20)
  v = mod.init(jax.random.PRNGKey(0), pos, pos)
  shared = mod.apply(v, pos, pos)
  rows = mod.apply(v, jnp.stack([pos, pos]), jnp.stack([pos, pos]))
  assert shared.shape == (1, 4, 20, 20) and rows.shape == (2, 4, 20, 20)
  np.testing.assert_array_equal(np.asarray(rows), np.broadcast_to(np.asarray(shared), rows.shape))


# ----------------------------------------------------------------------------- unsupported

def _quickstart():
  import importlib.util
  spec = importlib.util.spec_from_file_location("qs", os.path.join(REPO, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("method,hp", [("prompt_tuning", {"num_virtual_tokens": 2}),
                                       ("prefix_tuning", {"num_virtual_tokens": 2})])
def test_methods_that_act_on_whole_rows_are_refused(method, hp):
  from peft_jax.builder import build
  c = _quickstart()
  c.peft = {"method": method, **hp}
  c.data.pack = True
  with pytest.raises(inputs.ConfigError, match=f"data.pack=true: method '{method}' cannot train "
                     "on packed rows"):
    build(c)
  c = _quickstart()
  c.peft = {"method": method, **hp}
  c.data.pack = "auto"
  build(c)                                    # auto: trains unpacked
  # the model refuses segment ids too (a caller that bypasses the config)
  cfg, state, model = _setup("llama-tiny", method, hp)
  assert packing_problem(state.sites)
  _, p = _batches(cfg)
  with pytest.raises(ValueError, match="not supported with this method"):
    _logits(model, state, p)


def test_which_methods_pack():
  """Methods acting per token pack; those with prefixes, prompts or row gates do not."""
  from peft_jax.models import abstract_params
  from peft_jax.peft import get_method
  for preset in ("llama-tiny", "t5-tiny"):
    cfg = get_preset(preset)
    for method, packs in (("lora", True), ("ia3", True), ("houlsby", True), ("bitfit", True),
                          ("full", True), ("prompt_tuning", False), ("prefix_tuning", False),
                          ("prefix_tuning_ah", False), ("mam", False), ("unipelt", False)):
      state = apply_peft(cfg, abstract_params(cfg), method,
                         dict(get_method(method).example_hparams))
      assert (packing_problem(state.sites) is None) == packs, (preset, method)


# ----------------------------------------------------------------------------- the trainer

def _varied_jsonl(tmp_path, n_train=48, n_val=8):
  """Quickstart words in inputs of 1 to 40 words."""
  words = " ".join(json.loads(line)["input"] for line in
                   open(os.path.join(REPO, "data", "quickstart", "train.jsonl"))).split()
  rng = np.random.default_rng(0)
  for name, n in (("train", n_train), ("validation", n_val)):
    with open(tmp_path / f"{name}.jsonl", "w") as f:
      for _ in range(n):
        k = int(rng.integers(1, 41))
        f.write(json.dumps({"input": " ".join(rng.choice(words, k)),
                            "target": str(rng.choice(["positive", "negative"]))}) + "\n")
  return str(tmp_path / "train.jsonl"), str(tmp_path / "validation.jsonl")


def _trainer(tmp_path, pack):
  from peft_jax.trainer import Trainer
  return Trainer(_trainer_config(tmp_path, pack), None)


def _trainer_config(tmp_path, pack):
  c = _quickstart()
  c.data = {"name": "jsonl", "max_source_len": 64, "max_target_len": 16, "pack": pack}
  c.data.train_file, c.data.validation_file = _varied_jsonl(tmp_path)
  c.peft = {"method": "lora", "r": 4, "init_lora_weights": False, "target_modules": "all-linear"}
  c.train.batch_size = 16              # 8 devices (conftest): packed rows are 8 or 16
  c.train.micro_batch_size = 8         # unpacked: 2 micro-batches; packed in 8 rows: 1
  c.train.num_steps = 0
  c.train.num_epochs = 2
  return c


def test_trainer_packs_the_same_examples_and_learns_the_same(tmp_path):
  off, on = _trainer(tmp_path, False), _trainer(tmp_path, "auto")
  assert not off.pack and on.pack           # auto: these lengths pay (about half the tokens)
  assert on.steps_per_epoch == off.steps_per_epoch == 3
  steps = 2
  run = {}
  for name, t in (("off", off), ("on", on)):
    params = t.state.params
    opt = jax.jit(t.opt.init, out_shardings=t.opt_sh)(params)
    losses, rows = [], []
    for ep, i, host, batch in itertools.islice(t.batches(0, 0), steps):
      params, opt, m = t.step_fn(params, opt, batch, jax.random.PRNGKey(i))
      losses.append(float(m["loss"]))
      rows.append(host["inputs"].shape[0])
    tr, _ = split_trainable(params, t.state.trainable)
    run[name] = (losses, rows, {k: np.asarray(v) for k, v in tr.items()})
  np.testing.assert_allclose(run["on"][0], run["off"][0], atol=1e-5, rtol=0)
  assert max(run["on"][1]) < 16 and run["off"][1] == [16, 16]
  for k, v in run["off"][2].items():
    np.testing.assert_allclose(run["on"][2][k], v, atol=1e-5, rtol=1e-4, err_msg=k)
  # a pure function of (seed, epoch, position): a resumed iterator gets the same batches
  a = list(itertools.islice(on.batches(1, 0), 3))
  b = next(on.batches(1, 2))[2]
  assert all(np.array_equal(a[2][2][k], b[k]) for k in b)
  # every training example once in the epoch (48 examples, 3 batches of 16)
  assert sum(int(s.max()) for x in a for s in x[2]["segment_ids"]) == 48
  c = next(on.batches(1, 0))[2]
  assert all(np.array_equal(a[0][2][k], c[k]) for k in c)


def test_auto_leaves_quickstart_unpacked():
  """The quickstart's inputs fill most of their bucket: packing would not pay."""
  from peft_jax.trainer import Trainer
  c = _quickstart()
  c.data.max_train_examples = 64
  c.data.max_eval_examples = 8
  assert not Trainer(c, None).pack


def test_bench_script_runs_both_ways():
  """``scripts/bench_packing.py`` (tiny): both runs, the same real tokens, packed fuller."""
  import argparse
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "bench_packing", os.path.join(REPO, "scripts", "bench_packing.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  lengths = mod.tulu_like_lengths(2000, 4096)
  assert 300 < np.median(lengths) < 520 and (lengths == 4096).mean() < 0.03
  args = argparse.Namespace(batch_size=8, steps=1, max_len=64, answer_frac=0.5, vocab=64,
                            hidden=16, heads=2, layers=1)
  out = mod.run(args)
  un, pk = out["unpacked"], out["packed"]
  assert un["real_tokens"] == pk["real_tokens"] > 0
  assert pk["token_slots"] < un["token_slots"] and pk["fill"] > un["fill"]
  assert un["tokens_per_s"] > 0 and pk["tokens_per_s"] > 0 and "speedup" in out


@pytest.mark.slow
def test_packed_run_resumes_bitwise(tmp_path, monkeypatch):
  """A packed run stopped after a checkpoint and resumed ends with the uninterrupted run's
  parameters, bit for bit (packing is a pure function of seed, epoch and position)."""
  from peft_jax.trainer import Trainer
  # generation is not what this checks (and compiles for long): a constant score
  monkeypatch.setattr(Trainer, "evaluate", lambda self, params: {"exact_match": 0.0,
                                                                 "eval_loss": 1.0})

  def cfg(stop=0):
    from ml_collections import ConfigDict
    c = ConfigDict(_trainer_config(tmp_path, True).to_dict())
    c.train.update({"num_epochs": 0, "num_steps": 4, "save_every": 2, "stop_at_step": stop,
                    "eval_at_start": False})
    c.data.max_eval_examples = 4
    c.eval.update({"max_new_tokens": 2, "batch_size": 8})
    c.peft.target_modules = "q,v"      # fewer sites trace faster
    return c

  full = Trainer(cfg(), str(tmp_path / "full"))
  assert full.pack
  full.train()
  part = Trainer(cfg(stop=2), str(tmp_path / "part"))
  assert part.train()["interrupted_at"] == 2
  resumed = Trainer(cfg(), str(tmp_path / "part"))
  resumed.train()
  a, _ = split_trainable(full.params, full.state.trainable)
  b, _ = split_trainable(resumed.params, resumed.state.trainable)
  for k in a:
    np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
