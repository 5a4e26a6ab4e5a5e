"""Parity with Hugging Face PEFT on the tiny T5 / LLaMA models (fp32, logits within 1e-4).

Export: our random adapter weights -> adapter dir -> ``peft.PeftModel.from_pretrained``.
Import: HF PEFT model with random adapter weights -> ``save_pretrained`` -> our importer.
Counts: our trainable count == HF PEFT's ``get_nb_trainable_parameters``.

Each case uses the same configuration both ways, so the two directions share one
compiled forward.
"""
import copy
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tiny_hf import loaded

hfpeft = pytest.importorskip("peft")

from peft_jax import peft  # noqa: E402
from peft_jax.models import build_model  # noqa: E402
from peft_jax.peft.base import flatten, unflatten  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
TOL = 1e-4
KINDS = ("t5_v10", "t5_v11", "llama_mha", "llama_gqa")


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def fresh_torch(kind):
  return copy.deepcopy(loaded(kind)[0]).eval()


@functools.lru_cache(maxsize=None)
def _jitted(model):
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a))


def inputs(kind):
  r = np.random.default_rng(1)
  ids = r.integers(2, 128, (2, 7))
  mask = np.ones_like(ids)
  mask[1, 5:] = 0          # padding
  dec = r.integers(2, 128, (2, 5)) if kind.startswith("t5") else None
  return ids, mask, dec


def our_logits(kind, state, params):
  cfg = loaded(kind)[2]
  ids, mask, dec = inputs(kind)
  fn = _jitted(build_model(cfg, state.sites))
  args = [jnp.asarray(ids), jnp.asarray(mask)] + ([jnp.asarray(dec)] if dec is not None else [])
  return np.asarray(fn(state.prepare(params), *args))


def hf_logits(kind, pm):
  ids, mask, dec = inputs(kind)
  kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if dec is not None:
    kw["decoder_input_ids"] = torch.tensor(dec)
  with torch.no_grad():
    return pm(**kw).logits.numpy()


def randomize(state, params, seed=0, scale=0.1):
  """Non-trivial adapter values (LoRA B != 0; IA3 / LN / DoRA magnitudes around their init)."""
  rng = np.random.default_rng(seed)
  fl = flatten(params)
  for k in sorted(set(state.added) | set(state.made_trainable)):
    a = np.asarray(fl[k])
    noise = scale * rng.standard_normal(a.shape)
    if k.endswith(("ia3_l", "lora_magnitude", "/scale")):
      new = a + noise
    else:
      new = noise
    if k in state.update_masks:   # layers outside a layer selection keep their (identity) init
      new = np.where(state.update_masks[k], new, a)
    fl[k] = new.astype(a.dtype)
  cfg = state.model_cfg
  if state.method.name == "prefix_tuning" and cfg.model_type == "t5" and cfg.n_decoder_layers % 2 == 0:
    # HF's seq2seq prefix layout shares one prefix between decoder layers l and l + L/2
    L = cfg.n_decoder_layers
    for nm in ("prefix_key", "prefix_value"):
      k = f"decoder/layers/self_attn/{nm}"
      a = np.asarray(fl[k]).copy()
      a[L // 2:] = a[: L // 2]
      fl[k] = a
  return unflatten(fl)


def _hf_randomize(pm, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if p.requires_grad:
        noise = 0.1 * torch.randn(p.shape, generator=g)
        if "ia3_l" in n or "magnitude" in n or "ln_tuning" in n:
          p.add_(noise)
        else:
          p.copy_(noise)


# (our method, our hyperparameters, HF config factory) per case
def _cases(kind):
  t5 = kind.startswith("t5")
  task = "SEQ_2_SEQ_LM" if t5 else "CAUSAL_LM"
  pk = dict(token_dim=48, num_attention_heads=4, num_layers=3) if kind == "t5_v11" else {}
  qv = ["q", "v"] if t5 else ["q_proj", "v_proj"]
  return {
      "lora": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
               lambda: hfpeft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules="all-linear")),
      "lora_layers": ("lora", {"r": 2, "lora_alpha": 4, "use_rslora": True, "layers_to_transform": [1]},
                      lambda: hfpeft.LoraConfig(task_type=task, r=2, lora_alpha=4, use_rslora=True,
                                                target_modules=qv, layers_to_transform=[1])),
      # sub-layer + per-stack layer selection <-> an HF regex over exact module names
      "lora_sublayers": ("lora", {"r": 2, "target_modules": "all-linear", "last_k_layers": 2,
                                  "target_sublayers": ["cross_attn", "decoder_mlp"]},
                         lambda: hfpeft.LoraConfig(
                             task_type=task, r=2, lora_alpha=8,
                             target_modules=r"decoder\.block\.(1|2)\.layer\.(1\.EncDecAttention\.[qkvo]"
                                            r"|2\.DenseReluDense\.(wi_0|wi_1|wo))")),
      "dora": ("dora", {"r": 4, "lora_alpha": 8},
               lambda: hfpeft.LoraConfig(task_type=task, r=4, lora_alpha=8, use_dora=True)),
      "ia3": ("ia3", {}, lambda: hfpeft.IA3Config(task_type=task)),
      "ln_tuning": ("ln_tuning", {}, lambda: hfpeft.LNTuningConfig(task_type=task)),
      "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 3},
                        lambda: hfpeft.PromptTuningConfig(task_type=task, num_virtual_tokens=3)),
      "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 3},
                        lambda: hfpeft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3, **pk)),
      "prefix_projection": ("prefix_tuning", {"num_virtual_tokens": 3, "prefix_projection": True},
                            lambda: hfpeft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3,
                                                              prefix_projection=True, **pk)),
      # KronA <-> LoKr, AdaLoRA <-> ADALORA (full init_r tensors, no rank_pattern)
      "krona": ("krona", {"r": 4, "alpha": 8, "target_modules": qv},
                lambda: hfpeft.LoKrConfig(task_type=task, r=4, alpha=8, target_modules=qv)),
      "adalora": ("adalora", {"init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 8,
                              "target_modules": qv},
                  lambda: hfpeft.AdaLoraConfig(task_type=task, init_r=4, target_r=2, total_step=10,
                                               lora_alpha=8, target_modules=qv)),
  }


