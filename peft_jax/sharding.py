"""Meshes, logical-axis rules and shardings: how a run spreads over devices.

Design (after MaxText's logical axis rules and big_vision's regex rules):

* **Mesh.** Three named axes, ``data``, ``fsdp`` and ``tensor``, sized by
  ``config.mesh`` (``-1`` = "the rest of the devices"). The batch is split over
  ``data x fsdp``; base weights are split over ``fsdp`` (ZeRO-3 style: gathered
  layer by layer inside the step) and, when ``tensor > 1``, Megatron-style over
  ``tensor`` (heads, MLP width, vocabulary).
* **Logical rules.** Every model parameter carries logical axis names
  (``embed``, ``heads``, ``mlp``, ...; see :mod:`peft_jax.models.layers`).
  ``config.mesh.rules`` maps them to mesh axes (defaults: :data:`DEFAULT_RULES`).
  A dimension whose size the mesh axes do not divide stays unsplit, and
  :func:`describe` lists where that happened.
* **PEFT leaves** (the method's own, small) are replicated unless a rule in
  ``config.mesh.param_rules`` says otherwise. These rules are regexes over the
  flattened parameter paths (``encoder/layers/attn/q/lora_a``), the language
  used for targets and freezing too; the first match wins and also overrides
  the logical rules for base weights.
* **Activations.** Models call :func:`peft_jax.models.layers.constrain` with
  logical names (``batch``, ``act_len``, ``act_embed``, ...); inside
  :func:`activation_sharding` that becomes a sharding constraint, elsewhere it
  does nothing.
* **Shapes first.** Shardings are derived from ``jax.eval_shape`` trees, so
  weights are created (:func:`init_sharded`) or loaded straight into their shards
  and never exist whole on one device.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

#: logical axis name -> mesh axes (None: not split). Parameters and activations.
DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("relpos_buckets", None),
    ("heads_n", None),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


class ShardingError(ValueError):
  """A bad mesh or sharding rule (named in the message)."""


# ----------------------------------------------------------------------------- config parsing

def _axes(v) -> Any:
  """``"fsdp"``, ``"data+fsdp"``, ``("data", "fsdp")``, ``""``/``None``/``"_"`` -> mesh axes."""
  if v is None:
    return None
  if isinstance(v, (list, tuple)):
    v = tuple(a for a in v if a)
    out = v if len(v) > 1 else (v[0] if v else None)
  else:
    v = str(v).strip()
    if v in ("", "_", "None", "none"):
      return None
    parts = tuple(p.strip() for p in v.split("+") if p.strip())
    out = parts if len(parts) > 1 else parts[0]
  for a in (out if isinstance(out, tuple) else (out,)):
    if a not in MESH_AXES:
      raise ShardingError(f"unknown mesh axis {a!r}; expected one of {', '.join(MESH_AXES)}")
  return out


def parse_rules(rules) -> Tuple[Tuple[str, Any], ...]:
  """Logical rules: the defaults updated by ``rules``, given as a mapping, a sequence of
  pairs, or a string ``"embed=fsdp, mlp=tensor, batch=data+fsdp, vocab=_"``."""
  merged = dict(DEFAULT_RULES)
  if not rules:
    return tuple(merged.items())
  if isinstance(rules, str):
    pairs = []
    for part in [p.strip() for p in rules.split(",") if p.strip()]:
      if "=" not in part:
        raise ShardingError(f"mesh.rules entry {part!r} is not 'logical=mesh_axes'")
      k, v = part.split("=", 1)
      pairs.append((k.strip(), v.strip()))
  elif isinstance(rules, Mapping) or hasattr(rules, "items"):
    pairs = list(rules.items())
  else:
    pairs = list(rules)
  for k, v in pairs:
    merged[k] = _axes(v)
  return tuple(merged.items())


def parse_param_rules(rules) -> Tuple[Tuple[str, Tuple[Any, ...]], ...]:
  """Regex rules over flattened paths: a sequence of ``(regex, spec)`` or a string
  ``"regex -> d0,d1,...; regex -> ..."``; a dim is a mesh axis, ``a+b``, or ``_`` (unsplit)."""
  if not rules:
    return ()
  if isinstance(rules, str):
    pairs = []
    for part in [p.strip() for p in rules.split(";") if p.strip()]:
      if "->" not in part:
        raise ShardingError(f"mesh.param_rules entry {part!r} is not 'regex -> dims'")
      rx, dims = part.split("->", 1)
      pairs.append((rx.strip(), [d.strip() for d in dims.split(",")] if dims.strip() else []))
  else:
    pairs = list(rules)
  out = []
  for rx, dims in pairs:
    try:
      re.compile(rx)
    except re.error as e:
      raise ShardingError(f"mesh.param_rules regex {rx!r} does not compile: {e}") from None
    out.append((rx, tuple(_axes(d) for d in dims)))
  return tuple(out)


# ----------------------------------------------------------------------------- mesh

def mesh_shape(mesh_cfg, n_devices: int) -> Dict[str, int]:
  """Sizes of data/fsdp/tensor; one ``-1`` takes the rest. Errors name the mismatch."""
  sizes = {a: int(_get(mesh_cfg, a, 1 if a != "fsdp" else -1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ShardingError(f"mesh: at most one axis may be -1, got {sizes}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ShardingError(f"mesh: axis sizes must be positive or -1, got {sizes}")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if n_devices % fixed:
      raise ShardingError(f"mesh {sizes}: {n_devices} devices are not divisible by the fixed "
                          f"axes' product {fixed}")
    sizes[free[0]] = n_devices // fixed
  if int(np.prod(list(sizes.values()))) != n_devices:
    raise ShardingError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices; "
                        f"{n_devices} are available (set an axis to -1 to use the rest)")
  return sizes


def _get(c, k, default):
  if c is None:
    return default
  v = c.get(k, default) if hasattr(c, "get") else getattr(c, k, default)
  return default if v is None else v


def make_mesh(mesh_cfg=None, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ``Mesh(data, fsdp, tensor)`` over ``devices`` (default: all). Devices are laid out
  by ``mesh_utils`` so the tensor axis lies within a host/ICI neighbourhood."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # e.g. topologies mesh_utils does not know: plain order
    arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, MESH_AXES)


def batch_shards(mesh: Mesh) -> int:
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


# ----------------------------------------------------------------------------- specs

def _size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def _fit(spec: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> Tuple[P, Tuple[int, ...]]:
  """Drops mesh axes used twice or not dividing their dimension; returns the spec and
  the dims left unsplit because of divisibility."""
  used, out, dropped = set(), [], []
  for d, (axes, n) in enumerate(zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape)):
    if axes is None:
      out.append(None)
      continue
    tup = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a not in used)
    if not tup or n % _size(mesh, tup):
      if tup and _size(mesh, tup) > 1:
        dropped.append(d)
      out.append(None)
      continue
    used.update(tup)
    out.append(tup if len(tup) > 1 else tup[0])
  while out and out[-1] is None:
    out.pop()
  return P(*out), tuple(dropped)


def logical_to_mesh(names: Sequence[Optional[str]], rules) -> Tuple[Any, ...]:
  table = dict(rules)
  out = []
  for n in names:
    if n is not None and n not in table:
      raise ShardingError(f"logical axis {n!r} has no rule; rules cover {sorted(table)}")
    out.append(None if n is None else table[n])
  return tuple(out)


def param_specs(model_cfg, params, mesh: Mesh, rules=None, param_rules=None,
                added: Sequence[str] = ()) -> Tuple[Dict[str, P], Dict[str, Tuple[int, ...]]]:
  """Flat ``path -> PartitionSpec`` for a (possibly abstract) tree with the method's leaves.

  Base leaves follow their logical axes through ``rules``; the method's leaves
  (``added``) are replicated; ``param_rules`` (regex over paths) override both.
  Also returns ``path -> dims left unsplit`` (divisibility)."""
  from peft_jax.models import logical_axes
  from peft_jax.tree import flatten
  rules = parse_rules(rules) if not isinstance(rules, tuple) else rules
  prules = parse_param_rules(param_rules)
  logical = flatten(logical_axes(model_cfg))
  flat = flatten(params)
  added = set(added)
  specs, dropped = {}, {}
  for path, leaf in flat.items():
    shape = tuple(leaf.shape)
    hit = next((dims for rx, dims in prules if re.search(rx, path)), None)
    if hit is not None:
      want = hit
    elif path in logical and path not in added:
      want = logical_to_mesh(tuple(logical[path]), rules)
    else:
      want = ()
    if len(want) > len(shape):
      raise ShardingError(f"sharding rule for {path} names {len(want)} dims; the leaf has shape "
                          f"{shape}")
    specs[path], d = _fit(want, shape, mesh)
    if d:
      dropped[path] = d
  return specs, dropped


def param_shardings(model_cfg, params, mesh: Mesh, rules=None, param_rules=None, added=()):
  """Nested tree of ``NamedSharding`` matching ``params``."""
  from peft_jax.tree import unflatten
  specs, _ = param_specs(model_cfg, params, mesh, rules, param_rules, added)
  return unflatten({k: NamedSharding(mesh, s) for k, s in specs.items()})


def like_params(tree, params, shardings, mesh: Mesh):
  """Shardings for a tree whose leaves mirror parameters (optimizer moments, gradient
  accumulators): a leaf whose key path ends with a parameter's path and has its shape gets
  that parameter's sharding; everything else (counts, scalars) is replicated."""
  from peft_jax.tree import flatten
  flat_p = flatten(params)
  flat_s = flatten(shardings)
  repl = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = []
    for k in reversed(path):
      if isinstance(k, jax.tree_util.DictKey):
        keys.append(str(k.key))
      else:
        break
    keys.reverse()
    for i in range(len(keys)):
      p = "/".join(keys[i:])
      if p in flat_s and tuple(getattr(leaf, "shape", ())) == tuple(flat_p[p].shape):
        return flat_s[p]
    return repl

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- activations

