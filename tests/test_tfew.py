"""T-Few's LoRALinear (method ``tfew``) against its formula on the same weights: the
adapted layer equals a plain linear layer whose kernel is T-Few's
``W * (multi_lora_b @ multi_lora_a) / scaling_rank + lora_b @ lora_a / rank`` (torch
layout ``[out, in]``), computed independently in NumPy, for scaling ranks 1 and 2."""
import jax
import numpy as np
import pytest

from peft_jax import peft
from peft_jax.models import build_model, get_preset, init_params
from peft_jax.peft.base import flatten, unflatten


@pytest.mark.parametrize("r,s", [(2, 1), (3, 2)])
def test_tfew_equals_tfew_formula(r, s):
  cfg = get_preset("t5-v1_1-tiny").replace(dropout_rate=0.0)
  params = init_params(cfg, jax.random.PRNGKey(0))
  state = peft.apply_peft(cfg, params, "tfew", {"r": r, "scaling_rank": s, "init_scale": 0.01,
                                                 "target_modules": "q,v,wi_1"})
  rng = np.random.default_rng(0)
  flat = {k: (np.asarray(v) + rng.normal(0, 0.3, v.shape).astype(np.float32)
              if k.rsplit("/", 1)[-1].startswith("tfew_") else np.asarray(v))
          for k, v in flatten(state.params).items()}
  # the reference: the base model with T-Few's effective kernel, no method
  ref = dict(flatten(params))
  for p in sorted({k.rsplit("/", 1)[0] for k in flat if "/tfew_" in k}):
    w = np.asarray(ref[f"{p}/kernel"], np.float64)               # [L, in, out]
    torch_w = np.swapaxes(w, -1, -2)                              # [L, out, in]
    if f"{p}/tfew_scale_in" in flat:
      ma = np.asarray(flat[f"{p}/tfew_scale_in"], np.float64)     # [L, s, in]   multi_lora_a
      mb = np.swapaxes(np.asarray(flat[f"{p}/tfew_scale_out"], np.float64), -1, -2)  # [L, out, s]
      torch_w = torch_w * (mb @ ma) / s
    if f"{p}/tfew_lora_a" in flat:
      la = np.swapaxes(np.asarray(flat[f"{p}/tfew_lora_a"], np.float64), -1, -2)  # [L, r, in]
      lb = np.swapaxes(np.asarray(flat[f"{p}/tfew_lora_b"], np.float64), -1, -2)  # [L, out, r]
      torch_w = torch_w + lb @ la / r
    ref[f"{p}/kernel"] = np.swapaxes(torch_w, -1, -2).astype(np.float32)
  x = rng.integers(2, cfg.vocab_size, (2, 7)).astype(np.int32)
  dec = rng.integers(2, cfg.vocab_size, (2, 5)).astype(np.int32)
  mask = np.ones_like(x)
  ours = build_model(cfg, state.sites).apply({"params": state.prepare(unflatten(flat))}, x, mask, dec)
  plain = build_model(cfg).apply({"params": unflatten(ref)}, x, mask, dec)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), atol=2e-5, rtol=1e-4)
  # and merge folds exactly that kernel
  merged = flatten(peft.merge(state, unflatten(flat)))
  for k, v in ref.items():
    if k.endswith("/kernel") and k.rsplit("/", 1)[0] + "/tfew_scale_in" in flat:
      np.testing.assert_allclose(np.asarray(merged[k]), v, atol=1e-6)


def test_tfew_rejects_nothing_to_adapt():
  cfg = get_preset("t5-v1_1-tiny")
  with pytest.raises(peft.PeftConfigError, match="adapt nothing"):
    peft.describe(cfg, "tfew", {"r": 0, "scaling_rank": 0})
