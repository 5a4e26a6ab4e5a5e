"""Seed 000 (configs/superni.py): Table 1's grid builds at every point, Table 1's
% trainable from the dry run, Figure 2's model sizes, and the LoRA alpha choice.

All of it is abstract (shapes only, no weights): the computation of ``train.py --dry_run``
(``builder.build`` + ``peft.summary``)."""
import importlib.util
import json
import os

import pytest

from peft_jax import config_lib, grid_search
from peft_jax.builder import build
from peft_jax.models import abstract_params, count_params, get_preset
from peft_jax.peft import summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "superni.py")


def _module():
  spec = importlib.util.spec_from_file_location("cfg_superni_seed000", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


M = _module()


def _dry_run(variant, overrides=()):
  cfg, _ = config_lib.resolve(config_lib.load_file(f"{CONFIG}:{variant}"), list(overrides))
  built = build(cfg)
  return cfg, built.state, summary(built.state)


def _sweeps():
  """(config variant, grid) of every sweep of Table 1: one per method, LoRA one per rank."""
  out = []
  for method in M.METHODS:
    variants = [f"{method},{r}" for r in M.RANKS] if method == "lora" else [method]
    for v in variants:
      mod, _, variant = grid_search.load_config_module(f"{CONFIG}:{v}")
      out.append((v, grid_search.config_grid(mod, variant, grid_search.build_config(mod, variant))))
  return out


def test_every_grid_point_of_table1_builds():
  """Each point of each method's grid resolves (as sweep.py checks before running) and
  its PEFT tree builds on T5-LM-adapt XL; 30 + 30 + 120 + 20 + 5 + 5 points."""
  n_points, built = 0, {}
  for variant, grid in _sweeps():
    points = grid_search.expand_grid(grid, [0])
    grid_search.check_points(f"{CONFIG}:{variant}", grid, [0], {})
    for p in points:
      n_points += 1
      ov = [(k, v) for k, v in p["overrides"].items()]
      peft_ov = tuple(sorted((k, v) for k, v in ov if k.startswith("peft.")))
      if (variant, peft_ov) in built:   # the learning rate does not change the tree
        continue
      cfg, state, info = _dry_run(variant, ov)
      assert cfg.model.name == "t5-lm-adapt-xl"
      assert 0 < info["trainable_params"] <= info["total_params"], (variant, ov)
      built[(variant, peft_ov)] = (state.hparams, info)
  assert n_points == 30 + 30 + 120 + 20 + 5 + 5 == 210
  # h = null (encoder_hidden_size=0): plain prefixes, l x 2 (key, value) x 24 layers x 2048
  for l in (8, 32, 64, 128, 256, 512):
    hp, info = built[("prefix_tuning", (("peft.encoder_hidden_size", "0"),
                                        ("peft.num_virtual_tokens", str(l))))]
    assert hp["prefix_projection"] is False and info["trainable_params"] == l * 2 * 24 * 2048
    hp, info = built[("prefix_tuning", (("peft.encoder_hidden_size", "256"),
                                        ("peft.num_virtual_tokens", str(l))))]
    assert hp["prefix_projection"] is True and hp["encoder_hidden_size"] == 256
    # HF PEFT's MLP: embedding l x 2048, 2048 -> 256 -> 2 * 24 * 2048 (with biases)
    assert info["trainable_params"] == (l * 2048 + 2048 * 256 + 256 + 256 * 2 * 24 * 2048
                                        + 2 * 24 * 2048)


def test_h_null_is_a_cli_value_and_plain_prefixes():
  """``--config.peft.encoder_hidden_size=0`` turns the reparameterisation off even with
  prefix_projection=True (the config's default), and a negative width is one clear error."""
  _, state, _ = _dry_run("prefix_tuning", [("peft.encoder_hidden_size", "0")])
  assert state.hparams["prefix_projection"] is False
  leaves = [k for k in state.added]
  assert leaves and all(k.endswith(("prefix_key", "prefix_value")) for k in leaves)
  with pytest.raises(config_lib.ConfigError, match="encoder_hidden_size"):
    config_lib.resolve(config_lib.load_file(f"{CONFIG}:prefix_tuning"),
                       [("peft.encoder_hidden_size", "-1")])


# Table 1: method -> (% trainable as printed, digits printed)
TABLE1 = {"lora": (9.6, 1), "adapter": (6.6, 1), "prefix_tuning": (0.9, 1),
          "prompt_tuning": (0.001, 3), "bitfit": (0.04, 2), "full": (100, 0)}


def test_table1_trainable_percentages():
  """Each method's best setting (the config defaults, T5-LM-adapt XL) gives the printed %
  trainable. The denominator is all parameters (trainable + frozen, HF PEFT's
  print_trainable_parameters), although the caption says "frozen parameters": trainable /
  frozen would give LoRA 10.6% and adapter 7.1%, not 9.6% and 6.6%."""
  for method, (pct, digits) in TABLE1.items():
    _, _, info = _dry_run(method)
    t, frozen = info["trainable_params"], info["frozen_params"]
    assert info["trainable_percent"] == pytest.approx(100 * t / (t + frozen))
    assert round(info["trainable_percent"], digits) == pct, (method, info["trainable_percent"])
    if method in ("lora", "adapter"):   # the caption's reading does not reproduce them
      assert round(100 * t / frozen, digits) != pct
  _, _, lora = _dry_run("lora")
  assert lora["trainable_params"] == 2 * 24 * 2 * 512 * (2048 + 2048) + 24 * 2 * 512 * (2048 + 2048)


# LM-adapted T5 v1.1 (google/t5-<size>-lm-adapt): published parameter totals
PUBLISHED = {"base": 247_577_856, "large": 783_150_080, "xl": 2_849_757_184,
             "xxl": 11_135_332_352}
DIMS = {"base": (768, 2048, 12, 12), "large": (1024, 2816, 24, 16), "xl": (2048, 5120, 24, 32),
        "xxl": (4096, 10240, 24, 64)}   # d_model, d_ff, layers (each stack), heads; d_kv 64


def _t5_v11_total(d, ff, L, h, kv=64, vocab=32128, buckets=32):
  inner = h * kv
  attn = 4 * d * inner                 # q, k, v, o
  ffn = 3 * d * ff                     # gated-gelu: wi_0, wi_1, wo
  enc = L * (attn + ffn + 2 * d) + d + buckets * h
  dec = L * (2 * attn + ffn + 3 * d) + d + buckets * h
  return vocab * d + enc + dec + vocab * d   # shared embedding + untied lm_head


def test_figure2_lm_adapt_presets_match_published_sizes():
  for size, total in PUBLISHED.items():
    assert _t5_v11_total(*DIMS[size]) == total
    mc = get_preset(f"t5-lm-adapt-{size}")
    assert (mc.d_model, mc.d_ff, mc.num_layers, mc.num_heads, mc.d_kv) == DIMS[size] + (64,)
    assert mc.feed_forward_proj == "gated-gelu" and not mc.tie_word_embeddings
    assert count_params(abstract_params(mc)) == total, size
    cfg = M.get_config(f"adapter,{size}")            # the variant part selects it
    assert cfg.model.name == f"t5-lm-adapt-{size}"
  # the full-finetuning dry run counts exactly the model
  for size in ("base", "large"):
    _, _, info = _dry_run(f"full,{size}")
    assert info["total_params"] == info["trainable_params"] == PUBLISHED[size]


def test_lora_alpha_follows_rank_or_is_fixed():
  for part, r in M.RANKS.items():
    c = M.get_config(f"lora,{part}")
    assert (c.peft.r, c.peft.lora_alpha) == (r, r)          # default alpha_r: scale 1
    c = M.get_config(f"lora,{part},alpha512")
    assert (c.peft.r, c.peft.lora_alpha) == (r, 512)        # scale 512 / r
  c = M.get_config("")
  assert (c.peft.method, c.peft.r, c.peft.lora_alpha) == ("lora", 512, 512)   # Table 1's best
  c = M.get_config("lora,tiny")
  assert c.peft.lora_alpha == c.peft.r == 4
  _, state, _ = _dry_run("lora,r8")
  assert state.method.scaling(state.hparams) == 1.0
  _, state, _ = _dry_run("lora,r8,alpha512")
  assert state.method.scaling(state.hparams) == 64.0
  with pytest.raises(ValueError, match=r"need the method lora, not 'adapter'"):
    M.get_config("adapter,r8")


# ----------------------------------------------------------------------------- configs/tulu.py

def _tulu_jsonl(path, n=20):
  rows = []
  for i in range(n):
    msgs = [{"role": "user", "content": f"Say the number {i}."},
            {"role": "assistant", "content": f"The number is {i}."}]
    if i % 2:
      msgs = [{"role": "system", "content": "Answer briefly."}] + msgs + [
          {"role": "user", "content": "And the next one?"},
          {"role": "assistant", "content": f"It is {i + 1}."}]
    rows.append({"dataset": "toy", "id": f"c{i}", "messages": msgs})
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return rows


@pytest.mark.slow          # an end-to-end run: 30-50 s on a shared 2-core machine
@pytest.mark.shared_data
def test_tulu_tiny_default_data_trains_and_evaluates(shared_data, tmp_path, monkeypatch):
  """configs/tulu.py:lora,tiny with its default data settings (only the path given): the
  validation split is carved from the mixture, training and evaluation run, and the ids
  generation is prompted with are the ids training puts before each answer."""
  import peft_jax.decoding as decoding
  from peft_jax.data.tulu import tokenize_rows
  from peft_jax.trainer import Trainer
  spec = importlib.util.spec_from_file_location("cfg_tulu_seed000",
                                                os.path.join(REPO, "configs", "tulu.py"))
  tulu = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tulu)
  monkeypatch.setenv("PEFT_JAX_DATA_DIR", str(shared_data))
  data = tmp_path / "tulu_mix.jsonl"
  _tulu_jsonl(data)
  c = tulu.get_config("lora,tiny")
  assert c.data.eval_split == "validation" and c.data.validation_size == 4
  assert tulu.get_config("lora").data.validation_size == 1000
  c.data.path = str(data)
  prompts = []
  real = decoding.generate

  def spy(model, params, arr, mask, **kw):
    prompts.extend([list(a[m.astype(bool)]) for a, m in zip(arr, mask)])
    return real(model, params, arr, mask, **kw)

  monkeypatch.setattr(decoding, "generate", spy)
  t = Trainer(c, str(tmp_path / "wd"))
  val_ids = {r["meta"]["id"] for r in t.val_rows}
  assert len(t.val_rows) == 4 and len(t.chat) == 16
  assert not val_ids & {r["meta"]["id"] for r in t.train_rows}
  res = t.train()
  assert res["steps"] == 3 and res["tuned"] is not None and (tmp_path / "wd" / "adapter").exists()
  # what training would train on for the validation conversations (the trainer's encoding)
  trained = list(tokenize_rows(t.tok, t.val_rows, max_length=c.data.max_source_len +
                               c.data.max_target_len))
  expected = []
  for e in trained:
    k = max(i for i, m in enumerate(e["loss_mask"]) if not m) + 1    # where the answer starts
    expected.append(e["input_ids"][:k])
  assert expected[0][0] == t.tok.bos_token_id
  assert prompts[:4] == expected                 # the untuned evaluation's prompts
  assert prompts[-4:] == expected                # the final evaluation's
  # the evaluation loss sees the training sequence: prompt + answer (+ EOS)
  for i, e in enumerate(trained):
    assert t.val_enc.source[i] + t.val_enc.target[i] == e["input_ids"]
