"""The LLaMA family (LLaMA 1/2/3; ``transformers``' LlamaForCausalLM): a decoder-only model
with RoPE, read as ``causal`` batches; and its two variants on the same model code, each a
family of its own (its model_type, config class and HF names): Qwen2 (biases on q, k, v)
and Mistral (sliding-window attention)."""

from __future__ import annotations

from typing import Any, Dict, List

import jax
import jax.numpy as jnp

from peft_jax.models.config import LlamaConfig, MistralConfig, Qwen2Config
from peft_jax.models.family import Family, register
from peft_jax.models.llama import Llama, init_cache

_HF_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
            "up": "up_proj", "down": "down_proj"}


#: the rope_scaling types peft-jax computes (peft_jax.models.llama.rope_inv_freq)
ROPE_TYPES = ("default", "linear", "llama3")


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


class LlamaFamily(Family):
  name = "llama"
  config_class = LlamaConfig
  layout = "causal"
  source_eos = False
  has_dropout = False
  prompt_leaf = "prompt_embeddings"
  embedding_leaf = "embed/embedding"
  embedding_lookups = {"embed": "model.embed_tokens"}
  hf_embedding_table = "model.embed_tokens"
  hf_model_types = ("llama",)
  hf_architecture = "LlamaForCausalLM"
  hf_task_type = "CAUSAL_LM"
  hf_peft_default_targets = {"LORA": ("q_proj", "v_proj"),
                             "IA3": ("k_proj", "v_proj", "down_proj"),
                             "IA3_FEEDFORWARD": ("down_proj",),
                             "ADALORA": ("q_proj", "v_proj")}
  hf_weight_aliases = {"model.embed_tokens.weight": ("embed_tokens.weight",)}
  sublayer_aliases = {"self_attn": frozenset({"self_attn"}), "attn": frozenset({"self_attn"}),
                      "mlp": frozenset({"mlp"})}

  def build(self, cfg, sites):
    return Llama(cfg, sites)

  # dimensions
  def hidden_size(self, cfg):
    return cfg.hidden_size

  def num_heads(self, cfg):
    return cfg.num_attention_heads

  def head_dim(self, cfg):
    return cfg.head_dim

  def kv_width(self, cfg):
    return cfg.n_kv_heads * cfg.head_dim

  def num_layers(self, cfg):
    return cfg.num_hidden_layers

  def max_input_length(self, cfg):
    return int(cfg.max_position_embeddings), "max_position_embeddings"

  # sites
  def attentions(self, cfg):
    return [("self_attn", "layers/attn", cfg.num_hidden_layers)]

  def residual_sites(self, cfg):
    return (("layers", cfg.num_hidden_layers, 0, (("attn", "self_attn"), ("mlp", "mlp"))),)

  def modules_to_save_problem(self, cfg, path):
    """Why ``modules_to_save`` cannot name the module at ``path`` (None: it can)."""
    if path == "embed" and cfg.tie_word_embeddings:
      return ("with a tied head, HF PEFT's trained copy of embed_tokens leaves the head on the "
              "original weight, which peft-jax's one tied leaf cannot express")
    return None

  def hf_module_name(self, path, kind, name, layer):
    if path == "lm_head":
      return "lm_head"
    if kind == "norm":
      if name == "final_norm":
        return "model.norm"
      return f"model.layers.{layer}." + {"attn_norm": "input_layernorm",
                                          "mlp_norm": "post_attention_layernorm"}[name]
    sub = "self_attn" if path.split("/")[1] == "attn" else "mlp"
    return f"model.layers.{layer}.{sub}.{_HF_PROJ[name]}"

  # generation
  def start(self, model, params, ids, mask, max_new_tokens):
    cfg, v = model.cfg, {"params": params}
    b, p = ids.shape
    # Move the padding to the left (stable sort puts pads first, tokens keep their order).
    order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
    ids = jnp.take_along_axis(ids, order, 1)
    mask = jnp.take_along_axis(mask, order, 1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    # Tokens a method prepends at the input (prompt tuning) take the first cache slots.
    n_pre = jax.eval_shape(lambda: model.apply(v, ids, mask)).shape[1] - p
    n_valid = jnp.sum(mask, axis=1).astype(jnp.int32) + n_pre
    slots = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
    cache = init_cache(cfg, b, n_pre + p + max_new_tokens)
    # the head runs at the last prompt token only (the others' logits are not needed)
    last = jnp.full((b, 1), p - 1, jnp.int32)
    logits, cache = model.apply(v, ids, slots, positions, True, cache, 0, use_embed_site=True,
                                logits_at=last)
    slots = jnp.concatenate([jnp.ones((b, n_pre), bool), slots], axis=1)
    # the slot of step t's token: after the prepended tokens and the prompt
    aux = {"slots": slots, "n_valid": n_valid, "offset": jnp.int32(n_pre + p)}
    return logits[:, -1], cache, aux

  def advance(self, model, params, aux, cache, tokens, t):
    logits, cache = model.apply({"params": params}, tokens[:, None], aux["slots"],
                                (aux["n_valid"] + t)[:, None], True, cache, aux["offset"] + t,
                                use_embed_site=False)
    return logits[:, -1], cache

  # HF checkpoints
  def check_hf_variant(self, hf: Dict[str, Any]):
    """A ``ValueError`` for a config.json this family cannot represent."""
    for flag in ("attention_bias", "mlp_bias"):
      if hf.get(flag):
        raise ValueError(f"unsupported {self.name} variant: {flag}=true (peft-jax's {self.name} "
                         "has no biases there)")
    if "sliding_attention" in (hf.get("layer_types") or ()) and not self.hf_sliding_window:
      raise ValueError(f"unsupported {self.name} variant: sliding-window layers (layer_types); "
                       "peft-jax reads this model type with full attention only")

  def hf_extra_fields(self, hf: Dict[str, Any]) -> Dict[str, Any]:
    """The config fields of this family beyond LLaMA's."""
    return {}

  #: the family reads config.json's ``sliding_window`` (Mistral)
  hf_sliding_window = False

  def config_from_hf(self, hf: Dict[str, Any], tensor_names=()):
    self.check_hf_variant(hf)
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"unsupported {self.name} hidden_act {hf['hidden_act']!r}; expected 'silu'")
    rp = dict(hf.get("rope_parameters") or {})
    theta = rp.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rs = hf.get("rope_scaling") or rp
    rs = {k: v for k, v in rs.items() if v is not None} if rs else None
    kind = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
    if kind not in ROPE_TYPES:
      raise ValueError(f"unsupported rope_scaling type {kind!r} in config.json; peft-jax "
                       f"supports rope types: {', '.join(ROPE_TYPES)}")
    if kind == "default":
      rs = None
    # head_dim only where it is not hidden / heads (config.json may or may not spell it)
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
      head_dim = None
    return self.config_class(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        num_hidden_layers=hf["num_hidden_layers"], head_dim_=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=None if not rs else tuple(sorted(rs.items())),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first(hf.get("bos_token_id", 1)),
        eos_token_id=_first(hf.get("eos_token_id", 2)), pad_token_id=hf.get("pad_token_id"),
        **self.hf_extra_fields(hf))

  def hf_extra_config(self, cfg) -> Dict[str, Any]:
    """config.json keys of this family beyond LLaMA's."""
    if cfg.qkv_bias or cfg.sliding_window:
      raise ValueError(f"a {self.name} checkpoint cannot hold qkv_bias / sliding_window; "
                       "use the qwen2 / mistral configs")
    return {"attention_bias": False, "mlp_bias": False}

  def config_to_hf(self, cfg):
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
      rope.update(cfg.rope_scaling_dict)
    legacy_scaling = None if not cfg.rope_scaling else cfg.rope_scaling_dict
    return {
        "architectures": [self.hf_architecture], "model_type": self.hf_model_types[0],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.num_hidden_layers,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": rope, "rope_scaling": legacy_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "hidden_act": "silu", "dtype": "float32", **self.hf_extra_config(cfg),
    }

  def hf_weight_names(self, cfg):
    n = cfg.num_hidden_layers
    p = "model.layers.{i}"
    m: List = [("embed/embedding", "model.embed_tokens.weight", None, False)]
    for w in "qkvo":
      m.append((f"layers/attn/{w}/kernel", f"{p}.self_attn.{w}_proj.weight", n, True))
    if cfg.qkv_bias:
      for w in "qkv":
        m.append((f"layers/attn/{w}/bias", f"{p}.self_attn.{w}_proj.bias", n, False))
    for w in ("gate", "up", "down"):
      m.append((f"layers/mlp/{w}/kernel", f"{p}.mlp.{w}_proj.weight", n, True))
    m.append(("layers/attn_norm/scale", f"{p}.input_layernorm.weight", n, False))
    m.append(("layers/mlp_norm/scale", f"{p}.post_attention_layernorm.weight", n, False))
    m.append(("final_norm/scale", "model.norm.weight", None, False))
    if not cfg.tie_word_embeddings:
      m.append(("lm_head/kernel", "lm_head.weight", None, True))
    return m


