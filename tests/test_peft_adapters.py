"""Bottleneck adapters (houlsby / pfeiffer / parallel): counts, init, masking, and
parity with AdapterHub (``adapters`` 1.3.0) run in its own venv (``.venv-adapters``,
made by ``.ci/adapterhub_env.sh``)."""
import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.checkpoint.hf import config_to_hf, load_hf, save_hf
from peft_jax.models import abstract_params, build_model, get_preset
from peft_jax.peft import adapters
from peft_jax.peft.accounting import count
from peft_jax.peft.base import PeftConfigError, apply_peft, flatten, join, split_trainable, unflatten

ROOT = pathlib.Path(__file__).resolve().parents[1]
REF_VENV = ROOT / ".venv-adapters"
REF_PY = REF_VENV / "bin" / "python"
REF_SCRIPT = ROOT / "tests" / "adapterhub_ref.py"
AH_CLASS = {"houlsby": "DoubleSeqBnConfig", "pfeiffer": "SeqBnConfig", "parallel": "ParBnConfig"}


def _trainable_count(state):
  fp, fm = flatten(state.params), flatten(state.trainable)
  return sum(int(np.prod(v.shape)) for k, v in fp.items() if fm[k])


def _per_adapter(d, m, extra=0):
  return d * m + m + m * d + d + extra


# ----------------------------------------------------------------------------- counts

def test_t5_large_abstract_counts_with_adapterhub_defaults():
  cfg = get_preset("t5-large")
  params = abstract_params(cfg)
  counts = {m: _trainable_count(apply_peft(cfg, params, m)) for m in ("houlsby", "pfeiffer", "parallel")}
  assert counts["houlsby"] == 12_687_360      # 96 adapters (enc attn+FFN, dec self-attn+FFN), m=64
  assert counts["pfeiffer"] == 6_343_680      # 48 FFN adapters, m=64
  assert counts["parallel"] == 50_405_376     # 48 FFN adapters, m=1024//2=512
  layers = cfg.num_layers + cfg.n_decoder_layers
  assert counts["houlsby"] == 2 * layers * _per_adapter(1024, 64)
  assert counts["pfeiffer"] == layers * _per_adapter(1024, 64)
  assert counts["parallel"] == layers * _per_adapter(1024, 512)
  # no leaf is left abstractly unshaped, nothing existing became trainable
  st = apply_peft(cfg, params, "houlsby")
  assert not st.made_trainable and all("/adapter_" in k for k in st.added)
  assert st.hparams["cross_adapter"] is False


def test_llama_abstract_counts_and_options():
  cfg = get_preset("llama-2-7b")
  params = abstract_params(cfg)
  d, n = 4096, 32
  assert _trainable_count(apply_peft(cfg, params, "houlsby")) == 2 * n * _per_adapter(d, 256)
  assert _trainable_count(apply_peft(cfg, params, "pfeiffer")) == n * _per_adapter(d, 256)
  assert _trainable_count(apply_peft(cfg, params, "parallel")) == n * _per_adapter(d, 2048)
  got = _trainable_count(apply_peft(cfg, params, "pfeiffer", {"bottleneck_size": 100, "ln_before": True,
                                                              "ln_after": True, "scaling": "channel"}))
  assert got == n * _per_adapter(d, 100, extra=4 * d + d)
  got = _trainable_count(apply_peft(cfg, params, "houlsby", {"reduction_factor": 0.5, "scaling": "learned"}))
  assert got == 2 * n * _per_adapter(d, 8192, extra=1)   # rf < 1: an up-projection, as AdapterHub


def test_t5_cross_adapter_and_rf_mapping():
  cfg = get_preset("t5-v1_1-tiny")                       # 2 encoder, 3 decoder layers, d=32
  params = abstract_params(cfg)
  st = apply_peft(cfg, params, "houlsby", {"cross_adapter": True})
  sites = sorted({k.rsplit("/adapter_", 1)[0] + "/" + k.split("/adapter_")[1].split("/")[0]
                  for k in st.added})
  assert sites == ["decoder/layers/cross_attn", "decoder/layers/mlp", "decoder/layers/self_attn",
                   "encoder/layers/attn", "encoder/layers/mlp"]
  assert _trainable_count(st) == (2 * 2 + 3 * 3) * _per_adapter(32, 2)
  # AdapterHub layer ids: encoder 0..1, decoder 2..4; one size per stack is representable
  st = apply_peft(cfg, params, "pfeiffer", {"reduction_factor": {"0": 8, "1": 8, "default": 4}})
  assert _trainable_count(st) == 2 * _per_adapter(32, 4) + 3 * _per_adapter(32, 8)
  with pytest.raises(PeftConfigError, match="one size per stack"):
    apply_peft(cfg, params, "pfeiffer", {"reduction_factor": {"0": 8, "default": 4}})


