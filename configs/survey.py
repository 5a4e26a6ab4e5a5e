"""Seed 003, the survey's head-to-head: T5-Large/3B/11B x {BoolQ, RTE, COPA, CNN/DailyMail}
x {full and 14 PEFT methods}.

  python train.py --config=configs/survey.py:t5-large,rte,lora_qv --config.model.checkpoint=/ckpt/t5-large

Variant parts: model in {t5-large (default), t5-3b, t5-11b, tiny}; task in {boolq,
rte (default), copa, cnn_dailymail}; method in METHODS (default lora_qv). Settings
(survey): learning rate from {1e-3, 1e-4, 1e-5} (``GRID``; default 1e-4, 1e-5 for
full), batch 32, input 512, output 8 (classification) or 128 (CNN/DM), 3 epochs but
at least 100 steps, CNN/DM 1 epoch; each method with its library defaults
(AdapterHub for the adapter family, HF PEFT for LoRA, (IA)^3, prompt/prefix tuning,
LN tuning, LoKr for KronA).
"""

from peft_jax.config_lib import base_config, parse_variant, tiny_model

MODELS = ("t5-large", "t5-3b", "t5-11b", "tiny")
TASKS = {"boolq": "accuracy", "rte": "accuracy", "copa": "accuracy", "cnn_dailymail": "rougeL"}
METHODS = {
    "full": {"method": "full"},
    "houlsby": {"method": "houlsby"},
    "pfeiffer": {"method": "pfeiffer"},
    "parallel": {"method": "parallel"},
    "ia3": {"method": "ia3"},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 30,
                      "prefix_projection": True, "encoder_hidden_size": 512},
    # 20 prompt vectors before a 512-token input (T5's positions are relative; HF PEFT
    # prepends them to the truncated input the same way)
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 20,
                      "max_input_length": 532},
    "ln_tuning": {"method": "ln_tuning"},
    "lora_qv": {"method": "lora", "r": 8, "lora_alpha": 8, "target_modules": "q,v"},
    "lora_all": {"method": "lora", "r": 8, "lora_alpha": 8, "target_modules": "all-linear"},
    "krona": {"method": "krona"},
    "mam": {"method": "mam"},
    "compacter": {"method": "compacter"},
    "compacter_pp": {"method": "compacter_pp"},
    "unipelt": {"method": "unipelt"},
}
GRID = {"train.learning_rate": [1e-3, 1e-4, 1e-5]}


def get_config(variant: str = ""):
  v = parse_variant(variant, {"model": MODELS, "task": tuple(TASKS), "method": tuple(METHODS)},
                    {"model": "t5-large", "task": "rte", "method": "lora_qv"})
  c = base_config()
  c.model.name = v["model"]
  c.data.name = v["task"]
  c.data.max_source_len = 512
  c.data.max_target_len = 128 if v["task"] == "cnn_dailymail" else 8
  c.peft = dict(METHODS[v["method"]])
  c.train.learning_rate = 1e-5 if v["method"] == "full" else 1e-4
  c.train.batch_size = 32
  c.train.num_epochs = 1 if v["task"] == "cnn_dailymail" else 3
  c.train.min_steps = 0 if v["task"] == "cnn_dailymail" else 100
  c.eval.metric = TASKS[v["task"]]
  c.eval.max_new_tokens = c.data.max_target_len
  if v["model"] == "tiny":
    tiny_model(c, "t5-tiny", vocab_size=32128)
    c.tokenizer = "../shared/data/tokenizers/t5"
    c.train.min_steps = 0
    small = {"prefix_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 8},
             "prompt_tuning": {"num_virtual_tokens": 4}}
    c.peft.update(small.get(v["method"], {}))
  return c
