"""T5 in Flax linen: v1.0 (ReLU, tied head with d_model**-0.5 rescale) and
v1.1 / LM-adapted / FLAN-T5 (gated-GELU, untied head); ``d_kv*heads`` may
differ from ``d_model`` (T5-3B, T5-11B).

Parameter tree (``[layers]`` = stacked by the layer scan)::

  shared/embedding                                  [vocab, embed]
  encoder/rel_bias/embedding                        [buckets, heads]
  encoder/layers/attn/{q,k,v}/kernel                [layers, embed, heads*d_kv]
  encoder/layers/attn/o/kernel                      [layers, heads*d_kv, embed]
  encoder/layers/attn_norm/scale, mlp_norm/scale    [layers, embed]
  encoder/layers/mlp/{wi | wi_0, wi_1}/kernel, mlp/wo/kernel
  encoder/final_norm/scale
  decoder/... as encoder, with self_attn, self_attn_norm, cross_attn, cross_attn_norm
  lm_head/kernel                                    [embed, vocab] (untied only)

The tied head (v1.0) is still a ``linear`` site named ``lm_head`` (``TiedHead``), so LoRA
can target it and ``modules_to_save`` can give it an untied ``lm_head/kernel`` copy.

Numerics follow ``transformers``' T5: no 1/sqrt(d) in attention, relative
position buckets shared by all layers of a stack, norms in fp32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from peft_jax.models.config import T5Config, as_dtype
from peft_jax.models.layers import (Dropout, Embed, Linear, RMSNorm, TiedHead, attention,
                                    check_packable, constrain, param_with_axes, same_segment,
                                    gated, scanned, softmax)
from peft_jax.sites import NO_SITES, Sites

_ACTS = {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=False),
         "gelu_new": functools.partial(nn.gelu, approximate=True), "silu": nn.silu}


def relative_position_bucket(rel, bidirectional, num_buckets, max_distance):
  """T5's bucketing of ``key_pos - query_pos`` (as in Mesh TF / transformers)."""
  ret = 0
  if bidirectional:
    num_buckets //= 2
    ret = (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  large = max_exact + (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
                       / math.log(max_distance / max_exact) * (num_buckets - max_exact)
                       ).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, rel, large)