def test_leave_out_counts_and_masks():
  cfg = get_preset("t5-large")
  params = abstract_params(cfg)
  left = [0, 1, 2, 24, 47]            # AdapterHub ids: encoder 0..23, decoder 24..47
  st = apply_peft(cfg, params, "houlsby", {"leave_out": left})
  assert count(st)["trainable_params"] == (96 - 2 * len(left)) * _per_adapter(1024, 64)
  assert count(apply_peft(cfg, params, "houlsby"))["trainable_params"] == 12_687_360
  m = st.update_masks
  assert m["encoder/layers/adapter_attn/down/kernel"].shape == (24, 1, 1)
  assert m["decoder/layers/adapter_mlp/up/bias"].shape == (24, 1)
  assert list(np.flatnonzero(~m["encoder/layers/adapter_mlp/down/bias"][:, 0])) == [0, 1, 2]
  assert list(np.flatnonzero(~m["decoder/layers/adapter_self_attn/up/kernel"][:, 0, 0])) == [0, 23]
  # the per-layer on/off flags are frozen constants: no gradient, no optimizer state, no mask
  flag = "decoder/layers/adapter_mlp/layer_on"
  assert flag in st.added and flag not in m and not flatten(st.trainable)[flag]
  # leaving out every encoder layer drops the encoder leaves altogether
  st = apply_peft(cfg, params, "pfeiffer", {"leave_out": list(range(24))})
  assert all(k.startswith("decoder/") for k in st.added)
  assert count(st)["trainable_params"] == 24 * _per_adapter(1024, 64)


@pytest.mark.parametrize("bad,match", [
    ({"leave_out": [4]}, "leave_out"),           # t5-tiny has layer ids 0..3
    ({"leave_out": [0, 1, 2, 3]}, "no layer"),
    ({"use_gating": True}, "use_gating"),
    ({"residual_before_ln": "post_add"}, "post_add"),
    ({"non_linearity": "nope"}, "non_linearity"),
    ({"init_weights": "lora"}, "init_weights"),
    ({"scaling": "wild"}, "scaling"),
    ({"mh_adapter": False, "output_adapter": False}, "none of"),
    ({"reduction_factor": 0}, "reduction_factor"),
    ({"bottleneck_size": 0}, "bottleneck_size"),
    ({"reduction_factor": {"3": 8}}, "default"),
    ({"bogus": 1}, "unknown hyperparameter"),
])
def test_bad_hyperparameters_raise_clear_errors(bad, match):
  cfg = get_preset("t5-tiny")
  with pytest.raises(PeftConfigError, match=match):
    apply_peft(cfg, abstract_params(cfg), "houlsby", bad)


# ----------------------------------------------------------------------------- forward helpers

