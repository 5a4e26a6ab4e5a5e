"""Reference forward passes with AdapterHub (``adapters`` 1.3.0) for Compacter, Compacter++,
MAM and UniPELT. Runs inside ``.venv-adapters`` as a subprocess of
``tests/test_peft_compacter.py`` / ``tests/test_peft_mam_unipelt.py``; never imports peft_jax.

Usage: ``python tests/adapterhub_ref6.py WORKDIR``. ``WORKDIR/cases.json`` lists cases like
``tests/adapterhub_ref.py``'s, except that ``adapter_weights`` is an npz keyed by AdapterHub's
own parameter names (adapter name ``a``; the prefix pool's parameters as
``pool.prefix_tunings.a.<location>...``), which must name exactly AdapterHub's trainable
parameters after ``train_adapter``. LLaMA runs with eager attention (AdapterHub's prefix
concatenation relies on an explicit mask). Writes ``<id>.npz`` (``logits``, ``base_logits``)
and ``<id>.json`` (``trainable``, ``names``).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import adapters  # noqa: E402
import transformers  # noqa: E402

from adapterhub_ref import build  # noqa: E402

NAME = "a"


def canonical(name):
  if ".prefix_tuning.pool." in name:
    return "pool." + name.split(".prefix_tuning.pool.", 1)[1]
  return name


def run_case(case, workdir):
  model = build(case)
  if case["model_type"] == "llama":
    model.config._attn_implementation = "eager"
  adapters.init(model)
  model.add_adapter(NAME, config=getattr(adapters, case["adapter_class"])(**case["adapter_kwargs"]))
  model.train_adapter(NAME)
  params = {canonical(n): p for n, p in model.named_parameters() if p.requires_grad}
  trainable = sum(p.numel() for p in params.values())
  w = dict(np.load(case["adapter_weights"]))
  missing, extra = sorted(set(params) - set(w)), sorted(set(w) - set(params))
  if missing or extra:
    raise RuntimeError(f"{case['id']}: parameter names differ: AdapterHub has but test lacks "
                       f"{missing[:8]}, test has but AdapterHub lacks {extra[:8]}")
  with torch.no_grad():
    for n, p in params.items():
      v = torch.from_numpy(np.ascontiguousarray(w[n]))
      if tuple(v.shape) != tuple(p.shape):
        raise RuntimeError(f"{case['id']}: {n}: shape {tuple(v.shape)} vs AdapterHub {tuple(p.shape)}")
      p.copy_(v)
  model.eval()
  inp = {k: torch.from_numpy(v) for k, v in np.load(case["inputs"]).items()}
  with torch.no_grad():
    logits = model(**inp).logits.float().numpy()
    model.set_active_adapters(None)
    base = model(**inp).logits.float().numpy()
  np.savez(os.path.join(workdir, f"{case['id']}.npz"), logits=logits, base_logits=base)
  with open(os.path.join(workdir, f"{case['id']}.json"), "w") as f:
    json.dump({"trainable": int(trainable), "names": sorted(params),
               "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__}}, f)


def main(workdir):
  torch.manual_seed(0)
  with open(os.path.join(workdir, "cases.json")) as f:
    cases = json.load(f)
  for case in cases:
    run_case(case, workdir)
  print(f"adapterhub_ref6: {len(cases)} cases done")


if __name__ == "__main__":
  main(sys.argv[1])
