"""Decoding: token-exact parity with ``transformers`` on the tiny models (greedy against
the model's uncached forward step by step, beam search against ``generate`` run uncached,
stopping at EOS), and sampling checks."""
import functools
import re
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from peft_jax import decoding
from peft_jax.decoding import generate, pad_prompts
from peft_jax.checkpoint.hf import load_hf
from peft_jax.models import build_model
from tiny_hf import KINDS, make_hf_model, saved_hf_model

transformers.logging.set_verbosity_error()

N = 20                                            # max_new_tokens everywhere
PROMPTS = [[5, 17, 33, 9, 70, 21, 3], [44, 12, 8]]  # two lengths: the batch needs padding
PAD = 0


@functools.lru_cache(maxsize=None)
def _models(kind, sharp=False):
  """(torch model, our model, params). The random tiny T5s repeat one token forever;
  ``sharp`` scales the decoder and self-attention weights so that outputs vary with
  the history (a stronger test of the cache) and beam search differs from greedy."""
  if sharp:
    hf = make_hf_model(kind)
    with torch.no_grad():
      for name, p in hf.named_parameters():
        if re.search(r"decoder\.block|SelfAttention", name) and "layer_norm" not in name:
          p.mul_(5.0)
    path = tempfile.mkdtemp(prefix=f"peftjax_dec_{kind}_")
    hf.save_pretrained(path)
  else:
    hf, path = saved_hf_model(kind)
  cfg, params = load_hf(path)
  return hf, build_model(cfg), params


def _prompts(kind):
  # T5's encoder reads right-padded input; transformers wants LLaMA prompts left-padded.
  return decoding.pad_prompts(PROMPTS, PAD, "right" if kind.startswith("t5") else "left")


def _ours(kind, sharp=False, **kw):
  _, model, params = _models(kind, sharp)
  ids, mask = _prompts(kind)
  kw.setdefault("pad_token_id", PAD)   # LLaMA's config has none (generate would pad with EOS)
  return np.asarray(decoding.generate(model, params, ids, mask, max_new_tokens=N, **kw))


def _hf_greedy(kind, sharp=False, eos=None):
  """Greedy decoding by transformers' model, uncached: its full forward on each unpadded
  prompt plus the tokens so far, argmax, until EOS; as [B, N], padded after EOS. This is
  the model's own definition of greedy output, independent of transformers' cache
  classes and ``generate`` plumbing, which change between releases."""
  hf, model, _ = _models(kind, sharp)
  eos = model.cfg.eos_token_id if eos is None else eos
  res = np.full((len(PROMPTS), N), PAD, np.int64)
  for r, prompt in enumerate(PROMPTS):
    new = []
    while len(new) < N and eos not in new:
      with torch.no_grad():
        if hf.config.is_encoder_decoder:
          dec = [hf.config.decoder_start_token_id] + new
          logits = hf(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec]),
                      use_cache=False).logits
        else:
          logits = hf(input_ids=torch.tensor([prompt + new]), use_cache=False).logits
      new.append(int(logits[0, -1].argmax()))
    res[r, :len(new)] = new
  return res


def _hf_beams(kind, sharp=False, eos=None, **kw):
  """transformers' beam search (``generate``, uncached so that its cache classes play no
  part), as [B, N]: pad after the first EOS and at the end."""
  hf, model, _ = _models(kind, sharp)
  cfg = model.cfg
  eos = cfg.eos_token_id if eos is None else eos
  ids, mask = _prompts(kind)
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out = hf.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                      attention_mask=torch.as_tensor(mask, dtype=torch.long),
                      max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=PAD,
                      repetition_penalty=1.0, use_cache=False, num_return_sequences=1,
                      early_stopping=False, **kw).numpy()
  new = out[:, 1:] if hf.config.is_encoder_decoder else out[:, ids.shape[1]:]
  res = np.full((len(new), N), PAD, np.int64)
  for i, row in enumerate(new.tolist()):
    if eos in row:                # beam search fills with EOS, not pad, when pad id is 0
      row = row[:row.index(eos) + 1]
    res[i, :len(row)] = row
  return res