def _inputs(seed=0):
  r = np.random.RandomState(seed)
  ids = r.randint(2, 128, (2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0                       # a padded T5 encoder row
  dec = r.randint(2, 128, (2, 5)).astype(np.int32)
  return ids, mask, dec


def _forward(cfg, state_or_none, params, ids, mask, dec, deterministic=True, rngs=None):
  model = build_model(cfg, state_or_none.sites) if state_or_none is not None else build_model(cfg)
  kw = {} if rngs is None else {"rngs": rngs}
  with jax.disable_jit():      # tiny models: op-by-op beats compiling
    if dec is not None:
      return model.apply({"params": params}, ids, mask, dec, deterministic=deterministic, **kw)
    return model.apply({"params": params}, ids, deterministic=deterministic, **kw)


def _tiny(kind):
  """A tiny model from tests/tiny_hf.py (shared with the parity cases; no jit-compiled init)."""
  from tiny_hf import saved_hf_model
  return load_hf(saved_hf_model({"t5": "t5_v10", "llama": "llama_mha"}[kind])[1])


# ----------------------------------------------------------------------------- init

@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_step0_output_versus_base(kind):
  """What AdapterHub's inits give at step 0: 'mam_adapter' (parallel's default) zeroes the up
  projection, so the model equals the base exactly; 'houlsby' is near-identity; 'bert' (the
  houlsby/pfeiffer default) is not an identity."""
  cfg, params = _tiny(kind)
  ids, mask, dec = _inputs()
  dec = dec if kind == "t5" else None
  mask = mask if kind == "t5" else None
  base = np.asarray(_forward(cfg, None, params, ids, mask, dec))
  def diff(method, init):
    st = apply_peft(cfg, params, method, {"init_weights": init})
    out = np.asarray(_forward(cfg, st, st.params, ids, mask, dec))
    return out, float(np.max(np.abs(out - base)))

  for method in ("houlsby", "pfeiffer", "parallel"):
    np.testing.assert_array_equal(diff(method, "mam_adapter")[0], base)
  assert adapters.PARALLEL_DEFAULTS["init_weights"] == "mam_adapter"
  assert adapters.HOULSBY_DEFAULTS["init_weights"] == adapters.PFEIFFER_DEFAULTS["init_weights"] == "bert"
  near, far = diff("houlsby", "houlsby")[1], diff("houlsby", "bert")[1]
  assert 0 < near < 0.5 * far, (near, far)     # truncated N(0, 1e-2) vs N(0, 2e-2)
  assert diff("pfeiffer", "bert")[1] > 0


def test_init_statistics():
  cfg = get_preset("llama-tiny").replace(hidden_size=1024, num_hidden_layers=2)
  from peft_jax.peft.base import get_method, resolve_hparams

  def leaves(method, init, seed=None):
    meth = get_method(method)
    hp = resolve_hparams(meth, {"init_weights": init, "init_weights_seed": seed})
    new = meth.init_leaves(cfg, hp, {}, jax.random.PRNGKey(0))
    return {k.split("adapter_")[1]: np.asarray(v) for k, v in new.items()}

  mam = leaves("parallel", "mam_adapter")
  assert np.all(mam["mlp/up/kernel"] == 0) and np.all(mam["mlp/up/bias"] == 0)
  assert np.all(mam["mlp/down/bias"] == 0)
  bound = 1 / np.sqrt(1024)                        # kaiming_uniform_(a=sqrt(5)), fan_in 1024
  assert np.abs(mam["mlp/down/kernel"]).max() <= bound
  assert abs(mam["mlp/down/kernel"].std() - bound / np.sqrt(3)) < 0.02 * bound
  hb = leaves("houlsby", "houlsby")
  for k in ("attn/down/kernel", "attn/up/kernel", "mlp/down/kernel", "mlp/up/kernel"):
    assert np.abs(hb[k]).max() <= 0.02 and 0.007 < hb[k].std() < 0.01
  bert = leaves("pfeiffer", "bert")
  assert abs(bert["mlp/down/kernel"].std() - 0.02) < 1e-3 and np.all(bert["mlp/up/bias"] == 0)
  assert not np.allclose(bert["mlp/down/kernel"][0], bert["mlp/down/kernel"][1])
  seeded = leaves("pfeiffer", "bert", seed=3)      # AdapterHub: every module starts the same
  np.testing.assert_array_equal(seeded["mlp/down/kernel"][0], seeded["mlp/down/kernel"][1])


# ----------------------------------------------------------------------------- gradient masking

@pytest.mark.parametrize("kind,method,left", [("t5", "houlsby", []), ("llama", "pfeiffer", [0]),
                                              ("llama", "parallel", [])])
def test_only_adapter_leaves_are_trainable_and_get_gradients(kind, method, left):
  cfg, params = _tiny(kind)
  st = apply_peft(cfg, params, method, {"init_weights": "bert", "cross_adapter": kind == "t5",
                                        "leave_out": left})
  fm = flatten(st.trainable)
  flags = {k for k in st.added if k.endswith("/layer_on")}      # frozen constants (leave_out)
  assert bool(flags) == bool(left)
  assert {k for k, v in fm.items() if v} == set(st.added) - flags
  assert all("/adapter_" in k for k in st.added) and not st.made_trainable
  assert {k for k, v in fm.items() if not v} == set(flatten(params)) | flags
  train, frozen = split_trainable(st.params, st.trainable)
  ids, mask, dec = _inputs()
  if kind == "llama":
    mask, dec = None, ids

  def loss(tr):
    model = build_model(cfg, st.sites)
    p = {"params": join(tr, frozen)}
    logits = model.apply(p, ids, mask, dec) if kind != "llama" else model.apply(p, ids)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, dec[..., None], -1)[..., 0])

  grads = jax.jit(jax.grad(loss))(train)
  assert set(grads) == set(st.added) - flags
  for k, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), k
    if left:                          # left-out layer 0: no gradient; layer 1: some
      assert np.all(g[0] == 0) and np.any(g[1] != 0), k
      assert st.update_masks[k].reshape(-1).tolist() == [False, True]
    else:
      assert np.any(g != 0), k


