r"""LoRA [lora] and DoRA [dora].

What it adds: for every targeted linear module ``W`` (kernel ``[in, out]``,
stacked ``[layers, in, out]``) two leaves next to the kernel,
``lora_A [.., in, r]`` and ``lora_B [.., r, out]``; DoRA also a magnitude
vector ``lora_magnitude [.., out]``. Where it acts: the ``linear`` site,
``y = x W + dropout(x) A B * s`` with ``s = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with ``use_rslora``). DoRA:
``y = m / ||W + s A B||_c * (x W + dropout(x) A B s)`` where the column norm
(over the input axis, one value per output) is treated as a constant in the
backward pass (DoRA paper §4.3, as HF PEFT). Defaults, names and
initialisation follow HF PEFT's ``LoraConfig`` (0.21): ``r=8``,
``lora_alpha=8``, ``lora_dropout=0``, targets ``q, v`` on T5 and LLaMA,
``A ~ U(+-1/sqrt(in))`` (torch's kaiming-uniform with ``a=sqrt(5)``), ``B = 0``
(``init_lora_weights=True``; ``"gaussian"``: ``A ~ N(0, 1/r)``; ``False``: B
random too). DoRA's magnitude starts at ``||W + s A B||_c = ||W||_c``, so both
methods are the base model at step 0.

Layer selection: stacked leaves keep all layers; unselected layers get
``A = B = 0`` (and DoRA ``m = ||W||``), which is the identity, and an update
mask keeps them frozen (with ``A = B = 0`` their gradients are exactly zero
anyway). Counts include only the selected layers.

Per-module ranks and alphas (HF's ``rank_pattern`` / ``alpha_pattern``): each key is
matched as HF PEFT's ``get_pattern_key`` does, ``re.match(rf"(.*\.)?({key})$", name)``
against the ``transformers`` module name of each module in each layer
(``model.layers.1.self_attn.q_proj``, ``encoder.block.0.layer.0.SelfAttention.q``; the
first matching key wins, no match: ``r`` / ``lora_alpha``). A stacked leaf keeps one
shape for its layers, so ``A``/``B`` are stored at the largest rank among the module's
selected layers; the rank columns past a layer's own rank are zero, masked out of
training and out of the counts (:meth:`update_masks`). Then each module also gets a
frozen ``lora_scale [..]`` leaf (the per-layer ``alpha / r``), a constant that is not
counted as a parameter.

T5 v1.0's tied head (``lm_head``, HF's ``nn.Linear`` sharing the input embedding, after
the ``d_model**-0.5`` rescale) is a target too (:func:`targets.tied_head_modules`): the
branch is added at its ``linear`` site; it cannot be merged (the weight is the input
embedding) and DoRA there is refused.

Merge: ``W' = W + s A B``; DoRA ``W' = m / n * (W + s A B)`` with
``n = ||W + s A B||_c``, which merge stores (leaf ``dora_merge_norm``) because
``unmerge`` cannot recover it from ``W'``.

Beyond linear layers (HF PEFT 0.21's ``Embedding`` layer, ``lora_bias``,
``trainable_token_indices``):

* LoRA on the token embedding: ``target_modules`` naming ``embed_tokens`` (or a regex
  matching the path) adapts the ``lookup`` site of :mod:`peft_jax.sites`: LLaMA's ``embed``
  (HF ``model.embed_tokens``); on T5 the encoder's and the decoder's lookups of the one
  ``shared`` table, paths ``encoder/embed_tokens`` and ``decoder/embed_tokens``, each with its
  own pair, as HF wraps ``encoder.embed_tokens`` and ``decoder.embed_tokens`` (HF's LoRA on
  ``shared`` wraps a module the stacks never call, a no-op there, so it is refused). Leaves
  beside the table: ``lora_embedding_A [vocab, r]`` (HF ``A.T``; init 0) and
  ``lora_embedding_B [r, width]`` (init ``N(0, 1)``; ``init_lora_weights=False``: both normal),
  prefixed ``encoder_`` / ``decoder_`` on T5 (``shared/encoder_lora_embedding_A``).
  ``x = E[ids] + A[ids] B * s``, no dropout (as HF). The tied head (``attend``) is not a
  site and stays unchanged. DoRA (HF's ``DoraEmbeddingLayer``): magnitude
  ``lora_embedding_magnitude [width]`` and ``x = m / n * (E[ids] + s A[ids] B)`` with
  ``n = ||E + s A B||`` per embedding dimension over the vocabulary, a constant in the
  backward pass. ``rank_pattern`` / ``alpha_pattern`` match the HF names
  (``model.embed_tokens``); then a frozen ``lora_embedding_scale`` holds the scale. A layer
  selection or ``target_sublayers`` with an embedding target is refused. Merge adds
  ``s A B`` to the table (DoRA as for kernels, the norm stored as
  ``lora_embedding_merge_norm``), refused on T5 (two updates, one table) and when the head is
  tied to the table (merging would change the head, which the unmerged LoRA does not).
* ``lora_bias=True``: ``lora_bias [.., out]`` (init 0) added to ``x A B`` before the scale,
  as HF's bias on ``lora_B``; refused, as by HF, with DoRA, with
  ``init_lora_weights='gaussian'`` and on embeddings. Merge folds ``s b`` into the layer's
  bias and is refused on a layer without one (T5, LLaMA; HF refuses too).
* ``trainable_token_indices`` (a list of ids, or ``{"embed_tokens": ids}`` on LLaMA /
  ``{"shared": ids}`` on T5; HF's per-stack ``{"embed_tokens": ..}`` on T5 is refused):
  the leaf ``trainable_tokens [n, width]`` beside the table (init: the rows themselves)
  replaces those rows of the table the model reads (:meth:`prepare_params`), so the
  lookups and a tied head see them, as HF's tied token adapters; the table stays frozen,
  so only those rows train. Merge writes the rows into the table and stores the originals
  (``trainable_tokens_original``) for unmerge. Not together with LoRA on the embedding.

Counts equal HF PEFT's ``get_nb_trainable_parameters``: ``r (vocab + width)`` per adapted
lookup (DoRA ``+ width``), ``out`` per ``lora_bias``, ``n width`` for the tokens.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, register
from peft_jax.peft.common import Rand, adapter_dtype, compute_dtype, dropout
from peft_jax.quantize import base_kernel, module_kernel

def pattern_key(keys, name: str):
  """The first of ``keys`` that matches module ``name`` as in HF PEFT's ``get_pattern_key``
  (a regex or a dotted suffix, matched to the end of the name); None: no key matches."""
  for k in keys:
    if re.match(rf"(.*\.)?({k})$", name):
      return k
  return None


def pattern_ranks(cfg, hp, m, alpha_key: str):
  """``[(rank, alpha)]`` of module ``m`` per layer (one entry when not stacked) under HF's
  ``rank_pattern`` / ``alpha_pattern`` (defaults ``hp["r"]`` / ``hp[alpha_key]``)."""
  rp, ap = hp.get("rank_pattern") or {}, hp.get("alpha_pattern") or {}
  out = []
  for l in (range(m.n_layers) if m.stacked else [None]):
    name = targets.hf_module_name(cfg, m, l)
    kr, ka = pattern_key(rp, name), pattern_key(ap, name)
    out.append((int(hp["r"]) if kr is None else int(rp[kr]),
                hp[alpha_key] if ka is None else ap[ka]))
  return out


def _pattern_problem(kind: str):
  def check(v):
    if not isinstance(v, dict):
      return "expected a {module pattern: value} dict"
    for k, x in v.items():
      if not isinstance(k, str):
        return f"pattern {k!r} is not a string"
      try:
        re.compile(k)
      except re.error as e:
        return f"pattern {k!r} is not a regular expression ({e})"
      if isinstance(x, bool) or not isinstance(x, (int, float)) or (
          kind == "rank" and (not isinstance(x, int) or x < 1)):
        return f"{k!r}: {x!r} is not {'a positive int' if kind == 'rank' else 'a number'}"
    return None
  return check


def _tokens_problem(v):
  if v is None:
    return None
  ids = v
  if isinstance(v, dict):
    if len(v) != 1 or not all(isinstance(k, str) for k in v):
      return "expected a list of token ids, or a {embedding module name: [ids]} dict with one entry"
    ids = next(iter(v.values()))
  if not isinstance(ids, (list, tuple)) or not ids or any(
      isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in ids):
    return "expected a non-empty list of token ids (ints >= 0)"
  if len(set(int(i) for i in ids)) != len(ids):
    return "token ids must not repeat"
  return None


# ----------------------------------------------------------------------------- embeddings

def embedding_modules(cfg, flat) -> list:
  """The token-embedding lookups LoRA can target, as :class:`targets.Module` of kind
  ``embed`` (``d_in`` = vocabulary, ``d_out`` = width): T5's encoder and decoder each read the
  one ``shared`` table (paths ``encoder/embed_tokens``, ``decoder/embed_tokens``, as HF PEFT
  wraps ``encoder.embed_tokens`` / ``decoder.embed_tokens``); LLaMA's ``embed``."""
  from peft_jax.models.family import family_of
  leaf = family_of(cfg).embedding_leaf
  if not leaf or leaf not in flat:
    return []
  v, d = (int(x) for x in flat[leaf].shape)
  # name: the transformers module HF PEFT wraps (the family's embedding_lookups)
  return [targets.Module(path=p, leaf=leaf, name=hf, stack=None, sublayer=None,
                         n_layers=None, d_in=v, d_out=d, kind="embed")
          for p, hf in family_of(cfg).embedding_lookups.items()]


