"""The quickstart task: a small generated sentiment data set shipped in the repo.

Each example is ``review: <6-10 words>`` -> ``positive`` | ``negative``; the label
is the majority of sentiment words (ties are avoided). A word-level tokenizer
(``tokenizers`` WordLevel, loadable with ``transformers.AutoTokenizer``) covers the
closed vocabulary, so nothing is downloaded. ``python -m peft_jax.data.quickstart``
regenerates ``data/quickstart/`` bit for bit.
"""

from __future__ import annotations

import json
import os
import random

POSITIVE = ["good", "great", "fine", "happy", "lovely", "superb", "nice", "bright", "warm", "calm"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "grim", "nasty", "dull", "cold", "harsh"]
FILLER = ["the", "movie", "was", "food", "day", "and", "very", "quite", "a", "service", "room",
          "book", "it", "felt", "really", "so"]
SPECIAL = ["<pad>", "</s>", "<unk>"]
VOCAB = SPECIAL + ["review", ":", "positive", "negative"] + POSITIVE + NEGATIVE + FILLER

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "data", "quickstart")


def make_example(rng: random.Random):
  n_sent = rng.choice([1, 3, 5])
  n_pos = rng.choice([k for k in range(n_sent + 1) if 2 * k != n_sent])
  words = rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, n_sent - n_pos)
  words += [rng.choice(FILLER) for _ in range(rng.randint(4, 7))]
  rng.shuffle(words)
  return {"input": "review : " + " ".join(words),
          "target": "positive" if 2 * n_pos > n_sent else "negative"}


def generate(n_train=2000, n_val=200, n_test=200, seed=0):
  """(train, validation, test); the test rows are drawn after the others, so adding them
  left train and validation unchanged."""
  rng = random.Random(seed)
  return ([make_example(rng) for _ in range(n_train)], [make_example(rng) for _ in range(n_val)],
          [make_example(rng) for _ in range(n_test)])


def build_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                 unk_token="<unk>")


def write(out_dir=DATA_DIR):
  os.makedirs(out_dir, exist_ok=True)
  train, val, test = generate()
  for name, rows in (("train", train), ("validation", val), ("test", test)):
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  build_tokenizer().save_pretrained(os.path.join(out_dir, "tokenizer"))


if __name__ == "__main__":
  write()
  print(f"wrote {DATA_DIR}")