def test_residual_input_missing_raises():
  """A caller of the site that does not pass the residual input gets a clear error for
  the configurations that read it (pfeiffer); houlsby's defaults do not need it."""
  cfg, _ = _tiny("llama")
  st = apply_peft(cfg, abstract_params(cfg), "pfeiffer")
  (handler,) = [h for h in st.sites.handlers if hasattr(h, "sublayer")]

  class _Module:
    def has_variable(self, col, name):
      return True

    def get_variable(self, col, name):
      return {}

  with pytest.raises(PeftConfigError, match="residual input"):
    handler.sublayer(_Module(), "mlp", None, jnp.zeros((1, 2, 4)), True, x=None)


def test_dropout_and_jit_training_mode():
  cfg, params = _tiny("llama")
  st = apply_peft(cfg, params, "parallel", {"dropout": 0.5, "init_weights": "bert"})
  ids = _inputs()[0]
  model = build_model(cfg, st.sites)
  f = jax.jit(lambda p, r, det: model.apply({"params": p}, ids, deterministic=det, rngs={"dropout": r}),
              static_argnums=2)
  a = f(st.params, jax.random.PRNGKey(0), False)
  ref = f(st.params, jax.random.PRNGKey(0), True)
  b = f(st.params, jax.random.PRNGKey(1), False)
  c = f(st.params, jax.random.PRNGKey(1), True)
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)
  np.testing.assert_array_equal(ref, c)
  np.testing.assert_allclose(ref, _forward(cfg, st, st.params, ids, None, None), atol=1e-5, rtol=0)


def test_formula_with_explicit_residual_input():
  """The handler's math with ``x=`` given (the proposed site extension) against a direct
  transcription of AdapterHub's pre_forward / forward / post_forward (layer_norm=None)."""
  r = np.random.RandomState(0)
  d, m = 6, 3
  p = {"down": {"kernel": r.randn(d, m), "bias": r.randn(m)}, "up": {"kernel": r.randn(m, d), "bias": r.randn(d)},
       "ln_before": {"scale": 1 + 0.1 * r.randn(d), "bias": r.randn(d)},
       "ln_after": {"scale": 1 + 0.1 * r.randn(d), "bias": r.randn(d)}}
  p = jax.tree_util.tree_map(lambda a: a.astype(np.float32), p)
  x, y = r.randn(2, 4, d).astype(np.float32), r.randn(2, 4, d).astype(np.float32)

  def ln(q, z):
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

  def ref(spec):
    def bott(z):
      if spec.ln_before:
        z = ln(p["ln_before"], z)
      h = np.tanh(z @ p["down"]["kernel"] + p["down"]["bias"])
      return (h @ p["up"]["kernel"] + p["up"]["bias"]) * spec.scaling
    if spec.is_parallel:
      out = bott(x)
      out = ln(p["ln_after"], out) if spec.ln_after else out
      hs = out + y
    else:
      hs, residual = y, None
      if spec.residual_before_ln:
        residual = hs
      if spec.original_ln_before:
        hs = hs + x
      if not spec.residual_before_ln:
        residual = hs
      out = bott(hs)
      if spec.adapter_residual_before_ln:
        out = out + residual
      if spec.ln_after:
        out = ln(p["ln_after"], out)
      if not spec.adapter_residual_before_ln:
        out = out + residual
      hs = out
    return hs + x if spec.original_ln_after else hs

  import itertools
  for par, olb, ola, rbl, arbl, lnb, lna in itertools.product(*[(False, True)] * 7):
    spec = adapters.AdapterSpec(non_linearity="tanh", original_ln_before=olb, original_ln_after=ola,
                         residual_before_ln=rbl, adapter_residual_before_ln=arbl, ln_before=lnb,
                         ln_after=lna, is_parallel=par, scaling=1.5)
    got = x + np.asarray(adapters.bottleneck_out(p, spec, jnp.asarray(y), jnp.asarray(x)))
    np.testing.assert_allclose(got, ref(spec), atol=2e-5, rtol=1e-5, err_msg=str(spec))