def emb_hf_name(m) -> str:
  """The ``transformers`` module HF PEFT wraps for this lookup."""
  return m.name


def emb_leaf(m, name: str) -> str:
  """Leaves of an embedding LoRA live beside the table: ``shared/encoder_lora_embedding_A``
  (T5, one per stack) or ``embed/lora_embedding_A`` (LLaMA)."""
  owner = m.leaf.rsplit("/", 1)[0]
  pre = "" if m.path == owner else m.path.split("/")[0] + "_"
  return f"{owner}/{pre}{name}"


def _emb_hit(cfg, m, t: str) -> bool:
  hf = emb_hf_name(m)
  return t in ("embed_tokens", m.path, hf) or hf.endswith("." + t) or m.path.endswith("/" + t)


def split_targets(cfg, flat, tg):
  """``(embedding modules, the remaining linear targets)`` of ``target_modules``; the linear
  part is None when nothing linear is targeted."""
  embs = embedding_modules(cfg, flat)
  from peft_jax.models.family import family_of
  table = family_of(cfg).hf_embedding_table
  lookups = [emb_hf_name(m) for m in embs]
  if isinstance(tg, (list, tuple, set, frozenset)):
    if table and table not in lookups and table in tg:
      raise PeftConfigError(f"target_modules {table!r}: in HF PEFT a LoRA on the {table} "
                            "embedding changes nothing (the stacks read "
                            f"{' and '.join(lookups)}); target 'embed_tokens' (or one of them)")
    hit, rest = [], []
    for t in tg:
      h = [m for m in embs if isinstance(t, str) and _emb_hit(cfg, m, t)]
      hit.extend(m for m in h if m not in hit)
      if not h:
        rest.append(t)
    return [m for m in embs if m in hit], (rest if rest else (None if hit else rest))
  if isinstance(tg, str) and tg != "all-linear":
    try:
      rx = re.compile(tg)
    except re.error:
      return [], tg
    hit = [m for m in embs if rx.fullmatch(m.path)]
    if hit and not any(rx.fullmatch(m.path) for m in targets.linear_modules(flat)):
      return hit, None
    return hit, tg
  return [], tg


