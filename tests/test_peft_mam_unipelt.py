"""MAM and UniPELT (AdapterHub ``MAMConfig`` / ``UniPELTConfig``): t5-large counts, gates,
training, and parity with AdapterHub 1.3.0 run in ``.venv-adapters`` (``tests/adapterhub_ref6.py``).

The parity helper here (:func:`adapterhub_parity`, :func:`to_adapterhub`) is shared with
``tests/test_peft_compacter.py``."""
import functools
import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft_jax import peft
from peft_jax.checkpoint.hf import config_to_hf, load_hf, save_hf
from peft_jax.models import get_preset, init_params
from peft_jax.peft import mam
from peft_jax.peft.base import PeftConfigError, apply_peft, flatten, unflatten
from steps import train_step  # noqa: E402  (the production step)

ROOT = pathlib.Path(__file__).resolve().parents[1]
REF_VENV = ROOT / ".venv-adapters"
REF_PY = REF_VENV / "bin" / "python"
REF_SCRIPT = ROOT / "tests" / "adapterhub_ref6.py"


# ----------------------------------------------------------------------------- counts

def _prefix(P, d, b, L, td):
  return P * d + d * b + b + b * (L * 2 * td) + L * 2 * td


def test_t5_large_counts_match_adapterhub_formula():
  """AdapterHub's trainable counts for t5-large (d=1024, 24+24 layers, 16 heads x 64),
  from the module shapes AdapterHub builds (checked against AdapterHub itself on the tiny
  models in the parity test)."""
  cfg = get_preset("t5-large")
  d, L = 1024, 24
  n_mam = peft.describe(cfg, "mam")["trainable_params"]
  # 3 prefix MLPs (encoder self, decoder self, cross): P=30, bottleneck 800 + 48 parallel FFN adapters m=512
  assert n_mam == 3 * _prefix(30, d, 800, L, d) + 48 * (2 * d * 512 + 512 + d) == 171_069_792
  uni = peft.describe(cfg, "unipelt")["trainable_params"]
  prefix = 3 * _prefix(10, d, 512, L, d)                       # P=10, bottleneck 512
  prefix_gates = 72 * (d + 1)                                 # one per attention (24 * 3)
  lora = 144 * (8 * d + d * 8 + d + 1)                        # q, v of 72 attentions, r=8, + gate
  adapter = 48 * (2 * d * 64 + 64 + d + d + 1)                # SeqBn FFN m=64 + gate
  assert uni == prefix + prefix_gates + lora + adapter == 86_223_624


def test_llama_prefix_sizes_and_options():
  cfg = get_preset("llama-2-7b")
  d, L = 4096, 32
  got = peft.describe(cfg, "mam", {"prefix_flat": True})["trainable_params"]
  assert got == 30 * L * 2 * d + L * (2 * d * 2048 + 2048 + d)
  with pytest.raises(PeftConfigError, match="use_gating"):
    peft.describe(cfg, "unipelt", {"use_gating": False})
  with pytest.raises(PeftConfigError, match="prefix_length"):
    peft.describe(cfg, "mam", {"prefix_length": 0})


# ----------------------------------------------------------------------------- training / gates

@functools.lru_cache(maxsize=None)
def _base(preset):
  cfg = get_preset(preset)
  cfg = cfg.replace(**({"num_layers": 1, "num_decoder_layers": 1} if cfg.model_type == "t5"
                       else {"num_hidden_layers": 1}))
  return cfg, init_params(cfg, jax.random.PRNGKey(0))


def _task(cfg):
  """A fixed small batch with a learnable target: predict (token + 1) mod 64."""
  r = np.random.default_rng(0)
  ids = jnp.asarray(r.integers(2, 64, (4, 6)), jnp.int32)
  if cfg.model_type == "t5":
    dec = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), ids[:, :4]], axis=1)
    return (ids, jnp.ones((4, 6), bool), dec), (ids[:, :5] + 1) % 64
  return (ids,), (ids + 1) % 64


