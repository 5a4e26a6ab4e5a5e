"""Seed 000, TULU: LLaMA-2-7B instruction-tuned on a TULU mixture.

  python train.py --config=configs/tulu.py:lora --config.model.checkpoint=/ckpt/llama-2-7b \
      --config.data.path=/data/tulu_v1_mix.jsonl --workdir=runs/tulu_lora

Variant parts: method in {lora, adapter, full} (default lora); model in {7b (default), tiny}.
Fixed (Appendix C): bf16, 3 epochs, lr 1e-4, linear schedule with 3% warmup, weight
decay 0, max length 4096, effective batch 128; LoRA r=512, alpha=512, dropout 0.1 on
all query and key layers; adapter size 512. Rendered in open-instruct's chat format,
loss on the assistant turns (``peft_jax.data.tulu``).

Validation (ours; the paper evaluates on benchmarks, not on held-out conversations): the
mixture has one split, so ``data.validation_size`` conversations (1,000; 4 for ``tiny``)
are held out from it by ``data.split_seed`` and removed from training; this split picks
the best checkpoint and gives the evaluation loss and ROUGE-L. Evaluation prompts are the
token ids training puts before each answer (BOS first); a prompt longer than
``data.max_source_len`` is cut from the left so the ``<|assistant|>`` cue survives.

  python train.py --config=configs/tulu.py:lora,tiny --config.data.path=/data/tulu.jsonl \
      --workdir=/tmp/tulu_tiny       # a random tiny LLaMA with the real tokenizer

Evaluation (seed 000's Table 3): the open-instruct suite, ``peft_jax/evals/suite.py``::

  python eval.py --checkpoint=runs/tulu_lora --suite=tulu \
      --config.eval.suite_data_dir=/data/eval     # open-instruct's data/eval layout

``eval.suite_data_dir`` defaults to the real items in ``../shared/data/open_instruct_eval``
(a few per benchmark, for checks); the full benchmarks come from open-instruct's
``scripts/data/prepare_eval_data.sh`` in the same layout.
"""

from peft_jax.config_lib import base_config, parse_variant, tiny_model

METHODS = ("lora", "adapter", "full")
MODELS = {"7b": "llama-2-7b", "tiny": "tiny"}
PEFT = {
    "lora": {"method": "lora", "r": 512, "lora_alpha": 512, "lora_dropout": 0.1,
             "target_modules": "q,k"},
    "adapter": {"method": "houlsby", "bottleneck_size": 512},
    "full": {"method": "full"},
}


def get_config(variant: str = ""):
  v = parse_variant(variant, {"method": METHODS, "model": tuple(MODELS)},
                    {"method": "lora", "model": "7b"})
  c = base_config()
  c.model.name = MODELS[v["model"]]
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = "full"
  c.data.name = "tulu"
  c.data.max_source_len = 3072
  c.data.max_target_len = 1024
  c.data.validation_size = 1000    # held out from the mixture (module docstring)
  c.peft = dict(PEFT[v["method"]])
  c.train.learning_rate = 1e-4
  c.train.num_epochs = 3
  c.train.batch_size = 128
  c.train.micro_batch_size = 8     # one 4096-token sequence per device on 8 devices
  c.eval.metric = "rougeL"
  c.eval.max_new_tokens = 256
  # eval.py --suite=tulu: the open-instruct benchmarks (module docstring)
  c.eval.suite_data_dir = "../shared/data/open_instruct_eval"
  if v["model"] == "tiny":
    tiny_model(c, "llama-tiny", vocab_size=32000)
    c.tokenizer = "../shared/data/tokenizers/llama"
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.train.micro_batch_size = 2
    c.data.validation_size = 4
    if v["method"] == "lora":
      c.peft.update({"r": 4, "lora_alpha": 4})
    if v["method"] == "adapter":
      c.peft.bottleneck_size = 4
  return c