MAIN = ("lora", "dora", "ia3", "ln_tuning", "prompt_tuning", "prefix_tuning")
CASES = [(k, m) for k in KINDS for m in MAIN]
CASES += [("t5_v11", "lora_layers"), ("llama_gqa", "lora_layers"), ("t5_v11", "lora_sublayers"),
          ("t5_v11", "prefix_projection"), ("llama_gqa", "prefix_projection")]


LOGIT_CASES = CASES + [(k, m) for k in ("t5_v11", "llama_gqa") for m in ("krona", "adalora")]


@pytest.mark.parametrize("kind,case", LOGIT_CASES)
def test_hf_peft_logits_both_ways(kind, case, tmp_path):
  _, _, cfg, base = loaded(kind)
  method, hp, hf_cfg = _cases(kind)[case]
  base_logits = hf_logits(kind, fresh_torch(kind))

  # ours -> HF
  state = peft.apply_peft(cfg, base, method, hp, jax.random.PRNGKey(0))
  params = randomize(state, state.params)
  peft.export_hf_peft(state, params, str(tmp_path / "ours"))
  pm = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), str(tmp_path / "ours")).eval()
  ours, theirs = our_logits(kind, state, params), hf_logits(kind, pm)
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  assert np.abs(ours[:, -base_logits.shape[1]:] - base_logits).max() > 1e-2   # adapter is active

  # HF -> ours
  pm = hfpeft.get_peft_model(fresh_torch(kind), hf_cfg())
  _hf_randomize(pm)
  pm.eval()
  pm.save_pretrained(str(tmp_path / "hf"))
  state2, params2 = peft.import_hf_peft(str(tmp_path / "hf"), cfg, base)
  assert state2.method.name == method
  theirs = hf_logits(kind, pm)
  np.testing.assert_allclose(our_logits(kind, state2, params2), theirs, atol=TOL, rtol=0)
  assert np.abs(theirs[:, -base_logits.shape[1]:] - base_logits).max() > 1e-2


@pytest.mark.parametrize("kind,case", CASES)
def test_trainable_count_equals_hf(kind, case):
  cfg = loaded(kind)[2]
  method, hp, hf_cfg = _cases(kind)[case]
  hc = hf_cfg()
  if case == "prompt_tuning" and kind.startswith("t5"):
    # HF's seq2seq default allocates 2 * num_virtual_tokens rows and only ever uses the first half
    hc.num_transformer_submodules = 1
  hf_trainable, hf_all = hfpeft.get_peft_model(fresh_torch(kind), hc).get_nb_trainable_parameters()
  info = peft.describe(cfg, method, hp)
  assert info["trainable_params"] == hf_trainable
  if case == "ln_tuning":   # HF keeps a frozen copy of every tuned norm
    assert info["total_params"] + info["trainable_params"] == hf_all
  else:
    assert info["total_params"] == hf_all
    assert info["trainable_percent"] == pytest.approx(100.0 * hf_trainable / hf_all, rel=1e-9)


@pytest.mark.parametrize("kind", ["t5_v11", "llama_gqa"])
def test_full_and_bitfit_counts_match_torch_model(kind):
  cfg = loaded(kind)[2]
  tm = fresh_torch(kind)
  n_all = sum(p.numel() for p in tm.parameters())
  assert peft.describe(cfg, "full")["trainable_params"] == n_all
  # BitFit (HF PEFT has none): one bias per output feature of every attention/FFN linear
  n_bias = sum(mod.out_features for name, mod in tm.named_modules()
               if isinstance(mod, torch.nn.Linear) and "lm_head" not in name)
  info = peft.describe(cfg, "bitfit")
  assert info["trainable_params"] == n_bias
  assert info["total_params"] == n_all + n_bias


def test_t5_prefix_export_refuses_untied_even_layers(tmp_path):
  """HF's seq2seq prefix layout ties decoder layers l and l + L/2 (t5_v10 has L=2)."""
  _, _, cfg, base = loaded("t5_v10")
  state = peft.apply_peft(cfg, base, "prefix_tuning", {"num_virtual_tokens": 2})
  with pytest.raises(peft.PeftConfigError, match="same prefix"):
    peft.export_hf_peft(state, state.params, str(tmp_path))


def test_t5_prefix_shift_matters():
  """The HF-compatible placement differs from 'none' positions (the bias on prefix keys)."""
  _, _, cfg, base = loaded("t5_v11")
  a = peft.apply_peft(cfg, base, "prefix_tuning", {"num_virtual_tokens": 3})
  b = peft.apply_peft(cfg, base, "prefix_tuning", {"num_virtual_tokens": 3, "prefix_positions": "none"})
  pa = randomize(a, a.params)
  assert np.abs(our_logits("t5_v11", a, pa) - our_logits("t5_v11", b, pa)).max() > 1e-4
