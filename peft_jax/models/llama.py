"""LLaMA 1/2/3 in Flax linen: RMSNorm, RoPE (default, linear and Llama-3
scaling), SwiGLU, grouped-/multi-query attention, tied or untied head; with the
config's switches also Qwen2 (``qkv_bias``: ``layers/attn/{q,k,v}/bias``) and Mistral
(``sliding_window``: a query sees only the last ``window`` tokens, itself included).

Parameter tree (``[layers]`` = stacked by the layer scan)::

  embed/embedding                          [vocab, embed]
  layers/attn/q/kernel                     [layers, embed, heads*head_dim]
  layers/attn/{k,v}/kernel                 [layers, embed, kv_heads*head_dim]
  layers/attn/o/kernel                     [layers, heads*head_dim, embed]
  layers/mlp/{gate,up}/kernel, down/kernel [layers, embed, mlp] / [layers, mlp, embed]
  layers/attn_norm/scale, mlp_norm/scale   [layers, embed]
  final_norm/scale                         [embed]
  lm_head/kernel                           [embed, vocab] (untied only)

Numerics follow ``transformers``' LlamaModel (RoPE in fp32, rotate-half layout).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models.config import LlamaConfig, as_dtype
from peft_jax.models.layers import (Embed, Linear, RMSNorm, attention, check_packable, constrain,
                                    gated, same_segment, scanned)
from peft_jax.sites import NO_SITES, Sites


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies, with 'linear' or 'llama3' rope scaling applied."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  rs = cfg.rope_scaling_dict
  if rs is None:
    return inv.astype(np.float32)
  kind = rs.get("rope_type", rs.get("type", "default"))
  if kind == "default":
    pass
  elif kind == "linear":
    inv = inv / rs["factor"]
  elif kind == "llama3":
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    inv = inv.astype(np.float32)
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, smoothed, scaled)
  else:
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
  return np.asarray(inv, np.float32)


def apply_rope(x, positions, inv_freq):
  """``x`` ``[B,T,N,H]``, ``positions`` ``[B,T]``; rotate-half layout as transformers."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos, sin = jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rot * sin).astype(x.dtype)


def _dense(cfg, sites, deterministic, features, axes, name, use_bias=False):
  return Linear(features, axes, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
                sites=sites, deterministic=deterministic, use_bias=use_bias, name=name)


class LlamaAttention(nn.Module):
  cfg: LlamaConfig
  sites: Sites = NO_SITES
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    cfg = self.cfg
    n, kv, h = cfg.num_attention_heads, cfg.n_kv_heads, cfg.head_dim
    dense = functools.partial(_dense, cfg, self.sites, self.deterministic)
    b, t = x.shape[:2]
    qkv = functools.partial(dense, use_bias=cfg.qkv_bias)
    q = qkv(n * h, ("embed", "heads"), "q")(x).reshape(b, t, n, h)
    k = qkv(kv * h, ("embed", "kv_heads"), "k")(x).reshape(b, t, kv, h)
    v = qkv(kv * h, ("embed", "kv_heads"), "v")(x).reshape(b, t, kv, h)
    inv = rope_inv_freq(cfg)
    q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
    new_cache = None
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
      new_cache = {"k": k, "v": v}
    n_keys = k.shape[1]
    k, v, mask, _ = self.sites.attention_kv(self, k, v, mask, None, self.deterministic)
    check_window(cfg, n_keys, k.shape[1])
    dtype = as_dtype(cfg.dtype)
    out = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask,
                    scale=1.0 / math.sqrt(h), impl=cfg.attention_impl)
    return dense(cfg.hidden_size, ("heads", "embed"), "o")(out.reshape(b, t, n * h)), new_cache


class LlamaMLP(nn.Module):
  cfg: LlamaConfig
  sites: Sites = NO_SITES
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = functools.partial(_dense, cfg, self.sites, self.deterministic)
    hid = gated(nn.silu, dense(cfg.intermediate_size, ("embed", "mlp"), "gate")(x),
                dense(cfg.intermediate_size, ("embed", "mlp"), "up")(x))
    hid = self.sites.ffn_act(self, hid, self.deterministic)
    return dense(cfg.hidden_size, ("mlp", "embed"), "down")(hid)


RESIDUAL = ("batch", "act_len", "act_embed")
LOGITS = ("batch", "act_len", "act_vocab")


class LlamaBlock(nn.Module):
  cfg: LlamaConfig
  sites: Sites = NO_SITES
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, mask, cache_index, cache):
    cfg, det = self.cfg, self.deterministic
    x = constrain(x, RESIDUAL)
    norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=as_dtype(cfg.dtype),
                             param_dtype=as_dtype(cfg.param_dtype), cast_before_scale=True)
    h = norm(name="attn_norm")(x)
    y, new_cache = LlamaAttention(cfg, self.sites, det, name="attn")(h, positions, mask, cache,
                                                                     cache_index)
    x = x + self.sites.sublayer(self, "attn", h, y, det, x=x)
    h = norm(name="mlp_norm")(x)
    y = LlamaMLP(cfg, self.sites, det, name="mlp")(h)
    x = constrain(x + self.sites.sublayer(self, "mlp", h, y, det, x=x), RESIDUAL)
    return x, new_cache