@dataclasses.dataclass(frozen=True)
class LoraHandler:
  scale: float
  rate: float
  dora: bool

  def linear(self, module, x, call_next, deterministic):
    y = call_next(x)
    if not module.has_variable("params", "lora_A"):
      return y
    dt = compute_dtype(module)
    a = module.get_variable("params", "lora_A")
    b = module.get_variable("params", "lora_B")
    xd = dropout(module, x, self.rate, deterministic)
    lora = jnp.dot(jnp.dot(xd.astype(dt), a.astype(dt)), b.astype(dt))
    if module.has_variable("params", "lora_bias"):   # lora_B's bias, scaled with it (HF)
      lora = lora + module.get_variable("params", "lora_bias").astype(dt)
    scale = self.scale
    if module.has_variable("params", "lora_scale"):   # per-module ranks / alphas
      scale = module.get_variable("params", "lora_scale").astype(dt)
    if not self.dora:
      return y + (lora * scale).astype(y.dtype)
    w = module_kernel(module)     # dequantized on a quantized base (peft_jax.quantize)
    m = module.get_variable("params", "lora_magnitude")
    delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32)) * jnp.asarray(scale, jnp.float32)
    n = jax.lax.stop_gradient(jnp.linalg.norm(w.astype(jnp.float32) + delta, axis=0))
    f = (m.astype(jnp.float32) / n).astype(dt)
    if deterministic or self.rate <= 0.0:
      base = y       # DoRA rescales the product x W, not a layer's own bias (as HF PEFT)
      if getattr(module, "use_bias", False):
        base = base - module.get_variable("params", "bias").astype(y.dtype)
    else:
      base = jnp.dot(xd.astype(dt), w.astype(dt))
    return y + ((f - 1) * base + f * lora * scale).astype(y.dtype)

  def lookup(self, module, ids, x, stack):
    """LoRA on the embedding: ``x + A[ids] B * s`` (no dropout, as HF PEFT)."""
    pre = f"{stack}_" if stack else ""
    if not module.has_variable("params", pre + "lora_embedding_A"):
      return x
    a = module.get_variable("params", pre + "lora_embedding_A")
    b = module.get_variable("params", pre + "lora_embedding_B")
    scale = self.scale
    if module.has_variable("params", pre + "lora_embedding_scale"):
      scale = module.get_variable("params", pre + "lora_embedding_scale")
    delta = jnp.dot(jnp.take(a, ids, axis=0).astype(jnp.float32), b.astype(jnp.float32)) * scale
    if not module.has_variable("params", pre + "lora_embedding_magnitude"):
      return x + delta.astype(x.dtype)
    # DoRA (HF's DoraEmbeddingLayer): m / ||E + s A B|| * (E[ids] + s A[ids] B), the norm per
    # embedding dimension over the vocabulary, a constant in the backward pass
    m = module.get_variable("params", pre + "lora_embedding_magnitude").astype(jnp.float32)
    table = module.get_variable("params", "embedding").astype(jnp.float32)
    full = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    n = jax.lax.stop_gradient(jnp.linalg.norm(table + full, axis=0))
    return ((m / n) * (x.astype(jnp.float32) + delta)).astype(x.dtype)


def check_bias(bias, flat):
  """HF's ``bias="lora_only"`` / ``"all"`` also trains the model's biases: a no-op on a
  model without any (T5, LLaMA); the trained biases are not supported."""
  if bias not in ("none", "lora_only", "all"):
    raise PeftConfigError(f"LoRA bias={bias!r}: expected 'none', 'lora_only' or 'all'")
  if bias != "none" and any(k.endswith("/bias") for k in flat):
    raise PeftConfigError(f"LoRA bias={bias!r} on a model with biases is not supported "
                          "(peft-jax imports bias='none' only there)")


