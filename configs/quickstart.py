"""The README's main job: LoRA on a tiny T5 on a small generated sentiment task.

Offline (the model is a random-init preset, the data and tokenizer ship in
``data/quickstart``), a couple of minutes on 2 CPU cores. Prints the untuned and
the tuned exact-match accuracy on the validation split.

  python train.py --config=configs/quickstart.py --workdir=/tmp/quickstart
  python train.py --config=configs/quickstart.py --config.train.num_steps=50   # shorter
"""

import ml_collections


VARIANTS = ("", "full")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is not recognised; accepted: "
                     f"{', '.join(repr(v) for v in VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"name": "t5-tiny", "checkpoint": "", "dtype": "float32",
                                       "param_dtype": "float32", "remat": "none",
                                       "dropout_rate": 0.0})
  c.tokenizer = "data/quickstart/tokenizer"
  c.data = ml_collections.ConfigDict({"name": "quickstart", "path": "data/quickstart",
                                      "max_source_len": 16, "max_target_len": 4,
                                      "max_train_examples": 0, "max_eval_examples": 0})
  c.peft = ml_collections.ConfigDict({"method": "lora", "r": 8, "lora_alpha": 16,
                                      "target_modules": "all-linear"})
  c.train = ml_collections.ConfigDict({
      "batch_size": 32,             # effective batch
      "micro_batch_size": 0,        # > 0: gradient accumulation over batch_size // micro_batch_size
      "num_steps": 300, "num_epochs": 0, "learning_rate": 3e-3,
      "schedule": "linear", "warmup_ratio": 0.03, "weight_decay": 0.0, "grad_clip": 1.0,
      "seed": 0, "log_every": 25,
      "eval_every": 0,              # > 0: evaluate (and checkpoint) every N steps
      "save_every": 0, "keep_last": 2, "early_stopping_patience": 0, "eval_at_start": True,
      "stop_at_step": 0})            # > 0: stop there as if interrupted (resume drills)
  c.eval = ml_collections.ConfigDict({"batch_size": 100, "max_new_tokens": 4, "num_beams": 1,
                                      "metric": "exact_match"})
  # all visible devices, weights split FSDP-style; see peft_jax/sharding.py and docs/scaling.md
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "num_devices": 0,
                                      "rules": "", "param_rules": ""})
  if variant == "full":
    c.peft = ml_collections.ConfigDict({"method": "full"})
    c.train.learning_rate = 1e-3
  return c
