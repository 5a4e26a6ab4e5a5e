"""Seed 000, SuperNI: T5-LM-adapted XL with the paper's PEFT methods (Table 1).

  python train.py --config=configs/superni.py:lora --config.model.checkpoint=/ckpt/t5-xl-lm-adapt \
      --config.data.path=/data/natural-instructions --workdir=runs/superni_lora

Variant parts (comma separated): method in {full, lora, adapter, prefix_tuning,
prompt_tuning, bitfit} (default lora); model in {xl (default), large, xxl, tiny}.
Defaults are Table 1's best settings; ``GRID`` lists its search space (for a sweep).
Fixed (Appendix C): fp32, 4 epochs, linear schedule with 3% warmup (constant for
full, as Tk-Instruct), weight decay 0, max length 1024, effective batch 128,
dropout 0.1, LoRA on all query and key layers; best checkpoint by ROUGE-L.
"""

from peft_jax.config_lib import base_config, parse_variant, tiny_model

METHODS = ("full", "lora", "adapter", "prefix_tuning", "prompt_tuning", "bitfit")
MODELS = {"xl": "t5-lm-adapt-xl", "large": "t5-lm-adapt-large", "xxl": "t5-lm-adapt-xxl",
          "tiny": "tiny"}
GRID = {
    "lora": {"peft.r": [8, 32, 64, 128, 256, 512], "train.learning_rate": [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]},
    "adapter": {"peft.bottleneck_size": [8, 32, 64, 128, 256, 512],
                "train.learning_rate": [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]},
    "prefix_tuning": {"peft.num_virtual_tokens": [8, 32, 64, 128, 256, 512],
                      "peft.encoder_hidden_size": [0, 256, 512, 1024],
                      "train.learning_rate": [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]},
    "prompt_tuning": {"peft.num_virtual_tokens": [8, 32, 128, 256],
                      "train.learning_rate": [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]},
    "bitfit": {"train.learning_rate": [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]},
    "full": {"train.learning_rate": [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]},
}
PEFT = {
    "full": ({"method": "full"}, 1e-5),
    "lora": ({"method": "lora", "r": 512, "lora_alpha": 512, "target_modules": "q,k"}, 1e-4),
    "adapter": ({"method": "houlsby", "bottleneck_size": 512}, 1e-4),
    "prefix_tuning": ({"method": "prefix_tuning", "num_virtual_tokens": 512,
                       "prefix_projection": True, "encoder_hidden_size": 256,
                       "max_input_length": 1024}, 1e-4),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 8,
                       "max_input_length": 1024}, 5e-5),
    "bitfit": ({"method": "bitfit"}, 5e-4),
}


def get_config(variant: str = ""):
  v = parse_variant(variant, {"method": METHODS, "model": tuple(MODELS)},
                    {"method": "lora", "model": "xl"})
  c = base_config()
  c.model.name = MODELS[v["model"]]
  c.data.name = "superni"
  c.data.max_source_len = 1024
  c.data.max_target_len = 128
  peft, lr = PEFT[v["method"]]
  c.peft = dict(peft)
  c.train.learning_rate = lr
  c.train.schedule = "constant" if v["method"] == "full" else "linear"
  c.train.num_epochs = 4
  c.train.batch_size = 128
  c.train.micro_batch_size = 8
  c.train.eval_every = 500
  c.eval.metric = "rougeL"
  c.eval.max_new_tokens = 128
  if v["model"] == "tiny":
    tiny_model(c, "t5-tiny", vocab_size=32128)
    c.tokenizer = "../shared/data/tokenizers/t5"
    c.train.micro_batch_size = 2
    c.train.eval_every = 0
    if v["method"] in ("lora", "adapter"):
      c.peft.update({"r": 4, "lora_alpha": 4} if v["method"] == "lora" else {"bottleneck_size": 4})
    if v["method"] in ("prefix_tuning", "prompt_tuning"):
      c.peft.update({"num_virtual_tokens": 4, "max_input_length": 512})
      if v["method"] == "prefix_tuning":
        c.peft.encoder_hidden_size = 8
  return c
