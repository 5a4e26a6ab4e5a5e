"""Plan mode: compile the training step ahead of time on a target mesh, load nothing.

``python train.py --config=... --plan`` builds the parameter tree abstractly
(``jax.eval_shape``), applies the method, derives the shardings, and lowers and
compiles the real training step (the one ``train.py`` runs: same optimizer,
accumulation, remat policy and shardings) for abstract inputs of the largest
bucket (``data.max_source_len`` / ``max_target_len``). XLA then reports per
device: argument, output, temporary and aliased (donated) bytes, and the FLOPs
of one step (counted from the step's jaxpr). No weights, no data, no device memory.
A quantized base (``model.quantize``) counts 4-bit codes at half a byte per value in the
params/device column (XLA:CPU's argument bytes store them one per byte).

Targets: fake CPU devices (``--cpu_devices``, the default here), or a real
topology through ``jax.experimental.topologies`` (``--plan_topology=v5e:2x4``)
where that platform's compiler (e.g. libtpu) is installed. Numbers from the CPU
compiler are estimates for other hardware: argument and output bytes follow
from the shardings exactly; temporaries depend on each backend's fusion and
scheduling (see docs/scaling.md).
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

#: usable accelerator memory per device (bytes) for the fit column
HARDWARE = {"tpu-v4": 32 * 2**30, "tpu-v5e": 16 * 2**30, "h100": 80 * 2**30}
#: a plan "fits" when its peak is at most this share of the device memory (runtime,
#: allocator fragmentation and the CPU compiler's different scheduling)
HEADROOM = 0.9


def abstract_batch(cfg, mc, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
  """The largest bucket's batch of ``cfg`` (see :meth:`peft_jax.models.Family.abstract_batch`)."""
  from peft_jax.models import family_of
  return family_of(mc).abstract_batch(batch_size, int(cfg.data.max_source_len),
                                      int(cfg.data.max_target_len))


