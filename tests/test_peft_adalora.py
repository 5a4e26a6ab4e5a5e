"""AdaLoRA: counts vs HF PEFT, logits parity with HF PEFT AdaLoRA on the tiny models, the
orthogonality regulariser, the rank budget schedule (HF's budget formula), pruning scores vs
HF's RankAllocator, training through the generic per-step hooks, and merging a pruned model."""
import copy
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from tiny_hf import saved_hf_model

hfpeft = pytest.importorskip("peft")

from peft_jax import peft  # noqa: E402
from peft_jax.checkpoint.hf import load_hf  # noqa: E402
from peft_jax.models import build_model, get_preset, init_params  # noqa: E402
from peft_jax.peft import adalora  # noqa: E402
from peft_jax.peft.base import flatten, unflatten  # noqa: E402
from peft_jax.peft.optimizer import HookedOptState  # noqa: E402
from steps import train_step  # noqa: E402  (the production step)

warnings.filterwarnings("ignore", module="peft")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_t5_large_counts_equal_hf_adalora():
  """HF's count from HF PEFT's AdaLoRA on a meta-device t5-large; on the meta device HF leaves
  its (frozen-by-design, 1 per matrix) ``ranknum`` buffers trainable, so they are excluded."""
  import transformers
  info = peft.describe(get_preset("t5-large"), "adalora", {"total_step": 1000})
  tc = transformers.T5Config(d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=24,
                             feed_forward_proj="relu", vocab_size=32128)
  with torch.device("meta"):
    tm = transformers.T5ForConditionalGeneration(tc)
  pm = hfpeft.get_peft_model(tm, hfpeft.AdaLoraConfig(task_type="SEQ_2_SEQ_LM", total_step=1000))
  hf = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "ranknum" not in n)
  assert info["trainable_params"] == hf
  # formula: q,k,v,o (1024x1024) and wi, wo (1024x4096), init_r=12: r*(in+out) + r each;
  # encoder 6 matrices, decoder 10 per layer, 24 layers each
  per_attn, per_mlp = 12 * 2048 + 12, 12 * 5120 + 12
  assert info["trainable_params"] == 24 * (4 * per_attn + 2 * per_mlp + 8 * per_attn + 2 * per_mlp) \
      == 12_980_736
  assert peft.describe(get_preset("t5-large"), "adalora")["trainable_params"] == 12_980_736


@functools.lru_cache(maxsize=None)
def loaded(kind):
  m, d = saved_hf_model(kind)
  cfg, base = load_hf(d)
  return m, cfg, base


def inputs(kind):
  r = np.random.default_rng(1)
  ids = r.integers(2, 128, (2, 7))
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  dec = r.integers(2, 128, (2, 5)) if kind.startswith("t5") else None
  return ids, mask, dec


def torch_kw(kind):
  ids, mask, dec = inputs(kind)
  kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if dec is not None:
    kw["decoder_input_ids"] = torch.tensor(dec)
  return kw


def our_logits(kind, state, params, sites=True):
  cfg = loaded(kind)[1]
  ids, mask, dec = inputs(kind)
  model = build_model(cfg, state.sites) if sites else build_model(cfg)
  args = [jnp.asarray(ids), jnp.asarray(mask)] + ([jnp.asarray(dec)] if dec is not None else [])
  return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args))


def hf_random(kind, hp, seed=0):
  tm = loaded(kind)[0]
  task = "SEQ_2_SEQ_LM" if kind.startswith("t5") else "CAUSAL_LM"
  pm = hfpeft.get_peft_model(copy.deepcopy(tm).eval(),
                             hfpeft.AdaLoraConfig(task_type=task, total_step=10, **hp))
  g = torch.Generator().manual_seed(seed)
  tensors = {}
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if p.requires_grad:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
        tensors[n[len("base_model.model."):-len(".default")]] = p.numpy().copy()
  return pm.eval(), tensors


PARITY = [("t5_v10", {}), ("t5_v11", {"init_r": 4, "target_r": 2, "lora_alpha": 16}),
          ("llama_gqa", {"target_modules": "all-linear", "init_r": 6, "target_r": 3})]