@register
class Lora(Method):
  name = "lora"
  identity_at_init = True
  reference = "HF PEFT 0.21 LoraConfig"
  mergeable = True
  hparams = {
      "r": Field(8, "rank of A [in, r] and B [r, out]", ge=1),
      "lora_alpha": Field(8, "scale numerator: the update is x A B * lora_alpha / r", "float"),
      "lora_dropout": Field(0.0, "dropout on the input of A during training", ge=0, lt=1),
      "use_rslora": Field(False, "scale by lora_alpha / sqrt(r) (rank-stabilised LoRA)"),
      "target_modules": Field(None, "modules to adapt (none: q,v on T5 and LLaMA)", "names"),
      "init_lora_weights": Field(True, "True: A kaiming-uniform, B = 0 (identity at init); "
                                 "'gaussian': A ~ N(0, 1/r); False: B random too",
                                 "bool_or_str", choices=("gaussian",)),
      "use_dora": Field(False, "DoRA: add a magnitude vector (method 'dora' sets it)"),
      "rank_pattern": Field(None, "{module pattern: rank} overriding r per module (HF PEFT: "
                            "regex or dotted suffix of the transformers module name)", "any",
                            check_fn=_pattern_problem("rank")),
      "alpha_pattern": Field(None, "{module pattern: alpha} overriding lora_alpha per module "
                             "(matched as rank_pattern)", "any", check_fn=_pattern_problem("alpha")),
      "lora_bias": Field(False, "a trained bias on lora_B, added with the LoRA branch times the "
                         "scale (HF PEFT; not with DoRA or on embeddings)"),
      "trainable_token_indices": Field(None, "token ids whose embedding rows train (HF PEFT): a "
                                       "list, or {embedding module name: [ids]}", "any",
                                       check_fn=_tokens_problem),
      **targets.SELECTION,
  }

  def _dora(self, hp):
    return bool(hp["use_dora"])

  def placement(self, cfg, hp, flat) -> targets.Placement:
    """The targeted linear modules (embedding targets: :meth:`embeddings`)."""
    tg = hp.get("target_modules")
    if tg is None:
      return targets.place(cfg, hp, flat, targets.default_targets(cfg, "LORA"),
                           modules=targets.linear_modules(flat) + targets.tied_head_modules(cfg, flat))
    _, lin = split_targets(cfg, flat, tg)
    if lin is None:
      return targets.Placement((), {})
    try:
      return targets.place(cfg, dict(hp, target_modules=lin), flat, None,
                           modules=targets.linear_modules(flat) + targets.tied_head_modules(cfg, flat))
    except PeftConfigError as e:
      embs = embedding_modules(cfg, flat)
      if "matches no module" not in str(e) or not embs:
        raise
      raise PeftConfigError(f"{e}; token embedding lookups: 'embed_tokens' "
                            f"({', '.join(m.path for m in embs)})") from None

  def embeddings(self, cfg, hp, flat) -> list:
    """The targeted embedding lookups (:func:`embedding_modules`)."""
    tg = hp.get("target_modules")
    embs = [] if tg is None else split_targets(cfg, flat, tg)[0]
    if embs:
      sel = [k for k in targets.LAYER_SELECTION_KEYS + ("target_sublayers",) if hp.get(k) is not None]
      if sel:
        raise PeftConfigError(f"LoRA on the embedding ({embs[0].path}) with {sel[0]}: the "
                              "embedding lies outside the layers; adapt it in a separate run")
    return embs

  def emb_rank(self, cfg, hp, m):
    """``(rank, alpha)`` of embedding lookup ``m`` (rank_pattern / alpha_pattern apply)."""
    name = emb_hf_name(m)
    kr = pattern_key(hp.get("rank_pattern") or {}, name)
    ka = pattern_key(hp.get("alpha_pattern") or {}, name)
    return (hp["r"] if kr is None else hp["rank_pattern"][kr],
            hp["lora_alpha"] if ka is None else hp["alpha_pattern"][ka])

  def token_indices(self, cfg, hp, flat):
    """``(table leaf, [ids])`` of ``trainable_token_indices``, or None."""
    from peft_jax.models.family import family_of
    v = hp.get("trainable_token_indices")
    if v is None:
      return None
    fam = family_of(cfg)
    ids = v
    if isinstance(v, dict):
      (name, ids), = v.items()
      table = fam.hf_embedding_table
      ok = tuple(dict.fromkeys((table.rsplit(".", 1)[-1], table)))
      lookups = [x for x in fam.embedding_lookups.values() if x != table]
      if name not in ok:
        raise PeftConfigError(
            f"trainable_token_indices names module {name!r}; peft-jax trains rows of the "
            f"token embedding only, named {' or '.join(repr(o) for o in ok)}" +
            (f" (HF's per-lookup rows of {' / '.join(lookups)} are not supported)"
             if lookups else ""))
    leaf = fam.embedding_leaf
    vocab = int(flat[leaf].shape[0])
    bad = [int(i) for i in ids if int(i) >= vocab]
    if bad:
      raise PeftConfigError(f"trainable_token_indices: token id {bad[0]} is out of range; the "
                            f"vocabulary has {vocab} tokens")
    return leaf, [int(i) for i in ids]

  def scaling(self, hp, r=None, alpha=None):
    r = hp["r"] if r is None else r
    alpha = hp["lora_alpha"] if alpha is None else alpha
    return alpha / (math.sqrt(r) if hp["use_rslora"] else r)

  # ------------------------------------------------------------------ per-module ranks
  def patterned(self, hp) -> bool:
    return bool(hp.get("rank_pattern") or hp.get("alpha_pattern"))

  def layer_ranks(self, cfg, hp, m):
    """``[(rank, alpha)]`` of module ``m`` per layer (one entry when not stacked)."""
    return pattern_ranks(cfg, hp, m, "lora_alpha")

  def stored_rank(self, cfg, hp, pl, m) -> int:
    """The rank ``A``/``B`` are stored at: the largest among the selected layers."""
    if not self.patterned(hp):
      return hp["r"]
    ranks = self.layer_ranks(cfg, hp, m)
    return max(ranks[0 if l is None else l][0] for l in pl.selected(m))

  def rank_masks(self, cfg, hp, pl, m):
    """``(A mask [L, 1, R], B mask [L, R, 1])`` of the rank columns each layer uses, or None
    when every layer uses all ``R`` stored columns."""
    if not self.patterned(hp) or not m.stacked:
      return None
    R = self.stored_rank(cfg, hp, pl, m)
    used = np.arange(R)[None, :] < np.array([r for r, _ in self.layer_ranks(cfg, hp, m)])[:, None]
    if used.all():
      return None
    return used[:, None, :], used[:, :, None]

  def module_scale(self, cfg, hp, m):
    """The frozen ``lora_scale`` value: ``[L]`` (stacked) or ``[]`` per-layer scales."""
    s = np.array([self.scaling(hp, r, a) for r, a in self.layer_ranks(cfg, hp, m)], np.float32)
    return s if m.stacked else s[0]

  def validate(self, cfg, hp, flat):
    r = hp["r"]
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
      raise PeftConfigError(f"r must be a positive int, got {r!r}")
    if not isinstance(hp["lora_alpha"], (int, float)) or isinstance(hp["lora_alpha"], bool):
      raise PeftConfigError(f"lora_alpha must be a number, got {hp['lora_alpha']!r}")
    if not 0.0 <= float(hp["lora_dropout"]) < 1.0:
      raise PeftConfigError(f"lora_dropout must be in [0, 1), got {hp['lora_dropout']!r}")
    if hp["init_lora_weights"] not in (True, False, "gaussian"):
      raise PeftConfigError(f"init_lora_weights must be True, False or 'gaussian', got "
                            f"{hp['init_lora_weights']!r}")
    pl = self.placement(cfg, hp, flat)
    embs = self.embeddings(cfg, hp, flat)
    if not pl.modules and not embs and hp.get("trainable_token_indices") is None:
      raise PeftConfigError("target_modules selects no module")
    if hp.get("lora_bias"):
      if self._dora(hp):
        raise PeftConfigError("lora_bias=True is not supported with DoRA (as in HF PEFT)")
      if hp["init_lora_weights"] not in (True, False):
        raise PeftConfigError(f"lora_bias=True needs init_lora_weights True or False (as in HF "
                              f"PEFT), got {hp['init_lora_weights']!r}")
      if embs:
        raise PeftConfigError(f"lora_bias=True is not supported for an embedding layer "
                              f"({embs[0].path}; as in HF PEFT)")
    tok = self.token_indices(cfg, hp, flat)
    if tok is not None and embs:
      raise PeftConfigError("trainable_token_indices together with LoRA on the same embedding "
                            f"({embs[0].path}) is not supported")
    for m in embs:
      rm = self.emb_rank(cfg, hp, m)[0]
      if rm > min(m.d_in, m.d_out):
        raise PeftConfigError(f"rank {rm} is larger than embedding {m.path} allows: its table is "
                              f"[vocab={m.d_in}, width={m.d_out}], so r must be <= "
                              f"{min(m.d_in, m.d_out)}")
    for m in pl.modules:
      if self._dora(hp) and m in targets.tied_head_modules(cfg, flat):
        raise PeftConfigError(f"DoRA on the tied {m.path} is not supported (its weight is the "
                              "input embedding); use LoRA there")
      rm = self.stored_rank(cfg, hp, pl, m)
      if rm > min(m.d_in, m.d_out):
        what = f"rank r={r}" if rm == r else f"rank {rm} (rank_pattern)"
        raise PeftConfigError(f"{what} is larger than layer {m.path} allows: its kernel is "
                              f"[in={m.d_in}, out={m.d_out}], so r must be <= {min(m.d_in, m.d_out)}")

  def init_leaves(self, cfg, hp, flat, rng):
    pl = self.placement(cfg, hp, flat)
    r, init = hp["r"], hp["init_lora_weights"]
    out = {}
    rnd = Rand(rng)
    for m in pl.modules:
      w = flat[m.leaf]
      lead = (m.n_layers,) if m.stacked else ()
      r = self.stored_rank(cfg, hp, pl, m)
      # torch layout [r, in] / [out, r], transposed to our [in, r] / [r, out]
      if init == "gaussian" and self.patterned(hp):
        std = 1.0 / np.array([rl for rl, _ in self.layer_ranks(cfg, hp, m)], np.float32)
        a = rnd.normal(lead + (r, m.d_in)) * (std.reshape(lead + (1, 1)) if m.stacked else std[0])
      elif init == "gaussian":
        a = rnd.normal(lead + (r, m.d_in), 1.0 / r)
      else:
        a = rnd.kaiming_uniform_a5(lead + (r, m.d_in))
      if init is False:
        b = rnd.kaiming_uniform_a5(lead + (m.d_out, r))
      else:
        b = jnp.zeros(lead + (m.d_out, r), jnp.float32)
      a, b = jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2)
      lm = targets.layer_mask(m, pl.layers.get(m.path), 3)
      if lm is not None:
        a = jnp.where(lm, a, 0.0)
        b = jnp.where(lm, b, 0.0)
      rmask = self.rank_masks(cfg, hp, pl, m)
      if rmask is not None:
        a = jnp.where(rmask[0], a, 0.0)
        b = jnp.where(rmask[1], b, 0.0)
      out[f"{m.path}/lora_A"] = a.astype(adapter_dtype(w.dtype))
      out[f"{m.path}/lora_B"] = b.astype(adapter_dtype(w.dtype))
      scale = self.scaling(hp)
      if self.patterned(hp):
        scale = self.module_scale(cfg, hp, m)
        out[f"{m.path}/lora_scale"] = jnp.asarray(scale)
        scale = scale[:, None, None] if m.stacked else scale
      if self._dora(hp):
        delta = jnp.einsum("...ir,...ro->...io", a, b) * scale
        out[f"{m.path}/lora_magnitude"] = jnp.linalg.norm(
            base_kernel(flat, m.path, jnp.float32) + delta, axis=-2).astype(adapter_dtype(w.dtype))
      if hp.get("lora_bias"):
        out[f"{m.path}/lora_bias"] = jnp.zeros(lead + (m.d_out,), adapter_dtype(w.dtype))
    for m in self.embeddings(cfg, hp, flat):
      # HF: A [r, vocab] = 0, B [width, r] ~ N(0, 1) (init_lora_weights=False: both N(0, 1));
      # stored transposed, A [vocab, r] (rows gathered by token id) and B [r, width]
      r, alpha = self.emb_rank(cfg, hp, m)
      dt = adapter_dtype(flat[m.leaf].dtype)
      a = rnd.normal((m.d_in, r)) if init is False else jnp.zeros((m.d_in, r), jnp.float32)
      out[emb_leaf(m, "lora_embedding_A")] = a.astype(dt)
      out[emb_leaf(m, "lora_embedding_B")] = rnd.normal((r, m.d_out)).astype(dt)
      if self.patterned(hp):
        out[emb_leaf(m, "lora_embedding_scale")] = jnp.asarray(self.scaling(hp, r, alpha),
                                                               jnp.float32)
      if self._dora(hp):   # ||E + s A B|| per embedding dimension (over the vocabulary)
        full = jnp.dot(a, out[emb_leaf(m, "lora_embedding_B")].astype(jnp.float32))
        out[emb_leaf(m, "lora_embedding_magnitude")] = jnp.linalg.norm(
            jnp.asarray(flat[m.leaf], jnp.float32) + self.scaling(hp, r, alpha) * full,
            axis=0).astype(dt)
    tok = self.token_indices(cfg, hp, flat)
    if tok is not None:   # HF: the rows start as the embedding's own (identity at init)
      leaf, ids = tok
      out[leaf.rsplit("/", 1)[0] + "/trainable_tokens"] = jnp.asarray(flat[leaf])[np.array(ids)]
    return out

  def prepare_params(self, cfg, hp, flat):
    """``trainable_token_indices``: the table the model reads has the trained rows (so a tied
    head sees them too, as HF PEFT's tied token adapter)."""
    tok = self.token_indices(cfg, hp, flat)
    if tok is None:
      return flat
    leaf, ids = tok
    out = dict(flat)
    t = flat[leaf.rsplit("/", 1)[0] + "/trainable_tokens"]
    out[leaf] = jnp.asarray(flat[leaf]).at[np.array(ids)].set(jnp.asarray(t).astype(flat[leaf].dtype))
    return out

  def leaf_roles(self, cfg, hp, paths):
    """DoRA's magnitude vectors train without weight decay; ``lora_scale`` is a constant."""
    out = {p: "no_decay" for p in paths if p.endswith(("/lora_magnitude", "lora_embedding_magnitude"))}
    out.update({p: "frozen" for p in paths if p.endswith(("/lora_scale", "lora_embedding_scale"))})
    return out

  def update_masks(self, cfg, hp, flat):
    pl = self.placement(cfg, hp, flat)
    out = {}
    for m in pl.modules:
      sel = pl.layers.get(m.path)
      rmask = self.rank_masks(cfg, hp, pl, m)
      for i, (leaf, nd) in enumerate((("lora_A", 3), ("lora_B", 3), ("lora_magnitude", 2),
                                      ("lora_bias", 2))):
        lm = targets.layer_mask(m, sel, nd)
        if rmask is not None and i < 2:
          lm = rmask[i] if lm is None else lm & rmask[i]
        if lm is not None and f"{m.path}/{leaf}" in flat:
          out[f"{m.path}/{leaf}"] = lm
      if f"{m.path}/lora_scale" in flat:   # a constant, not a parameter (never counted)
        out[f"{m.path}/lora_scale"] = np.zeros(np.shape(flat[f"{m.path}/lora_scale"]), bool)
    for k in flat:
      if k.endswith("lora_embedding_scale"):
        out[k] = np.zeros(np.shape(flat[k]), bool)
    return out

  def changed_params(self, cfg, hp, flat):
    n = targets.dense_changed_params(self.placement(cfg, hp, flat))
    n += sum(m.d_in * m.d_out for m in self.embeddings(cfg, hp, flat))
    tok = self.token_indices(cfg, hp, flat)
    return n + (0 if tok is None else len(tok[1]) * int(flat[tok[0]].shape[1]))

  def handlers(self, cfg, hp):
    return (LoraHandler(scale=float(self.scaling(hp)), rate=float(hp["lora_dropout"]),
                        dora=self._dora(hp)),)

  # ------------------------------------------------------------------ merge
  def _modules(self, flat):
    return sorted(k[: -len("/lora_A")] for k in flat if k.endswith("/lora_A"))

  def _scale_of(self, hp, flat, p):
    """The scale of module ``p``, broadcastable to its kernel."""
    if f"{p}/lora_scale" not in flat:
      return self.scaling(hp)
    s = jnp.asarray(flat[f"{p}/lora_scale"], jnp.float32)
    return s[..., None, None] if s.ndim else s

  def merge(self, cfg, hp, flat):
    out = dict(flat)
    for p in self._modules(flat):
      if f"{p}/kernel" not in flat:
        raise PeftConfigError(f"LoRA on the tied {p} cannot be merged: its weight is the input "
                              "embedding, which the merge would change too")
      w = jnp.asarray(flat[f"{p}/kernel"])
      delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(flat[f"{p}/lora_A"], jnp.float32),
                         jnp.asarray(flat[f"{p}/lora_B"], jnp.float32)) * self._scale_of(hp, flat, p)
      new = w.astype(jnp.float32) + delta
      if f"{p}/lora_magnitude" in flat:
        n = jnp.linalg.norm(new, axis=-2)
        out[f"{p}/dora_merge_norm"] = n
        new = new * (jnp.asarray(flat[f"{p}/lora_magnitude"], jnp.float32) / n)[..., None, :]
      out[f"{p}/kernel"] = new.astype(w.dtype)
      if f"{p}/lora_bias" in flat:
        out[f"{p}/bias"] = self._merged_bias(hp, flat, p, +1)
    for m in self.embeddings(cfg, hp, flat):
      out.update(self._emb_merged(cfg, hp, out, m, +1))
    tok = self.token_indices(cfg, hp, flat)
    if tok is not None:   # HF: the trained rows replace the table's (the originals are kept)
      leaf, ids = tok
      owner = leaf.rsplit("/", 1)[0]
      table = jnp.asarray(flat[leaf])
      out[f"{owner}/trainable_tokens_original"] = table[np.array(ids)]
      out[leaf] = table.at[np.array(ids)].set(jnp.asarray(flat[f"{owner}/trainable_tokens"]))
    return out

  def _merged_bias(self, hp, flat, p, sign):
    if f"{p}/bias" not in flat:
      raise PeftConfigError(f"cannot merge LoRA with lora_bias=True at {p}: the layer has no bias "
                            "to fold it into (as in HF PEFT); keep the adapter unmerged")
    bias = jnp.asarray(flat[f"{p}/bias"])
    s = self._scale_of(hp, flat, p)
    s = jnp.squeeze(jnp.asarray(s), (-1,)) if jnp.ndim(s) else s   # [L, 1, 1] -> [L, 1]
    new = bias.astype(jnp.float32) + sign * jnp.asarray(flat[f"{p}/lora_bias"], jnp.float32) * s
    return new.astype(bias.dtype)

  def _emb_merged(self, cfg, hp, flat, m, sign):
    """The table plus (or minus) ``s A B``; refused where the lookup does not own the table."""
    if m.path.endswith("/embed_tokens"):
      raise PeftConfigError(f"cannot merge LoRA on {m.path}: T5's encoder and decoder read one "
                            "shared table, which cannot hold their two updates; keep it unmerged")
    if getattr(cfg, "tie_word_embeddings", False):
      raise PeftConfigError(f"cannot merge LoRA on the embedding {m.path}: the output head is tied "
                            "to the table, and merging would change the head too (the unmerged "
                            "LoRA changes only the lookup); keep it unmerged")
    a = jnp.asarray(flat[emb_leaf(m, "lora_embedding_A")], jnp.float32)
    b = jnp.asarray(flat[emb_leaf(m, "lora_embedding_B")], jnp.float32)
    s = self.scaling(hp, *self.emb_rank(cfg, hp, m))
    t = jnp.asarray(flat[m.leaf])
    delta = s * jnp.dot(a, b)
    mag, nkey = emb_leaf(m, "lora_embedding_magnitude"), emb_leaf(m, "lora_embedding_merge_norm")
    if mag not in flat:
      return {m.leaf: (t.astype(jnp.float32) + sign * delta).astype(t.dtype)}
    mag = jnp.asarray(flat[mag], jnp.float32)
    if sign > 0:     # DoRA: E' = m / n * (E + s A B), n stored for unmerge (as HF caches it)
      n = jnp.linalg.norm(t.astype(jnp.float32) + delta, axis=0)
      return {m.leaf: ((mag / n) * (t.astype(jnp.float32) + delta)).astype(t.dtype), nkey: n}
    if nkey not in flat:
      raise PeftConfigError(f"cannot unmerge DoRA at {m.path}: the norm that merge stored "
                            "(lora_embedding_merge_norm) is missing; merge with plain=False")
    n = jnp.asarray(flat[nkey], jnp.float32)
    return {m.leaf: (t.astype(jnp.float32) / (mag / n) - delta).astype(t.dtype), nkey: None}

  def unmerge(self, cfg, hp, flat):
    out = dict(flat)
    for p in self._modules(flat):
      w = jnp.asarray(flat[f"{p}/kernel"])
      new = w.astype(jnp.float32)
      if f"{p}/lora_magnitude" in flat:
        if f"{p}/dora_merge_norm" not in flat:
          raise PeftConfigError(f"cannot unmerge DoRA at {p}: the weight norm that merge stored "
                                "(dora_merge_norm) is missing; merge with keep_adapter=True")
        n = jnp.asarray(out.pop(f"{p}/dora_merge_norm"), jnp.float32)
        new = new / (jnp.asarray(flat[f"{p}/lora_magnitude"], jnp.float32) / n)[..., None, :]
      delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(flat[f"{p}/lora_A"], jnp.float32),
                         jnp.asarray(flat[f"{p}/lora_B"], jnp.float32)) * self._scale_of(hp, flat, p)
      out[f"{p}/kernel"] = (new - delta).astype(w.dtype)
      if f"{p}/lora_bias" in flat:
        out[f"{p}/bias"] = self._merged_bias(hp, flat, p, -1)
    for m in self.embeddings(cfg, hp, flat):
      for k, v in self._emb_merged(cfg, hp, out, m, -1).items():
        if v is None:
          out.pop(k, None)     # the stored DoRA norm
        else:
          out[k] = v
    tok = self.token_indices(cfg, hp, flat)
    if tok is not None:
      leaf, ids = tok
      owner = leaf.rsplit("/", 1)[0]
      if f"{owner}/trainable_tokens_original" not in flat:
        raise PeftConfigError("cannot unmerge trainable_token_indices: the original rows that "
                              "merge stored (trainable_tokens_original) are missing; merge with "
                              "plain=False")
      orig = jnp.asarray(out.pop(f"{owner}/trainable_tokens_original"))
      out[leaf] = jnp.asarray(flat[leaf]).at[np.array(ids)].set(orig.astype(flat[leaf].dtype))
    return out

  # ------------------------------------------------------------------ HF PEFT (LoraConfig)
  hf_peft_type = "LORA"
  #: every field of peft 0.21's LoraConfig (see ``hf_peft.check_fields``)
  hf_fields = {
      **{k: "used" for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
                             "bias", "rank_pattern", "alpha_pattern", "lora_bias",
                             "trainable_token_indices")},
      # the saved tensors name the adapted modules and layers; initialisation-only settings
      **{k: "noop" for k in ("target_modules", "exclude_modules", "layers_to_transform",
                             "layers_pattern", "megatron_core", "qalora_group_size",
                             "eva_config", "corda_config", "lora_ga_config", "runtime_config",
                             "ensure_weight_tying")},
      "init_lora_weights": ((True, False, "gaussian"), "the other initialisations (PiSSA, "
                            "OLoRA, LoftQ, CorDA, ...) change the base weights too"),
      "fan_in_fan_out": ((False,), "transposed Conv1D weights; these models use nn.Linear"),
      "modules_to_save": ((None, []), "fully trained module copies"),
      "layer_replication": ((None,), "layers repeated to build a deeper model"),
      "loftq_config": (({}, None), "quantised base weights"),
      "megatron_config": ((None,), "Megatron parallel layers"),
      "use_qalora": ((False,), "quantisation-aware LoRA pooling"),
      "alora_invocation_tokens": ((None,), "activated LoRA acts only after these tokens"),
      "target_parameters": ((None,), "LoRA on raw parameters (e.g. MoE experts)"),
      "velora_config": ((None,), "VeLoRA"),
      "monteclora_config": ((None,), "MonteCLoRA"),
      "use_bdlora": ((None,), "block-diagonal LoRA"),
      "arrow_config": ((None,), "Arrow routing"),
      "kasa_config": ((None,), "KaSA"),
  }

  def hf_export(self, state, params):
    """``...<module>.lora_A.weight [r, in] = A.T``, ``lora_B.weight [out, r] = B.T``, DoRA
    ``lora_magnitude_vector [out]``; ``target_modules`` names the exact modules and layers."""
    from peft_jax.peft import hf_peft
    from peft_jax.tree import flatten
    cfg, hp, flat = state.model_cfg, state.hparams, flatten(params)
    pl = self.placement(cfg, hp, flat)
    names, tensors = [], {}
    for m in pl.modules:
      ranks = self.layer_ranks(cfg, hp, m)
      for l in pl.selected(m):
        hf = targets.hf_module_name(cfg, m, l)
        names.append(hf)
        sl = (lambda a, l=l: a[l]) if m.stacked else (lambda a: a)
        key = f"{hf_peft.PREFIX}{hf}"
        rl = ranks[0 if l is None else l][0]   # the layer's own rank (stored padded)
        tensors[f"{key}.lora_A.weight"] = hf_peft.np32(sl(flat[f"{m.path}/lora_A"]))[:, :rl].T
        tensors[f"{key}.lora_B.weight"] = hf_peft.np32(sl(flat[f"{m.path}/lora_B"]))[:rl].T
        if hp["use_dora"]:
          tensors[f"{key}.lora_magnitude_vector"] = hf_peft.np32(sl(flat[f"{m.path}/lora_magnitude"]))
        if hp.get("lora_bias"):
          tensors[f"{key}.lora_B.bias"] = hf_peft.np32(sl(flat[f"{m.path}/lora_bias"]))
    for m in self.embeddings(cfg, hp, flat):
      hf = emb_hf_name(m)
      names.append(hf)
      tensors[f"{hf_peft.PREFIX}{hf}.lora_embedding_A"] = hf_peft.np32(
          flat[emb_leaf(m, "lora_embedding_A")]).T
      tensors[f"{hf_peft.PREFIX}{hf}.lora_embedding_B"] = hf_peft.np32(
          flat[emb_leaf(m, "lora_embedding_B")]).T
      if hp["use_dora"]:
        tensors[f"{hf_peft.PREFIX}{hf}.lora_magnitude_vector"] = hf_peft.np32(
            flat[emb_leaf(m, "lora_embedding_magnitude")])
    tok = self.token_indices(cfg, hp, flat)
    if tok is not None:
      tensors[f"{hf_peft.PREFIX}{self.hf_table(cfg)}.token_adapter.trainable_tokens_delta"] = \
          hf_peft.np32(flat[tok[0].rsplit("/", 1)[0] + "/trainable_tokens"])
    fields = dict(r=int(hp["r"]), lora_alpha=hp["lora_alpha"], lora_dropout=float(hp["lora_dropout"]),
                  use_rslora=bool(hp["use_rslora"]), use_dora=bool(hp["use_dora"]),
                  target_modules=hf_peft.regex(names), bias="none", fan_in_fan_out=False,
                  init_lora_weights=True, layers_to_transform=None, layers_pattern=None,
                  rank_pattern=dict(hp.get("rank_pattern") or {}),
                  alpha_pattern=dict(hp.get("alpha_pattern") or {}), modules_to_save=None,
                  lora_bias=bool(hp.get("lora_bias")),
                  trainable_token_indices=hp.get("trainable_token_indices"))
    return fields, tensors

  def hf_table(self, cfg) -> str:
    """The ``transformers`` module HF PEFT's token adapter wraps (``trainable_token_indices``)."""
    from peft_jax.models.family import family_of
    return family_of(cfg).hf_embedding_table

  def hf_import(self, conf, tensors, cfg, base_params, path):
    from peft_jax.peft import hf_peft
    from peft_jax.peft.base import apply_peft
    from peft_jax.tree import flatten, unflatten
    base_flat = flatten(base_params)
    check_bias(conf.get("bias", "none"), base_flat)
    found = hf_peft.found_modules(cfg, base_flat, tensors, ".lora_A.weight")
    embs = self._hf_embeddings(cfg, base_flat, tensors)
    tok = conf.get("trainable_token_indices")
    if not found and not embs and tok is None:
      raise PeftConfigError(f"no lora_A tensors in {path}")
    dora = bool(conf.get("use_dora"))
    hp = {"r": int(conf["r"]), "lora_alpha": conf["lora_alpha"],
          "lora_dropout": float(conf.get("lora_dropout") or 0.0),
          "use_rslora": bool(conf.get("use_rslora")), "lora_bias": bool(conf.get("lora_bias"))}
    if found:
      hp.update(hf_peft.selection(found))
    if embs:
      hp["target_modules"] = hf_peft.regex(sorted(found) + [m.path for m in embs])
    if tok is not None:
      hp["trainable_token_indices"] = tok
    for k in ("rank_pattern", "alpha_pattern"):
      if conf.get(k):
        hp[k] = dict(conf[k])
    state = apply_peft(cfg, base_params, "dora" if dora else "lora", hp)
    flat = flatten(state.params)
    for m in embs:
      key = f"{hf_peft.PREFIX}{emb_hf_name(m)}"
      a, b = tensors[f"{key}.lora_embedding_A"], hf_peft.need(tensors, f"{key}.lora_embedding_B")
      rl = self.emb_rank(cfg, state.hparams, m)[0]
      if a.shape[0] != rl:
        raise PeftConfigError(f"adapter tensor {key}.lora_embedding_A has rank {a.shape[0]}; r "
                              f"and rank_pattern give rank {rl} for {emb_hf_name(m)}")
      vals = [("lora_embedding_A", a.T), ("lora_embedding_B", b.T)]
      if dora:
        vals.append(("lora_embedding_magnitude", hf_peft.need(tensors, f"{key}.lora_magnitude_vector")))
      for nm, v in vals:
        flat[emb_leaf(m, nm)] = hf_peft.set_layer(flat[emb_leaf(m, nm)], None, v,
                                                  f"{emb_hf_name(m)}.{nm}")
    t = self.token_indices(cfg, state.hparams, flat)
    if t is not None:
      key = f"{hf_peft.PREFIX}{self.hf_table(cfg)}.token_adapter.trainable_tokens_delta"
      leaf = t[0].rsplit("/", 1)[0] + "/trainable_tokens"
      flat[leaf] = hf_peft.set_layer(flat[leaf], None, hf_peft.need(tensors, key),
                                     "trainable_token_indices")
    pl = self.placement(cfg, state.hparams, flat)
    stored = {m.path: self.stored_rank(cfg, state.hparams, pl, m) for m in pl.modules}
    for p, (m, layers) in found.items():
      ranks = self.layer_ranks(cfg, state.hparams, m)
      for l in layers:
        hf = targets.hf_module_name(cfg, m, l)
        key = f"{hf_peft.PREFIX}{hf}"
        a, b = tensors[f"{key}.lora_A.weight"], hf_peft.need(tensors, f"{key}.lora_B.weight")
        rl = ranks[0 if l is None else l][0]
        if a.shape[0] != rl or b.shape[-1] != rl:
          raise PeftConfigError(f"adapter tensor {key}.lora_A.weight has rank {a.shape[0]}; r and "
                                f"rank_pattern give rank {rl} for {hf}")
        pad = stored[p] - rl
        vals = {"lora_A": np.pad(a.T, ((0, 0), (0, pad))), "lora_B": np.pad(b.T, ((0, pad), (0, 0)))}
        if dora:
          vals["lora_magnitude"] = hf_peft.need(tensors, f"{key}.lora_magnitude_vector")
        if state.hparams["lora_bias"]:
          vals["lora_bias"] = hf_peft.need(tensors, f"{key}.lora_B.bias")
        for nm, v in vals.items():
          flat[f"{p}/{nm}"] = hf_peft.set_layer(flat[f"{p}/{nm}"], l, v, f"{hf}.{nm}")
    return state, unflatten(flat)

  def _hf_embeddings(self, cfg, base_flat, tensors):
    """The embedding lookups the adapter's ``lora_embedding_A`` tensors name. (HF PEFT's saved
    copy of an adapted embedding, ``<embedding>.base_layer.weight``, is read and compared with
    the base model's table by :func:`peft_jax.peft.modules_to_save.check_hf_base_layers`.)"""
    from peft_jax.models.family import family_of
    from peft_jax.peft import hf_peft
    embs = embedding_modules(cfg, base_flat)
    by_name = {emb_hf_name(m): m for m in embs}
    table = family_of(cfg).hf_embedding_table
    out = []
    for k in sorted(tensors):
      name = k[len(hf_peft.PREFIX):] if k.startswith(hf_peft.PREFIX) else k
      if k.endswith(".lora_embedding_A"):
        hf = name[: -len(".lora_embedding_A")]
        if hf == table and hf not in by_name:
          raise PeftConfigError(f"adapter tensor {k}: LoRA on the {table} embedding changes "
                                f"nothing in HF PEFT (the stacks read {' and '.join(by_name)}), "
                                "so peft-jax does not import it")
        if hf not in by_name:
          raise PeftConfigError(f"adapter tensor {k}: module {hf!r} is not a token embedding of "
                                f"this model (expected {', '.join(sorted(by_name))})")
        out.append(by_name[hf])
    return sorted(out, key=lambda m: m.path)


@register
class Dora(Lora):
  name = "dora"
  reference = "HF PEFT 0.21 LoraConfig(use_dora=True)"
  hparams = dict(Lora.hparams, use_dora=Field(True, "DoRA: LoRA direction plus a magnitude vector"))

  def validate(self, cfg, hp, flat):
    if not hp["use_dora"]:
      raise PeftConfigError("method 'dora' needs use_dora=True; use method 'lora' for plain LoRA")
    super().validate(cfg, hp, flat)
