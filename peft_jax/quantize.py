"""Quantized frozen base kernels (QLoRA and int8 / int4): storage, dequantization, layout.

What it does: with ``model.quantize`` = ``int8`` | ``int4`` | ``nf4`` the frozen base kernels
that ``model.quantize_targets`` selects (a regex over kernel paths; default every linear
kernel of the layer stacks, not ``lm_head`` nor the embeddings) are stored quantized, once,
when the base is loaded or created. Every method then trains on top as usual: a ``linear``
site's frozen product ``base(x)`` (:class:`peft_jax.models.layers.Linear`) dequantizes the
kernel to the compute dtype inside the step (as QLoRA's bitsandbytes layer dequantizes
before its matmul), so only the codes and scales live in memory.

Formats (kernel ``W [.., in, out]``, stacked ``[layers, in, out]`` kernels quantize per layer):

* ``int8``: per output channel absmax: ``s[o] = max_i |W[i, o]| / 127``,
  ``q = clip(round(W / s), -127, 127)`` (int8). ``W = q * s`` exactly when ``W`` is an
  integer multiple of ``s`` with absmax ``127 s``.
* ``int4``: blocks of ``model.quantize_block`` (default 64) consecutive input rows per output
  column, absmax scale per block: ``s = max |W_block| / 7``, ``q = clip(round(W / s), -7, 7)``
  (int4). Error per value <= ``s / 2``.
* ``nf4`` (QLoRA, Dettmers et al. 2023): the same blocks, ``s = max |W_block|``, ``q`` the index
  of the nearest of the 16 NormalFloat levels (QLoRA Appendix E; qwix's table) of ``W / s``
  (uint4). Error per value <= half the largest gap between adjacent levels times ``s``.

The scale of a block covers ``block`` input rows; ``in`` must be a multiple of ``block``
(else one error line names the kernel and asks for another ``model.quantize_block``).

Double quantization (``model.quantize_double``, QLoRA section 3): the per-block scales are
themselves quantized: their mean (per layer) is subtracted and the centred scales are stored
as 8-bit codes with one fp32 absmax scale per block of 256 (along the output axis; a whole
row of scales when ``out`` is not a multiple of 256). QLoRA stores FP8 (bitsandbytes' dynamic
8-bit map) there; we use symmetric linear int8 codes, the same 8 bits + 32/256 bits. That is
``8/64 + 32/(64*256) = 0.127`` bits per weight instead of ``32/64 = 0.5``.

Leaves, next to the kernel's path ``P`` (``P/kernel`` is gone): ``P/kernel_q`` (codes, the
kernel's shape and logical axes, so they shard like it), ``P/kernel_scale`` (``[.., in/block,
out]``, ``[.., 1, out]`` for int8; fp32), or with double quantization ``P/kernel_scale_q``
(int8, that shape), ``P/kernel_scale_scale`` (``[.., in/block, out/256]`` fp32) and
``P/kernel_scale_mean`` (``[.., 1, 1]`` fp32). They are frozen base leaves (no optimizer state).

qwix (``qwix.QArray`` / ``qwix.dequantize``) dequantizes; ``nf4`` codes are checked against
``qwix.quantize(.., 'nf4', tiled_axes=..)`` in the tests. The codes are computed here (a
nearest-level search over the 15 midpoints, memory O(n); qwix's NF4 encoder builds an
``[n, 16]`` distance table, and its int scales use ``qmax + 0.5``, which is not the absmax
rule above). Double quantization is ours (qwix has none).

Readers of the base weight: :func:`base_kernel` (a flat tree) and
:func:`module_kernel` (a bound linen module, inside a site handler) return the dequantized
kernel; merging onto a quantized base is refused (:func:`refuse_merge`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "int8", "int4", "nf4")
#: every linear kernel of the layer stacks (LLaMA ``layers/...``, T5 ``encoder|decoder/layers``)
DEFAULT_TARGETS = r"(.+/)?layers/.+/kernel"
DOUBLE_BLOCK = 256
SUFFIXES = ("kernel_q", "kernel_scale", "kernel_scale_q", "kernel_scale_scale",
            "kernel_scale_mean")

#: QLoRA Appendix E's NF4 levels (bitsandbytes' table; qwix's get_nf4_buckets)
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


class QuantizeError(ValueError):
  """A bad ``model.quantize*`` setting or an unsupported operation on a quantized base."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  mode: str = "none"
  targets: str = DEFAULT_TARGETS
  double: bool = False
  block: int = 64

  @property
  def on(self) -> bool:
    return self.mode != "none"


