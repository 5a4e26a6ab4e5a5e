"""HF PEFT adapters whose ``target_modules`` regex picks different layers for different
modules (and mixes them with the unstacked head) import through a per-module
``layers_to_transform`` ({module path: [layers] | 'all'}), with HF PEFT's logits; our
export of such a selection loads back in HF PEFT with the same logits; our own configs
can state it directly, with trainable counts equal to HF PEFT's."""
import json
import warnings

import jax
import numpy as np
import pytest

from tiny_hf import loaded

hfpeft = pytest.importorskip("peft")

from test_hf_peft_import_strict import TOL, hf_adapter, imported_matches, task  # noqa: E402
from test_peft_hf_parity import fresh_torch, hf_logits, our_logits, randomize  # noqa: E402
from peft_jax import peft  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REGEX = {
    # q in layer 0, v in layer 1, and the head (LLaMA); T5: encoder q in block 0, decoder
    # cross-attention v in block 1, encoder FFN wo everywhere
    "llama_gqa": r".*layers\.0\.self_attn\.q_proj|.*layers\.1\.self_attn\.v_proj|lm_head",
    "t5_v11": (r".*encoder\.block\.0\.layer\.0\.SelfAttention\.q|"
               r".*decoder\.block\.1\.layer\.1\.EncDecAttention\.v|"
               r".*encoder\.block\.\d+\.layer\.1\.DenseReluDense\.wo"),
}
EXPECTED = {
    "llama_gqa": {"layers/attn/q": [0], "layers/attn/v": [1], "lm_head": "all"},
    "t5_v11": {"encoder/layers/attn/q": [0], "decoder/layers/cross_attn/v": [1],
               "encoder/layers/mlp/wo": "all"},
}


@pytest.mark.parametrize("kind", sorted(REGEX))
def test_import_regex_with_per_module_layers(kind, tmp_path):
  pm, d = hf_adapter(kind, tmp_path, r=2, target_modules=REGEX[kind])
  state = imported_matches(kind, pm, d)
  assert state.hparams["layers_to_transform"] == EXPECTED[kind]
  assert peft.summary(state)["trainable_params"] == pm.get_nb_trainable_parameters()[0]
  # and back: our export of the imported adapter loads in HF PEFT with the same logits
  _, _, cfg, base = loaded(kind)
  _, params = peft.import_hf_peft(d, cfg, base)
  peft.export_hf_peft(state, params, str(tmp_path / "ours"))
  back = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(hf_logits(kind, back), hf_logits(kind, pm), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", sorted(REGEX))
def test_our_per_module_selection_counts_and_exports(kind, tmp_path):
  _, _, cfg, base = loaded(kind)
  mods = sorted(EXPECTED[kind])
  hp = {"r": 2, "lora_alpha": 4, "target_modules": "(" + "|".join(mods) + ")",
        "layers_to_transform": dict(EXPECTED[kind])}
  state = peft.apply_peft(cfg, base, "lora", hp, jax.random.PRNGKey(0))
  params = randomize(state, state.params)
  hc = hfpeft.LoraConfig(task_type=task(kind), r=2, lora_alpha=4, target_modules=REGEX[kind])
  n_hf = hfpeft.get_peft_model(fresh_torch(kind), hc).get_nb_trainable_parameters()
  assert (peft.summary(state)["trainable_params"], peft.summary(state)["total_params"]) == n_hf
  peft.export_hf_peft(state, params, str(tmp_path / "ours"))
  pm = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(our_logits(kind, state, params), hf_logits(kind, pm), atol=TOL, rtol=0)
  # the unselected layers of a selected module stay exactly the base (A = B = 0, frozen)
  flat = peft.flatten(params)
  stacked = [m for m, v in EXPECTED[kind].items() if v != "all"]
  for m in stacked:
    sel = EXPECTED[kind][m]
    a = np.asarray(flat[f"{m}/lora_A"])
    others = [i for i in range(a.shape[0]) if i not in sel]
    assert others and not a[others].any() and a[sel].any()


def test_per_module_selection_errors():
  _, _, cfg, base = loaded("llama_gqa")
  bad = [({"layers/attn/q": [0], "nope": [1]}, "neither a stack"),
         ({"layers/attn/q": [7]}, "layer 7 is out of range"),
         ({"layers/attn/q": [0], "lm_head": [0]}, "outside the layer stack; select it with 'all'"),
         ({"layers/attn/q": "some"}, "is not layer indices")]
  for sel, match in bad:
    with pytest.raises(peft.PeftConfigError, match=match) as e:
      peft.apply_peft(cfg, base, "lora", {"target_modules": "q,lm_head",
                                          "layers_to_transform": sel}, jax.random.PRNGKey(0))
    assert "\n" not in str(e.value)
