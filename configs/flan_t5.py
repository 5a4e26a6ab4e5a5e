"""Seed 002: FLAN-T5-XL on AG News / CoLA / E2E NLG / SAMSum at three data sizes.

  python train.py --config=configs/flan_t5.py:cola,low,lora --config.model.checkpoint=/ckpt/flan-t5-xl

Variant parts: task in {ag_news, cola, e2e_nlg, samsum}; size in {low, medium, high}
(100 / 1,000 / 10,000 training examples; 10 / 5 / 1 epochs); method in {full, lora,
ia3, bitfit, prompt_tuning} or one of Table 2's ablations (ABLATIONS); model in
{xl (default), tiny}. Fixed (A.3): AdamW, warmup then linear anneal, batch 16 with
gradient accumulation 4 (effective 64), early stopping on validation loss, LoRA
rank 2, 100 prompt tokens, (IA)^3 ones-initialised, BitFit zero biases.
The learning rates are ours (the paper does not state them): 3e-4 for PEFT, 1e-5 full.
"""

from peft_jax.config_lib import base_config, parse_variant, tiny_model

TASKS = {"ag_news": "accuracy", "cola": "accuracy", "e2e_nlg": "rougeL", "samsum": "rougeL"}
SIZES = {"low": (100, 10), "medium": (1000, 5), "high": (10000, 1)}
METHODS = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "r": 2},
    "ia3": {"method": "ia3"},
    "bitfit": {"method": "bitfit"},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 100},
}
ABLATIONS = {  # Table 2 (24 encoder and 24 decoder layers on FLAN-T5-XL)
    "lora_early": {"method": "lora", "r": 2, "first_k_layers": 12},
    "lora_late": {"method": "lora", "r": 2, "last_k_layers": 12},
    "lora_random50": {"method": "lora", "r": 2, "random_layer_fraction": 0.5},
    "ia3_early": {"method": "ia3", "first_k_layers": 12},
    "ia3_late": {"method": "ia3", "last_k_layers": 12},
    "ia3_random50": {"method": "ia3", "random_layer_fraction": 0.5},
    "lora_drop_self_attn": {"method": "lora", "r": 2, "target_sublayers": "cross_attn"},
    "lora_drop_cross_attn": {"method": "lora", "r": 2, "target_sublayers": "self_attn"},
    "lora_drop_qo": {"method": "lora", "r": 2, "target_modules": "k,v"},
    "ia3_drop_attn": {"method": "ia3", "target_modules": "wo", "feedforward_modules": "wo"},
    "ia3_drop_ffn": {"method": "ia3", "target_modules": "k,v", "feedforward_modules": ""},
}


def get_config(variant: str = ""):
  v = parse_variant(variant, {"task": tuple(TASKS), "size": tuple(SIZES),
                              "method": tuple(METHODS) + tuple(ABLATIONS),
                              "model": ("xl", "tiny")},
                    {"task": "cola", "size": "low", "method": "lora", "model": "xl"})
  c = base_config()
  c.model.name = "flan-t5-xl"
  c.data.name = v["task"]
  n, epochs = SIZES[v["size"]]
  c.data.size = v["size"]
  c.data.max_source_len = 512
  c.data.max_target_len = 8 if TASKS[v["task"]] == "accuracy" else 128
  c.peft = dict({**METHODS, **ABLATIONS}[v["method"]])
  c.train.learning_rate = 1e-5 if v["method"] == "full" else 3e-4
  c.train.schedule = "linear"
  c.train.num_epochs = epochs
  c.train.batch_size = 64
  c.train.micro_batch_size = 16
  c.train.eval_every = max(n // 64, 1)
  c.train.early_stopping_patience = 3
  c.eval.metric = TASKS[v["task"]]
  c.eval.max_new_tokens = c.data.max_target_len
  if v["model"] == "tiny":
    tiny_model(c, "t5-tiny", vocab_size=32128)
    c.tokenizer = "../shared/data/tokenizers/t5"
    c.train.micro_batch_size = 2
    c.train.eval_every = 0
    if v["method"] == "prompt_tuning":
      c.peft.num_virtual_tokens = 4
    for k in ("first_k_layers", "last_k_layers"):
      if k in c.peft:
        c.peft[k] = 1
  return c
