"""Autoregressive generation for the T5 and LLaMA models, compiled end to end.

One entry point, :func:`generate`, runs greedy decoding, sampling (temperature,
top-k, top-p) or beam search with a key/value cache. The whole loop is one
``jax.jit`` program: the cache has a static size (T5: ``max_new_tokens`` decoder
slots; LLaMA: ``prompt_len + max_new_tokens`` slots) and a ``lax.while_loop``
stops as soon as every row is finished. Compiled programs are cached by jit
(model, shapes and static settings), so repeated calls do not recompile;
``temperature``, ``top_p``, ``length_penalty`` and the EOS/pad ids are traced
values and can change freely.

Semantics follow ``transformers``' ``generate``:

* T5: the decoder starts from ``cfg.decoder_start_token_id``; the encoder reads
  ``input_ids`` under ``attention_mask`` as given (usually right-padded).
* LLaMA: prompts may be padded on either side; they are moved to the right end
  (left padding) internally, and RoPE positions are ``cumsum(mask) - 1``.
* A row stops after emitting EOS; later positions hold the pad id.
* Beam search reproduces transformers' vectorised beam search with its default
  ``early_stopping=False``: ``2 * num_beams`` candidates per step, a hypothesis
  is finished when it emits EOS or reaches ``max_new_tokens`` and is scored
  ``sum_logprob / generated_len ** length_penalty``; a row stops once its best
  running beam (divided by the current length) cannot beat its worst finished one.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models.family import family_of, is_stacked

_NEG = -1.0e9   # "impossible" score, as in transformers' beam search


def generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int,
             num_beams: int = 1, length_penalty: float = 1.0, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, rng=None,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None):
  """Generates ``max_new_tokens`` tokens per prompt; returns only the new tokens.

  Args:
    model: a ``T5`` or ``Llama`` module (``peft_jax.models.build_model``), possibly
      with PEFT sites; ``params`` is the matching plain parameter tree.
    input_ids: ``[B, P]`` int prompts (T5: encoder inputs).
    attention_mask: ``[B, P]`` 1 = token, 0 = padding; None = no padding.
    max_new_tokens: number of decoding steps (static).
    num_beams: > 1 runs beam search (``do_sample`` must be False); the best beam is returned.
    length_penalty: beam search only; exponent of the length normaliser.
    do_sample: sample from ``softmax(logits / temperature)`` restricted to the
      ``top_k`` most likely tokens (0 = all) and to the smallest set whose mass
      reaches ``top_p``; needs ``rng`` (a ``jax.random`` key).
    eos_token_id, pad_token_id: override the config's ids (LLaMA pads with EOS when
      the config has no pad id, as transformers does).

  Returns:
    ``[B, max_new_tokens]`` int32: generated tokens, with ``pad_token_id`` after a
    row's EOS (and after the point where all rows finished).
  """
  cfg = model.cfg
  family_of(cfg)        # a TypeError for a model config of no known family
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if num_beams < 1 or (num_beams > 1 and do_sample):
    raise ValueError("num_beams must be >= 1, and beam search does not sample (do_sample=False)")
  if do_sample and rng is None:
    raise ValueError("do_sample=True needs a PRNG key: rng=jax.random.PRNGKey(...)")
  if do_sample and not float(temperature) > 0:
    raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, bool)
  eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
  eos = -1 if eos is None else eos            # -1: never stop early
  if pad_token_id is None:
    pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else max(eos, 0)
  if rng is None:
    rng = jax.random.PRNGKey(0)                # unused by greedy and beam search
  return _generate_jit(model, params, input_ids, jnp.asarray(attention_mask, bool), rng,
                       jnp.float32(temperature), jnp.float32(top_p), jnp.float32(length_penalty),
                       jnp.int32(eos), jnp.int32(pad_token_id),
                       max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
                       do_sample=bool(do_sample), top_k=int(top_k),
                       split_layers=max_new_tokens > 1 and _split_fits(params))


#: read per-layer copies of the stacked weights in the decoding loop
#: (:func:`peft_jax.models.family.split_layers_of`): "auto" when the copies take at most
#: :data:`SPLIT_MEMORY_FRACTION` of the memory free on the parameters' device; True / False
SPLIT_LAYERS = "auto"
SPLIT_MEMORY_FRACTION = 0.25


def _split_fits(params) -> bool:
  if SPLIT_LAYERS != "auto":
    return bool(SPLIT_LAYERS)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  stacked = [x for p, x in flat if is_stacked(p)]
  if not stacked or any(isinstance(x, jax.core.Tracer) for x in stacked):
    return False                      # traced by an outer jit: sizes per device unknown
  per_device = sum(x.addressable_shards[0].data.nbytes if isinstance(x, jax.Array)
                   else np.asarray(x).nbytes for x in stacked)
  return per_device <= SPLIT_MEMORY_FRACTION * _free_bytes(stacked[0])


def _free_bytes(x) -> float:
  """Free memory of the device holding ``x``: the allocator's limit minus its use on an
  accelerator, the host's available memory on CPU."""
  dev = next(iter(x.devices())) if isinstance(x, jax.Array) else jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      info = dict(line.split(":", 1) for line in f)
    return float(info["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# ----------------------------------------------------------------------------- token choice

def sample_logits(logits, rng, temperature, top_p, top_k: int = 0):
  """Draws one token per row of ``logits`` ``[B, V]`` after temperature, top-k, top-p."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  # top-p: keep a token while the mass of the strictly more likely tokens is < top_p,
  # so the most likely token always survives.
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_before < top_p) | (top_p >= 1.0)
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- search loops

def _greedy_or_sample(first_logits, cache, step, n, eos, pad, choose):
  """Greedy decoding or sampling; ``choose(logits, t) -> tokens``."""
  b = first_logits.shape[0]

  def emit(state, logits):
    t, out, done, cache = state
    tok = jnp.where(done, pad, choose(logits, t))
    return t + 1, out.at[:, t].set(tok), done | (tok == eos), cache

  def cond(state):
    t, _, done, _ = state
    return (t < n) & ~jnp.all(done)

  def body(state):
    t, out, done, cache = state
    logits, cache = step(cache, out[:, t - 1], t - 1)
    return emit((t, out, done, cache), logits)

  state = (jnp.int32(0), jnp.full((b, n), pad, jnp.int32), jnp.zeros((b,), bool), cache)
  state = emit(state, first_logits)
  return jax.lax.while_loop(cond, body, state)[1]


def _beam_search(first_logits, cache, step, n, eos, pad, k, length_penalty):
  """transformers-style beam search (``early_stopping=False``) over ``k`` beams."""
  b, vocab = first_logits.shape
  c = 2 * k                                   # candidates kept per step
  rep = lambda x: jnp.repeat(x, k, axis=0)
  logits = rep(first_logits)
  cache = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=1), cache)   # [L, B*k, ...]
  take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)

  def select(s, logits):
    t = s["t"]
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab) + s["run_score"][..., None]
    top, idx = jax.lax.top_k(logp.reshape(b, k * vocab), c)
    src, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    seqs = take(s["run_seq"], src).at[:, :, t].set(tok)              # [b, c, n]
    hits = (tok == eos) | (t + 1 >= n)                               # finished candidates
    gen_len = (t + 1).astype(jnp.float32)
    # the best k unfinished candidates keep running
    run_score, keep = jax.lax.top_k(top + hits * _NEG, k)
    run_seq = take(seqs, keep)
    parent = take(src, keep) + (jnp.arange(b) * k)[:, None]         # rows of the flat cache
    # finished candidates among the top k enter the pool of finished hypotheses
    just = hits & (jnp.arange(c) < k)[None]
    fin = top / gen_len ** length_penalty
    fin = fin + (~s["open"])[:, None] * _NEG + (~just) * _NEG
    pool_score = jnp.concatenate([s["fin_score"], fin], 1)
    fin_score, best = jax.lax.top_k(pool_score, k)
    fin_seq = take(jnp.concatenate([s["fin_seq"], seqs], 1), best)
    fin_flag = take(jnp.concatenate([s["fin_flag"], just], 1), best)
    # a row stays open while its best running beam could still beat its worst finished one
    worst = jnp.where(fin_flag, jnp.min(fin_score, 1, keepdims=True), _NEG)
    hopeful = jnp.any(run_score[:, :1] / gen_len ** length_penalty > worst, axis=1)
    return dict(t=t + 1, run_seq=run_seq, run_score=run_score, fin_seq=fin_seq,
                fin_score=fin_score, fin_flag=fin_flag, open=s["open"] & hopeful,
                parent=parent.reshape(-1), all_hit=jnp.all(hits), cache=s["cache"])

  def cond(s):
    return (s["t"] < n) & jnp.any(s["open"]) & ~s["all_hit"]

  def body(s):
    t = s["t"]
    cache = jax.tree_util.tree_map(lambda x: jnp.take(x, s["parent"], axis=1), s["cache"])
    logits, cache = step(cache, s["run_seq"][:, :, t - 1].reshape(-1), t - 1)
    return select(dict(s, cache=cache), logits)

  s = dict(t=jnp.int32(0), run_seq=jnp.full((b, k, n), pad, jnp.int32),
           run_score=jnp.tile(jnp.array([0.0] + [_NEG] * (k - 1), jnp.float32), (b, 1)),
           fin_seq=jnp.full((b, k, n), pad, jnp.int32), fin_score=jnp.full((b, k), _NEG),
           fin_flag=jnp.zeros((b, k), bool), open=jnp.ones((b,), bool),
           parent=jnp.arange(b * k), all_hit=jnp.bool_(False), cache=cache)
  s = select(s, logits)
  s = jax.lax.while_loop(cond, body, s)
  return s["fin_seq"][:, 0]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "num_beams",
                                             "do_sample", "top_k", "split_layers"))
def _generate_jit(model, params, ids, mask, rng, temperature, top_p, length_penalty, eos, pad,
                  *, max_new_tokens, num_beams, do_sample, top_k, split_layers):
  first_logits, cache, step = family_of(model.cfg).prefill(model, params, ids, mask,
                                                           max_new_tokens, num_beams,
                                                           split_layers=split_layers)
  if num_beams > 1:
    return _beam_search(first_logits, cache, step, max_new_tokens, eos, pad, num_beams,
                        length_penalty)
  if do_sample:
    choose = lambda logits, t: sample_logits(logits, jax.random.fold_in(rng, t), temperature,
                                             top_p, top_k)
  else:
    choose = lambda logits, t: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return _greedy_or_sample(first_logits, cache, step, max_new_tokens, eos, pad, choose)


def pad_prompts(prompts, pad_id: int = 0, side: str = "left"):
  """Lists of token ids -> (``[B, P]`` int32 ids, ``[B, P]`` bool mask), padded on ``side``."""
  p = max(len(x) for x in prompts)
  ids = np.full((len(prompts), p), pad_id, np.int32)
  mask = np.zeros((len(prompts), p), bool)
  for i, x in enumerate(prompts):
    sl = slice(p - len(x), p) if side == "left" else slice(0, len(x))
    ids[i, sl], mask[i, sl] = x, True
  return ids, mask

