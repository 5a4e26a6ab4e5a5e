"""The model side of the benchmarks: batched generation with stop strings, next-token choices.

:class:`Engine` answers :class:`~peft_jax.evals.benchmarks.Request` objects with a model, its
parameters (base plus adapter, prepared) and a tokenizer.

- **Prompts** are tokenised with the tokenizer's special tokens, and a causal model's prompt
  starts with BOS even when the tokenizer directory does not ask for it (a bare
  ``tokenizer.model``), as open-instruct's LLaMA prompts do. A prompt longer than the model's positions allow (after room for the
  new tokens) is cut from the left, keeping BOS, and counted in :attr:`Engine.truncated`.
- **Batches.** Rows are sorted by prompt length (longest first, so the largest program is
  compiled and any memory failure comes first) and cut into batches of ``batch_size`` rows.
  Prompt lengths are rounded up to buckets with at most 25% padding and the row count is
  fixed (filler rows), so a task compiles a handful of programs, each once.
- **Generation** decodes on the device with the key/value cache (``Family.start`` /
  ``Family.advance``), in chunks: one ``jax.jit`` call runs a ``lax.while_loop`` of up to
  ``chunk`` steps for the whole batch (it ends early once every row has emitted EOS). Then the
  host decodes the text of the unfinished rows and marks those containing a stop string as
  finished. The host sees the batch once per chunk (16, 32, 64, then 128 tokens), never per
  token. Stop strings are matched on the decoded text, as vLLM does, and the output is cut
  before the first one; the cache buffers are donated from chunk to chunk.
- **Text** of a generated row is decoded after the last few prompt tokens and the prompt's
  text is removed, so a leading space or indentation survives (SentencePiece drops the
  leading space of a sequence decoded on its own; HumanEval completions start with one).
- **Sampling** (``temperature > 0``): every sample has its own PRNG key from ``seed``, the
  request id and the sample index, so a sample does not depend on which rows share its
  batch: a resumed run draws the same samples, and a missing sample can be drawn alone.
- **Choices** (MMLU): one forward pass over right-padded prompts; the softmax over the whole
  vocabulary at each prompt's last position, read at the last token of
  ``tokenizer.encode(choice)`` for each candidate (``" A"`` ... ``" D"``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.evals.benchmarks import Request
from peft_jax.models.family import family_of

CHUNKS = (16, 32, 64, 128)     # tokens decoded between two host checks, growing
_CONTEXT = 8                   # prompt tokens decoded before a generation (leading spaces)


def bucket(n: int, cap: int) -> int:
  """``n`` rounded up so that padding is at most 25% (4 buckets per power of two, >= 16)."""
  if n <= 16:
    return min(16, cap) if cap >= n else n
  step = 1 << max(0, n.bit_length() - 3)
  return max(n, min(-(-n // step) * step, cap))


def row_key(seed: int, rid: str, sample: int) -> np.ndarray:
  """The PRNG key (raw uint32[2]) of sample ``sample`` of request ``rid``."""
  h = hashlib.sha256(f"{seed}\0{rid}\0{sample}".encode()).digest()
  return np.frombuffer(h[:8], np.uint32).copy()


def cut_at_stop(text: str, stop: Sequence[str]) -> Tuple[str, bool]:
  """``text`` before the first occurrence of any stop string, and whether one occurred."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
  return (text, False) if cut < 0 else (text[:cut], True)


# ----------------------------------------------------------------------------- device programs

def _choose(logits, keys, t, temperature, top_p, do_sample: bool):
  if not do_sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  from peft_jax.decoding import sample_logits
  one = lambda lg, k: sample_logits(lg[None], jax.random.fold_in(k, t), temperature, top_p)[0]
  return jax.vmap(one)(logits, keys)


@functools.partial(jax.jit, static_argnames=("model", "max_new", "do_sample"))
def _start(model, params, ids, mask, keys, temperature, top_p, eos, pad, *, max_new, do_sample):
  first, cache, aux = family_of(model.cfg).start(model, params, ids, mask, max_new)
  tok = _choose(first, keys, 0, temperature, top_p, do_sample)
  out = jnp.full((ids.shape[0], max_new), pad, jnp.int32).at[:, 0].set(tok)
  return {"t": jnp.int32(1), "out": out, "done": tok == eos, "cache": cache, "aux": aux}


