"""Qwen2 and Mistral (and Llama 3.1's rope) against transformers: teacher-forced logits,
greedy generation past Mistral's sliding window, checkpoint round trips, LoRA parity with
HF PEFT, the published presets' parameter totals, unsupported rope types refused."""
import functools
import json
import re
import shutil
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from peft_jax import decoding, peft
from peft_jax.checkpoint.hf import CheckpointError, config_to_hf, load_hf, save_hf
from peft_jax.models import (MistralConfig, Qwen2Config, abstract_params, build_model,
                             count_params, family_of, get_preset)
from tiny_hf import loaded, make_hf_model, saved_hf_model

transformers.logging.set_verbosity_error()
KINDS = ("qwen2", "mistral", "llama_gqa")      # llama_gqa: Llama 3.1's 'llama3' rope
N = 20
PROMPTS = [[5, 17, 33, 9, 70, 21, 3], [44, 12, 8]]
PAD = 0


def _ids(seed=0, t=12):
  return torch.randint(3, 128, (2, t), generator=torch.Generator().manual_seed(seed))


def _hf(m, ids):
  with torch.no_grad():
    return m(input_ids=ids).logits.numpy()


def _ours(cfg, params, ids):
  return np.asarray(build_model(cfg).apply({"params": params}, jnp.asarray(ids.numpy())))


def test_tiny_models_are_the_variants():
  qcfg, qp = loaded("qwen2")[2:]
  assert type(qcfg) is Qwen2Config and family_of(qcfg).name == "qwen2"
  assert qcfg.qkv_bias and qcfg.tie_word_embeddings and "lm_head" not in qp
  assert np.abs(qp["layers"]["attn"]["k"]["bias"]).max() > 0.01 and "bias" not in qp["layers"]["attn"]["o"]
  mcfg = loaded("mistral")[2]
  assert type(mcfg) is MistralConfig and mcfg.sliding_window == 4 and not mcfg.qkv_bias
  assert loaded("llama_gqa")[2].rope_scaling_dict["rope_type"] == "llama3"


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_forced_logits_match_transformers(kind):
  m, _, cfg, params = loaded(kind)
  ids = _ids()                                  # 12 tokens: three times Mistral's window
  ours, ref = _ours(cfg, params, ids), _hf(m, ids)
  assert ours.shape == ref.shape == (2, 12, 128)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_the_window_and_the_biases_matter():
  """Without the window (resp. the biases) the logits differ: the parity above tests them."""
  _, _, cfg, params = loaded("mistral")
  ids = _ids()
  full = _ours(cfg.replace(sliding_window=None), params, ids)
  win = _ours(cfg, params, ids)
  np.testing.assert_allclose(full[:, :4], win[:, :4], atol=1e-6)    # inside the window
  assert np.abs(full[:, 4:] - win[:, 4:]).max() > 1e-3
  _, _, qcfg, qp = loaded("qwen2")
  qp0 = jax.tree_util.tree_map(lambda x: x, qp)
  for w in "qkv":
    qp0["layers"]["attn"][w]["bias"] = np.zeros_like(qp["layers"]["attn"][w]["bias"])
  assert np.abs(_ours(qcfg, qp0, ids) - _ours(qcfg, qp, ids)).max() > 1e-3


def _hf_greedy(m, eos):
  """transformers' greedy output, uncached, on each unpadded prompt (as test_decoding)."""
  res = np.full((len(PROMPTS), N), PAD, np.int64)
  for r, prompt in enumerate(PROMPTS):
    new = []
    while len(new) < N and eos not in new:
      with torch.no_grad():
        logits = m(input_ids=torch.tensor([prompt + new]), use_cache=False).logits
      new.append(int(logits[0, -1].argmax()))
    res[r, :len(new)] = new
  return res


#: weights scaled so that the random tiny models' greedy output varies with the history
#: (unscaled, they repeat one token): (module name pattern, factor) per kind
SHARP = {"qwen2": (r"self_attn|mlp", 10.0), "mistral": (r"self_attn|mlp|embed", 3.0),
         "llama_gqa": (r"self_attn|mlp|embed", 3.0)}


