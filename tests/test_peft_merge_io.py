"""Merge / unmerge, plain HF export of a merged LoRA model, adapter-only save/load."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tiny_hf import loaded

from peft_jax import peft
from peft_jax.checkpoint.hf import save_hf
from peft_jax.models import build_model
from peft_jax.peft.base import flatten, unflatten


pytestmark = pytest.mark.usefixtures("one_torch_thread")




@functools.lru_cache(maxsize=None)
def _jitted(model):
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a))


def inputs(kind):
  r = np.random.default_rng(2)
  ids = jnp.asarray(r.integers(2, 128, (2, 6)), jnp.int32)
  mask = jnp.asarray([[1] * 6, [1] * 5 + [0]], jnp.int32)
  if kind.startswith("t5"):
    return ids, mask, jnp.asarray(r.integers(2, 128, (2, 4)), jnp.int32)
  return ids, mask


def logits(kind, params, state=None):
  cfg = loaded(kind)[2]
  model = build_model(cfg, state.sites) if state is not None else build_model(cfg)
  p = state.prepare(params) if state is not None else params
  return np.asarray(_jitted(model)(p, *inputs(kind)))


def randomized(kind, method, hp, seed=0):
  _, _, cfg, base = loaded(kind)
  state = peft.apply_peft(cfg, base, method, hp, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  fl = flatten(state.params)
  for k in set(state.added) | set(state.made_trainable):
    a = np.asarray(fl[k])
    noise = 0.1 * rng.standard_normal(a.shape)
    new = a + noise if k.endswith(("ia3_l", "lora_magnitude", "/scale")) else noise
    if k in state.update_masks:
      new = np.where(state.update_masks[k], new, a)
    fl[k] = new.astype(a.dtype)
  return state, unflatten(fl)


MERGE_CASES = [("llama_gqa", "lora", {"target_modules": "all-linear", "r": 4}),
               ("llama_gqa", "dora", {"target_modules": ["q", "v", "down"]}),
               ("llama_gqa", "ia3", {}),
               ("llama_gqa", "lora", {"last_k_layers": 1, "use_rslora": True}),
               ("t5_v11", "lora", {"target_modules": ["q", "k", "wi_0", "wo"]}),
               ("t5_v11", "ia3", {})]


@pytest.mark.parametrize("kind,method,hp", MERGE_CASES)
def test_merged_equals_unmerged(kind, method, hp):
  state, params = randomized(kind, method, hp)
  merged = peft.merge(state, params)
  assert set(flatten(merged)) == set(flatten(loaded(kind)[3]))   # a plain base tree
  ref = logits(kind, params, state)
  np.testing.assert_allclose(logits(kind, merged), ref, rtol=0, atol=1e-4)
  assert np.abs(ref - logits(kind, loaded(kind)[3])).max() > 1e-2
  full = peft.merge(state, params, plain=False)
  back = flatten(peft.unmerge(state, full))
  orig = flatten(params)
  assert set(back) == set(orig)
  for k in orig:
    np.testing.assert_allclose(np.asarray(back[k]), np.asarray(orig[k]), rtol=1e-5, atol=1e-5)


def test_bitfit_merge_is_honest():
  state, params = randomized("llama_gqa", "bitfit", {})
  kept = peft.merge(state, params, plain=False)       # biases stay linear biases
  assert all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(params)))
  np.testing.assert_array_equal(logits("llama_gqa", kept, state), logits("llama_gqa", params, state))
  with pytest.raises(peft.PeftConfigError, match="no bias"):
    peft.merge(state, params)


def test_non_mergeable_method_raises():
  state, params = randomized("llama_gqa", "prompt_tuning", {"num_virtual_tokens": 2})
  with pytest.raises(peft.PeftConfigError, match="cannot be merged"):
    peft.merge(state, params)


@pytest.mark.parametrize("kind", ["llama_gqa", "t5_v11"])
def test_merged_lora_exports_as_plain_hf_checkpoint(kind, tmp_path):
  hp = {"target_modules": "all-linear", "r": 4} if kind == "llama_gqa" else \
      {"target_modules": ["q", "k", "wi_0", "wo"]}
  state, params = randomized(kind, "lora", hp)
  save_hf(loaded(kind)[2], peft.merge(state, params), str(tmp_path))
  cls = transformers.LlamaForCausalLM if kind == "llama_gqa" else transformers.T5ForConditionalGeneration
  tm = cls.from_pretrained(str(tmp_path)).eval()
  ins = [torch.tensor(np.asarray(x)) for x in inputs(kind)]
  with torch.no_grad():
    if kind == "llama_gqa":
      ref = tm(input_ids=ins[0], attention_mask=ins[1]).logits.numpy()
    else:
      ref = tm(input_ids=ins[0], attention_mask=ins[1], decoder_input_ids=ins[2]).logits.numpy()
  np.testing.assert_allclose(logits(kind, params, state), ref, rtol=0, atol=1e-4)


def test_fold_prefix_projection():
  state, params = randomized("llama_gqa", "prefix_tuning",
                             {"num_virtual_tokens": 3, "prefix_projection": True})
  folded_state, folded = peft.fold_projection(state, params)
  assert folded_state.hparams["prefix_projection"] is False
  assert not any(k.startswith("prefix_encoder/") for k in flatten(folded))
  np.testing.assert_allclose(logits("llama_gqa", folded, folded_state),
                             logits("llama_gqa", params, state), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
@pytest.mark.parametrize("method,hp", [("lora", {"layers_to_transform": [1], "r": 2}),
                                       ("prefix_tuning", {"num_virtual_tokens": 2,
                                                          "prefix_projection": True}),
                                       ("ln_tuning", {})])
def test_adapter_save_load(method, hp, fmt, tmp_path):
  kind = "llama_gqa"
  _, _, cfg, base = loaded(kind)
  state, params = randomized(kind, method, hp)
  peft.save_adapter(state, params, str(tmp_path), format=fmt)
  files = sorted(os.listdir(tmp_path))
  assert files == sorted(["peft_config.json", f"adapter.{fmt}", "MANIFEST.json"])
  conf = json.load(open(tmp_path / "peft_config.json"))
  assert conf["method"] == method and conf["model_type"] == "llama"
  saved = set(conf["leaves"])
  assert saved == set(state.added) | set(state.made_trainable)   # only the method's leaves
  n_saved = sum(int(np.prod(v["shape"])) for v in conf["leaves"].values())
  assert n_saved < 0.5 * sum(x.size for x in jax.tree_util.tree_leaves(base))
  state2, params2 = peft.load_adapter(str(tmp_path), cfg, base)
  assert state2.hparams == state.hparams
  a, b = flatten(params), flatten(params2)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_adapter_load_rejects_mismatch(tmp_path):
  state, params = randomized("llama_gqa", "lora", {})
  peft.save_adapter(state, params, str(tmp_path))
  _, _, cfg_t5, base_t5 = loaded("t5_v10")
  with pytest.raises(peft.PeftConfigError, match="llama model, not t5"):
    peft.load_adapter(str(tmp_path), cfg_t5, base_t5)
  with pytest.raises(peft.PeftConfigError, match="no peft_config.json"):
    peft.load_adapter(str(tmp_path / "nope"), cfg_t5, base_t5)
