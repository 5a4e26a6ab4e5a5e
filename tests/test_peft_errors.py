"""Bad input fails before any compute with a PeftConfigError naming the problem and what was expected."""
import jax
import jax.numpy as jnp
import pytest

from peft_jax import peft
from peft_jax.models import abstract_params, build_model, get_preset
from peft_jax.peft import PeftConfigError

T5 = get_preset("t5-v1_1-tiny")
LLAMA = get_preset("llama-tiny")


def build(cfg, method, hp=None):
  return peft.apply_peft(cfg, abstract_params(cfg), method, hp or {})


def test_unknown_method():
  with pytest.raises(PeftConfigError, match=r"unknown PEFT method 'loraa'.*known methods: .*lora"):
    build(T5, "loraa")


def test_unknown_hyperparameter():
  with pytest.raises(PeftConfigError, match=r"unknown hyperparameter\(s\) \['rank'\].*expected some of .*'r'"):
    build(T5, "lora", {"rank": 4})


def test_target_matching_nothing_lists_modules():
  with pytest.raises(PeftConfigError) as e:
    build(T5, "lora", {"target_modules": ["q", "query"]})
  msg = str(e.value)
  assert "'query' matches no module" in msg
  for name in ("q", "k", "v", "o", "wi_0", "wi_1", "wo", "lm_head"):
    assert name in msg
  with pytest.raises(PeftConfigError, match=r"matches no module.*q_proj"):
    build(LLAMA, "ia3", {"target_modules": ".*nonexistent.*"})
  with pytest.raises(PeftConfigError, match="not a valid regular expression"):
    build(LLAMA, "lora", {"target_modules": "(q"})


def test_rank_larger_than_layer():
  with pytest.raises(PeftConfigError, match=r"rank r=40 is larger than layer .*in=32, out=48.*r must be <= 32"):
    build(T5, "lora", {"r": 40})
  with pytest.raises(PeftConfigError, match=r"r=0 is not an int >= 1"):
    build(T5, "dora", {"r": 0})


def test_bad_lora_values():
  with pytest.raises(PeftConfigError, match=r"lora_dropout=1.5 is not a number >= 0 and < 1"):
    build(T5, "lora", {"lora_dropout": 1.5})
  with pytest.raises(PeftConfigError, match="init_lora_weights"):
    build(T5, "lora", {"init_lora_weights": "pissa"})
  with pytest.raises(PeftConfigError, match="needs use_dora=True"):
    build(T5, "dora", {"use_dora": False})


def test_layer_selection_errors():
  with pytest.raises(PeftConfigError, match="at most one layer selection"):
    build(LLAMA, "lora", {"first_k_layers": 1, "last_k_layers": 1})
  with pytest.raises(PeftConfigError, match=r"layer 5 is out of range; the stacks have \{'layers': 2\}"):
    build(LLAMA, "lora", {"layers_to_transform": [0, 5]})
  with pytest.raises(PeftConfigError, match=r"random_layer_fraction=0.0 is not a number > 0 and <= 1"):
    build(LLAMA, "lora", {"random_layer_fraction": 0.0})
  with pytest.raises(PeftConfigError, match=r"unknown sub-layer 'cross' .*expected some of"):
    build(T5, "lora", {"target_sublayers": ["cross"]})
  with pytest.raises(PeftConfigError, match="leaves no targeted module"):
    build(T5, "lora", {"target_modules": ["wo"], "target_sublayers": ["cross_attn"]})


def test_ia3_feedforward_must_be_targeted():
  with pytest.raises(PeftConfigError, match="feedforward_modules must be a subset of target_modules"):
    build(T5, "ia3", {"target_modules": ["k", "v"], "feedforward_modules": ["wo"]})


def test_prompt_errors():
  with pytest.raises(PeftConfigError, match="needs num_virtual_tokens"):
    build(T5, "prompt_tuning")
  with pytest.raises(PeftConfigError, match=r"num_virtual_tokens=128 .*maximum input length is 128 "
                                            r"\(max_position_embeddings\).*expected num_virtual_tokens < 128"):
    build(LLAMA, "prompt_tuning", {"num_virtual_tokens": 128})
  with pytest.raises(PeftConfigError, match=r"maximum input length is 16 \(max_input_length\)"):
    build(T5, "prefix_tuning", {"num_virtual_tokens": 20, "max_input_length": 16})
  with pytest.raises(PeftConfigError, match=r"prompt_tuning_init='ZEROS': expected one of"):
    build(T5, "prompt_tuning", {"num_virtual_tokens": 2, "prompt_tuning_init": "ZEROS"})


def test_prompt_plus_input_too_long_fails_at_trace_time():
  state = build(T5, "prompt_tuning", {"num_virtual_tokens": 6, "max_input_length": 10})
  model = build_model(T5, state.sites)
  ids = jnp.zeros((1, 5), jnp.int32)
  with pytest.raises(PeftConfigError, match=r"6 virtual tokens \+ 5 input tokens = 11 exceed the "
                                            r"maximum input length 10"):
    jax.eval_shape(lambda p: model.apply({"params": p}, ids, None, ids), state.params)
  lstate = build(LLAMA, "prefix_tuning", {"num_virtual_tokens": 100})
  lmodel = build_model(LLAMA, lstate.sites)
  with pytest.raises(PeftConfigError, match="exceed max_position_embeddings=128"):
    jax.eval_shape(lambda p: lmodel.apply({"params": p}, jnp.zeros((1, 40), jnp.int32)), lstate.params)


def test_prefix_errors(tmp_path):
  with pytest.raises(PeftConfigError, match=r"prefix_attentions: unknown \['decoder'\]"):
    build(T5, "prefix_tuning", {"num_virtual_tokens": 2, "prefix_attentions": ["decoder"]})
  with pytest.raises(PeftConfigError, match=r"prefix_positions='left' is not one of 'shift', 'none'"):
    build(T5, "prefix_tuning", {"num_virtual_tokens": 2, "prefix_positions": "left"})
  cfg = get_preset("t5-tiny")
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(cfg))
  st = peft.apply_peft(cfg, params, "prefix_tuning",
                       {"num_virtual_tokens": 2, "prefix_attentions": ["encoder_self_attn"]})
  with pytest.raises(PeftConfigError, match="decoder self-attention only"):
    peft.export_hf_peft(st, st.params, str(tmp_path))


def test_unsupported_export_and_import(tmp_path):
  cfg = get_preset("llama-tiny")
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(cfg))
  st = peft.apply_peft(cfg, params, "bitfit")
  with pytest.raises(PeftConfigError, match=r"HF PEFT export supports adalora, dora, ia3, krona, ln_tuning, lora, prefix_tuning, prompt_tuning, not .bitfit."):
    peft.export_hf_peft(st, st.params, str(tmp_path))
  with pytest.raises(PeftConfigError, match="no adapter_config.json"):
    peft.import_hf_peft(str(tmp_path / "missing"), cfg, params)


def test_describe_reports_errors_before_compute():
  with pytest.raises(PeftConfigError, match="matches no module"):
    peft.describe(get_preset("llama-2-7b"), "lora", {"target_modules": ["qkv"]})
