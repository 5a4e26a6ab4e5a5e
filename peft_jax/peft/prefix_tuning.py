"""Prefix tuning [prefix_tuning] (Li & Liang, 2021).

What it adds: per attention layer a key prefix and a value prefix of
``num_virtual_tokens`` positions, ``<attention>/prefix_key`` and
``<attention>/prefix_value`` ``[layers, P, kv_heads * head_dim]`` (the
projected width, so it is right when ``d_kv * heads != d_model``, e.g. T5-3B,
and uses the KV heads under GQA). With ``prefix_projection=True`` the stored
leaves are instead HF PEFT's reparameterisation ``prefix_encoder/{embedding
[P, token_dim], dense_in (token_dim -> encoder_hidden_size), tanh, dense_out
(-> rows * token_dim)}`` and :meth:`PeftState.prepare` evaluates it into the
plain per-layer prefixes before every forward (``fold_projection`` folds it
once, for inference or export). Where it acts: the ``attention_kv`` site
(prefix keys/values concatenated in front, the mask extended with ``True``,
a T5 position bias extended) and the ``positions`` site (see below). Defaults
follow HF PEFT 0.21's ``PrefixTuningConfig``: ``num_virtual_tokens`` required,
``prefix_projection=False``, ``encoder_hidden_size`` = token_dim,
``init_weights=None`` (prefixes N(0, 1) like ``nn.Embedding``; ``"zero"``:
zeros, resp. a zero last projection layer).

``encoder_hidden_size=0`` means *no reparameterisation* (seed 000's ``h = null``):
it switches ``prefix_projection`` off, whatever that field says, so a sweep grid can
list ``h in {0, 256, 512, 1024}`` as one key next to ``prefix_projection=True``.
:meth:`PrefixTuning.validate` canonicalises the pair (``prefix_projection=False``,
``encoder_hidden_size=0``) before anything reads it, so the state, the accounting and
saved adapters all see plain prefixes.

Where on T5 (``prefix_attentions``, ours). HF PEFT passes the prefix as
``past_key_values`` to ``T5ForConditionalGeneration``: transformers drops the
cache for the encoder stack and PEFT empties the cross-attention cache, so
**only the decoder self-attention** gets prefixes. Its relative position bias
treats them as past tokens: the prefix occupies positions ``0..P-1`` and the
decoder tokens ``P..P+T-1``, so token-token biases are unchanged and a
prefix key gets the (causal, bucketed) bias of its distance ``p - (t + P)``.
LLaMA likewise runs the tokens at RoPE positions ``P..P+T-1`` against
un-rotated prefix keys. Our default is that behaviour
(``prefix_attentions=["decoder_self_attn"]`` on T5, ``prefix_positions=
"shift"``), so adapters round-trip with HF PEFT; ``prefix_attentions`` may
add ``"encoder_self_attn"`` and ``"cross_attn"`` (Li & Liang's placement;
not exportable to HF), and ``prefix_positions="none"`` keeps the token
positions and gives prefix keys zero position bias.

HF's T5 prefix layout quirk: PEFT builds the seq2seq cache by duplicating the
``2L`` prefix rows and splitting into chunks of 4, so decoder layer ``l``
reads rows ``4l mod 2L`` (key) and ``4l+1 mod 2L`` (value): with an even
number of decoder layers, layers ``l`` and ``l + L/2`` share one prefix and
half of HF's rows are unused. Import follows that mapping; export refuses
per-layer prefixes that the HF layout cannot represent.
"""

from __future__ import annotations

import dataclasses
import math
from typing import FrozenSet, List, Tuple

import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field
from peft_jax.models.family import SELF_ATTENTION_STACK, family_of
from peft_jax.peft import targets
from peft_jax.peft.base import Method, PeftConfigError, apply_peft, flatten, register, unflatten
from peft_jax.peft.common import Rand, adapter_dtype
from peft_jax.peft.prompt_tuning import MAX_INPUT_LENGTH, check_num_virtual_tokens

PROJ = "prefix_encoder"


#: HF PEFT's prefixes: the self-attention of the stack that generates
HF_ATTENTIONS = ("decoder_self_attn", "self_attn")


def attentions(cfg, hp) -> List[Tuple[str, str, int]]:
  """``[(kind, attention path, n_layers)]`` in canonical order (the model family's
  attention kinds; default: HF PEFT's, the generating stack's self-attention)."""
  fam = family_of(cfg)
  every = fam.attentions(cfg)
  kinds = hp.get("prefix_attentions")
  if isinstance(kinds, str):
    kinds = [kinds]
  if not kinds:
    kinds = [k for k, _, _ in every if k in HF_ATTENTIONS][:1]
  bad = [k for k in kinds if k not in [a[0] for a in every]]
  if bad:
    raise PeftConfigError(f"prefix_attentions: unknown {bad} for a {fam.name} model; expected "
                          f"some of {[a[0] for a in every]}")
  return [a for a in every if a[0] in kinds]