@pytest.mark.parametrize("kind,hp", PARITY)
def test_logits_and_orth_reg_match_hf_adalora(kind, hp):
  _, cfg, base = loaded(kind)
  pm, tensors = hf_random(kind, hp)
  state = peft.apply_peft(cfg, base, "adalora", dict(hp, total_step=10))
  params = adalora.set_hf_tensors(state, state.params, tensors)
  assert adalora.hf_tensors(state, params).keys() == tensors.keys()
  with torch.no_grad():
    theirs = pm(**torch_kw(kind)).logits.numpy()
  ours = our_logits(kind, state, params)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(ours - our_logits(kind, state, base, sites=False)).max() > 1e-2
  # counts (HF on the real cpu model: ranknum frozen)
  assert peft.describe(cfg, "adalora", hp)["trainable_params"] == pm.get_nb_trainable_parameters()[0]
  # orthogonality regulariser: HF adds it to outputs.loss when labels are given
  kw = torch_kw(kind)
  labels = kw.get("decoder_input_ids", kw["input_ids"])
  with torch.no_grad():
    with_reg = float(pm(**kw, labels=labels).loss)
    plain = float(pm.base_model.model(**kw, labels=labels).loss)
  ours_reg = float(state.loss_terms(params))
  assert ours_reg == pytest.approx(with_reg - plain, rel=1e-4, abs=1e-5)
  assert ours_reg > 0.01


def test_pruning_matches_hf_rank_allocator():
  """Same parameters and gradients fed to our after_step and to HF's update_and_allocate for a
  few steps (through the budget phase and the final pattern): the same lambdas are zeroed."""
  kind = "t5_v10"
  hp = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "total_step": 7, "deltaT": 1}
  _, cfg, base = loaded(kind)
  pm, tensors = hf_random(kind, {k: v for k, v in hp.items() if k != "total_step"})
  pm.peft_config["default"].total_step = hp["total_step"]
  state = peft.apply_peft(cfg, base, "adalora", hp)
  params = adalora.set_hf_tensors(state, state.params, tensors)
  hs = state.init_hook_state(params)
  after = jax.jit(state.after_step)
  named = dict(pm.named_parameters())
  rng = np.random.default_rng(0)
  for step in range(hp["total_step"] + 1):
    # a new "updated" parameter set and gradient, on both sides
    fl = flatten(params)
    grads = {}
    for k in state.added:
      fl[k] = jnp.asarray(np.asarray(fl[k]) + 0.05 * rng.standard_normal(fl[k].shape), jnp.float32)
      grads[k] = jnp.asarray(rng.standard_normal(fl[k].shape), jnp.float32)
    gflat = {k: grads.get(k, jnp.zeros(v.shape, v.dtype)) for k, v in fl.items()}
    ours_in = unflatten(fl)
    gt = adalora.hf_tensors(state, unflatten(gflat))
    with torch.no_grad():
      for name, t in adalora.hf_tensors(state, ours_in).items():
        p = named[f"base_model.model.{name}.default"]
        p.copy_(torch.from_numpy(np.ascontiguousarray(t)))
        p.grad = torch.from_numpy(np.ascontiguousarray(gt[name])).clone()
    params, hs = after(jnp.asarray(step, jnp.int32), ours_in, unflatten(gflat), hs)
    pm.base_model.update_and_allocate(step)
    hf_now = {n[len("base_model.model."):-len(".default")]: p.detach().numpy()
              for n, p in pm.named_parameters() if "lora_E" in n}
    ours_now = adalora.hf_tensors(state, params)
    for n, v in hf_now.items():
      np.testing.assert_array_equal(ours_now[n] == 0, v == 0, err_msg=f"step {step} {n}")
      np.testing.assert_allclose(ours_now[n], v, atol=1e-6)


# ----------------------------------------------------------------------------- training

def copy_task(cfg, n=8, length=6, seed=0):
  r = np.random.default_rng(seed)
  src = jnp.asarray(r.integers(3, cfg.vocab_size, (n, length)), jnp.int32)
  dec = jnp.concatenate([jnp.zeros((n, 1), jnp.int32), src[:, :-1]], axis=1)
  return src, dec


