"""Sequence packing of training batches: the same examples per step, in fewer rows.

A training step takes the examples of its batch as without packing (the seeded epoch
order, ``train.batch_size`` examples), so packing changes the speed of a run, not what it
learns: the loss is token-weighted (:func:`peft_jax.step.loss_fn`), and a packed batch has
the same target tokens with the same logits as the unpacked one (up to float rounding).

How a batch is packed (:func:`pack_batch`, from the unpacked batch of
:func:`peft_jax.data.batching.make_batch` or :func:`peft_jax.data.tulu.chat_batch`):

* **Rows.** First-fit decreasing: examples by length, longest first (ties: batch order),
  each into the first row with room, rows as wide as the unpacked batch's bucket (an
  encoder-decoder packs its inputs and its targets in the same row: both must fit). The
  number of rows is then rounded up to one of at most 8 counts (:func:`row_counts`): a
  multiple of the devices the batch is split over, and of the micro-batch once above it,
  so a run compiles a handful of shapes and no step holds more rows or longer rows than
  the unpacked batch would (never more memory).
* **Segments.** ``segment_ids`` (1, 2, ... per row; 0 on padding) and ``positions``
  restarting at 0 in each segment (LLaMA's RoPE; T5's relative position buckets); an
  encoder-decoder also has ``decoder_segment_ids`` and ``decoder_positions``, and each
  segment's decoder inputs start with the decoder start token (copied from the unpacked
  row, where they are the targets shifted right). Targets and loss masks are the unpacked
  row's, cut to the example's length, so the last token of a segment predicts nothing.
* **Attention** (the models, given ``segment_ids``): causal self-attention within a
  segment (LLaMA, T5's decoder), bidirectional within a segment (T5's encoder), and cross
  attention from a decoder segment to its own encoder segment only.

Methods that act on the sequence as a whole cannot be packed: a handler at the ``embed``
site prepends tokens to the row (prompt tuning), one at ``attention_kv`` or ``positions``
adds prefix keys and shifts positions per row (prefix tuning, AdapterHub's prefix tuning,
MAM, UniPELT, whose gates also average over the row). :func:`packing_problem` names them;
``data.pack=true`` with such a method is one configuration error, ``auto`` leaves the run
unpacked. A new handler that pools over the sequence declares ``packable = False``.

``data.pack`` (the trainer): ``false``: never; ``true``: every training batch; ``auto``
(default): on when the method can be packed and packing epoch 0's first (up to) 32
batches leaves at most :data:`AUTO_MAX_FRACTION` of their unpacked tokens (rows x width).
Evaluation and generation are never packed.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

#: ``auto`` packs when the packed batches hold at most this fraction of the unpacked tokens
AUTO_MAX_FRACTION = 0.8
#: ``auto`` measures this many batches of epoch 0
AUTO_BATCHES = 32
#: the sites at which a handler acts on a whole row (see the module docstring)
ROW_SITES = {"embed": "prepends tokens to each row (embed site)",
             "attention_kv": "adds keys and values to each row's attention (attention_kv site)",
             "positions": "shifts each row's positions (positions site)"}


def packing_problem(sites) -> Optional[str]:
  """Why a model with these ``Sites`` cannot train on packed rows, or None."""
  for h in sites.handlers:
    what = [ROW_SITES[k] for k in ROW_SITES if hasattr(h, k)]
    if getattr(h, "packable", True) is False:
      what.append("pools over each row")
    if what:
      return (f"its {type(h).__name__} {' and '.join(what)}, which a packed row would share "
              "among its examples")
  return None


def row_counts(batch_rows: int, micro_rows: int, shards: int) -> List[int]:
  """The row counts a packed batch may have: ``batch_rows * k / 8`` (k = 1..8) rounded up
  to a multiple of ``shards`` (the devices the batch is split over) while at most
  ``micro_rows`` (one pass), else to a multiple of ``micro_rows`` (several passes)."""
  def up(n):
    unit = shards if n <= micro_rows else micro_rows
    return min(batch_rows, -(-n // unit) * unit)
  return sorted({up(-(-batch_rows * k // 8)) for k in range(1, 9)})


def first_fit(lengths: np.ndarray, capacity: Sequence[int]) -> List[List[int]]:
  """First-fit decreasing: ``lengths`` ``[n, k]`` (k sizes per example: 1 for a causal
  row, 2 for an encoder-decoder's input and target), each row holding at most
  ``capacity[j]`` of size j. Returns the examples of each row, in insertion order."""
  lengths = np.asarray(lengths, np.int64).reshape(len(lengths), -1)
  cap = np.asarray(capacity, np.int64)
  if np.any(lengths > cap):
    raise ValueError(f"an example of lengths {lengths.max(0).tolist()} exceeds the row "
                     f"capacity {cap.tolist()}")
  order = sorted(range(len(lengths)), key=lambda i: (-float((lengths[i] / cap).max()), i))
  rows, used = [], []
  for i in order:
    for r, u in enumerate(used):
      if np.all(u + lengths[i] <= cap):
        rows[r].append(i)
        used[r] = u + lengths[i]
        break
    else:
      rows.append([i])
      used.append(lengths[i].copy())
  return rows


def _lengths(batch: Dict[str, np.ndarray]) -> np.ndarray:
  """Per unpacked row: ``[n, 1]`` (causal: its tokens) or ``[n, 2]`` (input, target)."""
  cols = [batch["input_mask"]] + ([batch["target_mask"]] if "decoder_inputs" in batch else [])
  out = []
  for m in cols:
    m = np.asarray(m) != 0
    n = m.sum(1)
    if any(not m[r, :n[r]].all() for r in range(len(m))):
      raise ValueError("pack_batch: a row's mask is not one run of ones from the start")
    out.append(n)
  n = np.stack(out, 1)
  if "decoder_inputs" not in batch:     # causal: no loss may sit past the row's tokens
    tm = np.asarray(batch["target_mask"]) != 0
    if any(tm[r, n[r, 0]:].any() for r in range(len(tm))):
      raise ValueError("pack_batch: a row has loss on positions past its tokens")
  return n


def plan(batch: Dict[str, np.ndarray], micro_rows: int, shards: int):
  """``(rows, row count)``: the examples of each packed row (unpacked row indices) and
  the rows of the packed batch (at least ``len(rows)``, see :func:`row_counts`)."""
  lengths = _lengths(batch)
  keep = np.flatnonzero(lengths.sum(1) > 0)               # padding rows carry nothing
  widths = [batch["inputs"].shape[1]] + (
      [batch["targets"].shape[1]] if "decoder_inputs" in batch else [])
  rows = [[int(keep[i]) for i in r] for r in first_fit(lengths[keep], widths)]
  b = batch["inputs"].shape[0]
  count = next(c for c in row_counts(b, micro_rows, shards) if c >= max(len(rows), 1))
  return rows, count


def _place(src: Dict[str, np.ndarray], keys, rows, count, lengths, seg_key, pos_key):
  """Copies each example's first ``lengths[i]`` entries of ``keys`` into its packed row,
  and writes the segment ids and positions."""
  out = {k: np.zeros((count, src[k].shape[1]), src[k].dtype) for k in keys}
  seg = np.zeros((count, src[keys[0]].shape[1]), np.int32)
  pos = np.zeros_like(seg)
  for r, members in enumerate(rows):
    at = 0
    for s, i in enumerate(members, start=1):
      n = int(lengths[i])
      for k in keys:
        out[k][r, at:at + n] = src[k][i, :n]
      seg[r, at:at + n] = s
      pos[r, at:at + n] = np.arange(n)
      at += n
  out[seg_key], out[pos_key] = seg, pos
  return out


def pack_batch(batch: Dict[str, np.ndarray], micro_rows: int, shards: int, pad_id: int
               ) -> Dict[str, np.ndarray]:
  """The packed form of an unpacked training batch (module docstring): the same keys plus
  ``segment_ids``/``positions`` (and ``decoder_segment_ids``/``decoder_positions``), in
  fewer rows when the examples fit."""
  batch = {k: np.asarray(v) for k, v in batch.items()}
  rows, count = plan(batch, micro_rows, shards)
  lengths = _lengths(batch)
  if "decoder_inputs" in batch:
    out = _place(batch, ["inputs", "input_mask"], rows, count, lengths[:, 0], "segment_ids",
                 "positions")
    out.update(_place(batch, ["decoder_inputs", "targets", "target_mask"], rows, count,
                      lengths[:, 1], "decoder_segment_ids", "decoder_positions"))
    for k in ("inputs", "decoder_inputs", "targets"):
      out[k][out["decoder_segment_ids" if k != "inputs" else "segment_ids"] == 0] = pad_id
    return out
  out = _place(batch, ["inputs", "input_mask", "targets", "target_mask"], rows, count,
               lengths[:, 0], "segment_ids", "positions")
  for k in ("inputs", "targets"):
    out[k][out["segment_ids"] == 0] = pad_id
  return out


def tokens(batch: Dict[str, np.ndarray]) -> int:
  """Token slots a batch computes: rows x (input width + decoder width)."""
  b = batch["inputs"].shape[0]
  return b * (batch["inputs"].shape[1] + (batch["decoder_inputs"].shape[1]
                                          if "decoder_inputs" in batch else 0))