def is_hf_layout(cfg, atts) -> bool:
  """Whether HF PEFT can hold prefixes at ``atts``: the default attention only."""
  return [a[0] for a in atts] == [a[0] for a in attentions(cfg, {})]


def token_dim(cfg):
  """Width of the prefixed keys and values (key/value heads * head width)."""
  return family_of(cfg).kv_width(cfg)


def transformer_submodules(cfg) -> int:
  """HF PEFT's ``num_transformer_submodules``: 2 for an encoder-decoder, else 1."""
  return 2 if family_of(cfg).layout == "seq2seq" else 1


@dataclasses.dataclass(frozen=True)
class PrefixHandler:
  n: int
  shift: bool
  self_stacks: FrozenSet[str]   # encoder-decoder stacks whose self-attention has a prefix
  max_len: int                  # the most positions the model encodes
  max_src: str = "max_position_embeddings"

  def positions(self, module, q_pos, k_pos, deterministic):
    if not self.shift:
      return q_pos, k_pos
    if k_pos is None:   # rotary positions [B, T] (decoder-only)
      if q_pos.shape[1] + self.n > self.max_len:
        raise PeftConfigError(f"prefix tuning: {self.n} prefix positions + {q_pos.shape[1]} tokens "
                              f"exceed {self.max_src}={self.max_len}")
      return q_pos + self.n, None
    stack = "decoder" if getattr(module, "is_decoder", False) else "encoder"
    if stack not in self.self_stacks:
      return q_pos, k_pos
    return q_pos + self.n, jnp.concatenate([jnp.arange(self.n, dtype=k_pos.dtype), k_pos + self.n])

  def attention_kv(self, module, k, v, mask, bias, deterministic):
    if not module.has_variable("params", "prefix_key"):
      return k, v, mask, bias
    b, s, nk, h = k.shape
    pk = module.get_variable("params", "prefix_key").reshape(self.n, nk, h)
    pv = module.get_variable("params", "prefix_value").reshape(self.n, nk, h)
    k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype)[None], (b, self.n, nk, h)), k], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype)[None], (b, self.n, nk, h)), v], axis=1)
    if mask is not None:
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (self.n,), mask.dtype), mask], axis=-1)
    if bias is not None and bias.shape[-1] == s:
      bias = jnp.concatenate([jnp.zeros(bias.shape[:-1] + (self.n,), bias.dtype), bias], axis=-1)
    return k, v, mask, bias


