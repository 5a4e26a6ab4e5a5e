"""Sharding over device meshes (8 simulated CPU devices, see conftest.py): rules, sharded
training equal to one device, loading and checkpoints across meshes, two processes over
localhost, and the ahead-of-time memory plan."""
import functools
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from peft_jax import sharding
from peft_jax.models import abstract_params, build_model, get_preset, init_params
from peft_jax.peft import apply_peft
from peft_jax.peft.base import flatten
from peft_jax.step import make_train_step, make_tx, opt_state_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(**axes):
  return sharding.make_mesh(dict({"data": 1, "fsdp": 1, "tensor": 1}, **axes),
                     jax.devices()[:int(np.prod(list(axes.values())))])


# ----------------------------------------------------------------------------- rules

def test_mesh_sizes_and_errors():
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.mesh_shape({}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(sharding.ShardingError, match="at most one axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(sharding.ShardingError, match="needs 6 devices; 8 are available"):
    sharding.mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(sharding.ShardingError, match="unknown mesh axis 'model'"):
    sharding.parse_rules("mlp=model")
  assert dict(sharding.parse_rules("mlp=_, batch=data"))["mlp"] is None


def test_default_specs_shard_base_fully_and_replicate_peft_leaves():
  mc = get_preset("t5-tiny")
  st = apply_peft(mc, abstract_params(mc), "lora", {"target_modules": ["q", "v"]})
  mesh = _mesh(fsdp=4, tensor=2)
  specs, dropped = sharding.param_specs(mc, st.params, mesh, added=st.added)
  assert specs["encoder/layers/attn/q/kernel"] == P(None, "fsdp", "tensor")
  assert specs["encoder/layers/attn/o/kernel"] == P(None, "tensor", "fsdp")
  assert specs["shared/embedding"] == P("tensor", "fsdp")
  assert specs["encoder/layers/mlp/wo/kernel"] == P(None, "tensor", "fsdp")
  lora = [k for k in specs if "lora_" in k]
  assert lora and all(specs[k] == P() for k in lora)
  assert not dropped
  # a regex rule overrides both: shard LoRA's B over tensor, keep q replicated
  specs2, _ = sharding.param_specs(mc, st.params, mesh, param_rules=r"lora_B$ -> _,_,tensor; "
                            r"attn/q/kernel$ -> ")
  assert specs2["encoder/layers/attn/q/lora_B"] == P(None, None, "tensor")
  assert specs2["encoder/layers/attn/q/kernel"] == P()
  # a dimension the mesh cannot divide stays unsplit, and is reported
  specs3, dropped3 = sharding.param_specs(mc, st.params, _mesh(fsdp=8), rules="heads_n=fsdp")
  assert specs3["encoder/rel_bias/embedding"] == P()    # 4 heads over 8 devices
  assert "encoder/rel_bias/embedding" in dropped3


# ----------------------------------------------------------------------------- equality

def _batch(mc, i, b):
  r = np.random.RandomState(i)
  if mc.model_type == "t5":
    return {"inputs": r.randint(2, 100, (b, 16)).astype(np.int32),
            "input_mask": (r.rand(b, 16) > .2).astype(np.int32),
            "decoder_inputs": r.randint(2, 100, (b, 8)).astype(np.int32),
            "targets": r.randint(2, 100, (b, 8)).astype(np.int32),
            "target_mask": np.ones((b, 8), np.int32)}
  return {"inputs": r.randint(2, 100, (b, 16)).astype(np.int32),
          "input_mask": np.ones((b, 16), np.int32),
          "targets": r.randint(2, 100, (b, 16)).astype(np.int32),
          "target_mask": (r.rand(b, 16) > .3).astype(np.int32)}


def _train(preset, method, mesh, steps=3, accum=1, batch=8):
  mc = get_preset(preset)
  hp = {"num_virtual_tokens": 4} if method == "prefix_tuning" else {"target_modules": "all-linear"}
  st = apply_peft(mc, init_params(mc, jax.random.PRNGKey(0)), method, hp,
                  rng=jax.random.PRNGKey(1))
  model = build_model(mc, st.sites)
  tx = make_tx(ConfigDict(dict(learning_rate=1e-3, schedule="constant", warmup_ratio=0.0,
                               total_steps=10, weight_decay=0.0, grad_clip=1.0)), st.params)
  if mesh is None:
    opt, step = make_train_step(st, model, tx, accum_steps=accum)
    params, ost = st.params, opt.init(st.params)
  else:
    psh = sharding.param_shardings(mc, st.params, mesh, added=st.added)
    opt, step = make_train_step(st, model, tx, accum_steps=accum, mesh=mesh, param_shardings=psh)
    params = sharding.put_tree(st.params, psh)
    ost = jax.jit(opt.init, out_shardings=opt_state_shardings(opt, params, psh, mesh))(params)
  losses = []
  for i in range(steps):
    params, ost, m = step(params, ost, _batch(mc, i, batch), jax.random.PRNGKey(10 + i))
    losses.append(float(m["loss"]))
  return np.array(losses), params


@pytest.mark.parametrize("preset,method,accum,batch", [
    ("t5-tiny", "lora", 1, 8), ("t5-tiny", "prefix_tuning", 2, 16),
    ("llama-tiny", "lora", 2, 16), ("llama-tiny", "prefix_tuning", 1, 8)])
def test_sharded_training_equals_one_device(preset, method, accum, batch):
  ref_loss, ref = _train(preset, method, None, accum=accum, batch=batch)
  ref = {k: np.asarray(v) for k, v in flatten(ref).items()}
  for axes in ({"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4}):
    loss, params = _train(preset, method, _mesh(**axes), accum=accum, batch=batch)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
    flat = flatten(params)
    for k, v in flat.items():
      np.testing.assert_allclose(np.asarray(v), ref[k], atol=1e-5, rtol=0, err_msg=k)
    # the base weights really are split: each device holds 1/(fsdp x tensor) of a q kernel
    q = next(v for k, v in flat.items() if k.endswith("attn/q/kernel"))
    split = axes.get("fsdp", 1) * axes.get("tensor", 1)
    assert q.addressable_shards[0].data.size * split == q.size, (axes, q.sharding)
    trained = [k for k in flat if "lora_" in k or "prefix" in k]
    assert trained and all(flat[k].sharding.is_fully_replicated for k in trained)
    assert not np.allclose(np.asarray(flat[trained[0]]), 0) or method == "lora"


# ----------------------------------------------------------------------------- loading

def test_hf_loader_reads_each_shard_from_the_file(monkeypatch):
  from peft_jax.checkpoint import hf
  from tiny_hf import saved_hf_model
  path = saved_hf_model("t5_v11")[1]
  cfg, ref = hf.load_hf(path)
  mesh = _mesh(fsdp=4, tensor=2)
  sh = sharding.param_shardings(cfg, abstract_params(cfg), mesh)
  # shards are read block by block; the whole-tensor reader is never used
  monkeypatch.setattr(hf._TensorSource, "get", lambda *a: pytest.fail("read a whole tensor"))
  _, got = hf.load_hf(path, cfg=cfg, shardings=sh)
  ref, got = flatten(ref), flatten(got)
  assert ref.keys() == got.keys()
  for k in ref:
    assert got[k].sharding == flatten(sh)[k]
    np.testing.assert_array_equal(np.asarray(got[k]), ref[k], err_msg=k)
  k = "encoder/layers/mlp/wi_0/kernel"
  assert got[k].addressable_shards[0].data.size * 8 == got[k].size


def test_random_init_lands_in_shards():
  mc = get_preset("llama-tiny")
  mesh = _mesh(fsdp=4, tensor=2)
  sh = sharding.param_shardings(mc, abstract_params(mc), mesh)
  p = flatten(sharding.init_sharded(mc, jax.random.PRNGKey(0), sh))
  ref = flatten(init_params(mc, jax.random.PRNGKey(0)))
  for k in ref:
    np.testing.assert_array_equal(np.asarray(p[k]), np.asarray(ref[k]), err_msg=k)
  assert p["layers/mlp/up/kernel"].addressable_shards[0].data.size * 8 == p["layers/mlp/up/kernel"].size


# ----------------------------------------------------------------------------- train.py

def _run(*args, timeout=900, env=None):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  e.pop("XLA_FLAGS", None)
  e.update(env or {})
  return subprocess.run([sys.executable, *args], cwd=REPO, env=e, capture_output=True, text=True,
                        timeout=timeout)


def _last_json(out):
  return json.loads(out.strip().splitlines()[-1])


def _adapter(wd):
  from safetensors.numpy import load_file
  return load_file(str(wd / "adapter" / "adapter.safetensors"))


def test_micro_batch_must_split_over_the_mesh():
  r = _run("train.py", "--config=configs/quickstart.py", "--cpu_devices=8",
           "--config.train.batch_size=12")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "must split evenly over the mesh's data x fsdp = 8" in r.stderr
  assert "Traceback" not in r.stderr


def test_checkpoint_written_under_one_mesh_restores_under_another(tmp_path):
  """Full fine-tuning (every leaf and its Adam moments sharded): 10 steps on fsdp=4 x
  tensor=2, stop; resume on data=2 x fsdp=4; equals 20 straight steps on one device."""
  common = ["train.py", "--config=configs/quickstart.py:full", "--config.train.num_steps=20",
            "--config.train.save_every=10", "--config.train.eval_at_start=False",
            "--config.data.max_eval_examples=10", "--config.eval.batch_size=10"]
  a, b = tmp_path / "straight", tmp_path / "resumed"
  r = _run(*common, f"--workdir={a}")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _run(*common, f"--workdir={b}", "--cpu_devices=8", "--config.mesh.fsdp=4",
           "--config.mesh.tensor=2", "--config.train.stop_at_step=10")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "'fsdp': 4, 'tensor': 2" in r.stdout
  r = _run(*common, f"--workdir={b}", "--cpu_devices=8", "--config.mesh.data=2",
           "--config.mesh.fsdp=4")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout and "at step 10" in r.stdout
  assert "'data': 2, 'fsdp': 4" in r.stdout
  x, y = _adapter(a), _adapter(b)
  assert x.keys() == y.keys() and len(x) > 10
  for k in x:
    np.testing.assert_allclose(y[k], x[k], atol=1e-5, rtol=0, err_msg=k)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(common, workdir, *extra):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, *common, f"--workdir={workdir}", "--cpu_devices=4",
       "--config.mesh.data=2", "--config.mesh.fsdp=4", "--distributed=on",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
       *extra],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  return outs


def test_two_processes_agree_with_one(tmp_path):
  """jax.distributed over localhost (gloo CPU collectives): 2 processes x 4 devices,
  mesh data=2 x fsdp=4, each process building only its half of every batch. The two
  processes save a checkpoint at step 3 and stop, restart and restore it together, and
  finish: the same losses and adapter as one process with 8 devices and with 1 device."""
  common = ["train.py", "--config=configs/quickstart.py", "--config.train.num_steps=6",
            "--config.train.log_every=1", "--config.train.eval_at_start=False",
            "--config.train.save_every=3",
            "--config.data.max_eval_examples=16", "--config.eval.batch_size=16"]
  two = tmp_path / "two"
  first = _two_processes(common, two, "--config.train.stop_at_step=3")
  assert _last_json(first[0][0])["interrupted_at"] == 3
  outs = _two_processes(common, two)
  assert "resumed from" in outs[0][0] and "at step 3" in outs[0][0]
  one8, one1 = tmp_path / "one8", tmp_path / "one1"
  r = _run(*common, f"--workdir={one8}", "--cpu_devices=8", "--config.mesh.data=2",
           "--config.mesh.fsdp=4")
  assert r.returncode == 0, r.stderr[-3000:]
  r1 = _run(*common, f"--workdir={one1}")
  assert r1.returncode == 0, r1.stderr[-3000:]
  # process 0 logs and writes; process 1 prints no table and writes no files of its own
  assert "tuned exact_match" in outs[0][0] and "trainable" in outs[0][0]
  assert "over 8 cpu devices" in outs[0][0]
  assert "process 0 of 2 builds rows 0:16 of each batch of 32" in outs[0][0]
  assert "trainable params" not in outs[1][0]      # no accounting table
  res2, res8, res1 = _last_json(outs[0][0]), _last_json(r.stdout), _last_json(r1.stdout)
  assert res2["tuned"] == res8["tuned"] == res1["tuned"]
  loss = lambda wd: [json.loads(l)["train/loss"] for l in open(wd / "metrics.jsonl")
                     if "train/loss" in l]
  np.testing.assert_allclose(loss(two), loss(one8), atol=1e-5, rtol=0)
  np.testing.assert_allclose(loss(two), loss(one1), atol=1e-5, rtol=0)
  assert len(loss(two)) == 6
  x, y, z = _adapter(two), _adapter(one8), _adapter(one1)
  for k in x:
    np.testing.assert_allclose(x[k], y[k], atol=1e-5, rtol=0, err_msg=k)
    np.testing.assert_allclose(x[k], z[k], atol=1e-5, rtol=0, err_msg=k)


# ----------------------------------------------------------------------------- plan

def _config(path, variant):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(variant)
  c.model.dtype = c.model.param_dtype = "bfloat16"
  c.model.remat = "full"
  c.data.max_source_len, c.data.max_target_len = 64, 16   # a short compile; sizes scale
  c.train.batch_size, c.train.micro_batch_size = 8, 8
  return c


@pytest.mark.parametrize("path,variant", [("survey.py", "t5-11b,lora_qv"), ("tulu.py", "lora")])
def test_plan_argument_bytes_shrink_as_the_mesh_grows(path, variant):
  from peft_jax.plan import plan
  c = _config(path, variant)
  res = {n: plan(c, jax.devices()[:n]) for n in (2, 4, 8)}
  arg = [res[n]["argument_bytes"] for n in (2, 4, 8)]
  assert arg[0] > arg[1] > arg[2], arg
  # the frozen base is split n ways (FSDP); the method's leaves are replicated
  from peft_jax import inputs
  mc = inputs.model_config(c)
  st = apply_peft(mc, abstract_params(mc), c.peft.method, inputs.peft_overrides(c))
  nbytes = lambda x: int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  flat = flatten(st.params)
  base = sum(nbytes(v) for k, v in flat.items() if k not in st.added)
  added = sum(nbytes(flat[k]) for k in st.added)
  assert base > 2 * 6.5e9 and added > 0
  for n in (2, 4, 8):
    r = res[n]
    assert r["unsplit_leaves"] == 0
    # T5's relative-position tables (a few KiB) stay replicated by rule
    assert 0 <= r["param_bytes_per_device"] - (base // n + added) < 64 * 1024, n
    assert r["argument_bytes"] >= r["param_bytes_per_device"] + r["opt_bytes_per_device"]
    assert r["temp_bytes"] > 0 and r["flops"] > 2 * r["total_params"] * 8 * 16
  assert res[2]["flops"] == res[8]["flops"]


def test_plan_command_prints_memory_and_json():
  r = _run("train.py", "--config=configs/tulu.py:lora", "--plan", "--cpu_devices=8",
           "--config.data.max_source_len=48", "--config.data.max_target_len=16",
           "--config.train.batch_size=8", "--config.train.micro_batch_size=8")
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  for row in ("arguments per device", "temporaries per device", "outputs per device",
              "matmul FLOPs per step", "peak per device"):
    assert row in out
  res = _last_json(out)
  assert res["devices"] == 8 and res["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert res["total_params"] == 6_738_415_616 + res["trainable_params"]