def jaxpr_flops(jaxpr) -> float:
  """Matmul FLOPs of a (closed) jaxpr: ``2 * out elements * contracted size`` per
  ``dot_general``; scans count ``length`` times; nested jaxprs (jit, remat, custom
  derivatives) once, so rematerialised forwards are included; ``cond`` its costliest
  branch. XLA's own cost analysis counts a loop body once, which under-reports
  scanned layers; this count is the whole step (all devices)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * float(np.prod(out)) * float(np.prod([lhs[d] for d in lc]))
      continue
    if name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
      continue
    mult = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += mult * jaxpr_flops(sub)
  return total


def _with(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def topology_devices(name: str):
  """Devices of a target topology, e.g. ``"v5e:2x4"`` or ``"tpu:v4:2x2x2"`` (needs the
  platform's compiler installed; raises a clear error otherwise)."""
  from jax.experimental import topologies
  platform, _, topo = name.partition(":")
  if platform.startswith(("v4", "v5", "v6")):
    platform, topo = "tpu", name
  try:
    return topologies.get_topology_desc(topology_name=topo, platform=platform).devices
  except Exception as e:
    from peft_jax.inputs import ConfigError
    raise ConfigError(f"--plan_topology={name!r}: this machine cannot describe that topology "
                      f"({type(e).__name__}: {str(e)[:200]}); use fake CPU devices "
                      "(--cpu_devices) instead") from None


def plan(cfg, devices: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
  """Compile the step for ``cfg`` on ``devices`` (default: the mesh config over all
  devices) and return the memory and FLOP figures (per device)."""
  from peft_jax import sharding
  from peft_jax.builder import build
  from peft_jax.peft.base import flatten
  from peft_jax.quantize import describe as describe_quant, is_scale, nbytes, spec_of

  built = build(cfg, devices)
  cfg, mc, state, mesh, psh = built.cfg, built.mc, built.state, built.mesh, built.param_sh
  tc, dropped, micro = cfg.train, built.dropped, built.micro_batch
  total = int(tc.num_steps) if tc.get("num_steps") else 1000
  opt, step, osh = built.train_step(total)
  a_params = _with(state.params, psh)
  a_opt = _with(jax.eval_shape(opt.init, state.params), osh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
           for k, v in abstract_batch(cfg, mc, int(tc.batch_size)).items()}
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  t0 = time.time()
  flops = jaxpr_flops(step.trace(a_params, a_opt, batch, key).jaxpr)
  lowered = step.lower(a_params, a_opt, batch, key)
  compiled = lowered.compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()

  def per_device(tree, shardings):    # 4-bit codes (model.quantize) at half a byte
    tot = 0
    for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
      tot += nbytes(x, s.shard_shape(x.shape))
    return int(tot)

  g = lambda name: int(getattr(mem, name, 0) or 0) if mem is not None else 0
  arg, out, tmp, alias = (g("argument_size_in_bytes"), g("output_size_in_bytes"),
                          g("temp_size_in_bytes"), g("alias_size_in_bytes"))
  peak = arg + out - alias + tmp
  is_trainable = flatten(state.trainable)
  trainable = sum(int(np.prod(v.shape)) for k, v in flatten(state.params).items()
                  if is_trainable[k])
  flat_params, flat_sh = flatten(a_params), flatten(psh)
  trainable_bytes = int(sum(nbytes(x, flat_sh[k].shard_shape(x.shape))
                            for k, x in flat_params.items() if is_trainable[k]))
  res = {
      "model": cfg.model.get("name") or cfg.model.get("checkpoint"), "method": cfg.peft.method,
      "devices": int(mesh.devices.size), "platform": mesh.devices.flat[0].platform,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "batch_size": int(tc.batch_size), "micro_batch_size": micro,
      "seq": [int(cfg.data.max_source_len), int(cfg.data.max_target_len)],
      "remat": mc.remat, "param_dtype": str(mc.param_dtype), "dtype": str(mc.dtype),
      "total_params": sum(int(np.prod(v.shape)) for k, v in flatten(state.params).items()
                          if not is_scale(k)),
      "trainable_params": trainable, "quantize": describe_quant(spec_of(mc)),
      "param_bytes_per_device": per_device(a_params, psh),
      "trainable_param_bytes_per_device": trainable_bytes,
      "opt_bytes_per_device": per_device(a_opt, osh),
      "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": tmp,
      "peak_bytes": peak, "flops": flops,
      "flops_per_device": flops / int(mesh.devices.size), "compile_s": round(compile_s, 1),
      "unsplit_leaves": len(dropped),
  }
  res["frozen_param_bytes_per_device"] = res["param_bytes_per_device"] - trainable_bytes
  res["fits"] = {hw: peak <= HEADROOM * cap for hw, cap in HARDWARE.items()}
  return res


def _gb(x):
  return f"{x / 2**30:.2f} GiB"


def format_plan(r: Dict[str, Any]) -> str:
  rows = [("model / method", f"{r['model']} / {r['method']}"),
          ("mesh", f"{r['mesh']} ({r['devices']} {r['platform']} devices)"),
          ("batch / micro-batch / seq", f"{r['batch_size']} / {r['micro_batch_size']} / "
                                        f"{r['seq']}"),
          ("remat / dtypes", f"{r['remat']} / params {r['param_dtype']}, compute {r['dtype']}"),
          ("params (trainable)", f"{r['total_params']:,} ({r['trainable_params']:,})"),
          ("quantized base", r.get("quantize", "none")),
          ("params per device", f"{_gb(r['param_bytes_per_device'])} (frozen "
                                f"{_gb(r['frozen_param_bytes_per_device'])}, trainable "
                                f"{_gb(r['trainable_param_bytes_per_device'])})"),
          ("optimizer state per device", _gb(r["opt_bytes_per_device"])),
          ("arguments per device", _gb(r["argument_bytes"])),
          ("outputs per device (aliased)", f"{_gb(r['output_bytes'])} ({_gb(r['alias_bytes'])})"),
          ("temporaries per device", _gb(r["temp_bytes"])),
          ("peak per device", _gb(r["peak_bytes"])),
          ("matmul FLOPs per step", f"{r['flops']:.3e} ({r['flops_per_device']:.3e} per device)"),
          ("fits", ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r["fits"].items())),
          ("compile", f"{r['compile_s']} s")]
  w = max(len(a) for a, _ in rows)
  return "\n".join(f"{a.ljust(w)}  {b}" for a, b in rows)
