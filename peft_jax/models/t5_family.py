"""The T5 family (T5 v1.0, v1.1, LM-adapted, FLAN-T5; ``transformers``' T5ForConditionalGeneration):
an encoder-decoder with relative position buckets, read as ``seq2seq`` batches."""

from __future__ import annotations

from typing import Any, Dict, List

import jax.numpy as jnp

from peft_jax.models.config import T5Config
from peft_jax.models.family import Family, register
from peft_jax.models.t5 import T5, init_cache


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


class T5Family(Family):
  name = "t5"
  config_class = T5Config
  layout = "seq2seq"
  source_eos = True
  has_dropout = True
  prompt_leaf = "encoder/prompt_embeddings"
  embedding_leaf = "shared/embedding"
  embedding_lookups = {"encoder/embed_tokens": "encoder.embed_tokens",
                       "decoder/embed_tokens": "decoder.embed_tokens"}
  hf_embedding_table = "shared"
  hf_model_types = ("t5", "mt5")
  hf_architecture = "T5ForConditionalGeneration"
  hf_task_type = "SEQ_2_SEQ_LM"
  hf_peft_default_targets = {"LORA": ("q", "v"), "IA3": ("k", "v", "wo"),
                             "IA3_FEEDFORWARD": ("wo",),
                             "ADALORA": ("q", "k", "v", "o", "wi", "wo")}
  hf_weight_aliases = {"shared.weight": ("encoder.embed_tokens.weight",
                                         "decoder.embed_tokens.weight")}
  sublayer_aliases = {
      "encoder_self_attn": frozenset({"encoder_self_attn"}),
      "decoder_self_attn": frozenset({"decoder_self_attn"}),
      "cross_attn": frozenset({"cross_attn"}),
      "encoder_mlp": frozenset({"encoder_mlp"}),
      "decoder_mlp": frozenset({"decoder_mlp"}),
      "self_attn": frozenset({"encoder_self_attn", "decoder_self_attn"}),
      "attn": frozenset({"encoder_self_attn", "decoder_self_attn", "cross_attn"}),
      "mlp": frozenset({"encoder_mlp", "decoder_mlp"}),
  }

  def build(self, cfg, sites):
    return T5(cfg, sites)

  # dimensions
  def hidden_size(self, cfg):
    return cfg.d_model

  def num_heads(self, cfg):
    return cfg.num_heads

  def head_dim(self, cfg):
    return cfg.d_kv

  def kv_width(self, cfg):
    return cfg.num_heads * cfg.d_kv

  def num_layers(self, cfg):
    return cfg.num_layers

  def max_input_length(self, cfg):
    return 512, "T5 default max_input_length"

  # sites
  def attentions(self, cfg):
    return [("encoder_self_attn", "encoder/layers/attn", cfg.num_layers),
            ("decoder_self_attn", "decoder/layers/self_attn", cfg.n_decoder_layers),
            ("cross_attn", "decoder/layers/cross_attn", cfg.n_decoder_layers)]

  def residual_sites(self, cfg):
    return (("encoder/layers", cfg.num_layers, 0, (("attn", "self_attn"), ("mlp", "mlp"))),
            ("decoder/layers", cfg.n_decoder_layers, cfg.num_layers,
             (("self_attn", "self_attn"), ("cross_attn", "cross_attn"), ("mlp", "mlp"))))

  def modules_to_save_problem(self, cfg, path):
    """Why ``modules_to_save`` cannot name the module at ``path`` (None: it can)."""
    if path == "shared":
      return ("HF PEFT's trained copy of T5's shared embedding is read by no layer (the "
              "encoder and decoder keep the original as embed_tokens), so peft-jax does not "
              "train it")
    return None

  def tied_head_source(self, cfg):
    """The leaf the tied ``lm_head`` site reads (v1.0), None for an untied head."""
    return "shared/embedding" if cfg.tie_word_embeddings else None

  def hf_module_name(self, path, kind, name, layer):
    if path == "lm_head":
      return "lm_head"
    parts = path.split("/")
    stack = parts[0]
    if kind == "norm":
      if name == "final_norm":
        return f"{stack}.final_layer_norm"
      j = {"attn_norm": 0, "self_attn_norm": 0, "cross_attn_norm": 1,
           "mlp_norm": 1 if stack == "encoder" else 2}[name]
      return f"{stack}.block.{layer}.layer.{j}.layer_norm"
    sub = parts[2]
    if sub == "mlp":
      j = 1 if stack == "encoder" else 2
      return f"{stack}.block.{layer}.layer.{j}.DenseReluDense.{name}"
    j, att = {"attn": (0, "SelfAttention"), "self_attn": (0, "SelfAttention"),
              "cross_attn": (1, "EncDecAttention")}[sub]
    return f"{stack}.block.{layer}.layer.{j}.{att}.{name}"

  # generation
  def start(self, model, params, ids, mask, max_new_tokens):
    cfg, v = model.cfg, {"params": params}
    enc, enc_mask = model.apply(v, ids, mask, method=model.encode)
    b = ids.shape[0]
    cache = init_cache(cfg, b, max_new_tokens, enc.shape[1])
    start = jnp.full((b, 1), cfg.decoder_start_token_id, jnp.int32)
    logits, cache = model.apply(v, start, enc, enc_mask, None, True, cache, 0, "fill",
                                method=model.decode)
    # the cross-attention keys and values stay fixed while decoding: read-only aux, not
    # part of the cache a step returns (and beam search reorders)
    aux = {"enc": enc, "enc_mask": enc_mask, "layers": {"cross": cache["cross"]}}
    return logits[:, -1], {"self": cache["self"]}, aux

  def advance(self, model, params, aux, cache, tokens, t):
    # slot 0 holds the start token, so the token of step t goes to slot t + 1
    cache = {"self": cache["self"], "cross": aux["layers"]["cross"]}
    logits, cache = model.apply({"params": params}, tokens[:, None], aux["enc"],
                                aux["enc_mask"], None, True, cache, t + 1, "step",
                                method=model.decode)
    return logits[:, -1], {"self": cache["self"]}

  # HF checkpoints
  def config_from_hf(self, hf: Dict[str, Any], tensor_names=()):
    tie = hf.get("tie_word_embeddings", True) is not False
    if "scale_decoder_outputs" in hf:
      scale = bool(hf["scale_decoder_outputs"])
      tie = tie and "lm_head.weight" not in tensor_names
    else:
      scale = tie
    return T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_heads=hf["num_heads"], num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers"),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"), tie_word_embeddings=tie,
        scale_decoder_outputs=scale,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        dropout_rate=hf.get("dropout_rate", 0.1), pad_token_id=hf.get("pad_token_id", 0) or 0,
        eos_token_id=_first(hf.get("eos_token_id", 1)),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)) or 0)

  def config_to_hf(self, cfg):
    return {
        "architectures": [self.hf_architecture], "model_type": "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.n_decoder_layers, "feed_forward_proj": cfg.feed_forward_proj,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.scales_decoder_outputs,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "dropout_rate": cfg.dropout_rate,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id, "is_encoder_decoder": True,
        "dtype": "float32",
    }

  def hf_weight_names(self, cfg):
    m: List = [("shared/embedding", "shared.weight", None, False)]
    mlp = ["wi_0", "wi_1", "wo"] if cfg.is_gated else ["wi", "wo"]
    for stack, n, subs in (("encoder", cfg.num_layers, [("attn", "SelfAttention")]),
                           ("decoder", cfg.n_decoder_layers,
                            [("self_attn", "SelfAttention"), ("cross_attn", "EncDecAttention")])):
      p = f"{stack}.block.{{i}}.layer"
      for j, (ours, theirs) in enumerate(subs):
        for w in "qkvo":
          m.append((f"{stack}/layers/{ours}/{w}/kernel", f"{p}.{j}.{theirs}.{w}.weight", n, True))
        m.append((f"{stack}/layers/{ours}_norm/scale", f"{p}.{j}.layer_norm.weight", n, False))
      j = len(subs)
      for w in mlp:
        m.append((f"{stack}/layers/mlp/{w}/kernel", f"{p}.{j}.DenseReluDense.{w}.weight", n, True))
      m.append((f"{stack}/layers/mlp_norm/scale", f"{p}.{j}.layer_norm.weight", n, False))
      m.append((f"{stack}/rel_bias/embedding",
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None,
                False))
      m.append((f"{stack}/final_norm/scale", f"{stack}.final_layer_norm.weight", None, False))
    if not cfg.tie_word_embeddings:
      m.append(("lm_head/kernel", "lm_head.weight", None, True))
    return m


T5_FAMILY = register(T5Family())