@functools.partial(jax.jit, static_argnames=("model", "do_sample"), donate_argnames=("state",))
def _advance(model, params, state, stopped, until, keys, temperature, top_p, eos, pad, *,
             do_sample):
  fam = family_of(model.cfg)
  n = state["out"].shape[1]

  def cond(s):
    return (s["t"] < jnp.minimum(until, n)) & ~jnp.all(s["done"])

  def body(s):
    t = s["t"]
    prev = jax.lax.dynamic_index_in_dim(s["out"], t - 1, axis=1, keepdims=False)
    logits, cache = fam.advance(model, params, s["aux"], s["cache"], prev, t - 1)
    tok = jnp.where(s["done"], pad, _choose(logits, keys, t, temperature, top_p, do_sample))
    out = jax.lax.dynamic_update_index_in_dim(s["out"], tok, t, axis=1)
    return dict(s, t=t + 1, out=out, done=s["done"] | (tok == eos), cache=cache)

  return jax.lax.while_loop(cond, body, dict(state, done=state["done"] | stopped))


@functools.partial(jax.jit, static_argnames=("model",))
def _choice_probs(model, params, ids, mask, last, candidates):
  """The softmax over the vocabulary at position ``last`` of each row, read at that row's
  ``candidates`` ``[B, W]``."""
  fam = family_of(model.cfg)
  v = {"params": params}
  if fam.layout == "seq2seq":
    start = jnp.full((ids.shape[0], 1), model.cfg.decoder_start_token_id, jnp.int32)
    logits = model.apply(v, ids, mask, start, None, True)[:, 0]
  else:
    out = model.apply(v, ids, mask, None, True)
    n_pre = out.shape[1] - ids.shape[1]          # tokens a method prepends (prompt tuning)
    logits = jnp.take_along_axis(out, (last + n_pre)[:, None, None], 1)[:, 0]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(probs, candidates, 1)


# ----------------------------------------------------------------------------- the engine

