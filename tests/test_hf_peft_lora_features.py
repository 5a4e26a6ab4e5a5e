"""HF PEFT LoRA features beyond linear layers: LoRA on the token embedding
(``lora_embedding_A/B``), ``lora_bias`` and ``trainable_token_indices``. Adapters made by
HF PEFT (noise on every adapter weight) import with HF PEFT's logits; ours, configured
the same way, count HF PEFT's trainable parameters and export to the same logits."""
import warnings

import jax
import numpy as np
import pytest

from tiny_hf import loaded

hfpeft = pytest.importorskip("peft")

from test_hf_peft_import_strict import hf_adapter, imported_matches, refused, task  # noqa: E402
from test_peft_hf_parity import fresh_torch, hf_logits, inputs, our_logits, randomize  # noqa: E402
from peft_jax import peft  # noqa: E402
from peft_jax.models import build_model  # noqa: E402
from peft_jax.peft.base import flatten  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4

# name -> (kind, HF LoraConfig kwargs, our lora hyperparameters)
CASES = {
    "emb_llama": ("llama_mha", dict(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]),
                  dict(r=2, lora_alpha=4, target_modules=["q", "embed_tokens"])),
    "emb_t5": ("t5_v10", dict(r=3, lora_alpha=6, target_modules=["q", "embed_tokens"]),
               dict(r=3, lora_alpha=6, target_modules=["q", "embed_tokens"])),
    "emb_t5_decoder": ("t5_v11", dict(r=2, target_modules=["decoder.embed_tokens"],
                                      rank_pattern={"embed_tokens": 3}),
                       dict(r=2, target_modules=["decoder.embed_tokens"],
                            rank_pattern={"embed_tokens": 3})),
    "dora_emb_llama": ("llama_mha", dict(r=2, lora_alpha=4, use_dora=True,
                                         target_modules=["v_proj", "embed_tokens"]),
                       dict(r=2, lora_alpha=4, use_dora=True, target_modules=["v", "embed_tokens"])),
    "dora_emb_t5": ("t5_v10", dict(r=2, use_dora=True, target_modules=["embed_tokens"]),
                    dict(r=2, use_dora=True, target_modules=["embed_tokens"])),
    # Qwen2: head tied to the table (HF's LoRA changes only the lookup; token rows reach both)
    "emb_qwen2_tied": ("qwen2", dict(r=2, target_modules=["embed_tokens", "k_proj"], lora_bias=False),
                       dict(r=2, target_modules=["embed_tokens", "k"])),
    "tokens_qwen2_tied": ("qwen2", dict(r=2, target_modules=["q_proj"], lora_bias=True,
                                        trainable_token_indices=[2, 8]),
                          dict(r=2, target_modules=["q"], lora_bias=True,
                               trainable_token_indices=[2, 8])),
    "bias_llama": ("llama_gqa", dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                     lora_bias=True, layers_to_transform=[1]),
                   dict(r=2, lora_alpha=4, target_modules=["q", "down"], lora_bias=True,
                        layers_to_transform=[1])),
    "bias_t5": ("t5_v11", dict(r=2, target_modules="all-linear", lora_bias=True),
                dict(r=2, target_modules="all-linear", lora_bias=True)),
    "tokens_llama": ("llama_mha", dict(r=2, target_modules=["v_proj"],
                                       trainable_token_indices={"embed_tokens": [3, 9, 5]}),
                     dict(r=2, target_modules=["v"],
                          trainable_token_indices={"embed_tokens": [3, 9, 5]})),
    "tokens_t5_tied": ("t5_v10", dict(r=2, target_modules=["q"], trainable_token_indices=[3, 9, 5]),
                       dict(r=2, target_modules=["q"], trainable_token_indices=[3, 9, 5])),
    "tokens_t5_untied": ("t5_v11", dict(r=2, target_modules=["q"], trainable_token_indices=[4, 7]),
                         dict(r=2, target_modules=["q"], trainable_token_indices=[4, 7])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_made_adapter_imports(case, tmp_path):
  kind, hf_kw, ours = CASES[case]
  pm, d = hf_adapter(kind, tmp_path, **hf_kw)
  state = imported_matches(kind, pm, d)
  assert peft.summary(state)["trainable_params"] == pm.get_nb_trainable_parameters()[0]
  # and back out: HF PEFT loads our export with the same logits
  _, _, cfg, base = loaded(kind)
  st, params = peft.import_hf_peft(d, cfg, base)
  peft.export_hf_peft(st, params, str(tmp_path / "back"))
  pm2 = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), str(tmp_path / "back")).eval()
  np.testing.assert_allclose(hf_logits(kind, pm2), hf_logits(kind, pm), atol=TOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_counts_and_export(case, tmp_path):
  kind, hf_kw, ours = CASES[case]
  _, _, cfg, base = loaded(kind)
  n_hf = hfpeft.get_peft_model(fresh_torch(kind), hfpeft.LoraConfig(task_type=task(kind), **hf_kw)
                               ).get_nb_trainable_parameters()
  info = peft.describe(cfg, "lora", ours)
  assert (info["trainable_params"], info["total_params"]) == n_hf
  state = peft.apply_peft(cfg, base, "lora", ours, jax.random.PRNGKey(0))
  # identity at init (HF: embedding A = 0, lora_B (and its bias) = 0, token rows = originals)
  plain = build_model(cfg)
  ids, mask, dec = inputs(kind)
  args = [ids, mask] + ([dec] if dec is not None else [])
  ref = np.asarray(plain.apply({"params": base}, *args))
  np.testing.assert_allclose(our_logits(kind, state, state.params), ref, atol=1e-5, rtol=0)
  params = randomize(state, state.params)
  peft.export_hf_peft(state, params, str(tmp_path / "ours"))
  pm = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), str(tmp_path / "ours")).eval()
  mine = our_logits(kind, state, params)
  np.testing.assert_allclose(mine, hf_logits(kind, pm), atol=TOL, rtol=0)
  assert np.abs(mine - ref).max() > 1e-2