LLAMA_FAMILY = register(LlamaFamily())


class Qwen2Family(LlamaFamily):
  """Qwen2 (``Qwen2ForCausalLM``): LLaMA plus biases on the q, k, v projections."""
  name = "qwen2"
  config_class = Qwen2Config
  hf_model_types = ("qwen2",)
  hf_architecture = "Qwen2ForCausalLM"
  hf_peft_default_targets = dict(LlamaFamily.hf_peft_default_targets,
                                 IA3=("q_proj", "v_proj", "down_proj"))

  def check_hf_variant(self, hf):
    super().check_hf_variant(hf)
    if hf.get("use_sliding_window"):
      raise ValueError("unsupported qwen2 variant: use_sliding_window=true (peft-jax reads "
                       "Qwen2 with full attention only)")

  def hf_extra_fields(self, hf):
    return {"qkv_bias": True}

  def hf_extra_config(self, cfg):
    if not cfg.qkv_bias or cfg.sliding_window:
      raise ValueError("a qwen2 checkpoint has q/k/v biases and full attention; expected "
                       "qkv_bias=True and sliding_window=None")
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers":
            cfg.num_hidden_layers}


class MistralFamily(LlamaFamily):
  """Mistral (``MistralForCausalLM``): LLaMA plus sliding-window attention."""
  name = "mistral"
  config_class = MistralConfig
  hf_model_types = ("mistral",)
  hf_architecture = "MistralForCausalLM"
  hf_sliding_window = True

  def hf_extra_fields(self, hf):
    return {"sliding_window": hf.get("sliding_window")}

  def hf_extra_config(self, cfg):
    if cfg.qkv_bias:
      raise ValueError("a mistral checkpoint has no q/k/v biases; expected qkv_bias=False")
    return {"sliding_window": cfg.sliding_window}


QWEN2_FAMILY = register(Qwen2Family())
MISTRAL_FAMILY = register(MistralFamily())