@dataclasses.dataclass
class Engine:
  """Answers requests with ``model`` / ``params`` (see the module docstring).

  ``max_positions``: the longest sequence the model takes (prompt plus new tokens); None
  reads it from the model family. ``progress(n)`` is called with the number of rows done."""
  model: object
  params: object
  tokenizer: object
  batch_size: int = 8
  seed: int = 0
  max_positions: Optional[int] = None
  truncated: int = 0

  def __post_init__(self):
    fam = family_of(self.model.cfg)
    if self.max_positions is None:
      self.max_positions = fam.max_input_length(self.model.cfg)[0]
    self.seq2seq = fam.layout == "seq2seq"
    tok = self.tokenizer
    self.eos = tok.eos_token_id if tok.eos_token_id is not None else -1
    self.pad = tok.pad_token_id if tok.pad_token_id is not None else max(self.eos, 0)

  # ------------------------------------------------------------------ prompts
  def encode(self, prompt: str, room: int) -> List[int]:
    """Token ids of ``prompt`` (special tokens included), cut from the left to leave ``room``
    positions (BOS kept)."""
    ids = list(self.tokenizer(prompt)["input_ids"])
    bos = self.tokenizer.bos_token_id
    if bos is not None and not self.seq2seq and ids[:1] != [bos]:
      ids = [bos] + ids       # a tokenizer directory without add_bos_token (LLaMA adds it)
    limit = max(2, self.max_positions - room)
    if len(ids) > limit:
      self.truncated += 1
      head = [bos] if bos is not None and ids[:1] == [bos] else []
      ids = head + ids[len(ids) - (limit - len(head)):]
    return ids

  def _batch(self, prompts: List[List[int]]):
    n = bucket(max(len(p) for p in prompts), max(max(len(p) for p in prompts), 16))
    ids = np.full((self.batch_size, n), self.pad, np.int32)
    mask = np.zeros((self.batch_size, n), bool)
    for i in range(self.batch_size):
      p = prompts[i] if i < len(prompts) else prompts[0]     # filler rows repeat row 0
      ids[i, :len(p)], mask[i, :len(p)] = p, True
    return ids, mask

  # ------------------------------------------------------------------ choices
  def choose(self, requests: Sequence[Request], on_result: Optional[Callable] = None,
             progress: Optional[Callable[[int], None]] = None) -> Dict[str, dict]:
    """Next-token choices: ``{id: {"output": best choice stripped, "probs": [p per choice]}}``."""
    results: Dict[str, dict] = {}
    enc = [(r, self.encode(r.prompt, 1)) for r in requests]
    enc.sort(key=lambda x: -len(x[1]))
    for i in range(0, len(enc), self.batch_size):
      chunk = enc[i:i + self.batch_size]
      cands = [self._candidates(r.choices) for r, _ in chunk]
      width = max(len(c) for c in cands)
      cand = np.zeros((self.batch_size, width), np.int32)
      for j, c in enumerate(cands):
        cand[j, :len(c)] = c
      ids, mask = self._batch([p for _, p in chunk])
      last = np.array([len(p) - 1 for _, p in chunk] + [0] * (self.batch_size - len(chunk)),
                      np.int32)
      probs = np.asarray(_choice_probs(self.model, self.params, ids, mask, last, cand))
      for j, (r, _) in enumerate(chunk):
        p = [float(x) for x in probs[j, :len(r.choices)]]
        res = {"output": r.choices[int(np.argmax(p))].strip(), "probs": p}
        results[r.id] = res
        if on_result is not None:
          on_result(r, 0, res)
      if progress is not None:
        progress(len(chunk))
    return results

  def _candidates(self, choices: Sequence[str]) -> List[int]:
    return [self.tokenizer.encode(c)[-1] for c in choices]

  # ------------------------------------------------------------------ generation
  def generate(self, requests: Sequence[Request], samples: Optional[Dict[str, List[int]]] = None,
               on_result: Optional[Callable] = None,
               progress: Optional[Callable[[int], None]] = None) -> Dict[str, List[str]]:
    """``{id: [text per sample]}``; ``samples[id]`` limits a request to those sample indices
    (the others are missing from its list: the caller has them)."""
    results: Dict[str, Dict[int, str]] = {}
    groups: Dict[tuple, list] = {}
    for r in requests:
      if r.choices:
        raise ValueError(f"request {r.id} is a choice; use Engine.choose")
      key = (r.max_new_tokens, tuple(r.stop), float(r.temperature), float(r.top_p))
      for s in (samples or {}).get(r.id, range(r.n)):
        groups.setdefault(key, []).append((r, s))
    for (max_new, stop, temperature, top_p), rows in groups.items():
      enc = [(r, s, self.encode(r.prompt, max_new)) for r, s in rows]
      enc.sort(key=lambda x: -len(x[2]))
      for i in range(0, len(enc), self.batch_size):
        chunk = enc[i:i + self.batch_size]
        texts = self._generate_batch([p for _, _, p in chunk], [(r.id, s) for r, s, _ in chunk],
                                     max_new, stop, temperature, top_p)
        for (r, s, _), text in zip(chunk, texts):
          results.setdefault(r.id, {})[s] = text
          if on_result is not None:
            on_result(r, s, text)
        if progress is not None:
          progress(len(chunk))
    return {k: [v[s] for s in sorted(v)] for k, v in results.items()}

  def _text(self, prompt: List[int], gen: np.ndarray) -> str:
    gen = [int(x) for x in gen]
    if self.eos in gen:
      gen = gen[:gen.index(self.eos)]
    special = set(self.tokenizer.all_special_ids)
    ctx = [t for t in prompt[-_CONTEXT:] if t not in special]
    dec = lambda x: self.tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    head = dec(ctx)
    full = dec(ctx + gen)
    if not full.startswith(head):        # a context ending inside a character: the whole prompt
      head, full = dec(prompt), dec(list(prompt) + gen)
    return full[len(head):] if full.startswith(head) else dec(gen)

  def _generate_batch(self, prompts, ids_samples, max_new, stop, temperature, top_p):
    b, real = self.batch_size, len(prompts)
    room = min(max_new, max(1, self.max_positions - max(len(p) for p in prompts)))
    ids, mask = self._batch(prompts)
    keys = np.zeros((b, 2), np.uint32)
    for j, (rid, s) in enumerate(ids_samples):
      keys[j] = row_key(self.seed, rid, s)
    do_sample = temperature > 0
    args = (jnp.asarray(keys), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
            jnp.int32(self.eos), jnp.int32(self.pad))
    state = _start(self.model, self.params, ids, mask, *args, max_new=room,
                   do_sample=do_sample)
    stopped = np.zeros(b, bool)
    stopped[real:] = True                # filler rows
    texts = [""] * real
    k = 0
    while True:
      out, done, t = np.asarray(state["out"]), np.asarray(state["done"]), int(state["t"])
      for j in range(real):
        if not stopped[j]:
          texts[j], hit = cut_at_stop(self._text(prompts[j], out[j, :t]), stop)
          stopped[j] = hit or bool(done[j])
      if stopped.all() or t >= room:
        return texts
      until = t + CHUNKS[min(k, len(CHUNKS) - 1)]
      k += 1
      state = _advance(self.model, self.params, state, jnp.asarray(stopped), jnp.int32(until),
                       *args, do_sample=do_sample)