@functools.lru_cache(maxsize=None)
def _sharp(kind):
  m = make_hf_model(kind)
  pattern, factor = SHARP[kind]
  with torch.no_grad():
    for name, p in m.named_parameters():
      if re.search(pattern, name) and "norm" not in name:
        p.mul_(factor)
  d = tempfile.mkdtemp(prefix=f"peftjax_sharp_{kind}_")
  m.save_pretrained(d)
  return (m,) + load_hf(d)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_transformers(kind):
  """20 new tokens after prompts of 7 and 3 tokens (left-padded batch): Mistral's cached
  steps see only the last 4 tokens, as transformers' uncached forward does."""
  m, cfg, params = _sharp(kind)
  ids, mask = decoding.pad_prompts(PROMPTS, PAD, "left")
  ours = np.asarray(decoding.generate(build_model(cfg), params, ids, mask, max_new_tokens=N,
                                      pad_token_id=PAD))
  ref = _hf_greedy(m, cfg.eos_token_id)
  assert max(len(set(r)) for r in ref.tolist()) > 4, ref     # it depends on the history
  np.testing.assert_array_equal(ours, ref)


def test_mistral_generation_without_the_window_differs():
  _, cfg, params = _sharp("mistral")
  ids, mask = decoding.pad_prompts(PROMPTS, PAD, "left")
  gen = lambda c: np.asarray(decoding.generate(build_model(c), params, ids, mask,
                                               max_new_tokens=N, pad_token_id=PAD))
  assert not np.array_equal(gen(cfg), gen(cfg.replace(sliding_window=None)))


@pytest.mark.parametrize("kind", KINDS)
def test_export_import_bitwise_and_loads_in_transformers(kind, tmp_path):
  m, _, cfg, params = loaded(kind)
  out = save_hf(cfg, params, str(tmp_path / "export"))
  cfg2, params2 = load_hf(out)
  assert cfg2 == cfg and type(cfg2) is type(cfg)
  a, b = flatten_dict(params), flatten_dict(params2)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  m2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(m2) is type(m)
  ids = _ids(seed=1)
  np.testing.assert_allclose(_hf(m2, ids), _hf(m, ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- HF PEFT

@pytest.mark.parametrize("kind,case", [("qwen2", "lora"), ("mistral", "lora"),
                                       ("qwen2", "dora"), ("qwen2", "ia3")])
def test_hf_peft_parity_both_ways(kind, case, tmp_path):
  """The pattern of test_peft_hf_parity on the variants (7-token rows, one padded: longer
  than Mistral's window). DoRA and IA3 on Qwen2 check how a layer's own bias is treated."""
  hfpeft = pytest.importorskip("peft")
  from test_peft_hf_parity import _cases, _hf_randomize, fresh_torch, hf_logits, our_logits, randomize
  _, _, cfg, base = loaded(kind)
  method, hp, hf_cfg = _cases(kind)[case]
  base_logits = hf_logits(kind, fresh_torch(kind))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    state = peft.apply_peft(cfg, base, method, hp, jax.random.PRNGKey(0))
    params = randomize(state, state.params)
    peft.export_hf_peft(state, params, str(tmp_path / "ours"))
    pm = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), str(tmp_path / "ours")).eval()
    ours, theirs = our_logits(kind, state, params), hf_logits(kind, pm)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(ours - base_logits).max() > 1e-2
    pm = hfpeft.get_peft_model(fresh_torch(kind), hf_cfg())
    _hf_randomize(pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "hf"))
    state2, params2 = peft.import_hf_peft(str(tmp_path / "hf"), cfg, base)
    theirs = hf_logits(kind, pm)
    np.testing.assert_allclose(our_logits(kind, state2, params2), theirs, atol=1e-4, rtol=0)
    assert np.abs(theirs - base_logits).max() > 1e-2