# ----------------------------------------------------------------------------- AdapterHub parity

# (case id, tiny_hf kind, method, overrides)
PARITY_CASES = [(f"{k}-{m}", k, m, {}) for k in ("t5_v10", "t5_v11", "llama_mha", "llama_gqa")
                for m in ("houlsby", "pfeiffer", "parallel")] + [
    ("t5_v10-houlsby-cross-ln-channel", "t5_v10", "houlsby",
     {"cross_adapter": True, "ln_before": True, "ln_after": True, "scaling": "channel",
      "non_linearity": "gelu"}),
    ("llama_mha-pfeiffer-variants", "llama_mha", "pfeiffer",
     {"original_ln_after": False, "residual_before_ln": False, "adapter_residual_before_ln": True,
      "ln_after": True, "scaling": "learned", "non_linearity": "tanh"}),
    ("t5_v11-parallel-mh-noresid", "t5_v11", "parallel",
     {"mh_adapter": True, "cross_adapter": True, "original_ln_after": False, "ln_before": True,
      "non_linearity": "gelu_new", "scaling": 0.5}),
    ("llama_gqa-houlsby-rf-leaky", "llama_gqa", "houlsby",
     {"reduction_factor": 2.5, "non_linearity": "leakyrelu", "original_ln_before": True,
      "residual_before_ln": False}),
    ("t5_v11-pfeiffer-rfmap-swish", "t5_v11", "pfeiffer",
     {"reduction_factor": {"0": 4, "1": 4, "default": 8}, "non_linearity": "swish"}),
    ("t5_v11-houlsby-leave-out", "t5_v11", "houlsby", {"leave_out": [1, 3], "cross_adapter": True}),
    ("llama_gqa-parallel-leave-out", "llama_gqa", "parallel", {"leave_out": [0], "ln_after": True}),
]


def _random_adapter_leaves(st, seed):
  r = np.random.RandomState(seed)
  out = {}
  for k in st.added:
    v = flatten(st.params)[k]
    shape = v.shape
    if k.endswith("/layer_on"):
      out[k] = np.asarray(v)
      continue
    if k.endswith("down/kernel"):
      a = r.randn(*shape) / np.sqrt(shape[-2])
    elif k.endswith("up/kernel"):
      a = 0.5 * r.randn(*shape) / np.sqrt(shape[-2])
    elif k.endswith("/scale") or k.endswith("/scaling"):
      a = 1 + 0.2 * r.randn(*shape)
    else:
      a = 0.1 * r.randn(*shape)
    out[k] = a.astype(np.float32)
  return out


def _ours_locations(st):
  flat = flatten(st.params)
  locs = []
  for k in st.added:
    if k.endswith("/down/bias"):
      prefix, site = k[:-len("/down/bias")].split("/adapter_")
      on = flat.get(f"{prefix}/adapter_{site}/layer_on")
      n = flat[k].shape[0]
      locs += [f"{prefix}|{site}|{i}" for i in range(n) if on is None or on[i] > 0.5]
  return sorted(locs)


