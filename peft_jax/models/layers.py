"""Building blocks shared by the T5 and LLaMA models.

Every parameter is created with logical axis names (``embed``, ``heads``,
``kv_heads``, ``mlp``, ``vocab``, ``layers``, ...); a sharding layer maps them
onto a mesh by rules. Kernels are stored ``[in, out]``.
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from peft_jax.sites import Sites, NO_SITES
from peft_jax.models.config import as_dtype

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


#: set by :func:`peft_jax.sharding.activation_sharding` while a step is traced
ACTIVATION_CONSTRAINT: contextvars.ContextVar = contextvars.ContextVar("activation_constraint",
                                                                       default=None)


def constrain(x, names: Sequence[Optional[str]]):
  """Sharding constraint on an activation by logical names (``batch``, ``act_len``,
  ``act_embed``, ``act_vocab``, ...); a no-op outside a sharded step."""
  fn = ACTIVATION_CONSTRAINT.get()
  return x if fn is None else fn(x, tuple(names))


def param_with_axes(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def matmul(x, kernel):
  """``x [..., in] @ kernel [in, out]`` as one 2-D product over the flattened leading axes.
  The backward pass then contracts the kernel's gradient over one token axis: over
  ``[B, T]`` at once XLA:CPU fused each gradient with a transposing copy whose stride
  (``B*T`` floats) thrashed the cache; measured on a LLaMA MLP's fwd+bwd at
  ``[8, 256, 512] x [512, 1376]``: 170 -> 94 ms, the gradients bitwise equal."""
  if x.ndim == 2:
    return jnp.dot(x, kernel)
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
  return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


class Linear(nn.Module):
  """A projection ``x @ kernel`` (``+ bias`` with ``use_bias``); a ``linear`` site.

  The bias belongs to the frozen base product that the site's handlers wrap, as in a
  torch ``nn.Linear`` that HF PEFT wraps (IA3 scales it with the output; LoRA adds to it).
  A quantized base stores ``kernel_q`` + scales instead of ``kernel``
  (:mod:`peft_jax.quantize`); ``base(x)`` then dequantizes to the compute dtype.
  """
  features: int
  axes: Sequence[str]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  sites: Sites = NO_SITES
  deterministic: bool = True
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    if self.has_variable("params", "kernel_q"):    # a quantized frozen base (peft_jax.quantize)
      from peft_jax.quantize import module_kernel
      kernel = module_kernel(self, self.dtype)
    else:
      kernel = param_with_axes(self, "kernel", self.kernel_init, (x.shape[-1], self.features),
                               tuple(self.axes), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                             (self.axes[-1],), self.param_dtype)

    def base(x):
      y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
      return y if bias is None else y + bias.astype(self.dtype)

    return self.sites.linear(self, x, base, self.deterministic)


#: draw dropout masks from 16 random bits per element (:func:`keep_mask`); False: jax.random.bernoulli
HALF_BITS_DROPOUT = True

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32, 20 rounds (Salmon et al., SC 2011): the hash behind ``jax.random``,
  bit for bit (tests/test_dropout.py checks it against ``jax.extend.random.threefry_2x32``).
  Written out so that XLA fuses the 20 rounds into one elementwise loop: JAX lowers its
  primitive on CPU as a rolled 5-iteration loop, one pass over memory per iteration, which
  made the mask of T5's attention-probability dropout 5x slower than this."""
  ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r)))
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x1, x2


