"""The suite's model side (peft_jax/evals/engine.py) on a tiny random LLaMA with the real
LLaMA tokenizer: chunked generation equals one-program greedy decoding cut at the stop
string, text keeps its leading whitespace, samples do not depend on their batch, and MMLU's
letter probabilities equal a transformers forward (base and HF PEFT LoRA) within 1e-4."""
import functools

import numpy as np
import pytest

from peft_jax.evals.benchmarks import Request
from peft_jax.evals.engine import Engine, bucket, cut_at_stop

pytestmark = pytest.mark.shared_data


@functools.lru_cache(maxsize=None)
def _tiny(tok_dir):
  import tempfile
  import torch
  import transformers
  from peft_jax.checkpoint.hf import load_hf
  from peft_jax.models import build_model
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=2, max_position_embeddings=4096,
                                 bos_token_id=1, eos_token_id=2, initializer_range=0.2)
  hf = transformers.LlamaForCausalLM(cfg).eval()   # a wide init: peaked next-token probabilities
  d = tempfile.mkdtemp(prefix="peftjax_oi_llama_")
  hf.save_pretrained(d)
  mc, params = load_hf(d)
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  return hf, d, build_model(mc), mc, params, tok


@pytest.fixture
def tiny(shared_data):
  return _tiny(str(shared_data / "tokenizers" / "llama"))


PROMPTS = ["Question: what is 2+2?\nAnswer:", "def f(x):\n", "Hello", "a b c d e f g h i j k"]


def test_bucket_and_stop_helpers():
  assert [bucket(n, 4096) for n in (3, 16, 17, 33, 100, 1000, 4000)] == \
      [16, 16, 20, 40, 112, 1024, 4096]
  assert all(n <= bucket(n, 10**6) <= 1.25 * n + 16 for n in range(1, 3000))
  assert bucket(300, 256) == 300           # never below the prompt, even over the cap
  assert cut_at_stop("a\nb\n\nc", ("\n\n", "\n")) == ("a", True)
  assert cut_at_stop("abc", ("\n",)) == ("abc", False)
  assert cut_at_stop("x = 1\ndef g", ("\nclass", "\ndef")) == ("x = 1", True)


def test_greedy_chunks_equal_one_program_decoding(tiny):
  """Text generated chunk by chunk (host stop checks between chunks) is the one-program
  greedy decode's text, cut before the stop string; rows of one batch stop independently."""
  from peft_jax.decoding import generate, pad_prompts
  _, _, model, _, params, tok = tiny
  n = 40
  stops = ("\n", "ing", "")
  reqs = [Request(id=str(i), prompt=p, max_new_tokens=n, stop=stops[i % 3:i % 3 + 1])
          for i, p in enumerate(PROMPTS)]
  got = Engine(model, params, tok, batch_size=3).generate(reqs)
  ids = [[tok.bos_token_id] + tok(p)["input_ids"] for p in PROMPTS]   # BOS: see Engine.encode
  a, m = pad_prompts(ids, 0, "left")
  ref = np.asarray(generate(model, params, a, m, max_new_tokens=n, eos_token_id=tok.eos_token_id,
                            pad_token_id=0))
  for i, r in enumerate(reqs):
    gen = [int(t) for t in ref[i]]
    full = tok.decode(ids[i] + gen, skip_special_tokens=True)
    text = full[len(tok.decode(ids[i], skip_special_tokens=True)):]
    assert got[r.id] == [cut_at_stop(text, r.stop)[0]], (i, got[r.id], text)


def test_generated_text_keeps_leading_whitespace(tiny):
  """SentencePiece drops the leading space of a sequence decoded alone; the engine decodes
  after the prompt's last tokens, so a HumanEval body keeps its indentation."""
  _, _, model, _, params, tok = tiny
  eng = Engine(model, params, tok)
  for prompt, completion in [("def f(x):\n", "    return x + 1\n"),
                             ("Answer:", " 42"), ("The answer is", " 7.")]:
    p = tok(prompt)["input_ids"]
    full = tok(prompt + completion)["input_ids"]
    assert full[:len(p)] == p
    gen = np.array(full[len(p):] + [tok.eos_token_id, 0, 0])
    assert eng._text(p, gen) == completion
    # what decoding the new tokens alone would give: the leading space lost
    assert tok.decode(full[len(p):], skip_special_tokens=True) != completion


