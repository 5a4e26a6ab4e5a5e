"""TÜLU mixtures: open-instruct chat rendering, the assistant-only loss mask, truncation,
chat batches, and the JSONL / `datasets` loaders."""
import json

import numpy as np
import pytest

from peft_jax.data.common import DataError
from peft_jax.data.sources import load_dataset_rows
from peft_jax.data.tulu import (chat_batch, encode_eval_rows, eval_encoding, render_conversation,
                                render_prompt, tokenize_conversation, tokenize_rows)

CONV = [
    {"role": "system", "content": "You are helpful. "},
    {"role": "user", "content": "  hi there ?"},
    {"role": "assistant", "content": "hello !\n"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "bye bye a b"},
]


def _runs(mask):
  """[(start, end)] of the runs of 1s."""
  runs, start = [], None
  for i, m in enumerate(list(mask) + [0]):
    if m and start is None:
      start = i
    elif not m and start is not None:
      runs.append((start, i))
      start = None
  return runs


@pytest.fixture(scope="module")
def word_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = ["<|", "|>", "user", "assistant", "system", "You", "are", "helpful", ".", "hi",
           "there", "hello", "!", "?", "bye", "a", "b"]
  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "[UNK]"] + words)}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                 unk_token="[UNK]", pad_token="<pad>")


def test_render_open_instruct_format():
  assert render_conversation(CONV) == (
      "<|system|>\nYou are helpful.\n<|user|>\nhi there ?\n<|assistant|>\nhello !</s>\n"
      "<|user|>\nbye\n<|assistant|>\nbye bye a b</s>")
  assert render_prompt(CONV[:4]) == (
      "<|system|>\nYou are helpful.\n<|user|>\nhi there ?\n<|assistant|>\nhello !</s>\n"
      "<|user|>\nbye\n<|assistant|>\n")
  assert render_conversation(CONV[1:3], eos="<|endoftext|>").endswith("hello !<|endoftext|>")


def test_loss_mask_only_on_assistant_tokens(word_tokenizer):
  tok = word_tokenizer
  enc = tokenize_conversation(tok, CONV, max_length=2048)
  ids, mask = enc["input_ids"], enc["loss_mask"]
  assert ids[0] == tok.bos_token_id and mask[0] == 0 and len(ids) == len(mask)
  runs = _runs(mask)
  assert [tok.convert_ids_to_tokens(ids[a:b]) for a, b in runs] == [
      ["hello", "!", "</s>"], ["bye", "bye", "a", "b", "</s>"]]
  assert enc["n_loss_tokens"] == 8 and not enc["truncated"]
  # the prefix method (open-instruct's way, any tokenizer) gives the same mask
  assert tokenize_conversation(tok, CONV, method="prefix") == enc
  no_bos = tokenize_conversation(tok, CONV, add_bos=False)
  assert no_bos["input_ids"] == ids[1:] and no_bos["loss_mask"] == mask[1:]


def test_truncation_keeps_the_start(word_tokenizer):
  full = tokenize_conversation(word_tokenizer, CONV)
  cut = tokenize_conversation(word_tokenizer, CONV, max_length=12)
  assert cut["truncated"] and cut["input_ids"] == full["input_ids"][:12]
  assert cut["loss_mask"] == full["loss_mask"][:12]
  tiny = tokenize_conversation(word_tokenizer, CONV, max_length=4)
  assert tiny["n_loss_tokens"] == 0
  rows = [{"messages": CONV}, {"messages": CONV[1:3]}]
  out = tokenize_rows(word_tokenizer, rows, max_length=4)
  assert len(out) == 0 and out.info["n_dropped_empty"] == 2
  out = tokenize_rows(word_tokenizer, rows, max_length=20)
  assert len(out) == 2 and out.info["n_truncated"] == 1


def test_chat_batch_layout(word_tokenizer):
  enc = tokenize_rows(word_tokenizer, [{"messages": CONV}, {"messages": CONV[1:3]}])
  b = chat_batch(enc, [0, 1], pad_id=0, max_len=64, batch_size=3)
  assert b["inputs"].shape == (3, 32) and b["inputs"].dtype == np.int32
  for r in range(2):
    ids = np.array(enc[r]["input_ids"])
    n = len(ids)
    assert (b["inputs"][r, :n] == ids).all() and b["input_mask"][r].sum() == n
    assert (b["targets"][r, :n - 1] == ids[1:]).all()
    # target_mask marks exactly the positions whose *next* token is an assistant token
    assert (b["target_mask"][r, :n - 1] == np.array(enc[r]["loss_mask"][1:])).all()
    assert b["target_mask"][r, n - 1:].sum() == 0
  assert b["input_mask"][2].sum() == 0 and b["target_mask"][2].sum() == 0