class Llama(nn.Module):
  """Decoder-only LLaMA. ``sites`` carries the active PEFT methods' handlers."""
  cfg: LlamaConfig
  sites: Sites = NO_SITES

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, deterministic=True,
               cache=None, cache_index=None, use_embed_site=None, segment_ids=None,
               logits_at=None):
    """Logits ``[B,T,V]`` (fp32); with a cache also the new cache.

    ``attention_mask`` marks valid keys: ``[B,T]`` without a cache, ``[B,S]`` over
    the cache slots with one (query ``t`` sits in slot ``cache_index + t``).
    ``positions`` ``[B,T]`` default to the slot index.
    ``use_embed_site`` (default: only without a cache) runs the ``embed`` site; with a
    cache that is the prefill call. Tokens the site prepends take positions
    ``0..n-1`` and shift the given positions by ``n``; with a cache they occupy
    the first ``n`` slots, so the cache (and the mask of later calls) is ``n``
    slots longer than the mask given here.
    ``segment_ids`` ``[B,T]`` (packed rows, :mod:`peft_jax.data.packing`; no cache): a
    token attends only to the earlier tokens of its own segment; pass ``positions`` that
    restart at 0 in each segment.
    ``logits_at`` ``[B,K]``: positions of ``input_ids`` whose logits alone are
    returned, ``[B,K,V]`` (the loss positions of a training batch: the head and the
    softmax then run over ``K`` tokens, not ``T``; generation's prefill: the last token).
    """
    cfg = self.cfg
    dtype, pdtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
    embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
                  sites=self.sites, name="embed")
    b, t = input_ids.shape
    t_in = t
    x = embed(input_ids)
    if attention_mask is None:
      s = t if cache is None else cache["k"].shape[2]
      attention_mask = jnp.ones((b, s), bool)
    attention_mask = attention_mask.astype(bool)
    if use_embed_site is None:
      use_embed_site = cache is None
    if segment_ids is not None:
      check_packable(self.sites, cache)
    if use_embed_site:
      x, attention_mask = self.sites.embed(self, x, attention_mask, deterministic)
      n_new = x.shape[1] - t
      t = x.shape[1]
      if positions is not None and n_new:
        positions = jnp.concatenate(
            [jnp.broadcast_to(jnp.arange(n_new, dtype=positions.dtype)[None], (b, n_new)),
             positions + n_new], axis=1)
    start = 0 if cache_index is None else cache_index
    slots = start + jnp.arange(t)
    if positions is None:
      positions = jnp.broadcast_to(slots[None], (b, t))
    s = attention_mask.shape[1]
    mask = attention_mask[:, None, None, :] & (jnp.arange(s)[None, :] <= slots[:, None])[None, None]
    if cfg.sliding_window:
      mask = mask & sliding_window_mask(positions, attention_mask, cache is not None,
                                        cfg.sliding_window)
    positions, _ = self.sites.positions(self, positions, None, deterministic)
    if segment_ids is not None:
      mask = mask & same_segment(segment_ids, segment_ids)
    block = scanned(LlamaBlock, cfg.remat, cfg.num_hidden_layers,
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                    decode_step=cache is not None and t == 1)
    x, new_cache = block(cfg, self.sites, deterministic, name="layers")(x, positions, mask,
                                                                        cache_index, cache)
    x = RMSNorm(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=pdtype, cast_before_scale=True,
                name="final_norm")(x)
    if logits_at is not None:      # tokens a method prepended shift the input's positions
      x = jnp.take_along_axis(x, (logits_at + (x.shape[1] - t_in))[..., None], axis=1)
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=dtype, param_dtype=pdtype,
                      sites=self.sites, deterministic=deterministic, name="lm_head")(x)
    logits = constrain(logits.astype(jnp.float32), LOGITS)
    return logits if cache is None else (logits, new_cache)


def sliding_window_mask(positions, key_mask, cached: bool, window: int):
  """Boolean ``[B, 1, T, S]``: key ``s`` lies within ``window`` tokens of query ``t``,
  ``t - window < s`` (transformers' sliding-window convention), counted in token positions,
  so that padding does not eat into the window. Without a cache the keys are the queries'
  own tokens; with one, key slot ``s`` holds the token at position
  ``cumsum(key_mask)[s] - 1`` (valid slots are filled in order, as generation does)."""
  kpos = positions if not cached else jnp.cumsum(key_mask.astype(jnp.int32), axis=1) - 1
  return (kpos[:, None, :] > positions[:, :, None] - window)[:, None]


def check_window(cfg: LlamaConfig, n_keys: int, n_with_added: int):
  """Keys that a method adds in front (prefix tuning) stay visible to every query here; in
  transformers they sit at the first cache positions and slide out of the window. The two
  agree while all keys fit in the window; longer sequences are refused (``ValueError``)."""
  if cfg.sliding_window and n_with_added > n_keys and n_with_added > cfg.sliding_window:
    raise ValueError(f"{n_with_added - n_keys} added prefix keys with sliding_window="
                     f"{cfg.sliding_window}: {n_with_added} keys in all exceed the window (where "
                     "transformers would slide the prefix out); use at most "
                     f"{cfg.sliding_window - (n_with_added - n_keys)} tokens per sequence")


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None):
  dtype = as_dtype(dtype or cfg.dtype)
  shape = (cfg.num_hidden_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