def _assert_padded_after_eos(out, eos):
  for row in out.tolist():
    if eos in row:
      j = row.index(eos)
      assert row[j + 1:] == [PAD] * (len(row) - j - 1), row


def test_saved_generation_configs_are_plain():
  # transformers must decode with the same (default) settings as we do
  for kind in KINDS:
    g = _models(kind)[0].generation_config
    assert g.repetition_penalty in (None, 1.0) and not g.no_repeat_ngram_size
    assert not g.do_sample and g.num_beams in (None, 1) and not g.min_length
    assert g.length_penalty in (None, 1.0) and g.early_stopping in (None, False)


CASES = [(k, False) for k in KINDS] + [("t5_v10", True), ("t5_v11", True)]
IDS = [k + ("-sharp" if s else "") for k, s in CASES]


@pytest.mark.parametrize("kind,sharp", CASES, ids=IDS)
def test_greedy_matches_transformers(kind, sharp):
  np.testing.assert_array_equal(_ours(kind, sharp), _hf_greedy(kind, sharp))


BEAM_CASES = [("t5_v10", False), ("t5_v11", False), ("t5_v10", True), ("t5_v11", True),
              ("llama_mha", False), ("llama_gqa", False)]


@pytest.mark.parametrize("kind,sharp", BEAM_CASES, ids=[k + ("-sharp" if s else "")
                                                         for k, s in BEAM_CASES])
def test_beam_search_matches_transformers(kind, sharp):
  ours = _ours(kind, sharp, num_beams=4)
  ref = _hf_beams(kind, sharp, num_beams=4, length_penalty=1.0)
  np.testing.assert_array_equal(ours, ref)
  if sharp:   # the sharpened models make beam search matter
    assert (ours != _ours(kind, sharp)).any()


# (kind, sharp, num_beams, length_penalty). For beam search the eos is chosen from the
# beam output; length_penalty 0 favours short hypotheses, so that beams really finish.
EOS_CASES = [("t5_v10", True, 1, 1.0), ("t5_v11", True, 1, 1.0), ("llama_mha", False, 1, 1.0),
             ("llama_gqa", False, 1, 1.0), ("t5_v10", True, 4, 0.0), ("t5_v11", True, 4, 0.0),
             ("llama_mha", False, 4, 0.0), ("llama_gqa", False, 4, 1.0)]


@pytest.mark.parametrize("kind,sharp,beams,lp", EOS_CASES,
                         ids=[f"{k}-beams{b}-lp{lp:g}" for k, _, b, lp in EOS_CASES])
def test_forced_eos_stops_and_pads_like_transformers(kind, sharp, beams, lp):
  # Random models rarely emit their EOS: declare the token that decoding emits at
  # step 5 of the first row to be EOS, on both sides.
  eos = int(_ours(kind, sharp, num_beams=beams)[0, 5])
  ours = _ours(kind, sharp, num_beams=beams, length_penalty=lp, eos_token_id=eos)
  ref = (_hf_greedy(kind, sharp, eos=eos) if beams == 1 else
         _hf_beams(kind, sharp, eos=eos, num_beams=beams, length_penalty=lp))
  np.testing.assert_array_equal(ours, ref)
  # the first row really stopped early (greedy: by step 5) and was padded
  assert eos in ours[0, :6].tolist()
  _assert_padded_after_eos(ours, eos)


def test_prompt_padding_side_does_not_matter_for_llama():
  _, model, params = _models("llama_gqa")
  left, right = (decoding.pad_prompts(PROMPTS, PAD, side) for side in ("left", "right"))
  gen = lambda ids, mask: np.asarray(decoding.generate(model, params, ids, mask,
                                                       max_new_tokens=N))
  np.testing.assert_array_equal(gen(*left), gen(*right))


# ----------------------------------------------------------------------------- sampling