def _hf_budget(init_bgt, target_bgt, hp, step):
  """HF's own RankAllocator.budget_schedule (no model needed)."""
  from peft.tuners.adalora.layer import RankAllocator
  ra = RankAllocator.__new__(RankAllocator)
  ra.peft_config = hfpeft.AdaLoraConfig(**{k: hp[k] for k in ("tinit", "tfinal", "deltaT", "total_step")})
  ra.init_bgt, ra.target_bgt = init_bgt, target_bgt
  return ra.budget_schedule(step)


def test_adalora_trains_with_rank_schedule_then_merges():
  cfg = get_preset("t5-tiny")
  base = init_params(cfg, jax.random.PRNGKey(0))
  hp = {"init_r": 6, "target_r": 2, "tinit": 3, "tfinal": 5, "deltaT": 2, "total_step": 30,
        "lora_alpha": 32}
  state = peft.apply_peft(cfg, base, "adalora", hp)
  assert state.has_step_hooks and not peft.apply_peft(cfg, base, "lora").has_step_hooks
  fwd = peft.apply_fn(state)
  src, dec = copy_task(cfg)

  def loss_fn(params):
    logits = fwd(params, src, None, dec)
    return optax.softmax_cross_entropy_with_integer_labels(logits, src).mean()

  opt, step_fn = train_step(state, loss_fn, optax.adam(3e-2))
  step_fn = jax.jit(step_fn)
  params, opt_state = state.params, opt.init(state.params)
  assert isinstance(opt_state, HookedOptState)
  init_bgt, target_bgt = state.method.budgets(cfg, state.hparams, flatten(params))
  n_mat = 2 * 6 + 2 * 10                        # t5-tiny: 2+2 layers; q,k,v,o,wi,wo
  assert (init_bgt, target_bgt) == (6 * n_mat, 2 * n_mat)
  ce_fn = jax.jit(loss_fn)
  ce, counts = [float(ce_fn(params))], []
  for s in range(hp["total_step"] + 3):
    params, opt_state, loss = step_fn(params, opt_state)
    ce.append(float(ce_fn(params)))
    n = adalora.count_nonzero_ranks(state, params)
    counts.append(n)
    budget, prune = _hf_budget(init_bgt, target_bgt, hp, s)
    if s <= hp["tinit"]:
      assert n == init_bgt, (s, n)
    elif prune:                                 # pruned this step: exactly the budget survives
      assert n == budget, (s, n, budget)
    if s >= hp["total_step"] - hp["tfinal"]:    # the final pattern: target rank from then on
      assert n == target_bgt, (s, n)
  assert int(opt_state.count) == hp["total_step"] + 3
  assert counts[hp["tinit"] + 1] > counts[hp["total_step"] - hp["tfinal"]]
  assert ce[-1] < 0.5 * ce[0], ce[::5]          # the task is learnt (cross entropy halves)
  fb, fp = flatten(base), flatten(params)
  assert all(np.array_equal(np.asarray(fb[k]), np.asarray(fp[k])) for k in fb)

  # the pruned model runs and merges exactly
  model = build_model(cfg, state.sites)
  unmerged = np.asarray(model.apply({"params": params}, src, None, dec))
  merged = np.asarray(build_model(cfg).apply({"params": peft.merge(state, params)}, src, None, dec))
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
  assert np.isfinite(unmerged).all()


def test_layer_selection_and_config_errors():
  cfg = get_preset("llama-tiny")
  full = peft.describe(cfg, "adalora")["trainable_params"]
  assert full == 2 * 2 * (12 * 64 + 12)              # q_proj, v_proj of 2 layers, 32 -> 32
  assert peft.describe(cfg, "adalora", {"layers_to_transform": [0]})["trainable_params"] == full // 2
  base = init_params(cfg, jax.random.PRNGKey(0))
  st = peft.apply_peft(cfg, base, "adalora", {"layers_to_transform": [0], "total_step": 4})
  assert st.method.budgets(cfg, st.hparams, flatten(st.params)) == (12 * 2, 8 * 2)
  with pytest.raises(peft.PeftConfigError, match="total_step"):
    peft.apply_peft(cfg, base, "adalora").init_hook_state(base)
  with pytest.raises(peft.PeftConfigError, match="budgeting phase"):
    peft.describe(cfg, "adalora", {"total_step": 10, "tinit": 6, "tfinal": 4})
  with pytest.raises(peft.PeftConfigError, match="target_r"):
    peft.describe(cfg, "adalora", {"init_r": 4, "target_r": 8})
