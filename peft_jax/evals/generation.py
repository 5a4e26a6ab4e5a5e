"""Generation-based evaluation: decode a split, score it."""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from peft_jax.data.batching import bucket_length


def generate_texts(model, params, tok, mc, rows, *, max_source_len: int, max_new_tokens: int,
                   batch_size: int, num_beams: int = 1, input_key="input") -> List[str]:
  from peft_jax.decoding import generate
  from peft_jax.models import family_of
  eos = tok.eos_token_id
  source_eos = family_of(mc).source_eos     # T5's encoder input ends with EOS
  out: List[str] = []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    if not source_eos and all("messages" in r for r in chunk):
      # chat rows (TULU): the prompt ids training puts before the answer (BOS first), cut
      # from the left so the "<|assistant|>" cue survives (data/tulu.py, eval_encoding)
      from peft_jax.data.tulu import eval_encoding
      ids = [eval_encoding(tok, r["messages"], max_source_len)["prompt"] for r in chunk]
    else:
      ids = [list(t[: max_source_len - 1]) + [eos] if source_eos else list(t[:max_source_len])
             for t in tok([r[input_key] for r in chunk], add_special_tokens=False)["input_ids"]]
    n = bucket_length(max(len(x) for x in ids), max_source_len)
    bs = batch_size  # fixed batch shape: one compile for the whole split
    arr = np.zeros((bs, n), np.int32)
    mask = np.zeros((bs, n), np.int32)
    for j, x in enumerate(ids):
      arr[j, :len(x)] = x
      mask[j, :len(x)] = 1
    mask[len(ids):, 0] = 1   # filler rows: one token so no row is empty
    new = np.asarray(generate(model, params, arr, mask, max_new_tokens=max_new_tokens,
                              num_beams=num_beams, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id))
    out.extend(tok.batch_decode(new[: len(chunk)].tolist(), skip_special_tokens=True))
  return out


def evaluate_generation(model, params, tok, mc, rows, *, metric: str = "exact_match",
                        **kw) -> Dict:
  """Greedy/beam generation on ``rows`` scored against their ``references`` (all of
  them, best match counts) or ``target``: exact match and ROUGE-L always, plus
  ``metric`` (any name of :func:`peft_jax.metrics.compute_metrics`)."""
  from peft_jax.metrics import compute_metrics
  preds = generate_texts(model, params, tok, mc, rows, **kw)
  refs = [r.get("references") or r["target"] for r in rows]
  names = tuple(dict.fromkeys(("exact_match", "rougeL", metric)))
  out = compute_metrics(preds, refs, names)
  out["n"] = len(rows)
  if rows and all(isinstance(r.get("meta"), dict) and r["meta"].get("task") for r in rows):
    from peft_jax.metrics import per_task_and_category   # SuperNI: per task and category
    br = per_task_and_category(preds, rows, names)
    out.update(per_task=br["per_task"], per_category=br["per_category"],
               task_macro=br["task_macro"])
  out["examples"] = [{"pred": p, "ref": r} for p, r in list(zip(preds, refs))[:5]]
  return out