@pytest.fixture(scope="module")
def adapterhub_results(tmp_path_factory):
  """Writes every case, runs AdapterHub on them in one subprocess (in .venv-adapters) while our
  forward passes run here, and returns (ours, theirs) keyed by case id."""
  if not (REF_PY.exists() and (REF_VENV / ".ready").exists()):
    pytest.skip(f"AdapterHub reference venv {REF_VENV} is absent or unfinished: run `bash .ci/adapterhub_env.sh` "
                "(creates it with adapters==1.3.0, transformers 4.57, CPU torch) to enable parity tests")
  from tiny_hf import saved_hf_model
  work = tmp_path_factory.mktemp("adapterhub")
  cases, todo = [], []
  base = {}
  for cid, kind, method, over in PARITY_CASES:
    if kind not in base:
      cfg, params = load_hf(saved_hf_model(kind)[1])
      save_hf(cfg, params, str(work / kind))
      base[kind] = (cfg, params)
    cfg, params = base[kind]
    st = apply_peft(cfg, params, method, over)
    leaves = _random_adapter_leaves(st, seed=len(cases))
    np.savez(work / f"{cid}-adapter.npz", **leaves)
    ids, mask, dec = _inputs()
    is_t5 = kind.startswith("t5")
    inputs = ({"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
               "decoder_input_ids": dec.astype(np.int64)} if is_t5 else {"input_ids": ids.astype(np.int64)})
    np.savez(work / f"{cid}-inputs.npz", **inputs)
    todo.append((cid, kind, st, leaves, (ids, mask if is_t5 else None, dec if is_t5 else None)))
    hf_cfg = config_to_hf(cfg)
    if is_t5:   # transformers 4.x: tie_word_embeddings also means the d_model**-0.5 rescale
      hf_cfg["tie_word_embeddings"] = bool(cfg.scales_decoder_outputs)
    cases.append({"id": cid, "model_type": "t5" if is_t5 else "llama", "config": hf_cfg,
                  "base": str(work / kind / "model.safetensors"), "adapter_class": AH_CLASS[method],
                  "adapter_kwargs": over, "adapter_weights": str(work / f"{cid}-adapter.npz"),
                  "inputs": str(work / f"{cid}-inputs.npz")})
  (work / "cases.json").write_text(json.dumps(cases))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JAX"))}
  env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
  log = open(work / "ref.log", "w+")
  proc = subprocess.Popen([str(REF_PY), str(REF_SCRIPT), str(work)], stdout=log, stderr=subprocess.STDOUT,
                          env=env)
  try:
    ours, base_logits = {}, {}
    for cid, kind, st, leaves, args in todo:
      cfg, params = base[kind]
      if kind not in base_logits:
        base_logits[kind] = np.asarray(_forward(cfg, None, params, *args))
      full = dict(flatten(st.params))
      full.update(leaves)
      ours[cid] = {"logits": np.asarray(_forward(cfg, st, unflatten(full), *args)),
                   "base_logits": base_logits[kind], "trainable": count(st)["trainable_params"],
                   "locations": _ours_locations(st)}
    rc = proc.wait(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  log.seek(0)
  if rc != 0:
    pytest.fail(f"AdapterHub reference failed (exit {rc}):\n{log.read()[-8000:]}")
  theirs = {}
  for c in cases:
    meta = json.loads((work / f"{c['id']}.json").read_text())
    with np.load(work / f"{c['id']}.npz") as z:
      meta["logits"], meta["base_logits"] = z["logits"], z["base_logits"]
    theirs[c["id"]] = meta
  return ours, theirs


@pytest.mark.parametrize("cid", [c[0] for c in PARITY_CASES])
def test_parity_with_adapterhub(adapterhub_results, cid):
  ours, theirs = adapterhub_results
  o, t = ours[cid], theirs[cid]
  assert t["versions"]["adapters"] == "1.3.0"
  assert o["locations"] == sorted(t["locations"]), "adapters sit at different sub-layers"
  assert o["trainable"] == t["trainable"], "trainable parameter counts differ"
  assert o["logits"].shape == t["logits"].shape
  np.testing.assert_allclose(o["base_logits"], t["base_logits"], atol=1e-4, rtol=0)
  assert np.max(np.abs(t["logits"] - t["base_logits"])) > 0.05, "the adapter has no visible effect"
  np.testing.assert_allclose(o["logits"], t["logits"], atol=1e-4, rtol=0)


def test_parity_counts_on_tiny_models_match_formula(adapterhub_results):
  ours, theirs = adapterhub_results
  # t5_v10: d=32, 2+2 layers; llama: d=32, 2 layers
  assert theirs["t5_v10-houlsby"]["trainable"] == 8 * _per_adapter(32, 2)
  assert theirs["t5_v10-pfeiffer"]["trainable"] == 4 * _per_adapter(32, 2)
  assert theirs["t5_v10-parallel"]["trainable"] == 4 * _per_adapter(32, 16) == 4_288
  assert theirs["t5_v11-parallel"]["trainable"] == 5 * _per_adapter(32, 16)   # 3 decoder layers
  assert theirs["llama_mha-parallel"]["trainable"] == 2 * _per_adapter(32, 16)
  # the decoder's cross-attention gets an mh adapter only with cross_adapter=True
  assert not any("cross_attn" in loc for loc in theirs["t5_v10-houlsby"]["locations"])
  assert any("cross_attn" in loc for loc in theirs["t5_v10-houlsby-cross-ln-channel"]["locations"])
