"""Seed 000, SuperNI: T5-LM-adapted XL with the paper's PEFT methods (Table 1).

  python train.py --config=configs/superni.py:lora --config.model.checkpoint=/ckpt/t5-xl-lm-adapt \
      --config.data.path=/data/natural-instructions --workdir=runs/superni_lora

Variant parts (comma separated):

* method in {full, lora, adapter, prefix_tuning, prompt_tuning, bitfit} (default lora);
* model in {xl (default), base, large, xxl, tiny}: the LM-adapted T5 v1.1 checkpoints
  (google/t5-<size>-lm-adapt; Figure 2 compares base, large and xl; "T5-3B" in the paper's
  text is xl, 2.85B parameters);
* LoRA rank in {r8, r32, r64, r128, r256, r512} (default r512, Table 1's best);
* LoRA alpha in {alpha_r (default), alpha512} (see below).

Defaults are Table 1's best settings; ``GRID`` lists its search space (for a sweep, per
method; ``sweep.py --use_config_grid``). Fixed (Appendix C): fp32, 4 epochs, linear
schedule with 3% warmup (constant for full, as Tk-Instruct), weight decay 0, max length
1024, effective batch 128, dropout 0.1, LoRA on all query and key layers; best checkpoint
by ROUGE-L. Figure 3 (number of training tasks): ``--config.data.num_train_tasks=N``
keeps N of the 706 training tasks, nested (the N tasks of a smaller run are among those
of a larger one, for the same ``data.split_seed``).

LoRA alpha (our choice; the paper does not state it for SuperNI). The only alpha the paper
gives is its TÜLU setting, r = 512 with alpha = 512, i.e. alpha = r. Two readings of the
rank grid are offered:

* ``alpha_r`` (default): ``lora_alpha = r`` at every rank, so the update scale
  ``alpha / r`` is 1 across the grid and a larger rank adds directions without shrinking
  each one. This also fits Table 4 / Finding 3: under Adam, the size of the update
  ``A B`` grows with r at scale 1, and the paper finds low ranks tolerate lr = 1e-3
  (r = 8: 44.8, best at that rank) while r = 256 and 512 diverge there (0.0). With a
  fixed alpha = 512 the scale at r = 8 would be 64, an effective step 64 times larger
  than at r = 512, and low ranks would be the unstable ones.
* ``alpha512``: ``lora_alpha = 512`` at every rank (this config's earlier behaviour):
  scale ``512 / r``, from 64 at r = 8 to 1 at r = 512.

Because alpha follows the rank, the rank is a variant part rather than a grid key: a
sweep grid sets each key independently and ``--config.peft.r=N`` would leave alpha
behind. Table 1's LoRA grid is therefore one sweep per rank part,
``configs/superni.py:lora,r8`` ... ``lora,r512``, each over ``GRID['lora']``'s learning
rates (``RANKS`` lists them); ``--config.peft.r`` still works but does not move alpha.

Prefix tuning's h = null (no reparameterisation) is ``peft.encoder_hidden_size=0``, which
turns ``prefix_projection`` off (``peft_jax.peft.prefix_tuning``), so Table 1's h grid
{null, 256, 512, 1024} is the grid key ``peft.encoder_hidden_size: [0, 256, 512, 1024]``.
"""

from peft_jax.config_lib import base_config, parse_variant, tiny_model

METHODS = ("full", "lora", "adapter", "prefix_tuning", "prompt_tuning", "bitfit")
MODELS = {"xl": "t5-lm-adapt-xl", "base": "t5-lm-adapt-base", "large": "t5-lm-adapt-large",
          "xxl": "t5-lm-adapt-xxl", "tiny": "tiny"}
RANKS = {f"r{r}": r for r in (8, 32, 64, 128, 256, 512)}       # Table 1's LoRA ranks
ALPHAS = ("alpha_r", "alpha512")
LRS = [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]
GRID = {   # Table 1; LoRA's ranks are the variant parts RANKS (alpha follows r)
    "lora": {"train.learning_rate": LRS},
    "adapter": {"peft.bottleneck_size": [8, 32, 64, 128, 256, 512], "train.learning_rate": LRS},
    "prefix_tuning": {"peft.num_virtual_tokens": [8, 32, 64, 128, 256, 512],
                      "peft.encoder_hidden_size": [0, 256, 512, 1024],   # 0: h = null
                      "train.learning_rate": LRS},
    "prompt_tuning": {"peft.num_virtual_tokens": [8, 32, 128, 256], "train.learning_rate": LRS},
    "bitfit": {"train.learning_rate": LRS},
    "full": {"train.learning_rate": LRS},
}
PEFT = {
    "full": ({"method": "full"}, 1e-5),
    "lora": ({"method": "lora", "target_modules": "q,k"}, 1e-4),
    "adapter": ({"method": "houlsby", "bottleneck_size": 512}, 1e-4),
    "prefix_tuning": ({"method": "prefix_tuning", "num_virtual_tokens": 512,
                       "prefix_projection": True, "encoder_hidden_size": 256,
                       "max_input_length": 1024}, 1e-4),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 8,
                       "max_input_length": 1024}, 5e-5),
    "bitfit": ({"method": "bitfit"}, 5e-4),
}


def lora_alpha(r: int, alpha: str) -> int:
  """The ``lora_alpha`` of rank ``r`` under the ``alpha`` variant part (module docstring)."""
  return r if alpha == "alpha_r" else 512


def get_config(variant: str = ""):
  v = parse_variant(variant, {"method": METHODS, "model": tuple(MODELS), "rank": tuple(RANKS),
                              "alpha": ALPHAS},
                    {"method": "lora", "model": "xl", "rank": "r512", "alpha": "alpha_r"})
  stray = [p for p in (variant or "").split(",") if p.strip() in (*RANKS, *ALPHAS)]
  if stray and v["method"] != "lora":
    raise ValueError(f"config variant part(s) {stray} set LoRA's rank/alpha; they need the "
                     f"method lora, not {v['method']!r}")
  c = base_config()
  c.model.name = MODELS[v["model"]]
  c.data.name = "superni"
  c.data.max_source_len = 1024
  c.data.max_target_len = 128
  peft, lr = PEFT[v["method"]]
  c.peft = dict(peft)
  if v["method"] == "lora":
    r = RANKS[v["rank"]]
    c.peft.update({"r": r, "lora_alpha": lora_alpha(r, v["alpha"])})
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
    if v["method"] == "lora":
      c.peft.update({"r": 4, "lora_alpha": lora_alpha(4, v["alpha"])})
    if v["method"] == "adapter":
      c.peft.update({"bottleneck_size": 4})
    if v["method"] in ("prefix_tuning", "prompt_tuning"):
      c.peft.update({"num_virtual_tokens": 4, "max_input_length": 512})
      if v["method"] == "prefix_tuning":
        c.peft.encoder_hidden_size = 8
  return c
