"""Tiny random ``transformers`` models saved in the Hugging Face layout, for parity tests.

The four flavours the acceptance tests name: a T5 v1.0-style config, a v1.1-style
config with ``d_kv*heads != d_model``, LLaMA with MHA, LLaMA with GQA and
Llama-3 rope scaling; besides them (not in ``KINDS``) Qwen2 (tied head, random q/k/v
biases) and Mistral (sliding window 4).
"""
import functools
import tempfile

import torch
import transformers

KINDS = ("t5_v10", "t5_v11", "llama_mha", "llama_gqa")


def make_hf_model(kind: str, seed: int = 0):
  torch.manual_seed(seed)
  if kind.startswith("t5"):
    common = dict(vocab_size=128, d_model=32, d_ff=64, num_heads=4, num_layers=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if kind == "t5_v10":
      cfg = transformers.T5Config(d_kv=8, feed_forward_proj="relu", **common)
    else:
      cfg = transformers.T5Config(d_kv=12, feed_forward_proj="gated-gelu",
                                  tie_word_embeddings=False, num_decoder_layers=3, **common)
    return transformers.T5ForConditionalGeneration(cfg).eval()
  common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
  if kind == "llama_mha":
    cfg = transformers.LlamaConfig(num_key_value_heads=4, **common)
  elif kind == "qwen2":             # tied head (as Qwen2-0.5B/1.5B), random q/k/v biases
    cfg = transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
      for name, p in m.named_parameters():
        if name.endswith("bias"):
          p.normal_(0.0, 0.05)
    return m
  elif kind == "mistral":           # a window shorter than the test sequences
    cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=4, **common)
    return transformers.MistralForCausalLM(cfg).eval()
  elif kind == "llama_gqa":
    cfg = transformers.LlamaConfig(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **common)
  else:
    raise ValueError(kind)
  return transformers.LlamaForCausalLM(cfg).eval()


@functools.lru_cache(maxsize=None)
def saved_hf_model(kind: str, seed: int = 0):
  """(torch model, directory) — saved once per test session."""
  m = make_hf_model(kind, seed)
  d = tempfile.mkdtemp(prefix=f"peftjax_{kind}_")
  m.save_pretrained(d)
  return m, d


@functools.lru_cache(maxsize=None)
def loaded(kind: str):
  """(torch model, directory, our config, our params) — imported once per test session."""
  from peft_jax.checkpoint.hf import load_hf
  m, d = saved_hf_model(kind)
  cfg, base = load_hf(d)
  return m, d, cfg, base