def test_message_errors(word_tokenizer):
  with pytest.raises(DataError, match=r"role 'bot'; expected one of \['system', 'user', 'assistant'\]"):
    tokenize_conversation(word_tokenizer, [{"role": "bot", "content": "x"}])
  with pytest.raises(DataError, match=r"expected a non-empty list"):
    render_conversation([])
  with pytest.raises(DataError, match=r"content is a int; expected a string"):
    render_conversation([{"role": "user", "content": 3}])


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return path


def test_load_tulu_jsonl(tmp_path):
  rows = [{"dataset": "oasst1", "id": f"c{i}", "messages": [
      {"role": "user", "content": f"question {i}"},
      {"role": "assistant", "content": f" answer {i} "}]} for i in range(10)]
  rows.append({"dataset": "x", "id": "noans", "messages": [{"role": "user", "content": "q"}]})
  path = _write_jsonl(tmp_path / "tulu_v2_mix.jsonl", rows)
  tr = load_dataset_rows("tulu", "train", path=path, seed=0)
  assert len(tr) == 10 and tr.info["n_without_assistant"] == 1
  r = {x["meta"]["id"]: x for x in tr}["c3"]
  assert r["input"] == "<|user|>\nquestion 3\n<|assistant|>\n" and r["target"] == "answer 3"
  assert r["meta"]["source_dataset"] == "oasst1" and r["messages"][1]["content"] == " answer 3 "
  again = load_dataset_rows("tulu", "train", path=tmp_path, seed=0)   # a folder of JSONL files
  other = load_dataset_rows("tulu", "train", path=path, seed=1)
  assert [x["input"] for x in again] == [x["input"] for x in tr]
  assert [x["input"] for x in other] != [x["input"] for x in tr]
  tr7 = load_dataset_rows("tulu", "train", path=path, validation_size=3)
  va = load_dataset_rows("tulu", "validation", path=path, validation_size=3)
  assert len(tr7) == 7 and len(va) == 3
  assert not {x["meta"]["id"] for x in tr7} & {x["meta"]["id"] for x in va}
  assert len(load_dataset_rows("tulu", "train", path=path, size="low")) == 10
  with pytest.raises(DataError, match=r"no validation split; expected validation_size=N"):
    load_dataset_rows("tulu", "validation", path=path)
  (tmp_path / "bad").mkdir()
  bad = tmp_path / "bad" / "b.jsonl"
  bad.write_text('{"messages": [{"role": "user"}]}\n')
  with pytest.raises(DataError, match=r"b\.jsonl line 1 message 0 is .*; expected a non-empty "
                                      r"list of \{'role'"):
    load_dataset_rows("tulu", "train", path=bad)
  with pytest.raises(DataError, match=r"no JSONL found"):
    load_dataset_rows("tulu", "train", path=tmp_path / "nothing")