def test_sampling_is_deterministic_given_the_key():
  a = _ours("llama_mha", do_sample=True, rng=jax.random.PRNGKey(0))
  b = _ours("llama_mha", do_sample=True, rng=jax.random.PRNGKey(0))
  c = _ours("llama_mha", do_sample=True, rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_tiny_top_p_and_top_k_1_equal_greedy():
  greedy = _ours("llama_mha")
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(
      _ours("llama_mha", do_sample=True, rng=key, top_p=1e-6, temperature=0.7), greedy)
  np.testing.assert_array_equal(_ours("llama_mha", do_sample=True, rng=key, top_k=1), greedy)


def _freq_tolerance(p, n):
  # 5 standard deviations of a frequency estimate, plus a little slack
  return 5 * np.sqrt(p * (1 - p) / n) + 2e-3


def test_sample_logits_frequencies_match_softmax():
  """Toy 1-step case: frequencies of 20k draws vs softmax(logits / T), per token within
  5 standard deviations (+0.002); top-k / top-p never draw outside their set."""
  n = 20000
  logits = jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  draw = jax.jit(jax.vmap(lambda k, t, p: decoding.sample_logits(logits, k, t, p)[0],
                          in_axes=(0, None, None)))
  for temperature in (0.5, 1.0, 2.0):
    freq = np.bincount(np.asarray(draw(keys, temperature, 1.0)), minlength=6) / n
    p = np.asarray(jax.nn.softmax(logits[0] / temperature))
    assert np.all(np.abs(freq - p) <= _freq_tolerance(p, n)), (temperature, freq, p)
  # top_k = 2: renormalised over the two best tokens
  topk = jax.jit(jax.vmap(lambda k: decoding.sample_logits(logits, k, 1.0, 1.0, 2)[0]))
  freq = np.bincount(np.asarray(topk(keys)), minlength=6) / n
  p = np.zeros(6)
  p[:2] = np.asarray(jax.nn.softmax(logits[0, :2]))
  assert np.all(np.abs(freq - p) <= _freq_tolerance(p, n)), freq
  # top_p = 0.8: the best token has mass 0.56, the first two 0.77 < 0.8, so three survive
  freq = np.bincount(np.asarray(draw(keys, 1.0, 0.8)), minlength=6) / n
  p = np.zeros(6)
  p[:3] = np.asarray(jax.nn.softmax(logits[0, :3]))
  assert np.all(np.abs(freq - p) <= _freq_tolerance(p, n)), freq


def test_one_step_sampling_frequencies_match_model_softmax():
  """End to end: 2000 copies of a prompt, one sampled token each at temperature 0.7;
  frequencies match softmax(transformers' logits / 0.7) within the tolerance above."""
  n, temperature = 2000, 0.7
  hf, model, params = _models("llama_mha")
  prompt = np.array([PROMPTS[0]], np.int32)
  out = decoding.generate(model, params, np.repeat(prompt, n, 0), None, max_new_tokens=1,
                          do_sample=True, temperature=temperature, rng=jax.random.PRNGKey(7))
  freq = np.bincount(np.asarray(out[:, 0]), minlength=model.cfg.vocab_size) / n
  with torch.no_grad():
    logits = hf(torch.as_tensor(prompt, dtype=torch.long)).logits[0, -1]
  p = torch.softmax(logits / temperature, -1).numpy().astype(np.float64)
  assert np.all(np.abs(freq - p) <= _freq_tolerance(p, n))


# ----------------------------------------------------------------------------- API

def test_repeated_calls_do_not_recompile():
  _ours("llama_gqa", do_sample=True, rng=jax.random.PRNGKey(0))
  size = decoding._generate_jit._cache_size()
  # same shapes and static settings; traced values (temperature, top_p, ids) may change
  _ours("llama_gqa", do_sample=True, rng=jax.random.PRNGKey(1), temperature=0.5, top_p=0.9)
  _ours("llama_gqa", do_sample=True, rng=jax.random.PRNGKey(1), eos_token_id=7, pad_token_id=3)
  assert decoding._generate_jit._cache_size() == size


def test_bad_arguments():
  _, model, params = _models("t5_v10")
  ids, mask = _prompts("t5_v10")
  with pytest.raises(ValueError, match="beam search"):
    decoding.generate(model, params, ids, mask, max_new_tokens=2, num_beams=2, do_sample=True,
                      rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="PRNG key"):
    decoding.generate(model, params, ids, mask, max_new_tokens=2, do_sample=True)
  with pytest.raises(ValueError, match="temperature"):
    decoding.generate(model, params, ids, mask, max_new_tokens=2, do_sample=True,
                      temperature=0.0, rng=jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- methods that
# lengthen the input (prompt tuning) during cached LLaMA generation

def _prompt_tuned_llama(kind="llama_gqa", n_virtual=3):
  from peft_jax import peft
  _, d = saved_hf_model(kind)
  cfg, params = load_hf(d)
  state = peft.apply_peft(cfg, params, "prompt_tuning", {"num_virtual_tokens": n_virtual},
                          rng=jax.random.PRNGKey(3))
  flat = peft.flatten(state.params)
  (leaf,) = [k for k in state.added]
  flat[leaf] = np.asarray(jax.random.normal(jax.random.PRNGKey(4), flat[leaf].shape)) * 0.5
  return cfg, state, peft.unflatten(flat)


def test_llama_prompt_tuning_generation_matches_uncached_loop():
  """Cached, batched, left-padded generation with a soft prompt equals a loop that reruns
  the full (uncached) forward on each unpadded prompt and takes the argmax."""
  cfg, state, params = _prompt_tuned_llama()
  model = build_model(cfg, state.sites)
  prompts = [[5, 17, 33, 9, 71, 4, 12], [44, 8, 90]]
  ids, mask = pad_prompts(prompts, pad_id=0, side="left")
  got = np.asarray(generate(model, params, ids, mask, max_new_tokens=8, eos_token_id=-1))
  fwd = jax.jit(lambda x: model.apply({"params": params}, x))
  for row, pr in enumerate(prompts):
    seq = list(pr)
    for _ in range(8):
      logits = fwd(jnp.asarray([seq], jnp.int32))
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert got[row].tolist() == seq[len(pr):], row


def test_llama_prompt_tuning_generation_matches_hf_peft(tmp_path):
  """Our cached, batched generation with a soft prompt equals greedy decoding by HF PEFT's
  own forward, run uncached on the growing unpadded sequence (the virtual tokens are
  prepended by ``PeftModel.forward``). HF PEFT's cached ``generate`` is not the reference
  here: with prompt tuning (peft 0.21, transformers 5.24) it leaves its own uncached
  forward after a few tokens, so it tests the cache of the reference, not ours."""
  import peft as hfpeft
  from peft_jax import peft
  cfg, state, params = _prompt_tuned_llama()
  peft.export_hf_peft(state, params, str(tmp_path / "pt"))
  m, _ = saved_hf_model("llama_gqa")
  pm = hfpeft.PeftModel.from_pretrained(m, str(tmp_path / "pt")).eval()
  prompts, n_new = [[5, 17, 33, 9, 71, 4, 12], [44, 8, 90]], 10
  ref = []
  for prompt in prompts:
    seq = list(prompt)
    with torch.no_grad():
      for _ in range(n_new):
        logits = pm(input_ids=torch.tensor([seq]), use_cache=False).logits
        seq.append(int(logits[0, -1].argmax()))
    ref.append(seq[len(prompt):])
  ids, mask = pad_prompts(prompts, pad_id=0, side="left")
  got = np.asarray(generate(build_model(cfg, state.sites), params, ids, mask, max_new_tokens=n_new,
                            eos_token_id=-1))
  np.testing.assert_array_equal(got, np.asarray(ref))


@pytest.mark.parametrize("kind,sharp", [("t5_v11", True), ("llama_gqa", False)])
def test_unrolled_decoding_steps_equal_the_rolled_loop(kind, sharp, monkeypatch):
  """One-token steps unroll the layer loop (``layers.DECODE_UNROLL``); the tokens are those
  of the rolled loop, and the step's layer scan is unrolled only in decoding steps."""
  from peft_jax.models import layers
  seen = []
  real = layers.nn.scan
  monkeypatch.setattr(layers.nn, "scan", lambda *a, **k: seen.append(k["unroll"]) or real(*a, **k))
  out = {}
  for unroll in (False, True):
    monkeypatch.setattr(layers, "DECODE_UNROLL", unroll)
    jax.clear_caches()
    seen.clear()
    out[unroll] = _ours(kind, sharp)
    n_layers = max(seen)
    assert (n_layers > 1) == unroll and 1 in seen, seen   # the prompt's pass stays rolled
  np.testing.assert_array_equal(out[True], out[False])


@pytest.mark.parametrize("method,hp", [
    ("lora", {"r": 4, "lora_alpha": 8, "init_lora_weights": False,
              "target_modules": "q,k,v,o"}),
    ("prefix_tuning", {"num_virtual_tokens": 3}),
])
def test_t5_cached_generation_matches_uncached_loop(method, hp):
  """T5's cache keeps the encoder's keys and values in the layouts of a step's products
  (``t5.init_cache``); a method acting on cross attention's keys (prefix tuning) reads
  them back in its own layout. Cached greedy generation, with a padded prompt, equals a
  loop that reruns the whole uncached decoder on each row and takes the argmax."""
  from peft_jax import peft
  _, model, params = _models("t5_v11", True)     # the sharpened model: outputs vary
  cfg = model.cfg
  state = peft.apply_peft(cfg, params, method, dict(hp), rng=jax.random.PRNGKey(3))
  flat = peft.flatten(state.params)
  for leaf in state.added:
    flat[leaf] = np.asarray(jax.random.normal(jax.random.PRNGKey(4), flat[leaf].shape)) * 0.1
  params = state.prepare(peft.unflatten(flat))
  model = build_model(cfg, state.sites)
  prompts, n_new = [[5, 17, 33, 9, 71, 4, 12, 1], [44, 8, 90, 1]], 6
  ids, mask = pad_prompts(prompts, pad_id=0, side="right")
  got = np.asarray(generate(model, params, ids, mask, max_new_tokens=n_new, eos_token_id=-1))
  fwd = jax.jit(lambda x, y: model.apply({"params": params}, x, jnp.ones_like(x), y, None, True))
  for row, pr in enumerate(prompts):
    dec = [cfg.decoder_start_token_id]
    for _ in range(n_new):
      logits = fwd(jnp.asarray([pr], jnp.int32), jnp.asarray([dec], jnp.int32))
      dec.append(int(jnp.argmax(logits[0, -1])))
    assert got[row].tolist() == dec[1:], row
  assert len(set(got.ravel().tolist())) > 2      # not a constant token


@pytest.mark.parametrize("kind,sharp", [("t5_v11", True), ("llama_gqa", False)])
@pytest.mark.parametrize("beams", [1, 3])
def test_per_layer_weight_copies_give_the_same_tokens(kind, sharp, beams, monkeypatch):
  """Decoding steps read per-layer copies of the stacked weights (and T5's cross-attention
  keys and values), made once per call (``decoding.SPLIT_LAYERS``, on by default when they
  fit in memory); greedy and beam search give the tokens of the stacked arrays."""
  _, model, params = _models(kind, sharp)
  assert decoding._split_fits(params)             # the default on these models: split
  ids, mask = _prompts(kind)
  out = {}
  for split in (False, True):
    monkeypatch.setattr(decoding, "SPLIT_LAYERS", split)
    out[split] = np.asarray(generate(model, params, ids, mask, max_new_tokens=8,
                                     num_beams=beams, eos_token_id=-1))
  np.testing.assert_array_equal(out[True], out[False])
  assert len(set(out[True].ravel().tolist())) > 2
  monkeypatch.setattr(decoding, "SPLIT_MEMORY_FRACTION", 0.0)
  monkeypatch.setattr(decoding, "SPLIT_LAYERS", "auto")
  assert not decoding._split_fits(params)         # no room: the stacked arrays are read