@contextlib.contextmanager
def activation_sharding(mesh: Optional[Mesh], rules=None):
  """Within this context (entered while a function is traced), the models' logical
  ``constrain`` calls become ``with_sharding_constraint`` on ``mesh``."""
  from peft_jax.models import layers
  if mesh is None:
    yield
    return
  rules = parse_rules(rules) if not isinstance(rules, tuple) else rules

  def fn(x, names):
    spec, _ = _fit(logical_to_mesh(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  token = layers.ACTIVATION_CONSTRAINT.set(fn)
  try:
    yield
  finally:
    layers.ACTIVATION_CONSTRAINT.reset(token)


# ----------------------------------------------------------------------------- materialising

def put(x, sharding: NamedSharding):
  """Places one leaf (a host array, or a jax.Array with another layout) into ``sharding``,
  shard by shard; works when ``sharding`` spans devices of other processes (each process
  must hold the same value)."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if isinstance(x, jax.Array) and x.is_fully_addressable and sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda y: y, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put_tree(tree, shardings):
  return jax.tree_util.tree_map(put, tree, shardings)


def init_sharded(model_cfg, rng, shardings):
  """Random base weights created directly in their shards (one jit; no device holds
  more than its share). Kernels that ``model_cfg.quantize`` selects are quantized inside
  the same jit (:mod:`peft_jax.quantize`)."""
  from peft_jax.models import _quantized, init_boxed
  import flax.linen as nn

  def init(r):
    tree = nn.unbox(init_boxed(model_cfg, r))
    return _quantized(model_cfg, tree, lambda spec, flat: _quantize_traced(spec, flat))

  return jax.jit(init, out_shardings=shardings)(rng)


def _quantize_traced(spec, flat):
  from peft_jax import quantize
  out = dict(flat)
  for k in quantize.selected(spec, flat):
    w = out.pop(k)
    for s, v in quantize.quantize_kernel(w, spec.mode, spec.block, spec.double).items():
      out[k[: -len("kernel")] + s] = v
  return out


def gather(x) -> np.ndarray:
  """A host copy of a (possibly multi-process) array, e.g. to write an adapter file."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(mesh: Mesh, specs: Mapping[str, P], dropped: Mapping[str, Tuple[int, ...]],
             shapes: Mapping[str, Any], limit: int = 12) -> str:
  """A short table: the mesh, and the leaves whose dims could not be split."""
  lines = [f"mesh {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} "
           f"devices"]
  for p, d in list(dropped.items())[:limit]:
    lines.append(f"  unsplit (size not divisible): {p} {tuple(shapes[p].shape)} dims {d} "
                 f"-> {specs[p]}")
  if len(dropped) > limit:
    lines.append(f"  ... {len(dropped) - limit} more")
  return "\n".join(lines)


Shardings = Union[Dict[str, Any], Any]


# ----------------------------------------------------------------------------- host data

def local_rows(sharding: NamedSharding, batch_size: int) -> Tuple[int, int]:
  """``(lo, hi)``: the rows of a global batch that this process's devices hold (one
  contiguous block; each host builds only those rows)."""
  idx = sharding.addressable_devices_indices_map((batch_size,))
  spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                  for s in idx.values()})
  lo, hi = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != hi - lo:
    raise ShardingError(f"this process's batch rows {spans} are not one contiguous block; "
                        "order the mesh so each host's devices are adjacent on data x fsdp")
  return lo, hi


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding, batch_size: int):
  """A global ``jax.Array`` batch from this process's rows (see :func:`local_rows`)."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
          for k, v in local.items()}
