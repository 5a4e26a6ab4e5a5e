"""TÜLU instruction mixtures (JSONL of ``{"dataset", "id", "messages": [{role, content}]}``)
in open-instruct's chat format, and their tokenisation with an assistant-only loss mask.

Chat format (open-instruct ``finetune.py``, ``encode_with_messages_format`` /
``_concat_messages``, used for TÜLU 1 and 2)::

    system:    "<|system|>\\n"    + content.strip() + "\\n"
    user:      "<|user|>\\n"      + content.strip() + "\\n"
    assistant: "<|assistant|>\\n" + content.strip() + eos_token + "\\n"

concatenated and then ``.strip()``-ed (so the text ends with ``eos_token``, ``</s>``
for LLaMA). open-instruct tokenises that text with the tokenizer's special tokens (a
BOS first for LLaMA); we tokenise it without them and put ``bos_token_id`` first
(``add_bos``), which is the same sequence for LLaMA. Truncation keeps the first
``max_length`` tokens (open-instruct: ``truncation=True``; TÜLU used 2048, seed 000
4096).

Loss mask: 1 exactly on the tokens of each assistant turn's content and its EOS; 0 on
BOS, role tags, system/user turns and the newline after each EOS. (open-instruct's
own labels differ in one token: they also train on the ``"\\n"`` that follows an
assistant's EOS when another turn follows; we leave it out since generation stops at
EOS.)

Generation prompt (open-instruct ``create_prompt_with_tulu_chat_format`` with content
stripped as in training): the rendered turns followed by ``"<|assistant|>\\n"``.

Evaluation encoding (:func:`eval_encoding`, used by generation and the evaluation loss
for rows that carry ``messages``): the conversation up to its last assistant turn is
tokenised exactly as for training (:func:`tokenize_conversation`, BOS first) and split
where that turn's loss mask starts: the prompt is the token ids training puts before the
answer, the target the ids it trains on (content + EOS). Encoding the prompt text alone
would differ twice: no BOS (``encode`` adds none for a causal LM), and a standalone answer
gains sentencepiece's leading "▁". A prompt longer than its budget (``max_source_len``)
keeps BOS and its *last* tokens (cut from the left, after BOS), so the ``<|assistant|>``
cue that the answer must follow survives; training instead keeps the first tokens, like
open-instruct.

Validation: the mixtures have one split; ``validation_size`` conversations are held out by
``split_seed`` (configs/tulu.py sets it), removed from ``train``.
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from peft_jax.fields import Field
from peft_jax.data.common import (COMMON_KNOBS, DataError, Rows, carve, check_split, hf_examples, is_hf_source,
                                  make_row, read_jsonl, require_file, resolve_root, subsample)

DATASET = "tulu"
ROLE_TAGS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
ASSISTANT_TAG = ROLE_TAGS["assistant"]

#: the options of :func:`load_tulu` (``--config.data.<knob>``)
KNOBS = {
    **COMMON_KNOBS,
    "validation_size": Field(0, "conversations held out (by split_seed) as the validation "
                             "split, removed from train; the mixtures have none (0: no "
                             "validation split)", ge=0),
    "eos": Field("</s>", "the end-of-turn text after each assistant turn"),
}


def check_messages(messages, where: str = "conversation") -> List[dict]:
  expected = ("a non-empty list of {'role': 'system'|'user'|'assistant', 'content': str}")
  if not isinstance(messages, (list, tuple)) or not messages:
    raise DataError(f"{DATASET}: {where} has messages={messages!r:.80}; expected {expected}")
  for j, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise DataError(f"{DATASET}: {where} message {j} is {m!r:.80}; expected {expected}")
    if m["role"] not in ROLE_TAGS:
      raise DataError(f"{DATASET}: {where} message {j} has role {m['role']!r}; expected one of "
                      f"{list(ROLE_TAGS)}")
    if not isinstance(m["content"], str):
      raise DataError(f"{DATASET}: {where} message {j} content is a "
                      f"{type(m['content']).__name__}; expected a string")
  return list(messages)


def _render(messages: Sequence[dict], eos: str):
  """(text before the final strip, [(start, end) char spans of assistant content+EOS])."""
  text, spans = "", []
  for m in messages:
    tag, content = ROLE_TAGS[m["role"]], m["content"].strip()
    if m["role"] == "assistant":
      start = len(text) + len(tag)
      text += tag + content + eos
      spans.append((start, len(text)))
      text += "\n"
    else:
      text += tag + content + "\n"
  return text, spans


def render_conversation(messages: Sequence[dict], eos: str = "</s>") -> str:
  """The training text of a conversation (open-instruct format, see module docstring)."""
  return _render(check_messages(messages), eos)[0].strip()


def render_prompt(messages: Sequence[dict], eos: str = "</s>") -> str:
  """The generation prompt: the turns so far, then ``"<|assistant|>\\n"``."""
  return _render(check_messages(messages), eos)[0] + ASSISTANT_TAG


def _ids(tokenizer, text: str, **kw):
  return tokenizer(text, add_special_tokens=False, **kw)


def tokenize_conversation(tokenizer, messages: Sequence[dict], *, max_length: int = 2048,
                          add_bos: bool = True, method: str = "auto") -> Dict[str, object]:
  """``{"input_ids": [int], "loss_mask": [0/1], "n_loss_tokens": int, "truncated": bool}``.

  ``method``: ``"offsets"`` finds assistant tokens by their character offsets in one
  tokenisation of the whole text (fast tokenizers); ``"prefix"`` by token counts of
  tokenised prefixes, like open-instruct (any tokenizer); ``"auto"`` picks offsets
  when the tokenizer is fast. Both give the same mask when tokenisation is consistent
  across the prefix boundaries (the tests check this for the LLaMA tokenizer)."""
  messages = check_messages(messages)
  eos = tokenizer.eos_token
  if eos is None:
    raise DataError(f"{DATASET}: the tokenizer has no eos_token; expected one (e.g. '</s>')")
  if max_length < 1:
    raise DataError(f"{DATASET}: max_length={max_length}; expected >= 1")
  raw, spans = _render(messages, eos)
  text = raw.strip()
  if method == "auto":
    method = "offsets" if getattr(tokenizer, "is_fast", False) else "prefix"
  if method == "offsets":
    enc = _ids(tokenizer, text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [int(any(s <= o[0] < e for s, e in spans)) for o in enc["offset_mapping"]]
  elif method == "prefix":
    ids = list(_ids(tokenizer, text)["input_ids"])
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      head = _render(messages[:i], eos)[0] + ASSISTANT_TAG
      a = len(_ids(tokenizer, head)["input_ids"])
      b = len(_ids(tokenizer, head + m["content"].strip() + eos)["input_ids"])
      for t in range(a, min(b, len(ids))):
        mask[t] = 1
  else:
    raise DataError(f"{DATASET}: method={method!r}; expected 'auto', 'offsets' or 'prefix'")
  if add_bos and tokenizer.bos_token_id is not None:
    ids, mask = [tokenizer.bos_token_id] + ids, [0] + mask
  truncated = len(ids) > max_length
  ids, mask = ids[:max_length], mask[:max_length]
  return {"input_ids": ids, "loss_mask": mask, "n_loss_tokens": int(sum(mask)),
          "truncated": truncated}


def eval_encoding(tokenizer, messages: Sequence[dict], max_prompt_len: int,
                  max_target_len: Optional[int] = None) -> Dict[str, object]:
  """``{"prompt": [int], "target": [int], "prompt_truncated": bool}`` for a conversation
  whose last turn is the assistant's answer (a loaded row's ``messages``): the training
  ids split at the start of that answer (module docstring), the prompt cut from the left
  to ``max_prompt_len`` (BOS kept), the target to ``max_target_len``."""
  messages = check_messages(messages)
  if messages[-1]["role"] != "assistant":
    raise DataError(f"{DATASET}: an evaluation conversation must end with an assistant turn "
                    f"(its reference answer); it ends with a {messages[-1]['role']!r} turn")
  if max_prompt_len < 2:
    raise DataError(f"{DATASET}: max_prompt_len={max_prompt_len}; expected >= 2 (BOS and the "
                    f"end of the prompt)")
  enc = tokenize_conversation(tokenizer, messages, max_length=1 << 62)
  ids, mask = enc["input_ids"], enc["loss_mask"]
  k = len(mask)
  while k > 0 and mask[k - 1]:       # the last run of loss tokens: the final answer
    k -= 1
  prompt, target = ids[:k], ids[k:]
  bos = tokenizer.bos_token_id
  cut = len(prompt) > max_prompt_len
  if cut:
    head = [bos] if bos is not None and prompt[:1] == [bos] else []
    prompt = head + prompt[len(prompt) - (max_prompt_len - len(head)):]
  if max_target_len is not None:
    target = target[:max_target_len]
  return {"prompt": prompt, "target": target, "prompt_truncated": cut}


def encode_eval_rows(tokenizer, rows: Sequence[dict], max_source_len: int, max_target_len: int):
  """:class:`~peft_jax.data.batching.Encoded` of chat rows (``messages``) for the
  evaluation loss and generation: :func:`eval_encoding` of each."""
  from peft_jax.data.batching import Encoded
  src, tgt, cut_src, cut_tgt = [], [], 0, 0
  for r in rows:
    e = eval_encoding(tokenizer, r["messages"], max_source_len)
    cut_src += e["prompt_truncated"]
    t = e["target"]
    if len(t) > max_target_len:       # as batching.encode: the cut target still ends with EOS
      cut_tgt += 1
      t = t[:max_target_len - 1] + [tokenizer.eos_token_id]
    src.append(e["prompt"])
    tgt.append(t)
  return Encoded(src, tgt, list(rows), cut_src, cut_tgt)


def tokenize_rows(tokenizer, rows: Sequence[dict], *, max_length: int = 2048, add_bos: bool = True,
                  drop_empty: bool = True, method: str = "auto") -> Rows:
  """Tokenise the ``messages`` of each row; rows whose loss mask is empty after
  truncation are dropped when ``drop_empty`` (counted in ``info['n_dropped_empty']``)."""
  out, dropped, truncated = [], 0, 0
  for r in rows:
    enc = tokenize_conversation(tokenizer, r["messages"], max_length=max_length,
                                add_bos=add_bos, method=method)
    truncated += enc["truncated"]
    if drop_empty and not enc["n_loss_tokens"]:
      dropped += 1
      continue
    out.append(enc)
  return Rows(out, {"n_dropped_empty": dropped, "n_truncated": truncated,
                    "max_length": max_length})


def chat_batch(encoded: Sequence[dict], idx: Sequence[int], pad_id: int, max_len: int,
               batch_size: Optional[int] = None, min_len: int = 8,
               lengths_from: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
  """A causal-LM batch in the layout of ``batching.make_batch(..., 'causal')``:
  ``inputs``/``input_mask``, ``targets`` = inputs shifted left, ``target_mask`` = the
  loss mask of the predicted token (so 1 only where an assistant token is predicted).
  Lengths are padded up to a power-of-two bucket (capped at ``max_len``); rows
  beyond ``len(idx)`` (to reach ``batch_size``) are all-zero masks. ``lengths_from``: the
  examples whose lengths choose the bucket (a host building its rows of a global batch)."""
  from peft_jax.data.batching import bucket_length
  idx = list(idx)
  bs = batch_size or len(idx)
  seqs = [list(encoded[i]["input_ids"])[:max_len] for i in idx]
  masks = [list(encoded[i]["loss_mask"])[:max_len] for i in idx]
  ref = idx if lengths_from is None else list(lengths_from)
  n = bucket_length(max([min(len(encoded[i]["input_ids"]), max_len) for i in ref] + [1]),
                    max_len, min_len)
  inputs = np.full((bs, n), pad_id, np.int32)
  input_mask = np.zeros((bs, n), np.int32)
  loss = np.zeros((bs, n), np.int32)
  for r, (s, m) in enumerate(zip(seqs, masks)):
    inputs[r, :len(s)] = s
    input_mask[r, :len(s)] = 1
    loss[r, :len(m)] = m
  targets = np.concatenate([inputs[:, 1:], np.full((bs, 1), pad_id, np.int32)], axis=1)
  target_mask = np.concatenate([loss[:, 1:], np.zeros((bs, 1), np.int32)], axis=1)
  return {"inputs": inputs, "input_mask": input_mask, "targets": targets,
          "target_mask": target_mask}


def _files(root: str) -> List[str]:
  if os.path.isfile(root):
    return [root]
  if os.path.isdir(root):
    files = sorted(glob.glob(os.path.join(root, "*.jsonl")))
    if files:
      return files
  raise DataError(f"{DATASET}: no JSONL found at {root}; expected a .jsonl file (e.g. "
                  f"tulu_v2_mix.jsonl) or a folder of them, with a 'messages' field per line")


def _row(ex: dict, where: str, eos: str) -> Optional[dict]:
  msgs = check_messages(ex.get("messages"), where)
  last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
  if last is None:
    return None
  row = make_row(render_prompt(msgs[:last], eos), msgs[last]["content"].strip(),
                 dataset=DATASET, source_dataset=ex.get("dataset"), id=ex.get("id"),
                 n_turns=len(msgs))
  row["messages"] = msgs[:last + 1]
  return row


def load_tulu(split: str = "train", *, path=None, seed: int = 0, size=None,
              validation_size: int = 0, split_seed: int = 0, shuffle: Optional[bool] = None,
              eos: str = "</s>", hf_config: Optional[str] = None,
              hf_split: Optional[str] = None) -> Rows:
  """Rows with ``messages`` (for :func:`tokenize_conversation`) plus ``input`` (the
  generation prompt up to the last assistant turn) and ``target`` (that turn).

  The mixtures have one split; ``validation_size`` > 0 holds out that many
  conversations (chosen by ``split_seed``) as ``validation``, removed from ``train``."""
  check_split(split, ("train", "validation"), DATASET)
  shuffle = (split == "train") if shuffle is None else shuffle
  info = {"dataset": DATASET, "split": split, "seed": seed, "template": "open-instruct tulu chat"}
  root = resolve_root(path, DATASET, "tulu")
  if is_hf_source(root):
    exs, _, desc = hf_examples(root, "train", DATASET, hf_config, hf_split or "train")
    info["source"] = desc
    where = lambda ex: f"example {ex['_line']}"  # noqa: E731
  else:
    files = _files(os.fspath(root))
    exs = []
    for fp in files:
      for ex in read_jsonl(require_file(fp, DATASET, "a JSONL file"), DATASET, ("messages",)):
        ex["_file"] = fp
        exs.append(ex)
    info["source"] = files
    where = lambda ex: f"{ex['_file']} line {ex['_line']}"  # noqa: E731
  rows, no_assistant = [], 0
  for ex in exs:
    r = _row(ex, where(ex), eos)
    if r is None:
      no_assistant += 1
    else:
      rows.append(r)
  info["n_without_assistant"] = no_assistant
  if validation_size:
    if not 0 < validation_size < len(rows):
      raise DataError(f"{DATASET}: validation_size={validation_size}; expected 0 < n < "
                      f"{len(rows)} (the number of conversations)")
    train, val = carve(rows, validation_size, split_seed, "tulu-validation")
    rows = train if split == "train" else val
  elif split == "validation":
    raise DataError(f"{DATASET}: the mixture has no validation split; expected "
                    f"validation_size=N to hold out N conversations")
  rows = subsample(rows, size, seed, shuffle=shuffle, what="conversations", info=info)
  info["n"] = len(rows)
  return Rows(rows, info)
