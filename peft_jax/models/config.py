"""Model configurations and named presets with the published dimensions."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(d):
  if isinstance(d, str):
    if d not in _DTYPES:
      raise ValueError(f"unknown dtype {d!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[d]
  return d


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 v1.0 (ReLU FFN, tied head) and v1.1 / LM-adapted / FLAN (gated-GELU)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_heads: int = 8
  num_layers: int = 6
  num_decoder_layers: Optional[int] = None
  feed_forward_proj: str = "relu"          # 'relu' | 'gated-gelu' | 'gelu' | 'gated-relu'
  tie_word_embeddings: bool = True        # lm_head is the shared embedding matrix
  scale_decoder_outputs: Optional[bool] = None   # d_model**-0.5 before the head; None: = tie
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.1
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  # execution policy (not part of the checkpoint)
  dtype: Any = "float32"                   # compute dtype
  param_dtype: Any = "float32"
  remat: str = "none"                      # see layers.REMAT_POLICIES
  attention_impl: Optional[str] = None     # passed to jax.nn.dot_product_attention
  # frozen base kernels stored quantized (peft_jax.quantize; run config model.quantize*)
  quantize: str = "none"                   # 'none' | 'int8' | 'int4' | 'nf4'
  quantize_targets: Optional[str] = None   # regex over kernel paths; None: the layer stacks'
  quantize_double: bool = False            # QLoRA's double quantization of the block scales
  quantize_block: int = 64                 # input rows per scale (int4, nf4)

  model_type = "t5"

  @property
  def n_decoder_layers(self):
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @property
  def scales_decoder_outputs(self):
    return self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs

  @property
  def is_gated(self):
    return self.feed_forward_proj.startswith("gated-")

  @property
  def act_name(self):
    return self.feed_forward_proj.split("-")[-1]

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """LLaMA 1/2/3: RMSNorm, RoPE (with Llama-3 scaling), SwiGLU, GQA/MQA."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None
  num_hidden_layers: int = 32
  head_dim_: Optional[int] = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Optional[Tuple[Tuple[str, Any], ...]] = None   # sorted items of the HF dict
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False                   # biases on the q, k, v projections (Qwen2)
  sliding_window: Optional[int] = None     # query t sees keys t - window < s <= t (Mistral)
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: Optional[int] = None
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  remat: str = "none"
  attention_impl: Optional[str] = None
  quantize: str = "none"                   # see T5Config.quantize
  quantize_targets: Optional[str] = None
  quantize_double: bool = False
  quantize_block: int = 64

  model_type = "llama"

  @property
  def n_kv_heads(self):
    return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

  @property
  def head_dim(self):
    return self.head_dim_ or self.hidden_size // self.num_attention_heads

  @property
  def rope_scaling_dict(self) -> Optional[Dict[str, Any]]:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
  """Qwen2: LLaMA with biases on the q, k, v projections (none on o)."""
  qkv_bias: bool = True
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0

  model_type = "qwen2"


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
  """Mistral: LLaMA with sliding-window attention (every layer; None: full causal)."""
  sliding_window: Optional[int] = 4096

  model_type = "mistral"


def _t5_v10(d_model, d_ff, d_kv, heads, layers):
  return T5Config(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers,
                  feed_forward_proj="relu", tie_word_embeddings=True)


def _t5_v11(d_model, d_ff, d_kv, heads, layers):
  return T5Config(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1)


def _llama3_rope(factor):
  """Llama 3.1/3.2's rope_scaling (sorted items, as LlamaConfig keeps it)."""
  return (("factor", factor), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
          ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))


def _qwen2(vocab, hidden, ffn, heads, kv_heads, layers, tie):
  return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                     num_attention_heads=heads, num_key_value_heads=kv_heads,
                     num_hidden_layers=layers, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     max_position_embeddings=131072, tie_word_embeddings=tie,
                     bos_token_id=151643, eos_token_id=151643)


_V11 = {"base": (768, 2048, 64, 12, 12), "large": (1024, 2816, 64, 16, 24),
        "xl": (2048, 5120, 64, 32, 24), "xxl": (4096, 10240, 64, 64, 24)}

PRESETS: Dict[str, Any] = {
    "t5-small": _t5_v10(512, 2048, 64, 8, 6),
    "t5-base": _t5_v10(768, 3072, 64, 12, 12),
    "t5-large": _t5_v10(1024, 4096, 64, 16, 24),
    "t5-3b": _t5_v10(1024, 16384, 128, 32, 24),
    "t5-11b": _t5_v10(1024, 65536, 128, 128, 24),
    **{f"t5-v1_1-{k}": _t5_v11(*v) for k, v in _V11.items()},
    # LM-adapted T5 v1.1 (google/t5-{base,large,xl,xxl}-lm-adapt): the v1.1 architecture,
    # further pre-trained with a language-modelling objective (seed 000's models)
    **{f"t5-lm-adapt-{k}": _t5_v11(*v) for k, v in _V11.items()},
    **{f"flan-t5-{k}": _t5_v11(*v) for k, v in _V11.items()},
    "llama-2-7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                              num_key_value_heads=32, num_hidden_layers=32, rms_norm_eps=1e-5,
                              max_position_embeddings=4096),
    "llama-2-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                               num_key_value_heads=40, num_hidden_layers=40, rms_norm_eps=1e-5,
                               max_position_embeddings=4096),
    "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                              rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                              bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_attention_heads=32, num_key_value_heads=8,
                                num_hidden_layers=32, rms_norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=_llama3_rope(8.0), max_position_embeddings=131072,
                                bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                num_attention_heads=32, num_key_value_heads=8,
                                num_hidden_layers=16, head_dim_=64, rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=_llama3_rope(32.0),
                                max_position_embeddings=131072, tie_word_embeddings=True,
                                bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-3b": LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                                num_attention_heads=24, num_key_value_heads=8,
                                num_hidden_layers=28, head_dim_=128, rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=_llama3_rope(32.0),
                                max_position_embeddings=131072, tie_word_embeddings=True,
                                bos_token_id=128000, eos_token_id=128001),
    # Mistral 7B v0.1 (4096-token sliding window)
    "mistral-7b": MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                num_attention_heads=32, num_key_value_heads=8,
                                num_hidden_layers=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                                max_position_embeddings=32768, sliding_window=4096,
                                bos_token_id=1, eos_token_id=2),
    # Qwen2 base models (full attention: their use_sliding_window is false)
    "qwen2-0.5b": _qwen2(151936, 896, 4864, 14, 2, 24, tie=True),
    "qwen2-1.5b": _qwen2(151936, 1536, 8960, 12, 2, 28, tie=True),
    "qwen2-7b": _qwen2(152064, 3584, 18944, 28, 4, 28, tie=False),
    # tiny presets for tests and the quickstart
    "t5-tiny": T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
                        feed_forward_proj="relu", tie_word_embeddings=True,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "t5-v1_1-tiny": T5Config(vocab_size=128, d_model=32, d_kv=12, d_ff=48, num_heads=4,
                             num_layers=2, num_decoder_layers=3, feed_forward_proj="gated-gelu",
                             tie_word_embeddings=False, relative_attention_num_buckets=8,
                             relative_attention_max_distance=16),
    "llama-tiny": LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                              num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                              max_position_embeddings=128, bos_token_id=1, eos_token_id=2),
    "llama-tiny-gqa": LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=2, max_position_embeddings=128,
                                  rope_theta=500000.0,
                                  rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                                ("low_freq_factor", 1.0),
                                                ("original_max_position_embeddings", 32),
                                                ("rope_type", "llama3"))),
}


def get_preset(name: str):
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  return PRESETS[name]