def test_load_tulu_datasets_format():
  datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")
  ds = datasets.Dataset.from_list([{"dataset": "sharegpt", "id": "a", "messages": [
      {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
  rows = load_dataset_rows("tulu", "train", path=datasets.DatasetDict({"train": ds}))
  assert rows[0]["input"] == "<|user|>\nhi\n<|assistant|>\n" and rows[0]["target"] == "hello"


@pytest.mark.shared_data
def test_llama_tokenizer_mask(shared_data):
  """Token ids and the loss mask, checked against sentencepiece itself (not against
  ``tok.decode``, whose spacing around special tokens changes between transformers
  releases). LLaMA's tokenizer encodes the text between special tokens as separate
  sentencepiece pieces, so the reference is: split at ``</s>``, encode each part with
  the model file, join with EOS, BOS first."""
  import sentencepiece
  from transformers import AutoTokenizer
  model_file = shared_data / "tokenizers/llama/tokenizer.model"
  tok = AutoTokenizer.from_pretrained(str(model_file.parent))
  sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
  conv = [{"role": "user", "content": "What is 2+2?\nAnswer briefly."},
          {"role": "assistant", "content": "It is 4."},
          {"role": "user", "content": "Thanks! And 3+3?"},
          {"role": "assistant", "content": "6.\n\nAnything else?"}]
  enc = tokenize_conversation(tok, conv, max_length=4096)
  assert tok.bos_token_id == sp.bos_id() == 1 and tok.eos_token_id == sp.eos_id() == 2
  expected = [sp.bos_id()]
  for i, part in enumerate(render_conversation(conv).split("</s>")):
    expected += ([sp.eos_id()] if i else []) + (sp.encode(part) if part else [])
  assert enc["input_ids"] == expected
  assert tokenize_conversation(tok, conv, method="prefix") == enc
  runs = _runs(enc["loss_mask"])
  ids = enc["input_ids"]
  # exactly the assistant contents and their EOS, each right after the assistant tag
  assert [sp.decode(ids[a:b - 1]) for a, b in runs] == ["It is 4.", "6.\n\nAnything else?"]
  assert all(ids[b - 1] == sp.eos_id() for _, b in runs)
  assert all(sp.id_to_piece(ids[a - 7:a]) == ["<", "|", "ass", "istant", "|", ">", "<0x0A>"]
             for a, _ in runs)
  assert enc["n_loss_tokens"] == sum(b - a for a, b in runs) == 6 + 9


# ----------------------------------------------------------------------------- evaluation encoding

def _answer_start(mask):
  return _runs(mask)[-1][0]


def test_eval_prompt_is_the_training_prefix(word_tokenizer):
  """The evaluation prompt is what training puts before the last answer (BOS included),
  the target what training learns there (content + EOS)."""
  tok = word_tokenizer
  train = tokenize_conversation(tok, CONV)
  k = _answer_start(train["loss_mask"])
  e = eval_encoding(tok, CONV, max_prompt_len=64)
  assert e["prompt"] == train["input_ids"][:k] and e["target"] == train["input_ids"][k:]
  assert e["prompt"][0] == tok.bos_token_id and not e["prompt_truncated"]
  assert tok.convert_ids_to_tokens(e["target"]) == ["bye", "bye", "a", "b", "</s>"]
  # the prompt text alone, as generation encoded it before, lacks BOS
  text_only = tok(render_prompt(CONV[:4]), add_special_tokens=False)["input_ids"]
  assert [tok.bos_token_id] + text_only == e["prompt"] != text_only
  enc = encode_eval_rows(tok, [{"messages": CONV}, {"messages": CONV[1:3]}], 64, 3)
  assert enc.source[0] == e["prompt"]
  assert tok.convert_ids_to_tokens(enc.target[0]) == ["bye", "bye", "</s>"]   # cut, EOS kept
  assert enc.truncated_targets == 1 and enc.truncated_sources == 0
  with pytest.raises(DataError, match="must end with an assistant turn"):
    eval_encoding(tok, CONV[:4], 64)


def test_long_eval_prompt_is_cut_from_the_left(word_tokenizer):
  tok = word_tokenizer
  long = [{"role": "user", "content": " ".join(["hi there"] * 40)},
          {"role": "assistant", "content": "hello !"}]
  full = eval_encoding(tok, long, max_prompt_len=10 ** 6)["prompt"]
  e = eval_encoding(tok, long, max_prompt_len=12)
  assert e["prompt_truncated"] and len(e["prompt"]) == 12 and len(full) > 80
  assert e["prompt"] == [tok.bos_token_id] + full[-11:]       # BOS, then the last tokens
  # the assistant cue is the end of the prompt
  assert tok.convert_ids_to_tokens(e["prompt"][-3:]) == ["<|", "assistant", "|>"]
  enc = encode_eval_rows(tok, [{"messages": long}], 12, 16)
  assert enc.source[0] == e["prompt"] and enc.truncated_sources == 1
  # training keeps the start instead (open-instruct)
  assert tokenize_conversation(tok, long, max_length=12)["input_ids"] == full[:12]


@pytest.mark.shared_data
def test_llama_eval_prompt_equals_training_prefix(shared_data):
  """With the real LLaMA tokenizer: the evaluation prompt equals the training ids before
  the answer, which is also BOS + the prompt text tokenised alone (the tokenisation does
  not change at the "<|assistant|>\\n" boundary)."""
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(str(shared_data / "tokenizers/llama"))
  conv = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "What is 2+2?\nAnswer briefly."},
          {"role": "assistant", "content": "It is 4."},
          {"role": "user", "content": "Thanks! And 3+3?"},
          {"role": "assistant", "content": "6.\n\nAnything else?"}]
  train = tokenize_conversation(tok, conv, max_length=4096)
  k = _answer_start(train["loss_mask"])
  e = eval_encoding(tok, conv, max_prompt_len=4096)
  assert e["prompt"] == train["input_ids"][:k] and e["target"] == train["input_ids"][k:]
  assert e["prompt"] == [tok.bos_token_id] + tok(render_prompt(conv[:4]),
                                                 add_special_tokens=False)["input_ids"]
  # a standalone answer would start with "▁6" where training has "6"
  assert tok(conv[-1]["content"], add_special_tokens=False)["input_ids"] != e["target"][:-1]
  cut = eval_encoding(tok, conv, max_prompt_len=16)["prompt"]
  assert cut[0] == tok.bos_token_id and cut[1:] == e["prompt"][-15:]
  assert tok.convert_ids_to_tokens(cut[-7:]) == ["<", "|", "ass", "istant", "|", ">", "<0x0A>"]
