"""AdaLoRA's pruned rank state against HF PEFT 0.21: adapters HF pruned with its own
``update_and_allocate`` (or given a hand-set ``rank_pattern``), with noise on every weight,
import with logits within 1e-4 of HF's reloaded adapter; our pruned state exports with a
``rank_pattern`` and cut tensors that ``PeftModel.from_pretrained`` loads with equal logits."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from tiny_hf import loaded

hfpeft = pytest.importorskip("peft")

from test_peft_hf_parity import _hf_randomize, fresh_torch, hf_logits, our_logits, randomize  # noqa: E402
from peft_jax import peft  # noqa: E402
from peft_jax.peft.base import flatten, unflatten  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4


def task(kind):
  return "SEQ_2_SEQ_LM" if kind.startswith("t5") else "CAUSAL_LM"


def hf_adalora(kind, **kw):
  conf = dict(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1, lora_alpha=32)
  conf.update(kw)
  return hfpeft.get_peft_model(fresh_torch(kind), hfpeft.AdaLoraConfig(task_type=task(kind), **conf))


def hf_prune(kind, pm, steps=6):
  """HF's own training loop with ``update_and_allocate`` (rank pruning) after each step."""
  pm.train()
  opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(2, 128, (2, 8), generator=g)
  for step in range(steps):
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    pm.base_model.update_and_allocate(step)
    opt.zero_grad()
  pm.eval()


def import_matches_reloaded(kind, pm, tmp_path):
  """Saves ``pm``, reloads it in HF (the reference: HF resizes by rank_pattern on load) and
  imports it here."""
  d = str(tmp_path / "hf")
  pm.save_pretrained(d)
  ref = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), d).eval()
  _, _, cfg, base = loaded(kind)
  state, params = peft.import_hf_peft(d, cfg, base)
  theirs = hf_logits(kind, ref)
  np.testing.assert_allclose(our_logits(kind, state, params), theirs, atol=TOL, rtol=0)
  assert np.abs(theirs - hf_logits(kind, fresh_torch(kind))).max() > 1e-2   # adapter is active
  return d, state, params


@pytest.mark.parametrize("kind,tm", [("llama_mha", ["q_proj", "v_proj"]), ("t5_v10", ["q", "v", "wo"])])
def test_hf_pruned_adapter_imports(kind, tm, tmp_path):
  pm = hf_adalora(kind, target_modules=tm)
  hf_prune(kind, pm)
  pattern = pm.peft_config["default"].rank_pattern
  assert pattern and any(not all(v) for v in pattern.values())
  _hf_randomize(pm, seed=3)      # noise on every weight (the kept ranks are what is saved)
  d, state, params = import_matches_reloaded(kind, pm, tmp_path)
  conf = json.load(open(os.path.join(d, "adapter_config.json")))
  assert conf["rank_pattern"] and any(not all(v) for v in conf["rank_pattern"].values())
  # the pruned ranks are zeros in our full init_r leaves
  fl = flatten(params)
  nonzero = sum(int((np.asarray(v) != 0).sum()) for k, v in fl.items() if k.endswith("adalora_E"))
  assert nonzero == sum(sum(v) for v in conf["rank_pattern"].values())


def test_hand_set_rank_pattern_imports(tmp_path):
  """A rank_pattern set by hand, one module cut to rank 0."""
  kind = "llama_gqa"
  pm = hf_adalora(kind, target_modules=["q_proj", "v_proj", "down_proj"])
  _hf_randomize(pm, seed=4)
  pm.peft_config["default"].rank_pattern = {
      "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False],
      "model.layers.1.self_attn.v_proj.lora_E": [False, False, False, False],
      "model.layers.1.mlp.down_proj.lora_E": [False, True, True, True],
  }
  d, _, _ = import_matches_reloaded(kind, pm, tmp_path)
  from safetensors.numpy import load_file
  t = load_file(os.path.join(d, "adapter_model.safetensors"))
  assert t["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape == (2, 32)
  assert t["base_model.model.model.layers.1.self_attn.v_proj.lora_E"].shape == (0, 1)


@pytest.mark.parametrize("kind", ["llama_mha", "t5_v10"])
def test_pruned_state_exports_with_rank_pattern(kind, tmp_path):
  _, _, cfg, base = loaded(kind)
  state = peft.apply_peft(cfg, base, "adalora", {"init_r": 4, "target_r": 2, "total_step": 6})
  params = randomize(state, state.params, seed=2)
  fl = flatten(params)
  mods = sorted(k for k in fl if k.endswith("/adalora_E"))
  rng = np.random.default_rng(0)
  for i, k in enumerate(mods):     # prune: some lambdas zero, one layer of one module entirely
    e = np.asarray(fl[k]).copy()
    e[rng.random(e.shape) < 0.5] = 0.0
    if i == 0:
      e[0] = 0.0
    fl[k] = e
  params = unflatten(fl)
  d = str(tmp_path / "ours")
  peft.export_hf_peft(state, params, d)
  conf = json.load(open(os.path.join(d, "adapter_config.json")))
  rp = conf["rank_pattern"]
  assert rp and any(not any(v) for v in rp.values()) and any(any(v) for v in rp.values())
  pm = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), d).eval()
  ours = our_logits(kind, state, params)
  np.testing.assert_allclose(ours, hf_logits(kind, pm), atol=TOL, rtol=0)
  assert np.abs(ours - hf_logits(kind, fresh_torch(kind))).max() > 1e-2
  st2, p2 = peft.import_hf_peft(d, cfg, base)        # and back
  np.testing.assert_allclose(our_logits(kind, st2, p2), ours, atol=1e-6, rtol=0)


def test_unpruned_state_exports_without_rank_pattern(tmp_path):
  _, _, cfg, base = loaded("llama_mha")
  state = peft.apply_peft(cfg, base, "adalora", {"init_r": 4, "target_r": 2, "total_step": 6})
  peft.export_hf_peft(state, state.params, str(tmp_path / "a"))     # E = 0 at init
  assert json.load(open(tmp_path / "a" / "adapter_config.json"))["rank_pattern"] is None
  peft.export_hf_peft(state, randomize(state, state.params), str(tmp_path / "b"))
  assert json.load(open(tmp_path / "b" / "adapter_config.json"))["rank_pattern"] is None


@pytest.mark.parametrize("edit,match", [
    (lambda rp, k: rp.update({k: rp[k][:3]}), "must be a list of 4 booleans"),
    (lambda rp, k: rp.update({k: [True] * 4}), "has rank 2; its rank_pattern keeps 4"),
    (lambda rp, k: rp.update({"model.layers.0.mlp.up_proj.lora_E": [True] * 4}), "has no tensor"),
])
def test_bad_rank_pattern_refused(edit, match, tmp_path):
  pm = hf_adalora("llama_mha", target_modules=["q_proj"])
  _hf_randomize(pm)
  k = "model.layers.0.self_attn.q_proj.lora_E"
  pm.peft_config["default"].rank_pattern = {k: [True, True, False, False]}
  d = str(tmp_path / "hf")
  pm.save_pretrained(d)
  f = os.path.join(d, "adapter_config.json")
  conf = json.load(open(f))
  edit(conf["rank_pattern"], k)
  json.dump(conf, open(f, "w"))
  _, _, cfg, base = loaded("llama_mha")
  with pytest.raises(peft.PeftConfigError, match=match) as e:
    peft.import_hf_peft(d, cfg, base)
  assert "\n" not in str(e.value)