def test_trainable_tokens_train_only_their_rows():
  kind, _, ours = CASES["tokens_t5_tied"]
  _, _, cfg, base = loaded(kind)
  state = peft.apply_peft(cfg, base, "lora", ours)
  tr = flatten(state.trainable)
  assert tr["shared/trainable_tokens"] and not tr["shared/embedding"]
  params = randomize(state, state.params)
  table = np.asarray(flatten(state.prepare(params))["shared/embedding"])
  orig = np.asarray(flatten(base)["shared/embedding"])
  changed = np.nonzero(np.abs(table - orig).max(1) > 0)[0]
  assert sorted(changed) == [3, 5, 9]
  np.testing.assert_array_equal(table[[3, 9, 5]], np.asarray(flatten(params)["shared/trainable_tokens"]))
  # the gradient reaches the token rows through the lookup and the tied head
  model = build_model(cfg, state.sites)
  ids, mask, dec = inputs(kind)
  g = jax.grad(lambda p: model.apply({"params": state.prepare(p)}, ids, mask, dec).sum())(params)
  assert np.abs(np.asarray(flatten(g)["shared/trainable_tokens"])).min(1).all()


def _merge_roundtrip(kind, ours):
  _, _, cfg, base = loaded(kind)
  state = peft.apply_peft(cfg, base, "lora", ours)
  params = randomize(state, state.params)
  ids, mask, dec = inputs(kind)
  args = [ids, mask] + ([dec] if dec is not None else [])
  merged = peft.merge(state, params)
  np.testing.assert_allclose(np.asarray(build_model(cfg).apply({"params": merged}, *args)),
                             our_logits(kind, state, params), atol=TOL, rtol=0)
  back = flatten(peft.unmerge(state, peft.merge(state, params, plain=False)))
  for k, v in flatten(params).items():
    np.testing.assert_allclose(np.asarray(back[k]), np.asarray(v), atol=1e-5, err_msg=k)
  return state, params


def test_merge_embedding_and_tokens():
  _merge_roundtrip("llama_mha", CASES["emb_llama"][2])         # untied head: merges
  _merge_roundtrip("llama_mha", CASES["dora_emb_llama"][2])
  _merge_roundtrip("t5_v10", CASES["tokens_t5_tied"][2])
  _merge_roundtrip("llama_mha", CASES["tokens_llama"][2])
  _merge_roundtrip("qwen2", CASES["tokens_qwen2_tied"][2])     # lora_bias folds into q's bias


@pytest.mark.parametrize("kind,ours,match", [
    ("t5_v10", CASES["emb_t5"][2], "T5's encoder and decoder read one shared table"),
    ("llama_mha", CASES["bias_llama"][2], "the layer has no bias"),
])
def test_merge_refused(kind, ours, match):
  _, _, cfg, base = loaded(kind)
  state = peft.apply_peft(cfg, base, "lora", ours)
  with pytest.raises(peft.PeftConfigError, match=match):
    peft.merge(state, state.params)


def test_tied_llama_embedding_merge_refused():
  import dataclasses
  _, _, cfg, base = loaded("llama_mha")
  cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
  fl = {k: v for k, v in flatten(base).items() if not k.startswith("lm_head")}
  from peft_jax.tree import unflatten
  state = peft.apply_peft(cfg, unflatten(fl), "lora", CASES["emb_llama"][2])
  with pytest.raises(peft.PeftConfigError, match="the output head is tied"):
    peft.merge(state, state.params)


