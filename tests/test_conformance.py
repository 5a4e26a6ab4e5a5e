"""One conformance test driven by the method registry: every registered method (with the
example hyperparameters declared beside it, ``Method.example_hparams``) goes through

* identity at init where the method claims it (``Method.identity_at_init``);
* training with the production step (``peft_jax.step.make_train_step``): frozen
  leaves bitwise unchanged, trainable leaves changed, optimizer state (Adam's two moments)
  only for trainable leaves;
* the adapter save/load round trip (bitwise leaves, equal logits);
* merge and unmerge where the method is mergeable;
* the Hugging Face PEFT export/import round trip where the method has a mapping.

A newly registered method is covered without editing this file."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft_jax import peft
from peft_jax.models import build_model, get_preset, init_params
from peft_jax.peft.base import PeftConfigError, flatten
from peft_jax.step import make_train_step

PRESET = "t5-v1_1-tiny"    # 3 decoder layers: HF PEFT's T5 prefix layout can hold them
B, S, T = 4, 8, 6


def _batch(cfg):
  rng = np.random.default_rng(0)
  x = rng.integers(2, cfg.vocab_size, (B, S)).astype(np.int32)
  y = rng.integers(2, cfg.vocab_size, (B, T)).astype(np.int32)
  dec = np.concatenate([np.zeros((B, 1), np.int32), y[:, :-1]], 1)
  return {"inputs": x, "input_mask": np.ones_like(x), "decoder_inputs": dec, "targets": y,
          "target_mask": np.ones_like(y)}


def _forward(cfg, state=None):
  """A jitted ``f(params, batch) -> logits`` for the base model or a method's state."""
  model = build_model(cfg, state.sites) if state is not None else build_model(cfg)
  prepare = state.prepare if state is not None else (lambda p: p)
  f = jax.jit(lambda p, b: model.apply({"params": prepare(p)}, b["inputs"], b["input_mask"],
                                       b["decoder_inputs"])[:, -T:])
  return lambda params, batch: np.asarray(f(params, batch))


@pytest.fixture(scope="module")
def base():
  cfg = get_preset(PRESET).replace(dropout_rate=0.0)   # dropout's PRNG costs ~8 s of compile
  return cfg, init_params(cfg, jax.random.PRNGKey(0)), _batch(cfg), _forward(cfg)


@pytest.mark.parametrize("name", peft.registered_methods())
def test_method_conformance(name, base, tmp_path):
  cfg, params0, batch, base_fwd = base
  method = peft.get_method(name)
  state = peft.apply_peft(cfg, params0, name, dict(method.example_hparams),
                          rng=jax.random.PRNGKey(1))
  fwd = _forward(cfg, state)      # also serves the reloaded state: same method, same leaves
  ref = base_fwd(params0, batch)
  init = fwd(state.params, batch)
  if method.identity_at_init:
    np.testing.assert_allclose(init, ref, atol=1e-5, err_msg=f"{name} claims identity at init")

  # train with the production step
  tx = optax.adamw(3e-2, weight_decay=0.1)
  opt, step = make_train_step(state, build_model(cfg, state.sites), tx, donate=False)
  opt_state = opt.init(state.params)
  inner = getattr(opt_state, "inner", opt_state)          # methods with per-step hooks
  flat0, mask = flatten(state.params), flatten(state.trainable)
  n_train = sum(int(np.prod(v.shape)) for k, v in flat0.items() if mask[k])
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(inner) if getattr(x, "ndim", 0) > 0)
  assert n_train > 0 and n_state == 2 * n_train, (n_state, n_train)
  params = state.params
  for i in range(3):
    params, opt_state, m = step(params, opt_state, batch, jax.random.PRNGKey(i))
    assert bool(m["finite"])
  flat = flatten(params)
  for k, v in flat.items():
    if not mask[k]:
      assert np.array_equal(np.asarray(v), np.asarray(flat0[k])), f"frozen {k} changed"
  assert any(not np.array_equal(np.asarray(flat[k]), np.asarray(flat0[k]))
             for k in flat if mask[k]), f"{name}: nothing trained"
  trained = fwd(params, batch)

  # adapter save / load
  peft.save_adapter(state, params, str(tmp_path / "adapter"))
  st2, p2 = peft.load_adapter(str(tmp_path / "adapter"), cfg, params0)
  f2 = flatten(p2)
  for k in set(state.added) | set(state.made_trainable):
    assert np.array_equal(np.asarray(f2[k]), np.asarray(flat[k])), k
  assert st2.hparams == state.hparams
  np.testing.assert_allclose(fwd(p2, batch), trained, atol=1e-6)

  # merge / unmerge
  if method.mergeable:
    try:
      merged = peft.merge(state, params)
    except PeftConfigError:     # keeps leaves of its own (e.g. BitFit's biases)
      merged = None
    if merged is not None:
      np.testing.assert_allclose(base_fwd(merged, batch), trained, atol=1e-4)
    back = flatten(peft.unmerge(state, peft.merge(state, params, plain=False)))
    for k, v in flat.items():
      np.testing.assert_allclose(np.asarray(back[k], np.float32), np.asarray(v, np.float32),
                                 atol=1e-5, err_msg=k)
  else:
    with pytest.raises(PeftConfigError, match="cannot be merged"):
      peft.merge(state, params)

  # Hugging Face PEFT round trip, where the method has a mapping
  try:
    peft.export_hf_peft(state, params, str(tmp_path / "hf"))
  except PeftConfigError as e:
    assert "HF PEFT export supports" in str(e), e
    return
  st3, p3 = peft.import_hf_peft(str(tmp_path / "hf"), cfg, params0)
  assert st3.method.name == ("lora" if name == "dora" else name) or st3.method.name == name
  np.testing.assert_allclose(_forward(cfg, st3)(p3, batch), trained, atol=1e-5)
