"""Strict HF PEFT import: adapters made by HF PEFT itself (noise on every adapter weight,
so B != 0) import with logits within 1e-4 of HF PEFT's, and every tensor or config
field the import does not understand stops it with one line naming it."""
import json
import os
import warnings

import numpy as np
import pytest

from tiny_hf import loaded

hfpeft = pytest.importorskip("peft")

from test_peft_hf_parity import _hf_randomize, fresh_torch, hf_logits, our_logits  # noqa: E402
from peft_jax import peft  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4


def task(kind):
  return "SEQ_2_SEQ_LM" if kind.startswith("t5") else "CAUSAL_LM"


def hf_adapter(kind, tmp_path, **kw):
  """An HF PEFT LoRA adapter with noise on every trainable weight: (peft model, directory)."""
  pm = hfpeft.get_peft_model(fresh_torch(kind), hfpeft.LoraConfig(task_type=task(kind), **kw))
  _hf_randomize(pm)
  pm.eval()
  d = str(tmp_path / "hf")
  pm.save_pretrained(d)
  return pm, d


def imported_matches(kind, pm, d):
  _, _, cfg, base = loaded(kind)
  state, params = peft.import_hf_peft(d, cfg, base)
  theirs = hf_logits(kind, pm)
  np.testing.assert_allclose(our_logits(kind, state, params), theirs, atol=TOL, rtol=0)
  assert np.abs(theirs - hf_logits(kind, fresh_torch(kind))).max() > 1e-2   # adapter is active
  return state


def refused(kind, d, match):
  _, _, cfg, base = loaded(kind)
  with pytest.raises(peft.PeftConfigError, match=match) as e:
    peft.import_hf_peft(d, cfg, base)
  assert "\n" not in str(e.value)
  return str(e.value)


def edit_config(d, **fields):
  f = os.path.join(d, "adapter_config.json")
  conf = json.load(open(f))
  conf.update(fields)
  json.dump(conf, open(f, "w"))


@pytest.mark.parametrize("kind,bias", [("t5_v11", "lora_only"), ("t5_v11", "all"),
                                       ("llama_gqa", "all"), ("llama_mha", "lora_only")])
def test_bias_on_a_model_without_biases_is_a_noop(kind, bias, tmp_path):
  pm, d = hf_adapter(kind, tmp_path, r=2, lora_alpha=4, target_modules="all-linear", bias=bias)
  imported_matches(kind, pm, d)


@pytest.mark.parametrize("kind", ["t5_v10", "llama_gqa"])
def test_full_hf_config_accounted(kind, tmp_path):
  """Every field HF PEFT writes is known: a plain adapter imports without complaint."""
  pm, d = hf_adapter(kind, tmp_path, r=4, lora_alpha=16, lora_dropout=0.1,
                     init_lora_weights="gaussian", exclude_modules=["o", "o_proj"],
                     target_modules="all-linear")
  imported_matches(kind, pm, d)


def test_extra_tensor_refused(tmp_path):
  from safetensors.numpy import load_file, save_file
  pm, d = hf_adapter("llama_gqa", tmp_path, r=2)
  f = os.path.join(d, "adapter_model.safetensors")
  t = load_file(f)
  t["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = np.ones((2, 2), np.float32)
  save_file(t, f)
  msg = refused("llama_gqa", d, "lora_C")
  assert "adapter tensor base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight" in msg


def test_unknown_and_unsupported_fields_refused(tmp_path):
  pm, d = hf_adapter("llama_gqa", tmp_path, r=2)
  edit_config(d, some_future_field=3)
  refused("llama_gqa", d, r"field some_future_field=3 is unknown")
  edit_config(d, some_future_field=None)
  refused("llama_gqa", d, r"some_future_field=None")
  pm, d = hf_adapter("llama_gqa", tmp_path / "b", r=2)
  edit_config(d, fan_in_fan_out=True)
  refused("llama_gqa", d, r"fan_in_fan_out=True is not supported .*only as False")
  edit_config(d, fan_in_fan_out=False, init_lora_weights="pissa")
  refused("llama_gqa", d, r"init_lora_weights='pissa'")


def test_layer_replication_refused(tmp_path):
  _, d = hf_adapter("llama_mha", tmp_path, r=2, layer_replication=[[0, 2], [1, 2]])
  refused("llama_mha", d, r"layer_replication=\[\[0, 2\], \[1, 2\]\] is not supported")


@pytest.mark.parametrize("kind,kw,match", [
    # LoRA on embeddings, lora_bias and trainable_token_indices: test_hf_peft_lora_features.py
    ("t5_v11", dict(target_modules=["q", "shared"]), "shared embedding changes nothing"),
])
def test_unsupported_features_refused(kind, kw, match, tmp_path):
  _, d = hf_adapter(kind, tmp_path, r=2, **kw)
  refused(kind, d, match)


def test_refused_tensor_named_even_when_config_looks_plain(tmp_path):
  """The tensors are checked on their own: fully trained module copies behind a plain config."""
  _, d = hf_adapter("llama_gqa", tmp_path, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
  edit_config(d, modules_to_save=None)
  refused("llama_gqa", d, r"adapter tensor base_model\.model\.lm_head\.weight is not understood")


# ----------------------------------------------------------------------------- rank / alpha patterns
PATTERNS = {
    "llama_gqa": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"q_proj": 4, r"model\.layers\.1\.self_attn\.v_proj": 3},
                      alpha_pattern={"v_proj": 16, "down_proj": 2}),
    "t5_v11": dict(r=2, lora_alpha=8, target_modules="all-linear",
                   rank_pattern={r"decoder\.block\.2\.layer\.1\.EncDecAttention\.q": 5, "wo": 3},
                   alpha_pattern={"SelfAttention.k": 3}),
}