def test_ia3_merge_scales_the_qkv_biases():
  """IA3 merged into Qwen2's q/v (kernel and bias, as HF PEFT) computes what the unmerged
  sites compute; BitFit at init is the base model (the layers' own biases count once)."""
  from test_peft_hf_parity import randomize
  _, _, cfg, base = loaded("qwen2")
  state = peft.apply_peft(cfg, base, "ia3", {}, jax.random.PRNGKey(0))
  params = randomize(state, state.params)
  merged = peft.merge(state, params, plain=True)
  ids = _ids(t=7)
  assert not np.allclose(merged["layers"]["attn"]["v"]["bias"], base["layers"]["attn"]["v"]["bias"])
  ref = np.asarray(build_model(cfg, state.sites).apply({"params": state.prepare(params)},
                                                        jnp.asarray(ids.numpy())))
  np.testing.assert_allclose(_ours(cfg, merged, ids), ref, atol=1e-4, rtol=0)
  bf = peft.apply_peft(cfg, base, "bitfit", {}, jax.random.PRNGKey(0))
  out = np.asarray(build_model(cfg, bf.sites).apply({"params": bf.prepare(bf.params)},
                                                     jnp.asarray(ids.numpy())))
  np.testing.assert_allclose(out, _ours(cfg, base, ids), atol=1e-6)


def test_prefix_keys_beyond_the_window_refused():
  """Prefix tuning keeps its keys visible; transformers slides them out of the window. Within
  the window both agree; beyond it, one error line."""
  _, _, cfg, base = loaded("mistral")
  state = peft.apply_peft(cfg, base, "prefix_tuning", {"num_virtual_tokens": 2},
                          jax.random.PRNGKey(0))
  model = build_model(cfg, state.sites)
  ids = jnp.asarray(_ids(t=2).numpy())
  assert np.isfinite(np.asarray(model.apply({"params": state.prepare(state.params)}, ids))).all()
  with pytest.raises(ValueError, match=r"2 added prefix keys with sliding_window=4.*at most 2 tokens"):
    model.apply({"params": state.prepare(state.params)}, jnp.asarray(_ids(t=5).numpy()))


# ----------------------------------------------------------------------------- presets

PRESETS = ("mistral-7b", "qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "llama-3.1-8b",
           "llama-3.2-1b", "llama-3.2-3b")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_totals_equal_transformers(name):
  """Our abstract parameter total == transformers' model of the same config.json (built on
  the meta device: no memory), tied embeddings counted once."""
  cfg = get_preset(name)
  hf = config_to_hf(cfg)
  hf_cfg = transformers.AutoConfig.for_model(**hf)
  with torch.device("meta"):
    m = transformers.AutoModelForCausalLM.from_config(hf_cfg)
  assert type(m).__name__ == family_of(cfg).hf_architecture
  theirs = sum(p.numel() for p in m.parameters())
  assert count_params(abstract_params(cfg)) == theirs


def test_preset_totals_published():
  """The published sizes (a slip in a preset's dimensions would change these)."""
  totals = {"mistral-7b": 7_241_732_096, "qwen2-0.5b": 494_032_768, "llama-3.1-8b": 8_030_261_248,
            "llama-3.2-1b": 1_235_814_400}
  for name, n in totals.items():
    assert count_params(abstract_params(get_preset(name))) == n, name
  assert get_preset("mistral-7b").sliding_window == 4096
  assert all(get_preset(p).tie_word_embeddings for p in ("qwen2-0.5b", "qwen2-1.5b",
                                                         "llama-3.2-1b", "llama-3.2-3b"))


# ----------------------------------------------------------------------------- rope types

@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 32},
                                  {"rope_type": "dynamic", "factor": 2.0},
                                  {"type": "su", "factor": 2.0}])
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2"])
def test_unsupported_rope_types_refused_at_config_read(kind, rope, tmp_path):
  _, d = saved_hf_model(kind)
  bad = tmp_path / "bad"
  shutil.copytree(d, bad)
  c = json.load(open(bad / "config.json"))
  c["rope_parameters"] = dict(rope, rope_theta=10000.0)
  c["rope_scaling"] = rope
  json.dump(c, open(bad / "config.json", "w"))
  name = rope.get("rope_type", rope.get("type"))
  with pytest.raises(CheckpointError) as e:
    load_hf(str(bad))
  msg = str(e.value)
  assert "\n" not in msg and repr(name) in msg and "default, linear, llama3" in msg


def test_qwen2_sliding_window_layers_refused(tmp_path):
  _, d = saved_hf_model("qwen2")
  bad = tmp_path / "bad"
  shutil.copytree(d, bad)
  c = json.load(open(bad / "config.json"))
  c["use_sliding_window"] = True
  json.dump(c, open(bad / "config.json", "w"))
  with pytest.raises(CheckpointError, match="use_sliding_window"):
    load_hf(str(bad))
