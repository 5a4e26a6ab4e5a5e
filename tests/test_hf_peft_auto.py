"""An HF PEFT export of a run on a Hugging Face checkpoint names that checkpoint
(``base_model_name_or_path``), so ``AutoPeftModelForCausalLM`` /
``AutoPeftModelForSeq2SeqLM`` open the directory alone, with our logits."""
import json
import os

import jax
import numpy as np
import pytest

hfpeft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from tiny_hf import saved_hf_model  # noqa: E402
from peft_jax import peft  # noqa: E402
from peft_jax.builder import build  # noqa: E402
from peft_jax.models import family_of  # noqa: E402
from peft_jax.peft.base import flatten, unflatten  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(kind, method):
  _, base_dir = saved_hf_model(kind)
  built = build({"model": {"checkpoint": base_dir}, "data": {"name": "quickstart"},
                 "peft": method}, with_weights=True)
  state = built.state
  flat = dict(flatten(state.params))
  keys = jax.random.split(jax.random.PRNGKey(1), len(state.added))
  for k, key in zip(sorted(state.added), keys):     # noise on every adapter weight
    flat[k] = flat[k] + 0.1 * jax.random.normal(key, flat[k].shape, flat[k].dtype)
  return built, base_dir, unflatten(flat)


@pytest.mark.parametrize("kind,auto", [("llama_gqa", "AutoPeftModelForCausalLM"),
                                       ("t5_v11", "AutoPeftModelForSeq2SeqLM")])
@pytest.mark.parametrize("method", [{"method": "lora", "r": 4, "target_modules": "q,v"},
                                    {"method": "ia3"}], ids=["lora", "ia3"])
def test_auto_peft_model_opens_the_export(kind, auto, method, tmp_path):
  built, base_dir, params = _run(kind, method)
  out = peft.export_hf_peft(built.state, params, str(tmp_path / "hf"))
  conf = json.load(open(os.path.join(out, "adapter_config.json")))
  assert conf["base_model_name_or_path"] == os.path.abspath(base_dir)
  model = getattr(hfpeft, auto).from_pretrained(out).eval()
  ids = np.array([[5, 17, 33, 9, 70, 21, 3], [44, 12, 8, 6, 2, 9, 11]], np.int32)
  mask = np.ones_like(ids)
  fam = family_of(built.mc)
  batch = {"inputs": ids, "input_mask": mask, "decoder_inputs": ids[:, :5],
           "targets": ids[:, :5] if fam.layout == "seq2seq" else ids}
  ours = np.asarray(fam.logits(built.model, built.state.prepare(params), batch, True))
  with torch.no_grad():
    kw = {"decoder_input_ids": torch.tensor(ids[:, :5], dtype=torch.long)} if fam.layout == "seq2seq" else {}
    theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask), **kw).logits.float().numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-5)
  with torch.no_grad():                          # the adapter is active: not the base's logits
    base = model.get_base_model()
    with model.disable_adapter():
      plain = base(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask), **kw).logits.float().numpy()
  assert np.abs(plain - theirs).max() > 1e-2


def test_explicit_name_wins_and_presets_write_null(tmp_path):
  built, _, params = _run("llama_gqa", {"method": "lora", "r": 2})
  out = peft.export_hf_peft(built.state, params, str(tmp_path / "a"), base_model_name_or_path="org/base")
  assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == "org/base"
  preset = build({"model": {"name": "llama-tiny"}, "data": {"name": "quickstart"},
                  "peft": {"method": "lora", "r": 2}}, with_weights=True)
  out = peft.export_hf_peft(preset.state, preset.state.params, str(tmp_path / "b"))
  assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] is None