class RelativePositionBias(nn.Module):
  cfg: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_pos, k_pos):
    """``[1, N, T, S]`` from positions ``[T]``/``[S]``; ``[B, N, T, S]`` from per-row
    positions ``[B,T]``/``[B,S]`` (packed rows: positions restart in each segment)."""
    cfg = self.cfg
    emb = param_with_axes(self, "embedding", nn.initializers.normal(1.0),
                          (cfg.relative_attention_num_buckets, cfg.num_heads),
                          ("relpos_buckets", "heads_n"), as_dtype(cfg.param_dtype))
    buckets = relative_position_bucket(k_pos[..., None, :] - q_pos[..., :, None],
                                       self.bidirectional, cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    values = jnp.take(emb, buckets, axis=0).astype(jnp.float32)      # [(B,) T, S, N]
    if values.ndim == 3:
      return jnp.transpose(values, (2, 0, 1))[None]                  # [1, N, T, S]
    return jnp.transpose(values, (0, 3, 1, 2))                       # [B, N, T, S]


def _dense(cfg, sites, deterministic, features, axes, name):
  return Linear(features, axes, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
                sites=sites, deterministic=deterministic, name=name)


class T5Attention(nn.Module):
  cfg: T5Config
  sites: Sites = NO_SITES
  deterministic: bool = True
  is_cross: bool = False
  decode_mode: str = "none"      # 'none' | 'fill' (write cache, compute cross kv) | 'step'

  @nn.compact
  def __call__(self, x, kv_in, mask, bias, cache=None, cache_index=None):
    cfg = self.cfg
    n, h = cfg.num_heads, cfg.d_kv
    dense = functools.partial(_dense, cfg, self.sites, self.deterministic)
    b, t = x.shape[:2]
    q = dense(n * h, ("embed", "heads"), "q")(x).reshape(b, t, n, h)
    new_cache = None
    if self.is_cross and self.decode_mode == "step":
      # the encoder's keys and values, stored at the prompt's pass in the layouts of the
      # step's two products (keys [B,N,H,S], values [B,N,S,H]): read as they are at every
      # token, where the [B,S,N,H] layout was transposed twice per layer per token
      new_cache = cache
      if not self.sites.has("attention_kv"):
        return self._cross_step(q, cache["k"], cache["v"], mask), new_cache
      k, v = jnp.transpose(cache["k"], (0, 3, 1, 2)), jnp.transpose(cache["v"], (0, 2, 1, 3))
    else:
      s = kv_in.shape[1]
      k = dense(n * h, ("embed", "heads"), "k")(kv_in).reshape(b, s, n, h)
      v = dense(n * h, ("embed", "heads"), "v")(kv_in).reshape(b, s, n, h)
      if self.decode_mode != "none":
        if self.is_cross:
          new_cache = {"k": jnp.transpose(k, (0, 2, 3, 1)).astype(cache["k"].dtype),
                       "v": jnp.transpose(v, (0, 2, 1, 3)).astype(cache["v"].dtype)}
        else:
          k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
          v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
          new_cache = {"k": k, "v": v}
    k, v, mask, bias = self.sites.attention_kv(self, k, v, mask, bias, self.deterministic)
    dtype = as_dtype(cfg.dtype)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    dropout = None
    if not self.deterministic and cfg.dropout_rate > 0:
      # T5 drops attention probabilities (in the compute dtype, as transformers does: the
      # residual kept for the backward pass is half the size under bf16)
      dropout = lambda p: Dropout(cfg.dropout_rate)(p, deterministic=False)
    out = attention(q, k, v, mask=mask, bias=bias, scale=1.0, impl=cfg.attention_impl,
                    dropout=dropout)
    y = dense(cfg.d_model, ("heads", "embed"), "o")(out.reshape(b, t, n * h))
    return y, new_cache

  def _cross_step(self, q, k_t, v_t, mask):
    """Cross attention of a decoding step on the cached keys ``[B,N,H,S]`` and values
    ``[B,N,S,H]`` (T5: no scaling, no position bias), then the output projection."""
    cfg = self.cfg
    b, t, n, h = q.shape
    dtype = as_dtype(cfg.dtype)
    logits = jnp.einsum("btnh,bnhs->bnts", q.astype(dtype), k_t.astype(dtype),
                        preferred_element_type=jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = softmax(logits, axis=-1)
    out = jnp.einsum("bnts,bnsh->btnh", probs.astype(dtype), v_t.astype(dtype))
    if mask is not None:        # as layers.attention: a query with no valid key gives zeros
      out = jnp.where(jnp.any(mask, axis=-1)[:, :, :, None].transpose(0, 2, 1, 3), out, 0)
    dense = functools.partial(_dense, cfg, self.sites, self.deterministic)
    return dense(cfg.d_model, ("heads", "embed"), "o")(out.reshape(b, t, n * h))


class T5MLP(nn.Module):
  cfg: T5Config
  sites: Sites = NO_SITES
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = functools.partial(_dense, cfg, self.sites, self.deterministic)
    act = _ACTS["gelu_new" if cfg.feed_forward_proj == "gated-gelu" else cfg.act_name]
    if cfg.is_gated:
      hid = gated(act, dense(cfg.d_ff, ("embed", "mlp"), "wi_0")(x),
                  dense(cfg.d_ff, ("embed", "mlp"), "wi_1")(x))
    else:
      hid = act(dense(cfg.d_ff, ("embed", "mlp"), "wi")(x))
    hid = Dropout(cfg.dropout_rate)(hid, deterministic=self.deterministic)
    hid = self.sites.ffn_act(self, hid, self.deterministic)
    return dense(cfg.d_model, ("mlp", "embed"), "wo")(hid)


RESIDUAL = ("batch", "act_len", "act_embed")
LOGITS = ("batch", "act_len", "act_vocab")


class T5Block(nn.Module):
  """One encoder or decoder layer, the body of the layer scan."""
  cfg: T5Config
  sites: Sites = NO_SITES
  deterministic: bool = True
  is_decoder: bool = False
  decode_mode: str = "none"

  @nn.compact
  def __call__(self, x, mask, bias, enc, enc_mask, cache_index, cache):
    cfg, det = self.cfg, self.deterministic
    x = constrain(x, RESIDUAL)
    norm = functools.partial(RMSNorm, eps=cfg.layer_norm_epsilon, dtype=as_dtype(cfg.dtype),
                             param_dtype=as_dtype(cfg.param_dtype))
    drop = Dropout(cfg.dropout_rate)
    sa_name = "self_attn" if self.is_decoder else "attn"
    new_cache = {}
    h = norm(name=f"{sa_name}_norm")(x)
    y, c = T5Attention(cfg, self.sites, det, is_cross=False,
                       decode_mode=self.decode_mode if self.is_decoder else "none",
                       name=sa_name)(h, h, mask, bias, None if cache is None else cache["self"],
                                     cache_index)
    y = self.sites.sublayer(self, sa_name, h, drop(y, deterministic=det), det, x=x)
    x = x + y
    if c is not None:
      new_cache["self"] = c
    if self.is_decoder:
      h = norm(name="cross_attn_norm")(x)
      y, c = T5Attention(cfg, self.sites, det, is_cross=True, decode_mode=self.decode_mode,
                         name="cross_attn")(h, enc, enc_mask, None,
                                            None if cache is None else cache["cross"], cache_index)
      y = self.sites.sublayer(self, "cross_attn", h, drop(y, deterministic=det), det, x=x)
      x = x + y
      if c is not None:
        new_cache["cross"] = c
    h = norm(name="mlp_norm")(x)
    y = T5MLP(cfg, self.sites, det, name="mlp")(h)
    y = self.sites.sublayer(self, "mlp", h, drop(y, deterministic=det), det, x=x)
    x = constrain(x + y, RESIDUAL)
    return x, (new_cache if new_cache else None)


class T5Stack(nn.Module):
  cfg: T5Config
  sites: Sites = NO_SITES
  is_decoder: bool = False

  @nn.compact
  def __call__(self, x, mask, enc=None, enc_mask=None, cache=None, cache_index=None,
               deterministic=True, decode_mode="none", segment_ids=None, positions=None,
               enc_segment_ids=None):
    """``x``: embedded inputs ``[B,T,D]``; ``mask``: valid keys ``[B,S]`` (S = T, or
    the cache length when decoding). Returns (hidden, key mask, new cache).

    Packed rows (:mod:`peft_jax.data.packing`): ``segment_ids`` and ``positions``
    ``[B,T]`` of this stack's tokens (positions restart at 0 in each segment; the
    relative position bias is computed per row from them), and for the decoder the
    encoder's ``enc_segment_ids``: attention stays within a segment, cross attention
    reads the encoder tokens of the same segment."""
    cfg = self.cfg
    if segment_ids is not None:
      check_packable(self.sites, cache)
    if not self.is_decoder:
      x, mask = self.sites.embed(self, x, mask, deterministic)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    t = x.shape[1]
    start = 0 if cache_index is None else cache_index
    slots = start + jnp.arange(t)
    s = mask.shape[1]
    if segment_ids is None:
      q_pos, k_pos = slots, jnp.arange(s)
      q_pos, k_pos = self.sites.positions(self, q_pos, k_pos, deterministic)
    else:   # no handler at the positions site (check_packable)
      q_pos = k_pos = positions
    bias = RelativePositionBias(cfg, bidirectional=not self.is_decoder, name="rel_bias")(
        q_pos, k_pos)
    attn_mask = mask[:, None, None, :].astype(bool)
    if self.is_decoder:
      attn_mask = attn_mask & (jnp.arange(s)[None, :] <= slots[:, None])[None, None]
    cross_mask = None if enc_mask is None else enc_mask[:, None, None, :].astype(bool)
    if segment_ids is not None:
      attn_mask = attn_mask & same_segment(segment_ids, segment_ids)
      if cross_mask is not None:
        cross_mask = cross_mask & same_segment(segment_ids, enc_segment_ids)
    n_layers = cfg.n_decoder_layers if self.is_decoder else cfg.num_layers
    block = scanned(T5Block, cfg.remat, n_layers,
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                    decode_step=decode_mode == "step")
    x, new_cache = block(cfg, self.sites, deterministic, self.is_decoder, decode_mode,
                         name="layers")(x, attn_mask, bias, enc, cross_mask, cache_index, cache)
    x = RMSNorm(eps=cfg.layer_norm_epsilon, dtype=as_dtype(cfg.dtype),
                param_dtype=as_dtype(cfg.param_dtype), name="final_norm")(x)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return x, mask, new_cache


class T5(nn.Module):
  """Encoder-decoder T5. ``sites`` carries the active PEFT methods' handlers."""
  cfg: T5Config
  sites: Sites = NO_SITES

  def setup(self):
    cfg = self.cfg
    self.shared = Embed(cfg.vocab_size, cfg.d_model, dtype=as_dtype(cfg.dtype),
                        param_dtype=as_dtype(cfg.param_dtype), sites=self.sites)
    self.encoder = T5Stack(cfg, self.sites, is_decoder=False)
    self.decoder = T5Stack(cfg, self.sites, is_decoder=True)
    if cfg.tie_word_embeddings:   # a linear site over the shared matrix (HF's tied lm_head)
      self.lm_head = TiedHead(dtype=as_dtype(cfg.dtype), sites=self.sites)
    else:
      self.lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=as_dtype(cfg.dtype),
                            param_dtype=as_dtype(cfg.param_dtype), sites=self.sites)

  def encode(self, input_ids, attention_mask=None, deterministic=True, segment_ids=None,
             positions=None):
    """Returns (encoder hidden states, their key mask) — the mask may be longer than
    ``input_ids`` when a method prepends tokens. ``segment_ids``/``positions``: packed
    rows (:class:`T5Stack`)."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    h, mask, _ = self.encoder(self.shared(input_ids, "encoder"), attention_mask.astype(bool),
                              deterministic=deterministic, segment_ids=segment_ids,
                              positions=positions)
    return h, mask

  def decode(self, decoder_input_ids, enc, enc_mask, decoder_attention_mask=None,
             deterministic=True, cache=None, cache_index=None, decode_mode="none",
             segment_ids=None, positions=None, enc_segment_ids=None):
    """Decoder logits ``[B,T,V]`` (fp32); with a cache also returns the new cache.

    Decoding: ``decode_mode='fill'`` writes the first tokens at ``cache_index`` and
    stores the cross-attention keys/values; ``'step'`` reuses them. ``segment_ids``,
    ``positions`` (decoder) and ``enc_segment_ids``: packed rows (:class:`T5Stack`).
    """
    cfg = self.cfg
    b, t = decoder_input_ids.shape
    if decoder_attention_mask is None:
      s = t if cache is None else cache["self"]["k"].shape[2]
      decoder_attention_mask = jnp.ones((b, s), bool)
    x = self.shared(decoder_input_ids, "decoder")
    h, _, new_cache = self.decoder(x, decoder_attention_mask.astype(bool), enc,
                                   enc_mask.astype(bool), cache, cache_index,
                                   deterministic=deterministic,
                                   decode_mode="none" if cache is None else decode_mode,
                                   segment_ids=segment_ids, positions=positions,
                                   enc_segment_ids=enc_segment_ids)
    if cfg.scales_decoder_outputs:
      h = h * (cfg.d_model ** -0.5)
    if cfg.tie_word_embeddings:
      logits = self.lm_head(h, self.shared, deterministic)
    else:
      logits = self.lm_head(h)
    logits = constrain(logits.astype(jnp.float32), LOGITS)
    return logits if cache is None else (logits, new_cache)

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, deterministic=True, segment_ids=None, positions=None,
               decoder_segment_ids=None, decoder_positions=None):
    """Training logits; the ``*segment_ids``/``*positions`` of packed rows go together."""
    enc, enc_mask = self.encode(input_ids, attention_mask, deterministic, segment_ids, positions)
    return self.decode(decoder_input_ids, enc, enc_mask, decoder_attention_mask, deterministic,
                       segment_ids=decoder_segment_ids, positions=decoder_positions,
                       enc_segment_ids=segment_ids)


def init_cache(cfg: T5Config, batch: int, max_len: int, enc_len: int, dtype=None):
  """Zeroed decoder cache: self-attention ``[L,B,max_len,N,H]``; cross attention keys
  ``[L,B,N,H,enc_len]`` and values ``[L,B,N,enc_len,H]`` (the layouts a decoding step's
  products read, see :meth:`T5Attention._cross_step`)."""
  dtype = as_dtype(dtype or cfg.dtype)
  L, n, h = cfg.n_decoder_layers, cfg.num_heads, cfg.d_kv
  z = lambda *shape: jnp.zeros((L, batch) + shape, dtype)
  return {"self": {"k": z(max_len, n, h), "v": z(max_len, n, h)},
          "cross": {"k": z(n, h, enc_len), "v": z(n, enc_len, h)}}