def spec_of(mc) -> QuantSpec:
  """The quantization of a model config (``quantize*`` fields; ``none`` when absent)."""
  return QuantSpec(mode=getattr(mc, "quantize", "none") or "none",
                   targets=getattr(mc, "quantize_targets", None) or DEFAULT_TARGETS,
                   double=bool(getattr(mc, "quantize_double", False)),
                   block=int(getattr(mc, "quantize_block", 64) or 64))


def check_spec(spec: QuantSpec) -> QuantSpec:
  if spec.mode not in MODES:
    raise QuantizeError(f"model.quantize={spec.mode!r}: expected one of {', '.join(MODES)}")
  try:
    re.compile(spec.targets)
  except re.error as e:
    raise QuantizeError(f"model.quantize_targets={spec.targets!r} is not a regex ({e})") from None
  if spec.block < 1:
    raise QuantizeError(f"model.quantize_block={spec.block}: expected a positive integer")
  return spec


def qtype_of(mode: str):
  return {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}[mode]


def selected(spec: QuantSpec, flat_shapes: Dict[str, Any]):
  """The kernel paths (``.../kernel``, rank >= 2) that ``spec`` quantizes."""
  if not spec.on:
    return []
  rx = re.compile(spec.targets)
  out = [k for k, v in sorted(flat_shapes.items())
         if k.endswith("/kernel") and len(v.shape) >= 2 and rx.fullmatch(k)]
  for k in out:
    d_in = flat_shapes[k].shape[-2]
    if spec.mode != "int8" and d_in % spec.block:
      raise QuantizeError(f"model.quantize_block={spec.block} does not divide the input size "
                          f"{d_in} of {k}; set model.quantize_block to a divisor of it")
  return out


# ----------------------------------------------------------------------------- one kernel

def _absmax_codes(w, axis_keep, qmax, dtype):
  """``w [..., nb, B, out]`` -> codes, scale ``[..., nb, 1, out]`` (absmax / qmax)."""
  del axis_keep
  amax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)
  s = jnp.where(amax > 0, amax / qmax, 1.0)
  q = jnp.clip(jnp.round(w / s), -qmax, qmax).astype(dtype)
  return q, s


def nf4_encode(x):
  """Index of the nearest NF4 level of ``x`` in ``[-1, 1]`` (uint4); ties go to the
  upper level, as bitsandbytes' midpoint tree."""
  mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
  return jnp.searchsorted(mids, x, side="left").astype(jnp.uint4)


