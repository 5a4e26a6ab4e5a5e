"""Tokenise text-to-text examples and batch them with bucketed static shapes.

Sequence lengths are padded up to the next bucket (powers of two by default),
so a run compiles the training step a handful of times, not once per batch.
Two layouts:

* ``seq2seq`` (T5): ``inputs``/``input_mask``, ``decoder_inputs`` (targets shifted
  right, starting with the decoder start token), ``targets``, ``target_mask``.
* ``causal`` (LLaMA): ``inputs`` = prompt + target + EOS, ``input_mask``,
  ``targets`` = inputs shifted left, ``target_mask`` = 1 on target tokens only, and
  when ``max_target_len`` is shorter than the row, ``loss_positions`` ``[B,
  max_target_len]`` (:func:`loss_positions`): the model's head and the loss then run at
  the target tokens alone.

The trainer may then pack a training batch's examples into fewer rows
(:mod:`peft_jax.data.packing`, ``data.pack``).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np


def bucket_length(n: int, max_len: int, min_len: int = 8) -> int:
  b = min_len
  while b < n:
    b *= 2
  return min(b, max_len)


@dataclasses.dataclass
class Encoded:
  source: List[List[int]]
  target: List[List[int]]
  raw: List[dict]
  truncated_sources: int = 0     # rows whose input was cut to max_source_len
  truncated_targets: int = 0     # rows whose target was cut to max_target_len


def encode(tokenizer, rows: Sequence[dict], max_source_len: int, max_target_len: int,
           input_key="input", target_key="target", source_eos: bool = True) -> Encoded:
  """Token ids, truncated; targets end with EOS, sources too when ``source_eos``
  (T5's encoder input; a causal LM's prompt runs straight into its target). Chat rows
  (TULU: every row has ``messages``, causal) are encoded as training encodes them
  (``tulu.encode_eval_rows``: BOS first, the prompt cut from the left)."""
  if rows and not source_eos and all("messages" in r for r in rows):
    from peft_jax.data.tulu import encode_eval_rows
    return encode_eval_rows(tokenizer, rows, max_source_len, max_target_len)
  eos = tokenizer.eos_token_id
  def ids(texts, max_len, add_eos):
    out, cut = [], 0
    room = max_len - 1 if add_eos else max_len
    for t in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
      cut += len(t) > room
      out.append(list(t[:room]) + [eos] if add_eos else list(t[:room]))
    return out, cut
  src, cut_src = ids([r[input_key] for r in rows], max_source_len, source_eos)
  tgt, cut_tgt = ids([r[target_key] for r in rows], max_target_len, True)
  return Encoded(src, tgt, list(rows), cut_src, cut_tgt)


def _pad(seqs, length, pad):
  out = np.full((len(seqs), length), pad, np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s[:length]
  return out


def loss_positions(target_mask, k: int) -> np.ndarray:
  """``[B, k]`` int32: each row's loss positions (``target_mask`` != 0) in order, then -1.
  With it the model computes its head and the loss at these ``k`` positions alone (a
  causal row's target is the short end of a long sequence). A ``ValueError`` if a row has
  more than ``k``."""
  m = np.asarray(target_mask) != 0
  out = np.full((m.shape[0], k), -1, np.int32)
  for r in range(m.shape[0]):
    pos = np.flatnonzero(m[r])
    if len(pos) > k:
      raise ValueError(f"loss_positions: row {r} has {len(pos)} loss tokens, more than {k}")
    out[r, :len(pos)] = pos
  return out


def make_batch(enc: Encoded, idx: Sequence[int], layout: str, pad_id: int, start_id: int,
               max_source_len: int, max_target_len: int, batch_size: Optional[int] = None,
               lengths_from: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
  """A padded batch; rows beyond ``len(idx)`` (to reach ``batch_size``) have zero masks.

  ``lengths_from``: the examples whose lengths choose the buckets (default ``idx``); a
  host that builds only its rows of a global batch passes the whole batch here, so
  every host pads to the same shape."""
  idx = list(idx)
  ref = list(idx if lengths_from is None else lengths_from) or [None]
  src_len = max((len(enc.source[i]) if i is not None else 1) for i in ref)
  tgt_len = max((len(enc.target[i]) if i is not None else 1) for i in ref)
  full_len = max((len(enc.source[i]) + len(enc.target[i]) if i is not None else 2)
                 for i in ref)
  bs = batch_size or len(idx)
  src = [enc.source[i] for i in idx] + [[pad_id]] * (bs - len(idx))
  tgt = [enc.target[i] for i in idx] + [[pad_id]] * (bs - len(idx))
  valid = np.array([1] * len(idx) + [0] * (bs - len(idx)), np.int32)
  if layout == "seq2seq":
    s_len = bucket_length(src_len, max_source_len)
    t_len = bucket_length(tgt_len, max_target_len)
    inputs = _pad(src, s_len, pad_id)
    input_mask = (_pad([[1] * len(s) for s in src], s_len, 0) * valid[:, None]).astype(np.int32)
    targets = _pad(tgt, t_len, pad_id)
    target_mask = _pad([[1] * len(t) for t in tgt], t_len, 0) * valid[:, None]
    dec = np.concatenate([np.full((bs, 1), start_id, np.int32), targets[:, :-1]], axis=1)
    return {"inputs": inputs, "input_mask": input_mask, "decoder_inputs": dec,
            "targets": targets, "target_mask": target_mask.astype(np.int32)}
  if layout == "causal":
    full = [s + t for s, t in zip(src, tgt)]
    n = bucket_length(full_len + 1, max_source_len + max_target_len)
    inputs = _pad(full, n, pad_id)
    input_mask = _pad([[1] * len(f) for f in full], n, 0) * valid[:, None]
    tmask = _pad([[0] * (len(s) - 1) + [1] * len(t) for s, t in zip(src, tgt)], n, 0) * valid[:, None]
    targets = np.concatenate([inputs[:, 1:], np.full((bs, 1), pad_id, np.int32)], axis=1)
    out = {"inputs": inputs, "input_mask": input_mask.astype(np.int32), "targets": targets,
           "target_mask": tmask.astype(np.int32)}
    if max_target_len < n:     # a row's targets are at most max_target_len tokens
      out["loss_positions"] = loss_positions(tmask, max_target_len)
    return out
  raise ValueError(f"unknown layout {layout!r}; expected 'seq2seq' or 'causal'")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """Deterministic permutation for (seed, epoch)."""
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng([seed, epoch]).permutation(n)