@pytest.mark.parametrize("method,kind,hp,match", [
    ("lora", "t5_v10", dict(target_modules=["q", "shared"]), "changes nothing"),
    ("dora", "llama_mha", dict(lora_bias=True), "lora_bias=True is not supported with DoRA"),
    ("lora", "llama_mha", dict(target_modules=["embed_tokens"], lora_bias=True),
     "not supported for an embedding layer"),
    ("lora", "llama_mha", dict(lora_bias=True, init_lora_weights="gaussian"), "init_lora_weights"),
    ("lora", "t5_v10", dict(trainable_token_indices={"embed_tokens": [1]}), "per-lookup rows of encoder.embed_tokens"),
    ("lora", "llama_mha", dict(trainable_token_indices=[1, 500]), "token id 500 is out of range"),
    ("lora", "llama_mha", dict(trainable_token_indices=[1, 1]), "must not repeat"),
    ("lora", "llama_mha", dict(target_modules=["embed_tokens"], layers_to_transform=[0]),
     "outside the layers"),
    ("lora", "t5_v10", dict(target_modules=["q", "embedding"]),
     r"'embedding' matches no module.*token embedding lookups: 'embed_tokens' "
     r"\(encoder/embed_tokens, decoder/embed_tokens\)"),
])
def test_refused_configs(method, kind, hp, match):
  _, _, cfg, base = loaded(kind)
  with pytest.raises(peft.PeftConfigError, match=match) as e:
    peft.apply_peft(cfg, base, method, hp)
  assert "\n" not in str(e.value)


def test_hf_shared_lora_refused_on_import(tmp_path):
  """HF PEFT's LoRA on T5's ``shared`` wraps a module the stacks do not call (a no-op)."""
  pm, d = hf_adapter("t5_v10", tmp_path / "a", r=2, target_modules=["q", "shared"])
  refused("t5_v10", d, r"shared\.lora_embedding_A: LoRA on the shared embedding changes nothing")
  pm_q = hfpeft.get_peft_model(fresh_torch("t5_v10"), hfpeft.LoraConfig(
      task_type="SEQ_2_SEQ_LM", r=2, target_modules=["q"]))
  pm_q.load_state_dict({k: v for k, v in pm.state_dict().items() if "shared" not in k}, strict=False)
  np.testing.assert_array_equal(hf_logits("t5_v10", pm_q.eval()), hf_logits("t5_v10", pm))


def test_changed_saved_embedding_refused(tmp_path):
  """HF PEFT saves the adapted embedding's table; one that differs from ours is refused."""
  import os
  from safetensors.numpy import load_file, save_file
  _, d = hf_adapter("llama_mha", tmp_path, r=2, target_modules=["embed_tokens"])
  f = os.path.join(d, "adapter_model.safetensors")
  t = load_file(f)
  k = "base_model.model.model.embed_tokens.base_layer.weight"
  assert k in t
  t[k] = t[k] + 1.0
  save_file(t, f)
  refused("llama_mha", d, "differs from this model's")


def test_missing_lora_bias_tensor_refused(tmp_path):
  import os
  from safetensors.numpy import load_file, save_file
  _, d = hf_adapter("llama_gqa", tmp_path, r=2, target_modules=["q_proj"], lora_bias=True)
  f = os.path.join(d, "adapter_model.safetensors")
  t = load_file(f)
  del t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"]
  save_file(t, f)
  refused("llama_gqa", d, r"q_proj\.lora_B\.bias is missing")


def test_adalora_still_refuses_these_fields(tmp_path):
  """AdaLoRA shares LoraConfig's fields but not these features: its import refuses them."""
  from test_hf_peft_import_strict import edit_config
  pm = hfpeft.get_peft_model(fresh_torch("llama_gqa"), hfpeft.AdaLoraConfig(
      task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]))
  d = str(tmp_path / "ada")
  pm.save_pretrained(d)
  edit_config(d, trainable_token_indices=[3])
  refused("llama_gqa", d, r"trainable_token_indices=\[3\] is not supported")
  edit_config(d, trainable_token_indices=None, lora_bias=True)
  refused("llama_gqa", d, r"lora_bias=True is not supported")


@pytest.mark.parametrize("kind,hp", [
    ("t5_v10", dict(r=2, target_modules=["q", "embed_tokens"], use_dora=True)),
    ("t5_v11", dict(r=2, target_modules=["q"], lora_bias=True, trainable_token_indices=[3, 9])),
])
def test_production_step_trains_only_the_adapter(kind, hp):
  """The production step: the table stays bitwise frozen, the new leaves (embedding pair,
  magnitudes, lora_bias, token rows) train; optimizer state only for them."""
  import optax
  from test_conformance import _batch
  from peft_jax.step import make_train_step
  _, _, cfg, base = loaded(kind)
  state = peft.apply_peft(cfg, base, "lora", hp)
  tx = optax.adamw(3e-2, weight_decay=0.1)
  opt, step = make_train_step(state, build_model(cfg, state.sites), tx, donate=False)
  opt_state = opt.init(state.params)
  params = state.params
  batch = _batch(cfg)
  for i in range(2):
    params, opt_state, m = step(params, opt_state, batch, jax.random.PRNGKey(i))
    assert bool(m["finite"])
  f0, f1, tr = flatten(state.params), flatten(params), flatten(state.trainable)
  assert np.array_equal(np.asarray(f1["shared/embedding"]), np.asarray(f0["shared/embedding"]))
  new = [k for k in state.added if tr[k]]
  assert new and all(not np.array_equal(np.asarray(f1[k]), np.asarray(f0[k])) for k in new), new
  n_train = sum(int(np.prod(f0[k].shape)) for k in f0 if tr[k])
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if getattr(x, "ndim", 0) > 0)
  assert n_state == 2 * n_train
