"""Models: parity with transformers, checkpoint import/export, abstract totals."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from peft_jax.checkpoint.hf import CheckpointError, load_hf, save_hf
from peft_jax.models import (abstract_params, build_model, count_params, get_preset, init_params,
                             logical_axes)
from tiny_hf import KINDS, saved_hf_model


def _inputs(kind, seed=0):
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(2, 128, (2, 9), generator=g)
  mask = torch.ones_like(ids)
  dec = torch.randint(2, 128, (2, 6), generator=g)
  if kind.startswith("t5"):
    mask[1, 6:] = 0   # a padded encoder row
  return ids, mask, dec


def _ours(model, params, kind, ids, mask, dec):
  if kind.startswith("t5"):
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids.numpy()),
                                  jnp.asarray(mask.numpy()), jnp.asarray(dec.numpy())))
  return np.asarray(model.apply({"params": params}, jnp.asarray(ids.numpy())))


def _theirs(m, kind, ids, mask, dec):
  with torch.no_grad():
    if kind.startswith("t5"):
      return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.numpy()
    return m(input_ids=ids).logits.numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_forced_logits_match_transformers(kind):
  m, d = saved_hf_model(kind)
  cfg, params = load_hf(d)
  ids, mask, dec = _inputs(kind)
  ours = _ours(build_model(cfg), params, kind, ids, mask, dec)
  ref = _theirs(m, kind, ids, mask, dec)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_t5_flavours_are_what_the_acceptance_names():
  cfg10, _ = load_hf(saved_hf_model("t5_v10")[1])
  cfg11, _ = load_hf(saved_hf_model("t5_v11")[1])
  assert cfg10.feed_forward_proj == "relu" and cfg10.tie_word_embeddings and cfg10.scales_decoder_outputs
  assert cfg11.is_gated and cfg11.d_kv * cfg11.num_heads != cfg11.d_model
  cfg, _ = load_hf(saved_hf_model("llama_gqa")[1])
  assert cfg.n_kv_heads < cfg.num_attention_heads and cfg.rope_scaling_dict["rope_type"] == "llama3"


@pytest.mark.parametrize("kind", KINDS)
def test_export_import_bitwise_and_loads_in_transformers(kind, tmp_path):
  import transformers
  m, d = saved_hf_model(kind)
  cfg, params = load_hf(d)
  out = save_hf(cfg, params, str(tmp_path / "export"))
  cfg2, params2 = load_hf(out)
  assert cfg2 == cfg
  a, b = flatten_dict(params), flatten_dict(params2)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  cls = (transformers.T5ForConditionalGeneration if kind.startswith("t5")
         else transformers.LlamaForCausalLM)
  m2 = cls.from_pretrained(out).eval()
  ids, mask, dec = _inputs(kind, seed=1)
  np.testing.assert_allclose(_theirs(m2, kind, ids, mask, dec), _theirs(m, kind, ids, mask, dec),
                             atol=1e-5, rtol=0)


def test_import_sharded_safetensors_and_pytorch_bin(tmp_path):
  m, d = saved_hf_model("llama_mha")
  cfg, params = load_hf(d)
  m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  _, p_sh = load_hf(str(tmp_path / "sharded"))
  # pytorch_model.bin layout
  os.makedirs(tmp_path / "bin")
  shutil.copy(os.path.join(d, "config.json"), tmp_path / "bin")
  torch.save(m.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  _, p_bin = load_hf(str(tmp_path / "bin"))
  for other in (p_sh, p_bin):
    for k, v in flatten_dict(params).items():
      assert np.array_equal(v, flatten_dict(other)[k]), k


def test_bad_checkpoints_give_clear_errors(tmp_path):
  _, d = saved_hf_model("t5_v10")
  with pytest.raises(CheckpointError, match="does not exist"):
    load_hf(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(CheckpointError, match="missing config.json"):
    load_hf(str(empty))
  shutil.copy(os.path.join(d, "config.json"), empty)
  with pytest.raises(CheckpointError, match="no weights"):
    load_hf(str(empty))
  # unsupported architecture
  bad = tmp_path / "bert"
  shutil.copytree(d, bad)
  c = json.load(open(bad / "config.json"))
  c["model_type"] = "bert"
  json.dump(c, open(bad / "config.json", "w"))
  with pytest.raises(CheckpointError, match="unsupported architecture.*'bert'"):
    load_hf(str(bad))
  # a tensor whose shape does not match the config: names the tensor and both shapes
  mism = tmp_path / "mismatch"
  shutil.copytree(d, mism)
  c = json.load(open(mism / "config.json"))
  c["d_ff"] = 80
  json.dump(c, open(mism / "config.json", "w"))
  with pytest.raises(CheckpointError, match=r"DenseReluDense\.wi\.weight.*\(32, 64\).*\(32, 80\)"):
    load_hf(str(mism))
  # corrupt weights file
  corrupt = tmp_path / "corrupt"
  shutil.copytree(d, corrupt)
  (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(CheckpointError, match="cannot read safetensors"):
    load_hf(str(corrupt))


@pytest.mark.parametrize("name,total", [("t5-11b", 11_307_321_344), ("flan-t5-xl", 2_849_757_184),
                                        ("llama-2-7b", 6_738_415_616)])
def test_abstract_totals_exact(name, total):
  shapes = abstract_params(get_preset(name))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(shapes))
  assert count_params(shapes) == total


def test_every_preset_builds_abstractly():
  from peft_jax.models import PRESETS
  for name in PRESETS:
    assert count_params(abstract_params(get_preset(name))) > 0, name


def test_logical_axes_on_every_leaf():
  for name in ("t5-v1_1-tiny", "llama-tiny-gqa"):
    axes = flatten_dict(logical_axes(get_preset(name)))
    shapes = flatten_dict(abstract_params(get_preset(name)))
    assert axes.keys() == shapes.keys()
    for k, spec in axes.items():
      assert len(spec) == len(shapes[k].shape) and all(a is not None for a in spec), (k, spec)
      if "layers" in k:
        assert spec[0] == "layers"


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_remat_and_bf16_policies(remat):
  cfg = get_preset("llama-tiny").replace(remat=remat)
  model = build_model(cfg)
  from peft_jax.models import init_params
  params = init_params(cfg, jax.random.PRNGKey(0))
  ids = jnp.arange(12).reshape(2, 6) % 100
  ref = build_model(get_preset("llama-tiny")).apply({"params": params}, ids)
  loss = lambda p: model.apply({"params": p}, ids).mean()
  np.testing.assert_allclose(model.apply({"params": params}, ids), ref, atol=1e-6)
  g = jax.grad(loss)(params)
  assert np.isfinite(np.asarray(g["layers"]["attn"]["q"]["kernel"])).all()
  bf = build_model(cfg.replace(dtype="bfloat16")).apply({"params": params}, ids)
  assert bf.dtype == jnp.float32  # logits always fp32
  np.testing.assert_allclose(bf, ref, atol=0.1)


def test_hub_id_offline_gives_clear_error():
  with pytest.raises(CheckpointError, match="not a local directory and could not be fetched"):
    load_hf("google/flan-t5-small-does-not-exist")


@pytest.mark.shared_data
def test_tokenizer_from_checkpoint_dir_with_real_t5_vocab(shared_data, tmp_path):
  """A checkpoint directory with the real T5 SentencePiece files: AutoTokenizer reads it
  from the same directory as the weights, and the ids drive our model."""
  from transformers import AutoTokenizer
  from peft_jax import inputs
  import ml_collections
  _, d = saved_hf_model("t5_v10")
  ck = tmp_path / "ck"
  shutil.copytree(d, ck)
  for f in (shared_data / "tokenizers" / "t5").iterdir():
    shutil.copy(f, ck)
  cfg = ml_collections.ConfigDict({"model": {"checkpoint": str(ck)}, "tokenizer": ""})
  tok = inputs.tokenizer(cfg)
  ids = tok(["translate English to German: Hello"], return_tensors="np")
  assert ids["input_ids"][0, -1] == tok.eos_token_id == 1
  assert len(tok) >= 32100
  mc = inputs.model_config(cfg)
  cfg_l, params = load_hf(str(ck))
  out = build_model(mc).apply({"params": params}, jnp.asarray(ids["input_ids"] % 128),
                              jnp.asarray(ids["attention_mask"]), jnp.zeros((1, 2), jnp.int32))
  assert out.shape == (1, 2, 128) and np.isfinite(np.asarray(out)).all()


def test_untied_t5_head_matches_transformers(tmp_path):
  """transformers 5 ties T5's head unless the checkpoint says otherwise: a FLAN-T5-style
  checkpoint (``tie_word_embeddings: false``, its own ``lm_head.weight``, no rescale) loads
  untied on both sides with the same logits, and exports back the same way."""
  import transformers
  from safetensors.numpy import load_file, save_file
  _, d = saved_hf_model("t5_v11")
  ck = tmp_path / "flan_like"
  shutil.copytree(d, ck)
  sd = load_file(str(ck / "model.safetensors"))
  sd["lm_head.weight"] = np.random.RandomState(0).randn(128, 32).astype(np.float32)
  save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
  c = json.load(open(ck / "config.json"))
  c["tie_word_embeddings"] = False
  c.pop("scale_decoder_outputs", None)
  json.dump(c, open(ck / "config.json", "w"))
  m = transformers.T5ForConditionalGeneration.from_pretrained(str(ck)).eval()
  assert m.lm_head.weight.data_ptr() != m.shared.weight.data_ptr()
  cfg, params = load_hf(str(ck))
  assert not cfg.tie_word_embeddings and not cfg.scales_decoder_outputs and "lm_head" in params
  ids, mask, dec = _inputs("t5_v11")
  np.testing.assert_allclose(_ours(build_model(cfg), params, "t5_v11", ids, mask, dec),
                             _theirs(m, "t5_v11", ids, mask, dec), atol=1e-4, rtol=0)
  out = save_hf(cfg, params, str(tmp_path / "export"))
  m2 = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  np.testing.assert_allclose(_theirs(m2, "t5_v11", ids, mask, dec), _theirs(m, "t5_v11", ids, mask, dec),
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["", "xla"])
def test_attention_impl_reaches_the_model_config(impl):
  """``model.attention_impl`` (the kernel of ``jax.nn.dot_product_attention``) is a config
  field; ``xla`` computes what JAX's default does."""
  from peft_jax import inputs
  from peft_jax.config_lib import resolve
  cfg, _ = resolve({"model": {"name": "llama-tiny", "attention_impl": impl},
                    "data": {"name": "quickstart"}})
  mc = inputs.model_config(cfg)
  assert mc.attention_impl == (impl or None)
  params = init_params(mc, jax.random.PRNGKey(0))
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 50
  out = build_model(mc).apply({"params": params}, ids, jnp.ones_like(ids, bool))
  ref = build_model(mc.replace(attention_impl=None)).apply({"params": params}, ids,
                                                             jnp.ones_like(ids, bool))
  np.testing.assert_allclose(out, ref, atol=1e-6)