def test_samples_do_not_depend_on_their_batch(tiny):
  _, _, model, _, params, tok = tiny
  req = Request(id="HumanEval/0", prompt="def f(x):\n", max_new_tokens=12, temperature=0.8,
                top_p=0.95, n=6, stop=("\ndef",))
  other = Request(id="other", prompt="Hello", max_new_tokens=12, temperature=0.8, n=3)
  all6 = Engine(model, params, tok, batch_size=4, seed=3).generate([req, other])
  alone = Engine(model, params, tok, batch_size=2, seed=3).generate([req],
                                                                    samples={req.id: [1, 4]})
  assert alone[req.id] == [all6[req.id][1], all6[req.id][4]]
  assert len(set(all6[req.id])) > 1                      # different samples
  reseeded = Engine(model, params, tok, batch_size=4, seed=4).generate([req])
  assert reseeded[req.id] != all6[req.id]


def _letter_probs_hf(hf, tok, prompts):
  import torch
  out = []
  ids = [tok.encode(c)[-1] for c in (" A", " B", " C", " D")]
  with torch.no_grad():
    for p in prompts:
      x = torch.tensor([[tok.bos_token_id] + tok(p)["input_ids"]])
      probs = torch.softmax(hf(x).logits[0, -1].double(), -1)
      out.append([float(probs[i]) for i in ids])
  return np.array(out)


def _mmlu_prompts(shared_data, tok, n_shot):
  from peft_jax.evals.benchmarks import benchmark
  from peft_jax.evals.benchmarks.common import resolve_settings
  bench = benchmark("mmlu")
  s = resolve_settings(bench, {"n_shot": n_shot})
  items = bench.load(str(shared_data / "open_instruct_eval"), s)
  items = [it for it in items if it["id"].split("/")[0] in ("abstract_algebra",
                                                              "clinical_knowledge")][:6]
  return bench.requests(items, s, tok)


@pytest.mark.parametrize("n_shot", [0, 5])
def test_mmlu_letter_probabilities_equal_transformers(tiny, shared_data, n_shot,
                                                      one_torch_thread):
  hf, _, model, _, params, tok = tiny
  reqs = _mmlu_prompts(shared_data, tok, n_shot)
  got = Engine(model, params, tok, batch_size=4).choose(reqs)
  ref = _letter_probs_hf(hf, tok, [r.prompt for r in reqs])
  ours = np.array([got[r.id]["probs"] for r in reqs])
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  assert np.abs(ours - ref).max() / ref.max() < 1e-3
  for r, p in zip(reqs, ref):
    assert got[r.id]["output"] == "ABCD"[int(np.argmax(p))]


def test_mmlu_letter_probabilities_with_an_hf_peft_lora_adapter(tiny, shared_data, tmp_path,
                                                                one_torch_thread):
  """An HF PEFT LoRA adapter (random, non-zero B) on the same tiny LLaMA: imported through
  our HF PEFT mapping, the engine's letter probabilities equal PEFT's forward."""
  import peft
  import torch
  from peft_jax.models import build_model
  from peft_jax.peft.hf_peft import import_hf_peft
  _, d, _, mc, params, tok = tiny
  import transformers
  base = transformers.LlamaForCausalLM.from_pretrained(d).eval()
  conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
  pm = peft.get_peft_model(base, conf)
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.5)
  pm.eval()
  pm.save_pretrained(str(tmp_path / "adapter"))
  state, ad_params = import_hf_peft(str(tmp_path / "adapter"), mc, params)
  model = build_model(mc, state.sites)
  reqs = _mmlu_prompts(shared_data, tok, 0)
  got = Engine(model, state.prepare(ad_params), tok, batch_size=4).choose(reqs)
  ref = _letter_probs_hf(pm, tok, [r.prompt for r in reqs])
  ours = np.array([got[r.id]["probs"] for r in reqs])
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  # the adapter changes the probabilities (get_peft_model wrapped ``base`` in place, so the
  # base's probabilities come from our model without the adapter)
  _, _, base_model, _, _, _ = tiny
  plain = Engine(base_model, params, tok, batch_size=4).choose(reqs)
  base_probs = np.array([plain[r.id]["probs"] for r in reqs])
  assert np.abs(base_probs - ref).max() > 0.05 * ref.max()