def _loss(state):
  fwd = peft.apply_fn(state)

  def f(params, inputs, labels):
    logits = fwd(params, *inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return f


def train(preset, method, over=None, steps=25, lr=1e-2):
  cfg, params = _base(preset)
  st = apply_peft(cfg, params, method, over or {})
  opt, step = train_step(st, _loss(st), optax.adam(lr))
  step = jax.jit(step)
  p, os_ = st.params, opt.init(st.params)
  inputs, labels = _task(cfg)
  losses = []
  for _ in range(steps):
    p, os_, loss = step(p, os_, inputs, labels)
    losses.append(float(loss))
  return st, p, losses


@pytest.mark.parametrize("preset,method", [("t5-v1_1-tiny", "mam"), ("llama-tiny-gqa", "unipelt")])
def test_trains(preset, method):
  """25 Adam steps (lr 1e-2) on a fixed batch: the loss falls by at least 25%."""
  st, p, losses = train(preset, method)
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.75 * losses[0], losses
  # frozen base weights unchanged
  fp, fm, f0 = flatten(p), flatten(st.trainable), flatten(st.params)
  assert all(np.array_equal(fp[k], f0[k]) for k in fp if not fm[k])


def _gate_values(state, params, inputs):
  """Runs the forward while recording every gate value (the shared ``_gate_value``)."""
  seen = []
  orig = mam._gate_value

  def spy(p, x):
    g = orig(p, x)
    jax.debug.callback(lambda a: seen.append(np.asarray(a)), g)
    return g

  mam._gate_value = spy
  try:
    jax.block_until_ready(jax.jit(peft.apply_fn(state))(params, *inputs))
    jax.effects_barrier()
  finally:
    mam._gate_value = orig
  return seen


@pytest.mark.parametrize("preset", ["llama-tiny-gqa"])
def test_unipelt_gates_in_unit_interval_and_get_gradients(preset):
  cfg, params = _base(preset)
  st = apply_peft(cfg, params, "unipelt")
  inputs, labels = _task(cfg)
  gates = _gate_values(st, st.params, inputs)
  # T5 (1+1 layers): 3 prefix gates, 6 LoRA gates (q,v of 3 attentions), 2 adapter gates
  n_expected = 3 + 6 + 2 if cfg.model_type == "t5" else 1 + 2 + 1
  assert len(gates) == n_expected
  for g in gates:
    assert g.shape == (inputs[0].shape[0], 1)
    assert np.all(g > 0) and np.all(g < 1)
  # gradients reach every gate's weights (LoRA's B is 0 at init, so its gate's gradient is
  # zero at step 0: give B a value first)
  fl = dict(flatten(st.params))
  for k in fl:
    if k.endswith("gated_lora/B"):
      fl[k] = jnp.full(fl[k].shape, 0.05, fl[k].dtype)
  p = unflatten(fl)
  grads = flatten(jax.jit(peft.value_and_grad(_loss(st), st))(p, inputs, labels)[1])
  gate_keys = [k for k in st.added if "/gate/" in k or "prefix_gate" in k]
  assert len(gate_keys) == 2 * n_expected
  for k in gate_keys:
    assert float(jnp.max(jnp.abs(grads[k]))) > 0, k


def test_unipelt_gate_scales_each_component():
  """Forcing every gate shut (bias -> -1e4) removes LoRA and the adapter exactly and zeroes the
  prefix keys/values (which, as in AdapterHub, still take part in the softmax as zero
  vectors): the output equals the model with B = 0, up = 0 and zero prefixes."""
  cfg, params = _base("llama-tiny-gqa")
  st = apply_peft(cfg, params, "unipelt")
  inputs, _ = _task(cfg)
  fl = dict(flatten(st.params))
  r = np.random.default_rng(1)
  for k in st.added:                       # make every component act
    if k.endswith(("gated_lora/B", "up/kernel")):
      fl[k] = jnp.asarray(0.3 * r.standard_normal(fl[k].shape), fl[k].dtype)
  fwd = jax.jit(peft.apply_fn(st))
  shut, off = dict(fl), dict(fl)
  for k in st.added:
    if k.endswith("gate/bias"):
      shut[k] = jnp.full(fl[k].shape, -1e4, fl[k].dtype)
    if k.endswith(("gated_lora/B", "up/kernel", "up/bias")) or "control_trans_2" in k:
      off[k] = jnp.zeros_like(fl[k])
  full, closed, ref = (np.asarray(fwd(unflatten(t), *inputs)) for t in (fl, shut, off))
  assert np.max(np.abs(full - ref)) > 1e-3
  np.testing.assert_allclose(closed, ref, atol=1e-5)


def test_mam_positions_follow_adapterhub():
  """AdapterHub's T5 keeps query positions and puts the prefix at key positions 0..P-1."""
  h = mam.AHPrefixHandler(n=3, self_stacks=frozenset({"encoder", "decoder"}))

  class Stack:
    is_decoder = True
  q, k = h.positions(Stack(), jnp.arange(4), jnp.arange(4), True)
  assert list(q) == [0, 1, 2, 3] and list(k) == list(range(7))
  q, k = h.positions(Stack(), jnp.arange(2)[None], None, True)     # LLaMA: unchanged
  assert k is None and list(q[0]) == [0, 1]


# ----------------------------------------------------------------------------- AdapterHub parity

def _t5_attn(prefix, i):
  stack = prefix.split("/")[0]
  return {"encoder/layers/attn": f"encoder.block.{i}.layer.0.SelfAttention",
          "decoder/layers/self_attn": f"decoder.block.{i}.layer.0.SelfAttention",
          "decoder/layers/cross_attn": f"decoder.block.{i}.layer.1.EncDecAttention"}.get(prefix) or stack


def _module_name(is_t5, path, i):
  """Our layer-agnostic path of an attention / adapter site -> AdapterHub's module name."""
  if is_t5:
    if path.endswith(("/attn", "/self_attn", "/cross_attn")) and "/adapter_" not in path:
      return _t5_attn(path, i)
    stack, site = path.split("/layers/adapter_")
    j = {("encoder", "attn"): 0, ("encoder", "mlp"): 1, ("decoder", "self_attn"): 0,
         ("decoder", "cross_attn"): 1, ("decoder", "mlp"): 2}[(stack, site)]
    return f"{stack}.block.{i}.layer.{j}.adapters.a"
  if path == "layers/attn":
    return f"model.layers.{i}.self_attn"
  site = path.split("layers/adapter_")[1]
  return f"model.layers.{i}.{'attention_adapters' if site == 'attn' else 'output_adapters'}.adapters.a"


def to_adapterhub(is_t5, added):
  """Our added leaves (path -> array) -> AdapterHub parameter names (adapter ``a``)."""
  out = {}
  T = lambda a: np.swapaxes(np.asarray(a), -1, -2)  # noqa: E731
  for k, v in added.items():
    v = np.asarray(v, np.float32)
    if k.endswith("/layer_on"):
      continue
    if k.startswith("compacter_shared/"):
      out[("" if is_t5 else "model.") + "shared_parameters.a." + k.split("/", 1)[1]] = v
      continue
    if k.startswith(mam.ROOT + "/"):
      _, loc, rest = k.split("/", 2)
      name = {"wte": "wte.weight", "control_trans": "control_trans"}.get(rest)
      if name is None:
        idx, leaf = rest[len("control_trans_"):].split("/")
        name = f"control_trans.{idx}.{'weight' if leaf == 'kernel' else 'bias'}"
        v = T(v) if leaf == "kernel" else v
      out[f"pool.prefix_tunings.a.{loc}.{name}"] = v
      continue
    if "/adapter_" in k:
      parts = k.split("/")
      j = next(i for i, q in enumerate(parts) if q.startswith("adapter_"))
      site_path, leaf = "/".join(parts[:j + 1]), "/".join(parts[j + 1:])
      name = {"down/kernel": ("adapter_down.0.weight", True), "up/kernel": ("adapter_up.weight", True),
              "gate/kernel": ("gate.weight", True), "gate/bias": ("gate.bias", False)}.get(leaf)
      if name is None:
        proj, rest = leaf.split("/")
        mod = "adapter_down.0" if proj == "down" else "adapter_up"
        if rest == "bias" and phm_added(added, site_path):
          rest = "b"
        name = (f"{mod}.{rest}", False)
      nm, tr = name
      for i in range(v.shape[0]):
        out[f"{_module_name(is_t5, site_path, i)}.{nm}"] = T(v[i]) if tr else v[i]
      continue
    if "/prefix_gate/" in k:
      attn, leaf = k.split("/prefix_gate/")
      for i in range(v.shape[0]):
        out[f"{_module_name(is_t5, attn, i)}.prefix_tuning.prefix_gates.a.{'weight' if leaf == 'kernel' else 'bias'}"] = \
            T(v[i]) if leaf == "kernel" else v[i]
      continue
    if "/gated_lora/" in k:
      mpath, leaf = k.split("/gated_lora/")
      attn, proj = mpath.rsplit("/", 1)
      proj = proj if is_t5 else f"{proj}_proj"
      nm, tr = {"A": ("lora_A", True), "B": ("lora_B", True), "gate/kernel": ("gate.weight", True),
                "gate/bias": ("gate.bias", False)}[leaf]
      for i in range(v.shape[0]):
        out[f"{_module_name(is_t5, attn, i)}.{proj}.loras.a.{nm}"] = T(v[i]) if tr else v[i]
      continue
    raise AssertionError(f"no AdapterHub name for {k}")
  return out


def phm_added(added, site_path):
  return any(k.startswith(site_path + "/") and "/W" in k for k in added)


def random_leaves(st, seed):
  """Random values for every added leaf, scaled so each component visibly acts."""
  r = np.random.RandomState(seed)
  fl = flatten(st.params)
  out = {}
  for k in st.added:
    shape = fl[k].shape
    if k.endswith("/layer_on"):
      out[k] = np.asarray(fl[k])
      continue
    if k.endswith(("/kernel", "/A", "/B", "/W_left", "/W_right", "/W")) and len(shape) >= 2:
      scale = 1.0 / np.sqrt(shape[-2])
      if k.endswith(("gate/kernel", "prefix_gate/kernel")):
        scale *= 2.0
    elif k.endswith("phm_rule"):
      scale = 0.5
    elif k.endswith(("/wte", "/control_trans")):
      scale = 1.0
    else:
      scale = 0.3
    out[k] = (scale * r.randn(*shape)).astype(np.float32)
  return out


def _inputs(seed=0):
  r = np.random.RandomState(seed)
  ids = r.randint(2, 128, (2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  dec = r.randint(2, 128, (2, 5)).astype(np.int32)
  return ids, mask, dec


def adapterhub_parity(tmp_path_factory, cases_spec, tag):
  """``cases_spec``: [(case id, tiny kind, our method, our overrides, AdapterHub class,
  AdapterHub kwargs)]. Returns {id: (ours dict, theirs dict)}."""
  if not (REF_PY.exists() and (REF_VENV / ".ready").exists()):
    pytest.skip(f"AdapterHub reference venv {REF_VENV} is absent or unfinished: run "
                "`bash .ci/adapterhub_env.sh` to enable parity tests")
  from tiny_hf import saved_hf_model
  work = tmp_path_factory.mktemp(f"adapterhub_{tag}")
  base, cases, todo = {}, [], []
  for cid, kind, method, over, ah_cls, ah_kw in cases_spec:
    if kind not in base:
      cfg, params = load_hf(saved_hf_model(kind)[1])
      save_hf(cfg, params, str(work / kind))
      base[kind] = (cfg, params)
    cfg, params = base[kind]
    is_t5 = kind.startswith("t5")
    st = apply_peft(cfg, params, method, over)
    leaves = random_leaves(st, seed=len(cases))
    np.savez(work / f"{cid}-w.npz", **to_adapterhub(is_t5, leaves))
    ids, mask, dec = _inputs()
    inputs = ({"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
               "decoder_input_ids": dec.astype(np.int64)} if is_t5 else {"input_ids": ids.astype(np.int64)})
    np.savez(work / f"{cid}-inputs.npz", **inputs)
    hf_cfg = config_to_hf(cfg)
    if is_t5:
      hf_cfg["tie_word_embeddings"] = bool(cfg.scales_decoder_outputs)
    cases.append({"id": cid, "model_type": "t5" if is_t5 else "llama", "config": hf_cfg,
                  "base": str(work / kind / "model.safetensors"), "adapter_class": ah_cls,
                  "adapter_kwargs": ah_kw, "adapter_weights": str(work / f"{cid}-w.npz"),
                  "inputs": str(work / f"{cid}-inputs.npz")})
    todo.append((cid, kind, st, leaves, (ids, mask, dec) if is_t5 else (ids,)))
  (work / "cases.json").write_text(json.dumps(cases))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JAX"))}
  env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
  log = open(work / "ref.log", "w+")
  proc = subprocess.Popen([str(REF_PY), str(REF_SCRIPT), str(work)], stdout=log, stderr=subprocess.STDOUT,
                          env=env)
  try:
    ours = {}
    for cid, kind, st, leaves, args in todo:
      cfg, params = base[kind]
      full = dict(flatten(st.params))
      full.update(leaves)
      fwd = peft.apply_fn(st)
      with jax.disable_jit():
        logits = np.asarray(fwd(unflatten(full), *args))
      ours[cid] = {"logits": logits, "trainable": peft.count(st)["trainable_params"]}
    rc = proc.wait(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  log.seek(0)
  if rc != 0:
    pytest.fail(f"AdapterHub reference failed (exit {rc}):\n{log.read()[-8000:]}")
  res = {}
  for c in cases:
    meta = json.loads((work / f"{c['id']}.json").read_text())
    with np.load(work / f"{c['id']}.npz") as z:
      meta["logits"], meta["base_logits"] = z["logits"], z["base_logits"]
    res[c["id"]] = (ours[c["id"]], meta)
  return res


def check_parity(o, t):
  assert t["versions"]["adapters"] == "1.3.0"
  assert o["trainable"] == t["trainable"], "trainable parameter counts differ"
  assert o["logits"].shape == t["logits"].shape
  assert np.max(np.abs(t["logits"] - t["base_logits"])) > 0.05, "the method has no visible effect"
  np.testing.assert_allclose(o["logits"], t["logits"], atol=1e-4, rtol=0)


PARITY = [
    ("t5-mam", "t5_v10", "mam", {}, "MAMConfig", {}),
    ("t5-unipelt", "t5_v10", "unipelt", {}, "UniPELTConfig", {}),
    ("llama-mam", "llama_mha", "mam", {}, "MAMConfig", {}),
    ("llama-unipelt", "llama_mha", "unipelt", {}, "UniPELTConfig", {}),
]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
  return adapterhub_parity(tmp_path_factory, PARITY, "mam_unipelt")


@pytest.mark.parametrize("cid", [c[0] for c in PARITY])
def test_parity_with_adapterhub(parity, cid):
  check_parity(*parity[cid])


def test_parity_counts_on_tiny_models(parity):
  """AdapterHub's own counts on the tiny models (t5_v10: d=32, 4 heads x 8, 2+2 layers;
  llama_mha: d=32, 2 layers) equal the formula used for t5-large above."""
  assert parity["t5-mam"][1]["trainable"] == 3 * _prefix(30, 32, 800, 2, 32) + 4 * (2 * 32 * 16 + 16 + 32)
  assert parity["t5-unipelt"][1]["trainable"] == (3 * _prefix(10, 32, 512, 2, 32) + 6 * 33
                                                  + 12 * (8 * 32 * 2 + 33) + 4 * (2 * 32 * 2 + 2 + 32 + 33))
  assert parity["llama-mam"][1]["trainable"] == _prefix(30, 32, 800, 2, 32) + 2 * (2 * 32 * 16 + 16 + 32)