def keep_mask(key, keep: float, shape):
  """Booleans, True with probability ``keep``: each element compares 16 random bits with
  ``round(keep * 2**16)``. One Threefry-2x32 draw (:func:`threefry2x32`) gives 64 bits,
  four elements: the last axis is cut into four contiguous quarters of ``q = ceil(n/4)``,
  and elements ``j``, ``j+q``, ``j+2q``, ``j+3q`` take the four 16-bit pieces of draw
  ``j`` (counter = the linear index of ``j`` in the quartered shape). Neighbours along the
  axis come from different draws, and the mask is a concatenation of four contiguous
  blocks, which XLA writes at memory speed; interleaving the four pieces (a ``stack`` on
  a new last axis) took 6.9 ms for T5's ``[8,8,256,256]`` attention mask on 2 CPU cores
  against 2.5 ms (``jax.grad`` through the dropout 14.6 vs 8.0 ms). ``jax.random.bernoulli``
  spends a whole draw on each element; at T5's attention-probability dropout that was 13%
  of a training step on CPU. The keep probability is exact to 2**-17 (0.9 is 0.8999939).
  Keys other than a threefry key (e.g. ``jax_default_prng_impl=rbg``) use
  ``jax.random.bits``, two elements per 32-bit word."""
  if not HALF_BITS_DROPOUT:
    return jax.random.bernoulli(key, keep, shape)
  shape = tuple(shape)
  threshold = jnp.uint32(round(keep * 65536))
  data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) \
      else key
  if data.shape != (2,) or data.dtype != jnp.uint32 or not shape:
    n = math.prod(shape)
    words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
    half = jnp.concatenate([words & 0xFFFF, words >> 16])[:n].reshape(shape)
    return half < threshold
  last = shape[-1]
  quarter = -(-last // 4)
  groups = shape[:-1] + (quarter,)
  count = jnp.zeros(groups, jnp.uint32)
  for axis in range(len(groups)):        # linear index, shaped like the quarters
    stride = math.prod(groups[axis + 1:])
    count = count + jax.lax.broadcasted_iota(jnp.uint32, groups, axis) * jnp.uint32(stride)
  b1, b2 = threefry2x32(data[0], data[1], jnp.zeros_like(count), count)
  keep = jnp.concatenate([(b1 & 0xFFFF) < threshold, (b2 & 0xFFFF) < threshold,
                          (b1 >> 16) < threshold, (b2 >> 16) < threshold], axis=-1)
  return keep if 4 * quarter == last else keep[..., :last]


class Dropout(nn.Module):
  """Inverted dropout (``flax.linen.Dropout``'s interface and scaling) with :func:`keep_mask`."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate <= 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    return apply_dropout(x, keep_mask(self.make_rng("dropout"), 1.0 - self.rate, x.shape),
                         self.rate)


def apply_dropout(x, keep, rate: float):
  """Inverted dropout with a given mask: ``where(keep, x / (1 - rate), 0)``."""
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class RMSNorm(nn.Module):
  """Scale-only RMS norm (T5 LayerNorm / LLaMA RMSNorm), computed in fp32."""
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  cast_before_scale: bool = False   # LLaMA casts to the input dtype before the scale; T5 after

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                            self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.cast_before_scale:
      return scale.astype(self.dtype) * y.astype(self.dtype)
    return (scale.astype(jnp.float32) * y).astype(self.dtype)


class Embed(nn.Module):
  """The token embedding; its lookup is a ``lookup`` site (``stack``: which stack reads it)."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  sites: Sites = NO_SITES

  def setup(self):
    self.embedding = param_with_axes(self, "embedding", nn.initializers.normal(1.0),
                                     (self.num_embeddings, self.features), ("vocab", "embed"),
                                     self.param_dtype)

  def __call__(self, ids, stack=None):
    x = jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
    return self.sites.lookup(self, ids, x, stack)

  def attend(self, x):
    """Logits against the (tied) embedding matrix."""
    return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


class TiedHead(nn.Module):
  """A tied output head as a ``linear`` site (``transformers``' ``lm_head``: an ``nn.Linear``
  sharing the input embedding): ``x @ embedding.T`` through the site's handlers, so methods
  can adapt it like any projection. It owns no weight; a ``kernel`` leaf ``[embed, vocab]``
  put in its scope (an untied trained copy, ``modules_to_save``) replaces the shared matrix."""
  dtype: Any = jnp.float32
  sites: Sites = NO_SITES

  @nn.compact
  def __call__(self, x, embed: "Embed", deterministic: bool = True):
    def base(x):
      if self.has_variable("params", "kernel"):
        k = self.get_variable("params", "kernel")
        return jnp.dot(x.astype(self.dtype), k.astype(self.dtype))
      return embed.attend(x)

    return self.sites.linear(self, x, base, deterministic)


def softmax(x, axis=-1):
  """``jax.nn.softmax`` with JAX's newer derivative rule (``jax.softmax_custom_jvp``): the
  backward pass keeps only the probabilities. The default rule differentiates through
  ``exp(x - max) / sum`` and keeps both the exponentials and the probabilities, two
  ``[B, N, T, S]`` float32 residuals per layer (LLaMA at the benchmark's size: 268 of
  the training step's 1,745 MB of temporaries)."""
  with jax.softmax_custom_jvp(True):
    return jax.nn.softmax(x, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(act, gate, up):
  """``act(gate) * up`` (LLaMA's SwiGLU, T5 v1.1's gated GELU) whose backward pass keeps
  only ``gate`` and ``up``.

  Differentiated as written, it keeps ``act(gate)`` and the pieces of its derivative
  (SiLU: the sigmoid, its derivative, the product) besides the two inputs: five or six
  ``[tokens, intermediate]`` residuals per layer where two suffice. The backward pass
  recomputes ``act(gate)`` and differentiates it with ``jax.vjp`` (elementwise, fused
  into the products that need it), so the gradients are autodiff's own."""
  return act(gate) * up


def _gated_fwd(act, gate, up):
  return act(gate) * up, (gate, up)


def _gated_bwd(act, res, g):
  gate, up = res
  a, act_vjp = jax.vjp(act, gate)
  (d_gate,) = act_vjp(g * up)
  return d_gate, g * a


gated.defvjp(_gated_fwd, _gated_bwd)


#: logits of masked positions (JAX's choice: finite, so a row with no valid key is uniform, not NaN)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention(q, k, v, *, mask=None, bias=None, scale=None, impl=None, dropout=None):
  """``[B,T,N,H] x [B,S,K,H] -> [B,T,N,H]``: softmax attention, grouped-query when K < N.

  ``mask`` is boolean ``[B|1, 1|N, T, S]`` (True = attend), ``bias`` additive
  ``[B|1, N, T, S]``, ``scale`` multiplies the logits (default ``1/sqrt(H)``), ``dropout``
  (T5 training) maps the probabilities, in the compute dtype, before they weigh the values.

  ``impl`` picks the kernel:

  * ``"einsum"``, and ``None``/``""`` on CPU: :func:`attention_heads_major`.
  * ``"xla"``/``"cudnn"``, and ``None``/``""`` elsewhere (GPU: cuDNN's fused kernel where it
    applies): ``jax.nn.dot_product_attention``. It has no dropout, so ``dropout`` always
    takes the heads-major path.

  Both compute the same function the same way (logits in float32, masked logits
  -0.7 x float32's max, float32 softmax, probabilities cast to the values' dtype); only the
  layouts of the two contractions differ.
  """
  if dropout is not None or impl == "einsum" or (not impl and jax.default_backend() == "cpu"):
    return attention_heads_major(q, k, v, mask=mask, bias=bias, scale=scale, dropout=dropout)
  dtype = q.dtype
  if bias is not None:
    bias = bias.astype(dtype)
  with jax.softmax_custom_jvp(True):        # keeps the probabilities only (see softmax)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                       implementation=impl or None)
  return out.astype(dtype)


def attention_heads_major(q, k, v, *, mask=None, bias=None, scale=None, dropout=None):
  """:func:`attention` with both contractions in a heads-major layout ``[B, K, G, T, H]``.

  ``jax.nn.dot_product_attention`` contracts in the ``[B,T,N,H]`` layout (grouped queries
  as a ``vmap``), and on CPU XLA lays its probability-times-values product out as
  ``[B,N,H,T]`` followed by transposes. Transposing ``q``, ``k`` and ``v`` to heads-major
  first (one copy each, ``[tokens, width]``-sized) makes both contractions plain batched
  GEMMs. On 2 CPU cores (``python scripts/bench_attention.py``: one block with its
  projections at the benchmark's sizes; median ms, xla -> einsum), T5 self-attention
  forward 34.7 -> 32.3, forward and backward 91.1 -> 89.8; LLaMA (GQA 8/2, causal) 24.7 ->
  13.9 and 68.2 -> 64.5; float32 outputs bit-identical. In the benchmark's generation the
  prompt's pass fell from 498 to 429 ms (T5) and from 370 to 262 ms (LLaMA).
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  dtype = q.dtype
  qh = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)             # [B,K,G,T,H]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)           # [B,K,S,H]
  logits = jnp.einsum("bkgth,bksh->bkgts", qh, kh, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(1.0 / math.sqrt(h) if scale is None else scale)

  def grouped(x):                                # [B|1, 1|N, T, S] -> [B|1, K|1, G|1, T, S]
    if x.shape[1] == 1:
      return x[:, :, None]
    return x.reshape(x.shape[0], kv, g, x.shape[2], x.shape[3])

  if bias is not None:
    logits = logits + grouped(bias.astype(dtype)).astype(jnp.float32)
  if mask is not None:
    # added, not selected: a select's derivative keeps its (broadcast) predicate and fill
    # as residuals; the sum of a logit and -0.7 x max is -0.7 x max in float32 all the same
    logits = logits + jnp.where(grouped(mask), jnp.float32(0), jnp.float32(_MASKED))
  probs = softmax(logits, axis=-1).astype(v.dtype)
  if dropout is not None:
    probs = dropout(probs)
  out = jnp.einsum("bkgts,bksh->bkgth", probs, vh)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(dtype)


def same_segment(q_segments, k_segments):
  """Boolean ``[B, 1, T, S]``: query ``t`` and key ``s`` lie in the same segment of a packed
  row (``[B,T]`` / ``[B,S]`` segment ids; :mod:`peft_jax.data.packing`)."""
  return (q_segments[:, :, None] == k_segments[:, None, :])[:, None]


def check_packable(sites, cache=None):
  """A ``ValueError`` unless a model with these sites may read packed rows (segment ids):
  training only (no cache), no method that acts on whole rows."""
  from peft_jax.data.packing import packing_problem
  if cache is not None:
    raise ValueError("segment_ids (packed rows) are for training; decoding with a cache "
                     "reads unpacked rows")
  problem = packing_problem(sites)
  if problem:
    raise ValueError(f"packed rows (segment_ids) are not supported with this method: {problem}")


#: unroll the layer loop of one-token decoding steps (see :func:`scanned`)
DECODE_UNROLL = True


def scanned(block_cls, cfg_remat: str, length: int, in_axes, decode_step: bool = False):
  """Wraps a block class with remat and ``nn.scan`` over layers (one compile for all layers).

  The scanned block has signature ``(carry, *xs) -> (carry, ys)``; its
  parameters gain a leading ``layers`` axis. ``decode_step``: a one-token decoding step,
  whose loop over layers is unrolled (:data:`DECODE_UNROLL`): a rolled loop slices each
  layer's weights out of the stacked arrays at a traced index, copying them at every
  token, where the unrolled one reads them at static offsets.
  """
  policy = REMAT_POLICIES.get(cfg_remat, "bad")
  if policy == "bad":
    raise ValueError(f"unknown remat policy {cfg_remat!r}; expected one of {sorted(REMAT_POLICIES)}")
  cls = block_cls
  if cfg_remat != "none":
    cls = nn.remat(cls, policy=policy, prevent_cse=False)
  return nn.scan(cls, variable_axes={"params": 0, "intermediates": 0},
                  split_rngs={"params": True, "dropout": True}, in_axes=in_axes, length=length,
                  unroll=length if decode_step and DECODE_UNROLL else 1,
                  metadata_params={nn.PARTITION_NAME: "layers"})
