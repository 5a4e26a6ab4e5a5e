"""LoKr's per-module ``rank_pattern`` / ``alpha_pattern`` against HF PEFT 0.21 (KronA's
mapping): HF-made adapters with noise on every weight import with logits within 1e-4, our
exports load in ``PeftModel.from_pretrained`` with equal logits, trainable counts equal."""
import warnings

import numpy as np
import pytest

from tiny_hf import loaded

hfpeft = pytest.importorskip("peft")

from test_peft_hf_parity import _hf_randomize, fresh_torch, hf_logits, our_logits, randomize  # noqa: E402
from peft_jax import peft  # noqa: E402
from peft_jax.peft import accounting  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4

CASES = {  # d_model 32 = 4 x 8: W2 [8, 8] is low-rank for r < 4, full from r = 4
    "llama_mha": dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={r"model\.layers\.1\.self_attn\.q_proj": 3, "v_proj": 6},
                      alpha_pattern={"down_proj": 10, r"model\.layers\.0\.self_attn\.q_proj": 7}),
    "t5_v10": dict(r=2, alpha=6, target_modules=["q", "v"],
                   rank_pattern={r"decoder\.block\.1\.layer\.1\.EncDecAttention\.q": 3},
                   alpha_pattern={"v": 2}),
    "t5_v11": dict(r=1, alpha=3, target_modules=["q", "wo"], decompose_both=True,
                   rank_pattern={"wo": 4}, alpha_pattern={r"encoder\.block\.0\..*\.q": 5}),
}


def task(kind):
  return "SEQ_2_SEQ_LM" if kind.startswith("t5") else "CAUSAL_LM"


@pytest.mark.parametrize("kind", sorted(CASES))
def test_lokr_patterns_both_ways(kind, tmp_path):
  conf = CASES[kind]
  _, _, cfg, base = loaded(kind)
  pm = hfpeft.get_peft_model(fresh_torch(kind), hfpeft.LoKrConfig(task_type=task(kind), **conf))
  _hf_randomize(pm)
  pm.eval()
  d = str(tmp_path / "hf")
  pm.save_pretrained(d)
  state, params = peft.import_hf_peft(d, cfg, base)
  assert state.hparams["rank_pattern"] == conf["rank_pattern"]
  theirs = hf_logits(kind, pm)
  np.testing.assert_allclose(our_logits(kind, state, params), theirs, atol=TOL, rtol=0)
  assert np.abs(theirs - hf_logits(kind, fresh_torch(kind))).max() > 1e-2
  n_hf = pm.get_nb_trainable_parameters()[0]
  assert accounting.count(state)["trainable_params"] == n_hf
  # ours -> HF
  hp = {k: v for k, v in conf.items()}
  ours = peft.apply_peft(cfg, base, "krona", hp)
  assert accounting.count(ours)["trainable_params"] == n_hf
  p = randomize(ours, ours.params, seed=5)
  peft.export_hf_peft(ours, p, str(tmp_path / "ours"))
  pm2 = hfpeft.PeftModel.from_pretrained(fresh_torch(kind), str(tmp_path / "ours")).eval()
  mine = our_logits(kind, ours, p)
  np.testing.assert_allclose(mine, hf_logits(kind, pm2), atol=TOL, rtol=0)
  assert np.abs(mine - hf_logits(kind, fresh_torch(kind))).max() > 1e-2


def test_mixed_factor_forms_refused():
  _, _, cfg, base = loaded("llama_mha")
  with pytest.raises(peft.PeftConfigError, match="need different factor forms") as e:
    peft.apply_peft(cfg, base, "krona", {"r": 2, "target_modules": ["q_proj"],
                                         "rank_pattern": {r"model\.layers\.1\.self_attn\.q_proj": 5}})
  assert "\n" not in str(e.value)
