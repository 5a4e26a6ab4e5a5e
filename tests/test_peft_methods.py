"""Library-default counts on the published sizes (abstract, no weights), targets and layer /
sub-layer selection, accounting, and prefix/prompt tuning with the decoding caches."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import peft
from peft_jax.models import get_preset, init_params, build_model
from peft_jax.models import llama as llama_mod
from peft_jax.models import t5 as t5_mod
from peft_jax.peft.base import flatten, unflatten


@pytest.mark.parametrize("preset,method,hp,expected", [
    ("t5-large", "lora", {"target_modules": ["q", "v"], "r": 8}, 2_359_296),
    ("t5-large", "lora", {}, 2_359_296),          # the defaults are q, v and r=8
    ("t5-large", "ia3", {}, 344_064),
    ("t5-large", "ln_tuning", {}, 124_928),
    ("flan-t5-xl", "bitfit", {}, 1_179_648),
    ("llama-2-7b", "lora", {}, 4_194_304),
])
def test_library_default_counts(preset, method, hp, expected):
  info = peft.describe(get_preset(preset), method, hp)
  assert info["trainable_params"] == expected
  assert info["trainable_percent"] == pytest.approx(
      100.0 * expected / (info["frozen_params"] + info["trainable_params"]))


def test_describe_contents():
  info = peft.describe(get_preset("t5-large"), "lora", {})
  for k in ("total_params", "trainable_params", "changed_params", "trainable_percent", "table",
            "frozen_params", "added_params", "hparams"):
    assert k in info
  assert info["total_params"] == 737_668_096 + 2_359_296
  assert info["added_params"] == 2_359_296
  assert info["changed_params"] == 144 * 1024 * 1024        # the q and v kernels LoRA folds into
  assert "2,359,296" in info["table"] and "% trainable" in info["table"]
  assert info["hparams"]["r"] == 8 and info["hparams"]["lora_alpha"] == 8
  full = peft.describe(get_preset("t5-large"), "full")
  assert full["trainable_params"] == full["total_params"] == full["changed_params"] == 737_668_096
  pt = peft.describe(get_preset("t5-large"), "prompt_tuning", {"num_virtual_tokens": 20})
  assert pt["trainable_params"] == 20 * 1024 and pt["changed_params"] == 0


def _lora(preset, **hp):
  return peft.describe(get_preset(preset), "lora", hp)["trainable_params"]


def test_selections_count_only_selected_layers():
  per = 8 * (1024 + 1024)          # t5-large q or v, r=8
  # q,v: encoder 2 per layer, decoder 4 per layer (self + cross), 24 layers each
  assert _lora("t5-large", last_k_layers=6) == 6 * 6 * per
  assert _lora("t5-large", first_k_layers=1) == 6 * per
  assert _lora("t5-large", layers_to_transform=[0, 23]) == 2 * 6 * per
  assert _lora("t5-large", layers_to_transform={"decoder": [0, 1, 2]}) == 3 * 4 * per
  assert _lora("t5-large", random_layer_fraction=0.25, layer_seed=3) == 6 * 6 * per
  assert _lora("t5-large", target_sublayers=["cross_attn"]) == 24 * 2 * per
  assert _lora("t5-large", target_sublayers=["encoder_self_attn"]) == 24 * 2 * per
  assert _lora("t5-large", target_sublayers=["self_attn"], last_k_layers=2) == 2 * 4 * per
  assert _lora("t5-large", target_modules="decoder/layers/cross_attn/(q|v)") == 24 * 2 * per
  assert _lora("t5-large", target_modules=["cross_attn/q", "EncDecAttention.v"]) == 24 * 2 * per
  # all-linear excludes the tied head; LLaMA accepts HF names
  assert _lora("llama-2-7b", target_modules=["q_proj", "v_proj"]) == _lora("llama-2-7b")
  n = 4096
  assert _lora("llama-2-7b", target_modules="all-linear") == 32 * 8 * (4 * 2 * n + 3 * (n + 11008))


def test_random_layer_selection_is_seeded():
  cfg = get_preset("llama-2-7b")
  a = peft.apply_peft(cfg, _abstract(cfg), "lora", {"random_layer_fraction": 0.5, "layer_seed": 1})
  b = peft.apply_peft(cfg, _abstract(cfg), "lora", {"random_layer_fraction": 0.5, "layer_seed": 1})
  c = peft.apply_peft(cfg, _abstract(cfg), "lora", {"random_layer_fraction": 0.5, "layer_seed": 2})
  ma, mb, mc = (s.update_masks["layers/attn/q/lora_A"].reshape(-1) for s in (a, b, c))
  assert ma.sum() == 16 and np.array_equal(ma, mb) and not np.array_equal(ma, mc)


@functools.lru_cache(maxsize=None)
def _abstract(cfg):
  from peft_jax.models import abstract_params
  return abstract_params(cfg)


@functools.lru_cache(maxsize=None)
def _real(name):
  cfg = get_preset(name)
  return cfg, init_params(cfg, jax.random.PRNGKey(0))


def _randomize(state, params):
  rng = np.random.default_rng(0)
  fl = flatten(params)
  for k in state.added:
    fl[k] = (0.5 * rng.standard_normal(fl[k].shape)).astype(np.float32)
  return unflatten(fl)


def test_llama_prefix_tuning_with_kv_cache_matches_full_forward():
  cfg, base = _real("llama-tiny-gqa")
  state = peft.apply_peft(cfg, base, "prefix_tuning", {"num_virtual_tokens": 3})
  params = _randomize(state, state.params)
  model = build_model(cfg, state.sites)
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 128, (2, 7)), jnp.int32)
  full = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
  cache = llama_mod.init_cache(cfg, 2, 10)
  mask = jnp.ones((2, 10), bool)
  step = jax.jit(lambda p, x, c, i: model.apply({"params": p}, x, mask, cache=c, cache_index=i))
  out1, cache = step(params, ids[:, :5], cache, 0)
  out2, cache = step(params, ids[:, 5:6], cache, 5)
  out3, _ = step(params, ids[:, 6:7], cache, 6)
  inc = jnp.concatenate([out1, out2, out3], axis=1)
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), rtol=0, atol=1e-5)


def test_t5_prefix_tuning_with_kv_cache_matches_full_decode():
  cfg, base = _real("t5-v1_1-tiny")
  state = peft.apply_peft(cfg, base, "prefix_tuning",
                          {"num_virtual_tokens": 2,
                           "prefix_attentions": ["encoder_self_attn", "decoder_self_attn", "cross_attn"]})
  params = _randomize(state, state.params)
  model = build_model(cfg, state.sites)
  r = np.random.default_rng(2)
  ids = jnp.asarray(r.integers(3, 128, (2, 6)), jnp.int32)
  dec = jnp.asarray(r.integers(3, 128, (2, 4)), jnp.int32)
  v = {"params": params}
  enc, enc_mask = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(v, ids)
  full = jax.jit(lambda v, d: model.apply(v, d, enc, enc_mask, method=model.decode))(v, dec)
  cache = t5_mod.init_cache(cfg, 2, 4, enc.shape[1])
  run = jax.jit(lambda v, d, c, i, mode: model.apply(v, d, enc, enc_mask, cache=c, cache_index=i,
                                                     decode_mode=mode, method=model.decode),
                static_argnums=4)
  a, cache = run(v, dec[:, :3], cache, 0, "fill")
  b, _ = run(v, dec[:, 3:], cache, 3, "step")
  np.testing.assert_allclose(np.asarray(jnp.concatenate([a, b], 1)), np.asarray(full), rtol=0, atol=1e-5)


def test_prompt_tuning_extends_inputs_and_masks():
  cfg, base = _real("t5-v1_1-tiny")
  state = peft.apply_peft(cfg, base, "prompt_tuning", {"num_virtual_tokens": 4,
                                                       "prompt_tuning_init": "SAMPLE_VOCAB"})
  p = flatten(state.params)["encoder/prompt_embeddings"]
  emb = np.asarray(base["shared"]["embedding"])
  assert all(any(np.array_equal(np.asarray(row), e) for e in emb) for row in p)   # sampled rows
  model = build_model(cfg, state.sites)
  ids = jnp.ones((2, 5), jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  enc, enc_mask = jax.jit(lambda p: model.apply({"params": p}, ids, mask, method=model.encode))(
      state.params)
  assert enc.shape[1] == 9 and enc_mask.shape == (2, 9)
  assert np.asarray(enc_mask).tolist()[1] == [True] * 4 + [True, True, True, False, False]

  lcfg, lbase = _real("llama-tiny-gqa")
  lstate = peft.apply_peft(lcfg, lbase, "prompt_tuning", {"num_virtual_tokens": 4})
  lmodel = build_model(lcfg, lstate.sites)
  out = jax.eval_shape(lambda p: lmodel.apply({"params": p}, jnp.ones((2, 5), jnp.int32)), lstate.params)
  assert out.shape == (2, 9, lcfg.vocab_size)


def test_prefix_width_follows_kv_heads_and_dkv():
  # T5-3B: d_kv * heads = 4096 != d_model = 1024; LLaMA-3-8B: 8 KV heads of 128
  t5 = peft.apply_peft(get_preset("t5-3b"), _abstract(get_preset("t5-3b")), "prefix_tuning",
                       {"num_virtual_tokens": 5})
  assert flatten(t5.params)["decoder/layers/self_attn/prefix_key"].shape == (24, 5, 4096)
  ll = peft.apply_peft(get_preset("llama-3-8b"), _abstract(get_preset("llama-3-8b")), "prefix_tuning",
                       {"num_virtual_tokens": 5, "prefix_projection": True})
  assert flatten(ll.params)["prefix_encoder/dense_out/kernel"].shape == (1024, 32 * 2 * 1024)
  assert flatten(jax.eval_shape(ll.prepare, ll.params))["layers/attn/prefix_value"].shape == (32, 5, 1024)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_dropout_only_in_training(method):
  cfg, base = _real("llama-tiny-gqa")
  state = peft.apply_peft(cfg, base, method, {"lora_dropout": 0.5})
  params = _randomize(state, state.params)
  if method == "dora":   # keep the magnitudes near ||W||
    fl = flatten(params)
    for k in state.added:
      if k.endswith("lora_magnitude"):
        fl[k] = flatten(state.params)[k]
    params = unflatten(fl)
  model = build_model(cfg, state.sites)
  ids = jnp.ones((1, 4), jnp.int32)
  f = jax.jit(lambda p, det, r: model.apply({"params": p}, ids, deterministic=det, rngs={"dropout": r}),
              static_argnums=1)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  e1, e2 = f(params, True, k1), f(params, True, k2)
  t1, t2 = f(params, False, k1), f(params, False, k2)
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))          # eval: no dropout
  assert np.abs(np.asarray(t1) - np.asarray(t2)).max() > 1e-4            # train: random masks
  assert np.abs(np.asarray(t1) - np.asarray(e1)).max() > 1e-4


@pytest.mark.parametrize("preset", ["t5-v1_1-tiny", "llama-tiny-gqa"])
def test_bf16_models_keep_fp32_adapters(preset):
  from peft_jax.models import abstract_params
  cfg = get_preset(preset).replace(dtype="bfloat16", param_dtype="bfloat16")
  ids = jnp.ones((2, 5), jnp.int32)
  args = (ids, None, ids) if cfg.model_type == "t5" else (ids,)
  for method, hp in [("lora", {"target_modules": "all-linear"}), ("dora", {}), ("ia3", {}),
                     ("bitfit", {}), ("prompt_tuning", {"num_virtual_tokens": 2}),
                     ("prefix_tuning", {"num_virtual_tokens": 2, "prefix_projection": True})]:
    state = peft.apply_peft(cfg, abstract_params(cfg), method, hp)
    assert all(flatten(state.params)[k].dtype == jnp.float32 for k in state.added)
    model = build_model(cfg, state.sites)
    out = jax.eval_shape(lambda p: model.apply({"params": state.prepare(p)}, *args), state.params)
    assert out.dtype == jnp.float32
