"""TyDiQA-GoldP as open-instruct evaluates it (``eval/tydiqa/run_eval.py``): 1-shot, with
the gold passage (``tydiqa_goldp_1shot``) or without it (``no_context``), SQuAD EM/F1.

Data: ``tydiqa/tydiqa-goldp-v1.1-dev.json`` (the questions) and ``-train.json`` (the shots),
SQuAD-1.1 layout. The language is the part of ``qa.id`` before the first ``-``.

Selection (upstream's call order on one ``random.Random(42)``, the same sequence as
``random.seed(42)`` once): for each language in sorted order, ``random.sample`` of
``max_num_examples_per_lang`` questions *only when* the language has more (otherwise its
questions stay in file order); then, for each language in sorted order,
``random.sample(train questions of the language, n_shot)``; a shot's answer is its first
answer text. With ``max_num_examples_per_lang`` None (or ``load(subsample=False)``) the
questions keep the file's order.

Missing shots: the shared train sample has none for arabic, bengali, indonesian, russian
and telugu. A language with no train question is a DataError unless
``missing_shots="borrow_dev"``: the shots are then drawn (same call, same place in the
random sequence) from that language's dev questions that are *not* evaluated, in file
order. ``load(subsample=False)`` evaluates every question, so nothing is left to borrow:
it (the scorer's id look-up) leaves such a language's ``shots`` None instead of failing,
and :func:`requests` refuses an item without the shots it needs.

Context truncation (``max_context_length`` 512, needs a tokenizer): each context, test and
demo, is encoded *with* special tokens and, if longer than 512 tokens, replaced by the
decode of the first 512. Upstream quirk kept: the encoding starts with BOS, so the
truncated text starts with the decoded BOS (``"<s> "`` for LLaMA) and holds 511 tokens of
text. The project's LLaMA tokenizer may be loaded without ``add_bos_token`` (BOS is added by
our own encoders); :func:`encode_with_bos` therefore puts ``bos_token_id`` first when
``encode`` did not, which is what open-instruct's LLaMA tokenizers return.

Prompt (per-language strings in :data:`TEMPLATES`, verbatim from upstream)::

    gold passage: {instruction}\\n\\n{P} {demo context}\\n{Q} {demo question}\\n{A} {demo answer}
                  \\n\\n{P} {context}\\n{Q} {question}\\n
    no context:   {instruction_nc}\\n\\n{Q} {demo question}\\n{A} {demo answer}\\n\\n{Q} {question}\\n

(demos joined by ``\\n\\n``; with 0 shots the demo block and its ``\\n\\n`` are absent), then
``{A}`` directly (non-chat), or the text as the user message and ``{A}`` after the
``<|assistant|>`` cue (chat). Greedy, 50 new tokens; non-chat stops at ``\\n``, chat at EOS.

Metric: per language, SQuAD-1.1 exact match and F1 (0-100, max over the gold answers;
normalisation: lowercase, drop ASCII punctuation, drop the words a/an/the, collapse
whitespace) of the stripped output, and upstream's ``recall`` (100 when a stripped,
lowercased gold answer is a substring of the lowercased output); the averages are
unweighted over the languages present, English included (Google's README would leave
English out). Headline ``score`` = average F1 / 100.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import string
import types
from typing import Dict, List, Optional, Sequence

from peft_jax.data.common import DataError
from peft_jax.evals.benchmarks import Request, chat_prompt
from peft_jax.evals.benchmarks.common import resolve_settings

NAME = "tydiqa"
DEFAULTS = {"n_shot": 1, "no_context": False, "max_num_examples_per_lang": 100,
            "max_context_length": 512, "max_new_tokens": 50, "chat": False,
            "missing_shots": "error"}
MISSING_SHOTS = ("error", "borrow_dev")
DEV_FILE, TRAIN_FILE = "tydiqa-goldp-v1.1-dev.json", "tydiqa-goldp-v1.1-train.json"

#: language -> (instruction with passage, passage label, question label, answer label,
#: instruction without passage); upstream's ``encoding_templates_with/without_context``.
TEMPLATES = {
    "english": ("Answer the following question based on the information in the given passage.",
                "Passage:", "Question:", "Answer:", "Answer the following question."),
    "arabic": ("أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.",
               "المقطع:", "السؤال:", "الإجابة:", "أجب على السؤال التالي."),
    "bengali": ("প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।",
                "অধ্যায়:", "প্রশ্ন:", "উত্তর:", "নিম্নলিখিত প্রশ্নের উত্তর দিন।"),
    "finnish": ("Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
                "Kappale:", "Kysymys:", "Vastaus:", "Vastaa seuraavaan kysymykseen."),
    "indonesian": ("Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.",
                   "Bagian:", "Pertanyaan:", "Jawaban:", "Jawab pertanyaan berikut."),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.",
               "문단:", "질문:", "답변:", "다음 질문에 답하십시오."),
    "russian": ("Ответьте на следующий вопрос на основе информации в данном отрывке.",
                "Отрывок:", "Вопрос:", "Ответ:", "Ответьте на следующий вопрос."),
    "swahili": ("Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.",
                "Kifungu:", "Swali:", "Jibu:", "Jibu swali lifuatalo."),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.",
               "పేరా:", "ప్రశ్న:", "సమాధానం:", "క్రింది ప్రశ్నకు సమాధానం ఇవ్వండి."),
}


# ----------------------------------------------------------------------------- settings

# ----------------------------------------------------------------------------- load

def language(qa_id: str) -> str:
  return qa_id.split("-")[0]


def read_squad(path: str) -> List[dict]:
  """The questions of a SQuAD-1.1-layout file in file order: id, language, context,
  question, answers (the answer texts)."""
  if not os.path.isfile(path):
    raise DataError(f"{NAME}: no file {path}; expected a SQuAD-1.1 style TyDiQA-GoldP file")
  with open(path, encoding="utf-8") as f:
    try:
      doc = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{NAME}: {path} is not JSON ({e}); expected a SQuAD-1.1 style document") from None
  out, where = [], "the document"
  try:
    for a, article in enumerate(doc["data"]):
      where = f"article {a}"
      for paragraph in article["paragraphs"]:
        for qa in paragraph["qas"]:
          out.append({"id": str(qa["id"]), "language": language(str(qa["id"])),
                      "context": paragraph["context"], "question": qa["question"],
                      "answers": [ans["text"] for ans in qa["answers"]]})
  except (KeyError, TypeError) as e:
    raise DataError(f"{NAME}: {path} {where} lacks {e}; expected data[].paragraphs[]"
                    ".{context, qas[].{id, question, answers[].text}}") from None
  return out


def _shot(q: dict) -> dict:
  if not q["answers"]:
    raise DataError(f"{NAME}: shot {q['id']} has no answer; expected at least one answer text")
  return {"id": q["id"], "context": q["context"], "question": q["question"], "answer": q["answers"][0]}


def _shots(rng: random.Random, root: str, languages: List[str], dev: List[dict],
           evaluated: set, s: dict, strict: bool) -> Dict[str, Optional[List[dict]]]:
  """language -> its n_shot shots (upstream's draw order), or None (``strict`` False only)."""
  pools: Dict[str, List[dict]] = {lang: [] for lang in languages}
  for q in read_squad(os.path.join(root, TRAIN_FILE)):
    if q["language"] in pools:
      pools[q["language"]].append(q)
  shots: Dict[str, Optional[List[dict]]] = {}
  for lang in languages:
    pool, source = pools[lang], "train"
    if not pool and s["missing_shots"] == "borrow_dev":
      pool = [q for q in dev if q["language"] == lang and q["id"] not in evaluated]
      source = "unevaluated dev"
    if len(pool) < s["n_shot"]:
      if not strict:
        shots[lang] = None
        continue
      hint = "" if source != "train" else "; missing_shots='borrow_dev' borrows unevaluated dev questions"
      raise DataError(f"{NAME}: {lang} has {len(pool)} {source} questions; expected at least "
                      f"n_shot={s['n_shot']}{hint}")
    shots[lang] = [_shot(q) for q in rng.sample(pool, s["n_shot"])]
  return shots


def load(data_dir: str, settings: Optional[dict] = None, subsample: bool = True) -> List[dict]:
  """The dev questions to evaluate (see the module docstring for the order and shots); each
  item: id, language, context, question, answers, shots (a list of n_shot
  ``{id, context, question, answer}``, shared by the items of a language)."""
  s = resolve_settings(BENCHMARK, settings)
  root = os.path.join(os.fspath(data_dir), "tydiqa")
  dev = read_squad(os.path.join(root, DEV_FILE))
  languages = sorted({q["language"] for q in dev})
  unknown = [lang for lang in languages if lang not in TEMPLATES]
  if unknown:
    raise DataError(f"{NAME}: no prompt template for language(s) {unknown}; expected some of "
                    f"{sorted(TEMPLATES)}")
  rng = random.Random(42)
  chosen = dev
  limit = s["max_num_examples_per_lang"] if subsample else None
  if limit:
    chosen = []
    for lang in languages:
      of_lang = [q for q in dev if q["language"] == lang]
      chosen += rng.sample(of_lang, limit) if len(of_lang) > limit else of_lang
  shots: Dict[str, Optional[List[dict]]] = {}
  if s["n_shot"] > 0:
    shots = _shots(rng, root, languages, dev, {q["id"] for q in chosen}, s, strict=subsample)
  return [{**q, "shots": shots.get(q["language"], [])} for q in chosen]


# ----------------------------------------------------------------------------- prompts

def encode_with_bos(tokenizer, text: str) -> List[int]:
  """``tokenizer.encode(text)`` with its special tokens, BOS first (added when the
  tokenizer did not add it, as the LLaMA tokenizers open-instruct used do)."""
  ids = list(tokenizer.encode(text))
  bos = getattr(tokenizer, "bos_token_id", None)
  if bos is not None and (not ids or ids[0] != bos):
    ids = [bos] + ids
  return ids


def truncate_context(text: str, tokenizer, max_tokens: Optional[int]) -> str:
  """Upstream's context cut: the decode of the first ``max_tokens`` ids (BOS included, so
  the result starts with the decoded BOS) when the encoding is longer; else ``text``."""
  if tokenizer is None or not max_tokens:
    return text
  ids = encode_with_bos(tokenizer, text)
  return tokenizer.decode(ids[:max_tokens]) if len(ids) > max_tokens else text


def prompt_text(item: dict, settings: dict, cut=lambda text: text) -> str:
  """The task text before the answer label (``cut`` truncates contexts)."""
  instruction, p, q, a, instruction_nc = TEMPLATES[item["language"]]
  no_context = settings["no_context"]
  text = (instruction_nc if no_context else instruction) + "\n\n"
  if settings["n_shot"] > 0:
    shots = item.get("shots")
    if not shots or len(shots) < settings["n_shot"]:
      raise DataError(f"{NAME}: item {item['id']} has no {settings['n_shot']} {item['language']} "
                      "shots; expected load() with shots (missing_shots='borrow_dev' borrows dev questions)")
    demos = [(f"{q} {d['question']}" if no_context else f"{p} {cut(d['context'])}\n{q} {d['question']}")
             + f"\n{a} {d['answer']}" for d in shots[: settings["n_shot"]]]
    text += "\n\n".join(demos) + "\n\n"
  if no_context:
    return text + f"{q} {item['question']}\n"
  return text + f"{p} {cut(item['context'])}\n{q} {item['question']}\n"


def requests(items: Sequence[dict], settings: Optional[dict] = None, tokenizer=None) -> List[Request]:
  s = resolve_settings(BENCHMARK, settings)
  cache: Dict[str, str] = {}

  def cut(text: str) -> str:
    if text not in cache:
      cache[text] = truncate_context(text, tokenizer, s["max_context_length"])
    return cache[text]

  out = []
  for item in items:
    answer_label = TEMPLATES[item["language"]][3]
    text = prompt_text(item, s, cut)
    prompt = chat_prompt(text, answer_label) if s["chat"] else text + answer_label
    out.append(Request(id=item["id"], prompt=prompt, max_new_tokens=s["max_new_tokens"],
                       stop=() if s["chat"] else ("\n",)))
  return out


# ----------------------------------------------------------------------------- score

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD-1.1 normalisation: lowercase, drop ASCII punctuation, drop the words a/an/the,
  collapse whitespace (in that order)."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
  """Token F1 of the normalised texts (0 when nothing is shared, so two empty texts score
  0 as in SQuAD 1.1)."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def _best(metric, prediction: str, answers: List[str]) -> float:
  return max((metric(prediction, a) for a in answers), default=0.0)


def score(items: Sequence[dict], outputs: Dict[str, List[str]], settings: Optional[dict] = None) -> dict:
  """EM, F1 and recall per language (0-100) of ``outputs[id][0]`` stripped (no output
  scores as an empty one); averages over the languages present."""
  resolve_settings(BENCHMARK, settings)
  if not items:
    raise ValueError(f"{NAME}: no items to score")
  per: Dict[str, Dict[str, List[float]]] = {}
  for item in items:
    texts = outputs.get(item["id"]) or [""]
    pred = texts[0].strip()
    m = per.setdefault(item["language"], {"exact_match": [], "f1": [], "recall": []})
    m["exact_match"].append(100.0 * _best(exact_match_score, pred, item["answers"]))
    m["f1"].append(100.0 * _best(f1_score, pred, item["answers"]))
    m["recall"].append(100.0 if any(a.strip().lower() in pred.lower() for a in item["answers"]) else 0.0)
  per_language = {lang: {**{k: sum(v) / len(v) for k, v in m.items()}, "n": len(m["f1"])}
                  for lang, m in sorted(per.items())}
  avg = {k: sum(p[k] for p in per_language.values()) / len(per_language)
         for k in ("f1", "exact_match", "recall")}
  return {"score": avg["f1"] / 100.0, **avg, "per_language": per_language, "n": len(items)}


BENCHMARK = types.SimpleNamespace(
    name=NAME, defaults=DEFAULTS, load=load, requests=requests, score=score,
    nullable=("max_num_examples_per_lang", "max_context_length"),
    minimums={"n_shot": 0, "max_num_examples_per_lang": 1, "max_context_length": 1,
              "max_new_tokens": 1},
    choices={"missing_shots": MISSING_SHOTS})
