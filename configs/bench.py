"""The efficiency benchmark, peft-jax side by side with Hugging Face PEFT (``bench.py``).

  python bench.py --config=configs/bench.py                       # 2 CPU cores, < 15 min
  python bench.py --config=configs/bench.py --out=docs/benchmarks.md   # regenerate the page
  python bench.py --config=configs/bench.py:smoke                 # tiny, seconds (the test)
  python bench.py --config=configs/bench.py:gpu                   # T5-Large, LLaMA-2-7B sizes
  python bench.py --config=configs/bench.py --config.run.methods=lora --config.run.blocks=5

Variants:

* default: a T5 of t5-small's dimensions (LoRA r=8 on q, v; model dropout 0.1; batch
  8 x (256 in + 64 out)) and a small LLaMA (512 hidden, 8 layers, 8 query / 2 key-value
  heads; batch 8 x 256: a 192-token prompt and 64 tokens with loss), methods LoRA, (IA)^3,
  Houlsby adapters (AdapterHub's reference), prefix tuning (HF PEFT's: decoder
  self-attention prefixes, 30 positions) and full fine-tuning (plain torch); fp32.
* ``gpu``: T5-Large and LLaMA-2-7B dimensions (random weights), bf16, for every method of
  the survey (``configs/survey.py``; seed 003) plus HF PEFT's prefix tuning; the survey's
  batch 32 x (512 in + 8 out) (RTE, Table 3's micro-batch 32 for T5-Large) and, for
  LLaMA-2-7B, batch 8 x (512 prompt + 128 target tokens); rows without an HF PEFT or
  AdapterHub counterpart run on peft-jax alone. ``run.peak_tflops`` (989: H100 / H200
  dense bf16) gives model FLOPs utilisation. The sides run one after the other
  (``run.together=false``): two full fine-tunings of LLaMA-2-7B do not fit one GPU.
* ``smoke``: tiny models (no dropout), LoRA only, two timed steps (the test, seconds).

Sections: ``run`` (peft_jax/bench/config.py RUN: steps, blocks, tokens), ``models`` (the
checkpoint's ``transformers`` config kwargs plus family, batch and lengths), ``methods``
(a peft-jax method with its hyperparameters; the Hugging Face side gets the same initial
weights through HF PEFT's adapter format or AdapterHub's modules).
"""

import importlib.util
import os

import ml_collections

VARIANTS = ("", "gpu", "smoke")

T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6,
                feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.1,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
T5_LARGE = dict(T5_SMALL, d_model=1024, d_ff=4096, num_heads=16, num_layers=24)
T5_TINY = dict(T5_SMALL, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, vocab_size=128,
               relative_attention_num_buckets=8, relative_attention_max_distance=16,
               dropout_rate=0.0)
LLAMA_SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                   num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=8,
                   max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
LLAMA_2_7B = dict(LLAMA_SMALL, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                  num_key_value_heads=32, num_hidden_layers=32, max_position_embeddings=4096)
LLAMA_TINY = dict(LLAMA_SMALL, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=128,
                  max_position_embeddings=128)

METHODS = {
    "lora": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "q,v"},
    "ia3": {"method": "ia3"},
    "houlsby": {"method": "houlsby"},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 30},
    "full": {"method": "full"},
}


def _survey_methods():
  """The survey's methods (configs/survey.py METHODS), named as there."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "survey.py")
  spec = importlib.util.spec_from_file_location("peft_jax_config_survey_for_bench", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return {k: dict(mod.METHODS[k]) for k in mod.SURVEY_METHODS}


def _model(family, hf, batch_size, source_len, target_len, remat="none", attention_impl=""):
  return dict(family=family, batch_size=batch_size, source_len=source_len,
              target_len=target_len, remat=remat, attention_impl=attention_impl, **hf)


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is not recognised; accepted: "
                     f"{', '.join(repr(v) for v in VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.run = ml_collections.ConfigDict({
      "models": "t5,llama", "methods": "lora,ia3,houlsby,prefix_tuning,full",
      "dtype": "float32", "warmup_steps": 1, "steps_per_block": 1, "blocks": 3, "block_warmup": 1,
      "n_batches": 2,
      "new_tokens": 32, "infer_blocks": 2, "merged": True, "learning_rate": 1e-4, "seed": 0,
      "hf_threads": 0, "adapterhub_python": ".venv-adapters/bin/python", "together": True,
      "timeout_s": 3600,
      "peak_tflops": 0.0})
  c.models = {"t5": _model("t5", T5_SMALL, 8, 256, 64),
              "llama": _model("llama", LLAMA_SMALL, 8, 192, 64)}
  c.methods = {k: dict(v) for k, v in METHODS.items()}
  if variant == "gpu":
    c.models = {"t5": _model("t5", T5_LARGE, 32, 512, 8),
                "llama": _model("llama", LLAMA_2_7B, 8, 512, 128)}
    survey = _survey_methods()
    c.methods = dict(survey, prefix_tuning_hf={"method": "prefix_tuning",
                                               "num_virtual_tokens": 30})
    c.run.methods = ",".join(list(survey) + ["prefix_tuning_hf"])
    c.run.dtype = "bfloat16"
    c.run.steps_per_block = 5
    c.run.blocks = 5
    c.run.infer_blocks = 3
    c.run.peak_tflops = 989.0
    c.run.together = False       # full fine-tuning of LLaMA-2-7B twice does not fit one GPU
  elif variant == "smoke":
    c.models = {"t5": _model("t5", T5_TINY, 2, 8, 4),
                "llama": _model("llama", LLAMA_TINY, 2, 8, 4)}
    c.methods = {"lora": dict(METHODS["lora"]), "ia3": {"method": "ia3"},
                 "houlsby": {"method": "houlsby"}, "full": {"method": "full"},
                 "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 3}}
    c.run.methods = "lora"
    c.run.blocks = 2
    c.run.new_tokens = 3
    c.run.infer_blocks = 1
  return c