@register
class PrefixTuning(Method):
  name = "prefix_tuning"
  example_hparams = {"num_virtual_tokens": 4}
  reference = "HF PEFT 0.21 PrefixTuningConfig"
  hparams = {
      "num_virtual_tokens": Field(None, "prefix length P: key/value positions added per attention "
                                  "layer (required)", "int", ge=1),
      "prefix_projection": Field(False, "train the prefixes through HF's two-layer tanh MLP"),
      "encoder_hidden_size": Field(None, "hidden width of that MLP (none: the key/value width; "
                                   "0: no MLP, prefix_projection off: the paper's h = null)",
                                   "int", ge=0),
      "init_weights": Field(None, "none: N(0, 1) prefixes; 'zero': zero prefixes (or a zero last "
                            "MLP layer)", "str", choices=("zero",)),
      "prefix_attentions": Field(None, "T5 attentions to prefix: encoder_self_attn, "
                                 "decoder_self_attn, cross_attn (none: the decoder's)", "names"),
      "prefix_positions": Field("shift", "shift: tokens after the prefix (HF PEFT); none: token "
                                "positions kept, prefix keys unbiased", choices=("shift", "none")),
      "max_input_length": MAX_INPUT_LENGTH,
  }

  def validate(self, cfg, hp, flat):
    check_num_virtual_tokens(cfg, hp, "prefix_tuning")
    attentions(cfg, hp)
    if hp["prefix_positions"] not in ("shift", "none"):
      raise PeftConfigError(f"prefix_positions must be 'shift' (HF PEFT) or 'none', got "
                            f"{hp['prefix_positions']!r}")
    if hp["init_weights"] not in (None, "zero"):
      raise PeftConfigError(f"init_weights must be None or 'zero', got {hp['init_weights']!r}")
    ehs = hp["encoder_hidden_size"]
    if ehs is not None and (not isinstance(ehs, (int, np.integer)) or isinstance(ehs, bool)
                            or ehs < 0):
      raise PeftConfigError(f"encoder_hidden_size must be an int >= 0 (0: no reparameterisation), "
                            f"got {ehs!r}")
    if ehs == 0:   # h = null: plain prefixes (canonical form, read by every later hook)
      hp["prefix_projection"] = False
    for _, path, _ in attentions(cfg, hp):
      if f"{path}/k/kernel" not in flat:
        raise PeftConfigError(f"prefix tuning: the model has no attention at {path}")

  def hidden(self, cfg, hp):
    return int(hp["encoder_hidden_size"] or token_dim(cfg))

  def rows(self, cfg, hp):
    return sum(2 * n for _, _, n in attentions(cfg, hp))

  def init_leaves(self, cfg, hp, flat, rng):
    n, td = int(hp["num_virtual_tokens"]), token_dim(cfg)
    dtype = flat[targets.linear_modules(flat)[0].leaf].dtype
    zero = hp["init_weights"] == "zero"
    out = {}
    rnd = Rand(rng)
    if hp["prefix_projection"]:
      hid, rows = self.hidden(cfg, hp), self.rows(cfg, hp)
      b_in, b_out = 1.0 / math.sqrt(td), 1.0 / math.sqrt(hid)
      out[f"{PROJ}/embedding"] = rnd.normal((n, td))
      out[f"{PROJ}/dense_in/kernel"] = rnd.uniform((td, hid), -b_in, b_in)
      out[f"{PROJ}/dense_in/bias"] = rnd.uniform((hid,), -b_in, b_in)
      if zero:
        out[f"{PROJ}/dense_out/kernel"] = jnp.zeros((hid, rows * td), jnp.float32)
        out[f"{PROJ}/dense_out/bias"] = jnp.zeros((rows * td,), jnp.float32)
      else:
        out[f"{PROJ}/dense_out/kernel"] = rnd.uniform((hid, rows * td), -b_out, b_out)
        out[f"{PROJ}/dense_out/bias"] = rnd.uniform((rows * td,), -b_out, b_out)
    else:
      for _, path, L in attentions(cfg, hp):
        for nm in ("prefix_key", "prefix_value"):
          shape = (L, n, td)
          out[f"{path}/{nm}"] = jnp.zeros(shape) if zero else rnd.normal(shape)
    return {k: v.astype(adapter_dtype(dtype)) for k, v in out.items()}

  def prepare_params(self, cfg, hp, flat):
    if not hp["prefix_projection"]:
      return flat
    out = dict(flat)
    out.update(project(cfg, hp, flat))
    return out

  def handlers(self, cfg, hp):
    stacks = {SELF_ATTENTION_STACK[k] for k, _, _ in attentions(cfg, hp) if k in SELF_ATTENTION_STACK}
    mx, src = family_of(cfg).max_input_length(cfg)
    return (PrefixHandler(n=int(hp["num_virtual_tokens"]), shift=hp["prefix_positions"] == "shift",
                          self_stacks=frozenset(stacks), max_len=mx, max_src=src),)

  # ------------------------------------------------------------------ HF PEFT (PrefixTuningConfig)
  hf_peft_type = "PREFIX_TUNING"
  #: every field of peft 0.21's PrefixTuningConfig: HF saves the folded prefixes, so the
  #: projection's settings and the initialisation are no-ops
  hf_fields = {**{k: "used" for k in ("num_virtual_tokens", "num_layers", "token_dim",
                                      "num_transformer_submodules")},
               **{k: "noop" for k in ("num_attention_heads", "encoder_hidden_size",
                                     "prefix_projection", "init_weights")},
               "modules_to_save": ((None, []), "fully trained module copies"),}

  def hf_export(self, state, params):
    """``prompt_embeddings [P, 2 L token_dim]``: the folded prefixes
    (``prefix_projection=False``); rows ``2l`` / ``2l+1`` are layer ``l``'s key / value for
    LLaMA, HF's seq2seq row mapping for T5 (``hf_peft.hf_prefix_rows``)."""
    from peft_jax.peft import hf_peft
    cfg = state.model_cfg
    state, params = fold_projection(state, params)
    hp, flat = dict(state.hparams), flatten(params)
    if hp["prefix_positions"] != "shift":
      raise PeftConfigError("HF PEFT's prefix tuning shifts the token positions behind the prefix; "
                            "export needs prefix_positions='shift'")
    atts = attentions(cfg, hp)
    if not is_hf_layout(cfg, atts):
      want = [a[0] for a in attentions(cfg, {})]
      raise PeftConfigError("HF PEFT applies prefixes to the decoder self-attention only; export "
                            f"needs prefix_attentions={want}, got {[a[0] for a in atts]}")
    _, path, L = atts[0]
    pk, pv = hf_peft.np32(flat[f"{path}/prefix_key"]), hf_peft.np32(flat[f"{path}/prefix_value"])
    n, td = pk.shape[1], pk.shape[2]
    sub = transformer_submodules(cfg)
    rows = np.zeros((2 * L, n, td), np.float32)
    written = {}
    for l, (rk, rv) in enumerate(hf_peft.hf_prefix_rows(cfg, L, sub)):
      for r, val in ((rk, pk[l]), (rv, pv[l])):
        if r in written and not np.array_equal(rows[r], val):
          raise PeftConfigError(
              f"HF PEFT's T5 prefix layout gives decoder layers {written[r]} and {l} the same prefix "
              f"(row {r} of {2 * L}; with an even number of decoder layers, layers l and l+L/2 share "
              "one); these layers have different prefixes, so HF PEFT cannot represent them")
        rows[r] = val
        written[r] = l
    emb = np.ascontiguousarray(np.transpose(rows, (1, 0, 2)).reshape(n, 2 * L * td))
    fields = dict(num_virtual_tokens=int(n), token_dim=int(td),
                  num_attention_heads=int(token_dim(cfg) // family_of(cfg).head_dim(cfg)),
                  num_layers=int(L), num_transformer_submodules=sub, encoder_hidden_size=int(td),
                  prefix_projection=False)
    return fields, {"prompt_embeddings": emb}

  def hf_import(self, conf, tensors, cfg, base_params, path):
    from peft_jax.peft import hf_peft
    n = int(conf["num_virtual_tokens"])
    emb = tensors["prompt_embeddings"]
    L_hf, td = int(conf["num_layers"]), int(conf["token_dim"])
    if td != token_dim(cfg):
      raise PeftConfigError(f"prefix adapter token_dim={td}, but this model's attention keys are "
                            f"{token_dim(cfg)} wide (kv_heads * head_dim)")
    state = apply_peft(cfg, base_params, "prefix_tuning", {"num_virtual_tokens": n})
    _, apath, L = attentions(cfg, state.hparams)[0]
    if L_hf != L:
      raise PeftConfigError(f"prefix adapter has num_layers={L_hf}, the model's prefixed attention has "
                            f"{L} layers")
    if emb.shape != (n, 2 * L * td):
      raise PeftConfigError(f"prompt_embeddings has shape {emb.shape}, expected {(n, 2 * L * td)}")
    rows = emb.reshape(n, 2 * L, td).transpose(1, 0, 2)
    sub = int(conf.get("num_transformer_submodules") or transformer_submodules(cfg))
    flat = flatten(state.params)
    pk, pv = np.zeros((L, n, td), np.float32), np.zeros((L, n, td), np.float32)
    for l, (rk, rv) in enumerate(hf_peft.hf_prefix_rows(cfg, L, sub)):
      pk[l], pv[l] = rows[rk], rows[rv]
    flat[f"{apath}/prefix_key"] = pk.astype(flat[f"{apath}/prefix_key"].dtype)
    flat[f"{apath}/prefix_value"] = pv.astype(flat[f"{apath}/prefix_value"].dtype)
    return state, unflatten(flat)


def project(cfg, hp, flat):
  """The MLP reparameterisation -> ``{<attention>/prefix_key|value: [L, P, token_dim]}``."""
  n, td = int(hp["num_virtual_tokens"]), token_dim(cfg)
  e = flat[f"{PROJ}/embedding"].astype(jnp.float32)
  h = jnp.tanh(e @ flat[f"{PROJ}/dense_in/kernel"].astype(jnp.float32)
               + flat[f"{PROJ}/dense_in/bias"].astype(jnp.float32))
  kv = h @ flat[f"{PROJ}/dense_out/kernel"].astype(jnp.float32) + flat[f"{PROJ}/dense_out/bias"].astype(jnp.float32)
  kv = kv.reshape(n, -1, td)                      # [P, rows, td]
  out, off = {}, 0
  dtype = flat[f"{PROJ}/embedding"].dtype
  for _, path, L in attentions(cfg, hp):
    blk = jnp.transpose(kv[:, off:off + 2 * L].reshape(n, L, 2, td), (1, 2, 0, 3))   # [L, 2, P, td]
    out[f"{path}/prefix_key"] = blk[:, 0].astype(dtype)
    out[f"{path}/prefix_value"] = blk[:, 1].astype(dtype)
    off += 2 * L
  return out


def fold_projection(state, params):
  """A projected prefix-tuning state -> an equivalent plain one (prefixes evaluated once)."""
  hp = dict(state.hparams)
  if state.method.name != "prefix_tuning":
    raise PeftConfigError(f"fold_projection is for prefix_tuning, not {state.method.name!r}")
  flat = flatten(params)
  if not hp["prefix_projection"]:
    return state, params
  plain = project(state.model_cfg, hp, flat)
  base = {k: v for k, v in flat.items() if k not in state.added}
  hp["prefix_projection"] = False
  new = apply_peft(state.model_cfg, unflatten(base), "prefix_tuning", hp)
  nf = flatten(new.params)
  nf.update(plain)
  return new, unflatten(nf)
