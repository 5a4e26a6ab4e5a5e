"""``modules_to_save`` (every method) and LoRA on T5 v1.0's tied ``lm_head``, against HF PEFT
0.21 on the tiny T5 / LLaMA models: HF PEFT-made adapters with noise on every trained weight
import with logits within 1e-4, our exports load in ``PeftModel.from_pretrained`` with equal
logits, trainable counts equal HF PEFT's, a saved module trains while the rest stays frozen,
and adapter checkpoints keep the trained copies."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tiny_hf import loaded

hfpeft = pytest.importorskip("peft")

from test_peft_hf_parity import _hf_randomize, fresh_torch, hf_logits, our_logits, randomize  # noqa: E402
from peft_jax import peft  # noqa: E402
from peft_jax.peft import accounting  # noqa: E402
from peft_jax.peft.base import flatten, unflatten  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4


def task(kind):
  return "SEQ_2_SEQ_LM" if kind.startswith("t5") else "CAUSAL_LM"


def hf_model(kind, conf_cls=None, **kw):
  conf_cls = conf_cls or hfpeft.LoraConfig
  pm = hfpeft.get_peft_model(fresh_torch(kind), conf_cls(task_type=task(kind), **kw))
  _hf_randomize(pm)
  return pm.eval()


def hf_trainable(pm):
  return pm.get_nb_trainable_parameters()[0]


def import_matches(kind, pm, tmp_path):
  _, _, cfg, base = loaded(kind)
  d = str(tmp_path / "hf")
  pm.save_pretrained(d)
  state, params = peft.import_hf_peft(d, cfg, base)
  theirs = hf_logits(kind, pm)
  np.testing.assert_allclose(our_logits(kind, state, params), theirs, atol=TOL, rtol=0)
  assert np.abs(theirs - hf_logits(kind, fresh_torch(kind))).max() > 1e-2   # adapter is active
  return state, params


def noisy(state, params, seed=1):
  """``randomize`` plus noise on the fully trained modules."""
  params = randomize(state, params, seed)
  fl = flatten(params)
  rng = np.random.default_rng(seed)
  for k in state.saved:
    a = np.asarray(fl[k])
    new = a + 0.1 * rng.standard_normal(a.shape)
    if k in state.update_masks:     # layers a name leaves out stay the base weights
      new = np.where(state.update_masks[k], new, a)
    fl[k] = new.astype(a.dtype)
  return unflatten(fl)


def export_matches(kind, state, params, tmp_path):
  d = str(tmp_path / "ours")
  peft.export_hf_peft(state, params, d)
  pm = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), d).eval()
  ours, theirs = our_logits(kind, state, params), hf_logits(kind, pm)
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  assert np.abs(theirs - hf_logits(kind, fresh_torch(kind))).max() > 1e-2
  return pm


CASES = [  # (kind, LoRA targets, modules_to_save as HF names it)
    ("t5_v10", ["q", "v"], ["lm_head"]),                       # the tied head: an untied copy
    ("t5_v11", ["q", "v"], ["lm_head", "final_layer_norm"]),   # both stacks' final norms
    ("llama_mha", ["q_proj", "v_proj"], ["lm_head", "model.norm"]),
    ("llama_gqa", ["q_proj"], ["model.layers.1.mlp.down_proj"]),  # one layer of a stacked leaf
]


@pytest.mark.parametrize("kind,tm,mts", CASES)
def test_lora_modules_to_save_both_ways(kind, tm, mts, tmp_path):
  _, _, cfg, base = loaded(kind)
  pm = hf_model(kind, r=2, lora_alpha=4, target_modules=tm, modules_to_save=mts)
  state, params = import_matches(kind, pm, tmp_path)
  assert state.saved and state.hparams["modules_to_save"] == mts
  assert accounting.count(state)["trainable_params"] == hf_trainable(pm)
  # ours (same config through our own names) -> HF
  ours = peft.apply_peft(cfg, base, "lora", {"r": 2, "lora_alpha": 4, "target_modules": tm,
                                               "modules_to_save": mts})
  assert ours.saved == state.saved
  assert accounting.count(ours)["trainable_params"] == hf_trainable(pm)
  export_matches(kind, ours, noisy(ours, ours.params), tmp_path)


def test_untied_embedding_copy_imports(tmp_path):
  """LLaMA's untied embed_tokens: HF's trained copy is the model's embedding."""
  pm = hf_model("llama_mha", r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
  state, _ = import_matches("llama_mha", pm, tmp_path)
  assert state.saved == ("embed/embedding",)
  assert accounting.count(state)["trainable_params"] == hf_trainable(pm)


def test_our_paths_and_regex_name_the_same_modules():
  _, _, cfg, base = loaded("llama_mha")
  a = peft.apply_peft(cfg, base, "lora", {"modules_to_save": ["lm_head", "final_norm"]})
  b = peft.apply_peft(cfg, base, "lora", {"modules_to_save": "(lm_head|final_norm)"})
  c = peft.apply_peft(cfg, base, "lora", {"modules_to_save": ["lm_head", "model.norm"]})
  assert a.saved == b.saved == c.saved == ("final_norm/scale", "lm_head/kernel")


@pytest.mark.parametrize("kind,tm", [("t5_v10", ["q", "lm_head"]), ("llama_gqa", ["v_proj", "lm_head"])])
def test_lora_on_the_head_both_ways(kind, tm, tmp_path):
  """T5 v1.0's head is tied (HF's lm_head Linear shares the embedding, after the
  d_model**-0.5 rescale); HF saves lm_head.base_layer.weight beside it, which must be ours."""
  _, _, cfg, base = loaded(kind)
  pm = hf_model(kind, r=2, lora_alpha=4, target_modules=tm)
  state, params = import_matches(kind, pm, tmp_path)
  assert "lm_head/lora_A" in flatten(params)
  assert accounting.count(state)["trainable_params"] == hf_trainable(pm)
  ours = peft.apply_peft(cfg, base, "lora", {"r": 2, "lora_alpha": 4, "target_modules": tm})
  assert accounting.count(ours)["trainable_params"] == hf_trainable(pm)
  export_matches(kind, ours, noisy(ours, ours.params), tmp_path)


def test_tied_head_lora_refuses_merge_and_dora():
  _, _, cfg, base = loaded("t5_v10")
  state = peft.apply_peft(cfg, base, "lora", {"target_modules": ["lm_head"]})
  with pytest.raises(peft.PeftConfigError, match="tied lm_head cannot be merged"):
    state.method.merge(cfg, state.hparams, flatten(state.params))
  with pytest.raises(peft.PeftConfigError, match="DoRA on the tied lm_head"):
    peft.apply_peft(cfg, base, "dora", {"target_modules": ["lm_head"]})


def test_merge_keeps_saved_modules(tmp_path):
  """Merged LoRA + a saved module computes the adapted model; the tied head's untied copy
  has no place in a plain tied base tree (one line), plain=False keeps it."""
  from peft_jax.models import build_model
  _, _, cfg, base = loaded("llama_mha")
  state = peft.apply_peft(cfg, base, "lora", {"r": 2, "modules_to_save": ["lm_head", "model.norm"]})
  params = noisy(state, state.params)
  merged = peft.merge(state, params)
  plain = peft.apply_peft(cfg, merged, "full")     # a model without sites on the merged tree
  assert build_model(cfg, plain.sites) is not None
  np.testing.assert_allclose(our_logits("llama_mha", plain, merged),
                             our_logits("llama_mha", state, params), atol=1e-5)
  _, _, cfg5, base5 = loaded("t5_v10")
  st5 = peft.apply_peft(cfg5, base5, "lora", {"r": 2, "modules_to_save": ["lm_head"]})
  with pytest.raises(peft.PeftConfigError, match="untied trained copy of the tied head"):
    peft.merge(st5, st5.params)
  assert "lm_head/kernel" in flatten(peft.merge(st5, st5.params, plain=False))


def test_foreign_base_layer_weight_refused(tmp_path):
  from safetensors.numpy import load_file, save_file
  import os
  pm = hf_model("t5_v10", r=2, target_modules=["lm_head"])
  d = str(tmp_path / "hf")
  pm.save_pretrained(d)
  f = os.path.join(d, "adapter_model.safetensors")
  t = load_file(f)
  t["base_model.model.lm_head.base_layer.weight"] = t["base_model.model.lm_head.base_layer.weight"] + 1
  save_file(t, f)
  _, _, cfg, base = loaded("t5_v10")
  with pytest.raises(peft.PeftConfigError, match="lm_head.base_layer.weight is a base weight"):
    peft.import_hf_peft(d, cfg, base)


@pytest.mark.parametrize("kind,mts", [("t5_v10", ["lm_head"]), ("llama_gqa", ["model.layers.1.mlp.down_proj"])])
def test_saved_module_trains_and_the_rest_stays_frozen(kind, mts):
  from steps import train_step
  from peft_jax.models import build_model
  _, _, cfg, base = loaded(kind)
  state = peft.apply_peft(cfg, base, "lora", {"r": 2, "modules_to_save": mts})
  model = build_model(cfg, state.sites)
  r = np.random.default_rng(0)
  ids = jnp.asarray(r.integers(2, 128, (2, 6)))
  args = (ids, jnp.ones_like(ids)) + ((ids,) if kind.startswith("t5") else ())

  def loss_fn(params):
    logits = model.apply({"params": state.prepare(params)}, *args)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  opt, step = train_step(state, loss_fn, optax.sgd(0.1))
  p0 = state.params
  p1, _, _ = step(p0, opt.init(p0))
  f0, f1 = flatten(p0), flatten(p1)
  changed = {k for k in f0 if not np.array_equal(np.asarray(f0[k]), np.asarray(f1[k]))}
  assert set(state.saved) <= changed
  assert changed <= set(state.saved) | set(state.added)       # base weights stay frozen
  if kind == "llama_gqa":   # only layer 1 of the stacked down projection trains
    k = "layers/mlp/down/kernel"
    assert np.array_equal(np.asarray(f0[k][0]), np.asarray(f1[k][0]))
    assert not np.array_equal(np.asarray(f0[k][1]), np.asarray(f1[k][1]))
  else:                     # the tied copy trains, the shared embedding does not
    assert np.array_equal(np.asarray(f0["shared/embedding"]), np.asarray(f1["shared/embedding"]))


@pytest.mark.parametrize("kind", ["t5_v10", "llama_gqa"])
def test_adapter_checkpoint_keeps_saved_modules(kind, tmp_path):
  _, _, cfg, base = loaded(kind)
  state = peft.apply_peft(cfg, base, "lora", {"r": 2, "modules_to_save": ["lm_head"]})
  params = noisy(state, state.params)
  peft.save_adapter(state, params, str(tmp_path / "a"))
  st2, p2 = peft.load_adapter(str(tmp_path / "a"), cfg, base)
  assert st2.saved == state.saved == ("lm_head/kernel",)
  np.testing.assert_array_equal(np.asarray(flatten(p2)["lm_head/kernel"]),
                                np.asarray(flatten(params)["lm_head/kernel"]))
  np.testing.assert_allclose(our_logits(kind, st2, p2), our_logits(kind, state, params), atol=1e-6)


@pytest.mark.parametrize("kind,conf_cls,kw,method", [
    ("llama_mha", "IA3Config", {}, "ia3"),
    ("t5_v10", "LoKrConfig", dict(r=2, target_modules=["q", "v"]), "krona"),
    ("llama_gqa", "LNTuningConfig", {}, "ln_tuning"),
    ("t5_v11", "AdaLoraConfig", dict(init_r=2, target_r=1, total_step=5, target_modules=["q"]),
     "adalora"),
])
def test_other_methods_carry_modules_to_save(kind, conf_cls, kw, method, tmp_path):
  """The mapping is method-independent: every mapped method carries modules_to_save."""
  _, _, cfg, base = loaded(kind)
  pm = hf_model(kind, getattr(hfpeft, conf_cls), modules_to_save=["lm_head"], **kw)
  state, params = import_matches(kind, pm, tmp_path)
  assert state.method.name == method and state.saved == ("lm_head/kernel",)
  assert accounting.count(state)["trainable_params"] == hf_trainable(pm)
  export_matches(kind, state, params, tmp_path)     # and back, the same weights


@pytest.mark.parametrize("mts,match", [
    (["mlp"], "a module holding other modules"),
    (["nonexistent"], "matches no module"),
    (["q_proj"], "also adapted by the method"),
    (["shared"], "shared embedding is read by no layer"),
    (["embed_tokens"], "with a tied head"),
])
def test_bad_modules_to_save_refused(mts, match):
  kind = {"shared": "t5_v11", "embed_tokens": "qwen2"}.get(mts[0], "llama_mha")
  _, _, cfg, base = loaded(kind)
  with pytest.raises(peft.PeftConfigError, match=match) as e:
    peft.apply_peft(cfg, base, "lora", {"target_modules": ["q_proj"] if kind != "t5_v11" else ["q"],
                                        "modules_to_save": mts})
  assert "\n" not in str(e.value)