def _ours_from_hf_kwargs(kw):
  out = dict(kw)
  if isinstance(out["target_modules"], list):
    out["target_modules"] = [t.replace("_proj", "") for t in out["target_modules"]]
  return out


@pytest.mark.parametrize("kind", sorted(PATTERNS))
def test_rank_alpha_pattern_import(kind, tmp_path):
  pm, d = hf_adapter(kind, tmp_path, **PATTERNS[kind])
  state = imported_matches(kind, pm, d)
  assert state.hparams["rank_pattern"] == PATTERNS[kind]["rank_pattern"]
  # the padded rank columns are not parameters: the counts equal HF PEFT's
  assert peft.summary(state)["trainable_params"] == pm.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("kind", sorted(PATTERNS))
def test_rank_alpha_pattern_ours_export_and_counts(kind, tmp_path):
  from test_peft_hf_parity import randomize
  from peft_jax.peft.base import flatten
  import jax
  _, _, cfg, base = loaded(kind)
  hp = _ours_from_hf_kwargs(PATTERNS[kind])
  state = peft.apply_peft(cfg, base, "lora", hp, jax.random.PRNGKey(0))
  params = randomize(state, state.params)
  fl = flatten(params)
  # the columns past a layer's own rank stay zero (randomize respects the update masks)
  for k, m in state.update_masks.items():
    if k.endswith(("lora_A", "lora_B")):
      assert not np.asarray(fl[k])[~np.broadcast_to(m, fl[k].shape)].any()
  peft.export_hf_peft(state, params, str(tmp_path / "ours"))
  conf = json.load(open(tmp_path / "ours" / "adapter_config.json"))
  assert conf["rank_pattern"] == PATTERNS[kind]["rank_pattern"]
  assert conf["alpha_pattern"] == PATTERNS[kind]["alpha_pattern"]
  pm = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(our_logits(kind, state, params), hf_logits(kind, pm), atol=TOL, rtol=0)
  hc = hfpeft.LoraConfig(task_type=task(kind), **PATTERNS[kind])
  n_hf = hfpeft.get_peft_model(fresh_torch(kind), hc).get_nb_trainable_parameters()
  info = peft.describe(cfg, "lora", hp)
  assert (info["trainable_params"], info["total_params"]) == n_hf
  # merge folds the per-layer scales
  merged = peft.merge(state, params)
  from peft_jax.models import build_model
  ids, mask, dec = __import__("test_peft_hf_parity").inputs(kind)
  args = [ids, mask] + ([dec] if dec is not None else [])
  plain = np.asarray(build_model(cfg).apply({"params": merged}, *args))
  np.testing.assert_allclose(plain, our_logits(kind, state, params), atol=TOL, rtol=0)


def test_rank_pattern_checked():
  _, _, cfg, base = loaded("llama_gqa")
  with pytest.raises(peft.PeftConfigError, match="rank_pattern.*'q_proj': 0 is not a positive int"):
    peft.apply_peft(cfg, base, "lora", {"rank_pattern": {"q_proj": 0}})
  with pytest.raises(peft.PeftConfigError, match=r"rank 40 \(rank_pattern\) is larger"):
    peft.apply_peft(cfg, base, "lora", {"rank_pattern": {"q_proj": 40}})


def test_missing_lora_b_refused(tmp_path):
  from safetensors.numpy import load_file, save_file
  _, d = hf_adapter("llama_gqa", tmp_path, r=2)
  f = os.path.join(d, "adapter_model.safetensors")
  t = load_file(f)
  del t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
  save_file(t, f)
  refused("llama_gqa", d, r"adapter tensor .*layers\.1\.self_attn\.v_proj\.lora_B\.weight is missing")


def test_other_methods_fields_checked(tmp_path):
  """IA3 / LoKr / AdaLoRA declare their fields too: an unknown or unsupported one stops."""
  for name, conf, match in (
      ("ia3", hfpeft.IA3Config(task_type="CAUSAL_LM"), "fan_in_fan_out=True"),
      ("lokr", hfpeft.LoKrConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]),
       "fan_in_fan_out=True is unknown"),
      ("adalora", hfpeft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10,
                                       target_modules=["q_proj"]), "fan_in_fan_out=True")):
    pm = hfpeft.get_peft_model(fresh_torch("llama_gqa"), conf)
    d = str(tmp_path / name)
    pm.save_pretrained(d)
    edit_config(d, fan_in_fan_out=True)
    refused("llama_gqa", d, match)


def test_dora_rank_alpha_pattern_import(tmp_path):
  pm, d = hf_adapter("llama_mha", tmp_path, use_dora=True, **PATTERNS["llama_gqa"])
  state = imported_matches("llama_mha", pm, d)
  assert state.method.name == "dora"