def quantize_kernel(w, mode: str, block: int = 64, double: bool = False) -> Dict[str, jax.Array]:
  """``{suffix: array}`` of a kernel ``[.., in, out]`` (leading dims are layers)."""
  w = jnp.asarray(w, jnp.float32)
  *lead, d_in, d_out = w.shape
  if mode == "int8":
    q, s = _absmax_codes(w[..., None, :, :], None, 127.0, jnp.int8)
    q, s = q.reshape(w.shape), s.reshape(*lead, 1, d_out)
  else:
    if d_in % block:
      raise QuantizeError(f"quantize block {block} does not divide the input size {d_in}")
    wb = w.reshape(*lead, d_in // block, block, d_out)
    if mode == "int4":
      q, s = _absmax_codes(wb, None, 7.0, jnp.int4)
    elif mode == "nf4":
      amax = jnp.max(jnp.abs(wb), axis=-2, keepdims=True)
      s = jnp.where(amax > 0, amax, 1.0)
      q = nf4_encode(wb / s)
    else:
      raise QuantizeError(f"unknown quantize mode {mode!r}; expected int8, int4 or nf4")
    q, s = q.reshape(w.shape), s.reshape(*lead, d_in // block, d_out)
  if not double:
    return {"kernel_q": q, "kernel_scale": s}
  return {"kernel_q": q, **double_quantize(s)}


def _second_block(d_out: int) -> int:
  return DOUBLE_BLOCK if d_out % DOUBLE_BLOCK == 0 else d_out


def double_quantize(s) -> Dict[str, jax.Array]:
  """Scales ``[.., nb, out]`` -> int8 codes of ``s - mean`` in blocks of 256 along ``out``."""
  *lead, nb, d_out = s.shape
  b2 = _second_block(d_out)
  mean = jnp.mean(s, axis=(-2, -1), keepdims=True)
  c = (s - mean).reshape(*lead, nb, d_out // b2, b2)
  amax = jnp.max(jnp.abs(c), axis=-1, keepdims=True)
  s2 = jnp.where(amax > 0, amax / 127.0, 1.0)
  q2 = jnp.clip(jnp.round(c / s2), -127, 127).astype(jnp.int8)
  return {"kernel_scale_q": q2.reshape(s.shape), "kernel_scale_scale": s2[..., 0],
          "kernel_scale_mean": mean}


def scales_of(leaves: Dict[str, Any]):
  """The fp32 block scales (undoing double quantization)."""
  if "kernel_scale" in leaves:
    return jnp.asarray(leaves["kernel_scale"], jnp.float32)
  import qwix
  q2 = jnp.asarray(leaves["kernel_scale_q"])
  s2 = jnp.asarray(leaves["kernel_scale_scale"], jnp.float32)
  c = qwix.dequantize(qwix.QArray(q2, s2, None, jnp.int8))
  return c + jnp.asarray(leaves["kernel_scale_mean"], jnp.float32)


def mode_of_codes(dtype) -> str:
  dt = jnp.dtype(dtype)
  if dt == jnp.dtype(jnp.int8):
    return "int8"
  if dt == jnp.dtype(jnp.int4):
    return "int4"
  if dt == jnp.dtype(jnp.uint4):
    return "nf4"
  raise QuantizeError(f"quantized kernel codes of dtype {dt}: expected int8, int4 or uint4 (nf4)")


def dequantize_kernel(leaves: Dict[str, Any], dtype=jnp.float32):
  """The kernel from its leaves (``{suffix: array}``), in ``dtype`` (via ``qwix.dequantize``)."""
  import qwix
  q = jnp.asarray(leaves["kernel_q"])
  s = scales_of(leaves)
  w = qwix.dequantize(qwix.QArray(q, s, None, qtype_of(mode_of_codes(q.dtype))))
  return w.astype(dtype)


def abstract_kernel(shape, dtype, mode: str, block: int, double: bool):
  """``{suffix: ShapeDtypeStruct}`` of a quantized kernel of ``shape``."""
  return jax.eval_shape(lambda w: quantize_kernel(w, mode, block, double),
                        jax.ShapeDtypeStruct(tuple(shape), dtype))


def leaf_axes(kernel_axes: Tuple, suffix: str, mode: str) -> Tuple:
  """Logical axes of a quantized leaf from the kernel's (``(.., in_axis, out_axis)``)."""
  *lead, a_in, a_out = tuple(kernel_axes)
  lead = tuple(lead)
  if suffix == "kernel_q":
    return tuple(kernel_axes)
  if suffix in ("kernel_scale", "kernel_scale_q"):
    return lead + ((None if mode == "int8" else a_in), a_out)
  if suffix == "kernel_scale_scale":
    return lead + ((None if mode == "int8" else a_in), None)
  return lead + (None, None)     # kernel_scale_mean


# ----------------------------------------------------------------------------- trees

def is_quantized(flat, path: str) -> bool:
  """Whether module ``path`` (no ``/kernel``) holds a quantized kernel in ``flat``."""
  return f"{path}/kernel_q" in flat


def quantized_modules(flat):
  return sorted(k[: -len("/kernel_q")] for k in flat if k.endswith("/kernel_q"))


def leaves_of(flat, path: str) -> Dict[str, Any]:
  return {s: flat[f"{path}/{s}"] for s in SUFFIXES if f"{path}/{s}" in flat}


def base_kernel(flat, path: str, dtype=None):
  """The base kernel of module ``path`` (``.../q``) from a flat tree: dequantized (fp32, or
  ``dtype``) when stored quantized, else the stored kernel (cast to ``dtype`` if given)."""
  if is_quantized(flat, path):
    return dequantize_kernel(leaves_of(flat, path), dtype or jnp.float32)
  w = jnp.asarray(flat[f"{path}/kernel"])
  return w if dtype is None else w.astype(dtype)


def module_kernel(module, dtype=None):
  """The base kernel of a bound :class:`~peft_jax.models.layers.Linear` (inside a site
  handler): dequantized when stored quantized."""
  if module.has_variable("params", "kernel_q"):
    leaves = {s: module.get_variable("params", s) for s in SUFFIXES
              if module.has_variable("params", s)}
    return dequantize_kernel(leaves, dtype or jnp.float32)
  w = module.get_variable("params", "kernel")
  return w if dtype is None else w.astype(dtype)


def quantize_flat(spec: QuantSpec, flat: Dict[str, Any], paths=None) -> Dict[str, Any]:
  """``flat`` with each selected ``.../kernel`` replaced by its quantized leaves."""
  paths = selected(spec, flat) if paths is None else paths
  out = dict(flat)
  for k in paths:
    w = out.pop(k)
    head = k[: -len("kernel")]
    for s, v in jax.jit(quantize_kernel, static_argnums=(1, 2, 3))(
        w, spec.mode, spec.block, spec.double).items():
      out[head + s] = v
  return out


def abstract_flat(spec: QuantSpec, flat: Dict[str, Any]) -> Dict[str, Any]:
  out = dict(flat)
  for k in selected(spec, flat):
    v = out.pop(k)
    head = k[: -len("kernel")]
    for s, a in abstract_kernel(v.shape, v.dtype, spec.mode, spec.block, spec.double).items():
      out[head + s] = a
  return out


def axes_flat(spec: QuantSpec, flat_shapes, flat_axes: Dict[str, Any]) -> Dict[str, Any]:
  """Logical axes (``PartitionSpec``s) of the quantized tree."""
  from jax.sharding import PartitionSpec as P
  out = dict(flat_axes)
  for k in selected(spec, flat_shapes):
    ax = out.pop(k)
    head = k[: -len("kernel")]
    sufs = ["kernel_q"] + (["kernel_scale_q", "kernel_scale_scale", "kernel_scale_mean"]
                           if spec.double else ["kernel_scale"])
    for s in sufs:
      out[head + s] = P(*leaf_axes(tuple(ax), s, spec.mode))
  return out


def nbytes(leaf, shape=None) -> float:
  """Bytes of a leaf (or of ``shape`` in its dtype, e.g. one device's shard), 4-bit codes
  at half a byte per value (as stored packed on accelerators)."""
  n = int(np.prod(leaf.shape if shape is None else shape))
  dt = jnp.dtype(leaf.dtype)
  if dt in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
    return n / 2
  return n * dt.itemsize


def is_scale(path: str) -> bool:
  """A quantization scale leaf (bookkeeping of a quantized kernel, not a model parameter)."""
  return path.rsplit("/", 1)[-1].startswith("kernel_scale")


def refuse_merge(flat, what: str = "merge"):
  """One error line when a flat tree holds quantized kernels."""
  from peft_jax.peft.base import PeftConfigError
  mods = quantized_modules(flat)
  if mods:
    raise PeftConfigError(
        f"cannot {what} onto a quantized base ({len(mods)} quantized kernels, e.g. {mods[0]}): "
        "the merged kernel would have to be re-quantized (lossy); load the base with "
        "model.quantize=none (the adapter loads onto it unchanged) and merge there")


def describe(spec: Optional[QuantSpec]) -> str:
  if spec is None or not spec.on:
    return "none"
  extra = "" if spec.mode == "int8" else f", blocks of {spec.block}"
  return f"{spec.mode}{extra}{', double-quantized scales' if spec.double else ''}"
