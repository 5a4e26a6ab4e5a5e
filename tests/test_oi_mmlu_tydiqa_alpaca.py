"""The MMLU, TyDiQA-GoldP and AlpacaEval benchmark modules against the shared samples of
../shared/data/open_instruct_eval (prompt bytes, shot selection, length rules, metrics)."""

from __future__ import annotations

import csv
import json
import pathlib
import random

import pytest

from peft_jax.config_lib import ConfigError
from peft_jax.data.common import DataError
from peft_jax.evals.benchmarks import alpaca_eval, mmlu, tydiqa

OIE = "open_instruct_eval"
LLAMA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers" / "llama"


@pytest.fixture(scope="module")
def tok():
  if not LLAMA.is_dir():
    pytest.skip(f"the LLaMA tokenizer is not at {LLAMA}")
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(LLAMA))


def n_tokens(tok, text):
  return len(tok(text, add_special_tokens=False)["input_ids"])


# ============================================================================= MMLU

MMLU_FILES = [f"{split}/{subject}_{split}.csv" for split in ("dev", "test") for subject in (
    "abstract_algebra", "clinical_knowledge", "college_computer_science",
    "high_school_european_history", "high_school_macroeconomics", "moral_scenarios")]


@pytest.mark.shared_data
@pytest.mark.parametrize("name", MMLU_FILES)
def test_mmlu_csv_reads_like_pandas(shared_data, name):
  pd = pytest.importorskip("pandas")
  path = shared_data / OIE / "mmlu" / name
  df = pd.read_csv(path, header=None)
  expected = [["{}".format(df.iloc[i, j]) for j in range(df.shape[1])] for i in range(df.shape[0])]
  assert mmlu.read_csv(str(path)) == expected and df.shape[1] == 6


# A CSV with the upstream quirks (CRLF records, bare LF inside quotes, a leading space, no
# final newline, a blank line) and pandas' conversions: NA strings, an int column, an int
# column with an NA (float), a float column, a bool column and a column of text.
QUIRKY = (' lead,NA,1,1,2.5,true,A\r\n"multi\nline",x,2,,3,FALSE,B\r\n\r\n'
          'q3,None,+3, 4,1e2,True,C\r\nq4,"",007,5,Infinity,false,D')
QUIRKY_ROWS = [[" lead", "nan", "1", "1.0", "2.5", "True", "A"],
               ["multi\nline", "x", "2", "nan", "3.0", "False", "B"],
               ["q3", "nan", "3", "4.0", "100.0", "True", "C"],
               ["q4", "nan", "7", "5.0", "inf", "False", "D"]]


def test_mmlu_csv_quirks_and_conversions(tmp_path):
  path = tmp_path / "quirky.csv"
  path.write_bytes(QUIRKY.encode())
  assert mmlu.read_csv(str(path), n_columns=7) == QUIRKY_ROWS
  pd = pytest.importorskip("pandas")
  df = pd.read_csv(path, header=None)
  assert [["{}".format(v) for v in row] for row in df.itertuples(index=False)] == QUIRKY_ROWS


def test_mmlu_csv_numbers_like_pandas(tmp_path):
  pd = pytest.importorskip("pandas")
  columns = [["0.1", "1", "-0.0"], ["1.5e-3", ".5", "5."], ["inf", "-Inf", "1"], [" inf", "1", "2"],
             ["9223372036854775808", "1", "2"], ["1_000", "2", "3"], ["tRUE", "NA", "false"],
             ["0.30000000000000004", "1e16", "1e-5"], ["", "", ""], ["0x10", "1", "2"]]
  text = "\n".join(",".join(f'"{c[i]}"' for c in columns) for i in range(3)) + "\n"
  path = tmp_path / "numbers.csv"
  path.write_text(text)
  df = pd.read_csv(path, header=None)
  expected = [["{}".format(v) for v in row] for row in df.itertuples(index=False)]
  assert mmlu.read_csv(str(path), n_columns=len(columns)) == expected


@pytest.mark.shared_data
def test_mmlu_load(shared_data):
  items = mmlu.load(shared_data / OIE, {"n_shot": 5})
  assert len(items) == 42
  assert [it["subject"] for it in items[::7]] == sorted({it["subject"] for it in items})
  assert [it["id"] for it in items[:7]] == [f"abstract_algebra/{i}" for i in range(7)]
  first = items[0]
  assert first["answer"] == "A" and first["choices"] == ["True, True", "False, False", "True, False", "False, True"]
  assert [s["answer"] for s in first["shots"]] == ["B", "B", "C", "A", "A"]
  assert mmlu.load(shared_data / OIE, {})[0]["shots"] == []


@pytest.mark.parametrize("row,message", [("q,a,b,c,d\n", "row 1 has 5 columns"),
                                         ("q,a,b,c,d,E\n", "row 1 has answer 'E'")])
def test_mmlu_bad_rows(tmp_path, row, message):
  (tmp_path / "mmlu" / "test").mkdir(parents=True)
  path = tmp_path / "mmlu" / "test" / "x_test.csv"
  path.write_text("q,a,b,c,d,A\n" + row)
  with pytest.raises(DataError, match=message) as e:
    mmlu.load(tmp_path, {})
  assert str(path) in str(e.value)


AA_HEADER = "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
AA_TF = "\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer:"
AA_SHOTS = (
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K "
    "are subgroups of G then HK is a subgroup of G." + AA_TF + " B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The "
    "symmetric group S_10 has 10 elements." + AA_TF + " C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every "
    "subgroup of an abelian group is abelian." + AA_TF + " A\n\n"
    "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n")


@pytest.mark.shared_data
def test_mmlu_prompts_literal(shared_data, tok):
  with open(shared_data / OIE / "mmlu/test/abstract_algebra_test.csv", newline="") as f:
    row = next(csv.reader(f))
  question = row[0] + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", row[1:5])) + "\nAnswer:"
  assert question.endswith(AA_TF)
  expected = {0: AA_HEADER + question, 5: AA_HEADER + AA_SHOTS + question}
  for n_shot, text in expected.items():
    items = mmlu.load(shared_data / OIE, {"n_shot": n_shot})
    plain = mmlu.requests(items[:1], {"n_shot": n_shot}, tok)[0]
    chat = mmlu.requests(items[:1], {"n_shot": n_shot, "chat": True}, tok)[0]
    assert plain.id == "abstract_algebra/0" and plain.prompt == text
    assert chat.prompt == "<|user|>\n" + text + "\n<|assistant|>\nThe answer is:"
    assert plain.choices == chat.choices == (" A", " B", " C", " D") and plain.max_new_tokens == 1
  # The guard keeps a prompt of exactly max_prompt_tokens and drops a shot from a longer one.
  size = n_tokens(tok, expected[5])
  items = mmlu.load(shared_data / OIE, {"n_shot": 5})
  assert mmlu.requests(items[:1], {"n_shot": 5, "max_prompt_tokens": size}, tok)[0].prompt == expected[5]
  assert mmlu.choose_shots(items[0], {"n_shot": 5, "chat": False, "max_prompt_tokens": size - 1}, tok) == 4


@pytest.mark.shared_data
@pytest.mark.parametrize("chat", [False, True])
def test_mmlu_long_prompts_drop_shots(shared_data, tok, chat):
  root = shared_data / OIE / "mmlu"
  with open(root / "dev/high_school_european_history_dev.csv", newline="") as f:
    dev = list(csv.reader(f))
  with open(root / "test/high_school_european_history_test.csv", newline="") as f:
    test = list(csv.reader(f))
  header = "The following are multiple choice questions (with answers) about  high school european history.\n\n"

  def block(r):
    return r[0] + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", r[1:5])) + "\nAnswer:"

  def build(r, k):
    text = header + "".join(block(d) + f" {d[5]}\n\n" for d in dev[:k]) + block(r)
    return f"<|user|>\n{text}\n<|assistant|>\nThe answer is:" if chat else text

  settings = {"n_shot": 5, "chat": chat}
  items = [it for it in mmlu.load(shared_data / OIE, settings) if it["subject"] == "high_school_european_history"]
  reqs = mmlu.requests(items, settings, tok)
  chosen = []
  for r, req in zip(test, reqs):
    k = max(k for k in range(6) if k == 0 or n_tokens(tok, build(r, k)) <= 2048)
    assert req.prompt == build(r, k) and n_tokens(tok, req.prompt) <= 2048
    assert k == 5 or n_tokens(tok, build(r, k + 1)) > 2048
    chosen.append(k)
  assert max(chosen) < 5 and min(chosen) >= 1          # The guard removed shots from every item.
  # Without a tokenizer the guard is off: every prompt keeps its 5 shots.
  assert [r.prompt for r in mmlu.requests(items, settings, None)] == [build(r, 5) for r in test]


@pytest.mark.shared_data
def test_mmlu_score(shared_data):
  items = mmlu.load(shared_data / OIE, {})
  gold = mmlu.score(items, {it["id"]: [" " + it["answer"]] for it in items})
  assert gold["score"] == gold["accuracy"] == gold["average_acc"] == gold["macro_acc"] == 1.0
  assert gold["n"] == 42 and set(gold["cat_acc"]) == set(mmlu.CATEGORIES)
  assert set(gold["subcat_acc"].values()) == {1.0} and len(gold["subject_acc"]) == 6
  wrong = mmlu.score(items, {it["id"]: ["ABCD"["ABCD".index(it["answer"]) - 1]] for it in items})
  assert wrong["score"] == 0.0 and set(wrong["cat_acc"].values()) == {0.0}
  always_a = mmlu.score(items, {it["id"]: ["A"] for it in items})
  assert always_a["score"] == sum(it["answer"] == "A" for it in items) / 42 < 0.5
  # Micro vs macro: one subject right (7 items), another half wrong.
  two = [it for it in items if it["subject"] in ("abstract_algebra", "moral_scenarios")]
  outs = {it["id"]: [it["answer"]] for it in two}
  for it in two[7:10]:
    outs[it["id"]] = ["E"]
  del outs[two[10]["id"]]
  r = mmlu.score(two, outs)
  assert r["average_acc"] == 10 / 14 and r["macro_acc"] == (1 + 3 / 7) / 2
  assert r["invalid"] == 3 and r["missing"] == 1
  assert r["cat_acc"] == {"STEM": 1.0, "humanities": 3 / 7} and r["subcat_acc"] == {"math": 1.0, "philosophy": 3 / 7}


@pytest.mark.shared_data
def test_mmlu_n_instances_like_pandas_sample(shared_data):
  pd = pytest.importorskip("pandas")
  items = mmlu.load(shared_data / OIE, {"n_instances": 3})
  assert len(items) == 18
  for subject in ("abstract_algebra", "moral_scenarios"):
    df = pd.read_csv(shared_data / OIE / f"mmlu/test/{subject}_test.csv", header=None)
    expected = [f"{subject}/{i}" for i in df.sample(3, random_state=42).index]
    assert [it["id"] for it in items if it["subject"] == subject] == expected
  assert len(mmlu.load(shared_data / OIE, {"n_instances": 3}, subsample=False)) == 42


def test_mmlu_categories_and_settings():
  assert len(mmlu.SUBCATEGORIES) == 57
  for sub in set(mmlu.SUBCATEGORIES.values()):
    assert sum(sub in members for members in mmlu.CATEGORIES.values()) == 1
  with pytest.raises(ConfigError, match="unknown setting"):
    mmlu.requests([], {"shots": 5}, None)
  with pytest.raises(ConfigError, match="n_shot"):
    mmlu.requests([], {"n_shot": -1}, None)


# ============================================================================= TyDiQA

BORROW = {"missing_shots": "borrow_dev", "max_num_examples_per_lang": 3}


@pytest.mark.shared_data
def test_tydiqa_missing_shots(shared_data):
  with pytest.raises(DataError, match="arabic has 0 train questions"):
    tydiqa.load(shared_data / OIE, {})
  # Every dev question is evaluated (4 per language <= 100): nothing is left to borrow.
  with pytest.raises(DataError, match="arabic has 0 unevaluated dev questions"):
    tydiqa.load(shared_data / OIE, {"missing_shots": "borrow_dev"})
  every = tydiqa.load(shared_data / OIE, {}, subsample=False)
  assert len(every) == 36 and every[0]["shots"] is None
  assert [it["shots"] is None for it in every if it["language"] == "english"] == [False] * 4
  with pytest.raises(DataError, match="no 1 arabic shots"):
    tydiqa.requests(every[:1], {}, None)
  assert len(tydiqa.requests(every[:1], {"n_shot": 0}, None)) == 1


@pytest.mark.shared_data
def test_tydiqa_selection_order(shared_data):
  dev = tydiqa.read_squad(str(shared_data / OIE / "tydiqa/tydiqa-goldp-v1.1-dev.json"))
  train = tydiqa.read_squad(str(shared_data / OIE / "tydiqa/tydiqa-goldp-v1.1-train.json"))
  languages = sorted({q["language"] for q in dev})
  assert len(languages) == 9
  random.seed(42)
  expected = []
  for lang in languages:
    expected += random.sample([q["id"] for q in dev if q["language"] == lang], 3)
  shots = {}
  for lang in languages:
    pool = [q["id"] for q in train if q["language"] == lang] or \
        [q["id"] for q in dev if q["language"] == lang and q["id"] not in expected]
    shots[lang] = random.sample(pool, 1)
  items = tydiqa.load(shared_data / OIE, BORROW)
  assert [it["id"] for it in items] == expected
  assert {it["language"]: [s["id"] for s in it["shots"]] for it in items} == shots
  assert shots["english"][0].startswith("english") and shots["english"][0] not in {q["id"] for q in dev}
  first = items[0]
  assert set(first) == {"id", "language", "context", "question", "answers", "shots"}
  assert first["shots"][0]["answer"] == next(q for q in dev if q["id"] == first["shots"][0]["id"])["answers"][0]


def _item(items, lang):
  return next(it for it in items if it["language"] == lang)


@pytest.mark.parametrize("lang,labels,instructions", [
    ("english", ("Passage:", "Question:", "Answer:"),
     ("Answer the following question based on the information in the given passage.",
      "Answer the following question.")),
    ("korean", ("문단:", "질문:", "답변:"),
     ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "다음 질문에 답하십시오.")),
])
@pytest.mark.shared_data
def test_tydiqa_prompts_literal(shared_data, tok, lang, labels, instructions):
  items = tydiqa.load(shared_data / OIE, BORROW)
  it = _item(items, lang)
  d = it["shots"][0]
  P, Q, A = labels

  def ctx(text):   # upstream's cut: BOS + 511 tokens of text, decoded, when longer than 512
    ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
    return tok.decode(ids[:512]) if len(ids) > 512 else text

  # The Korean shot is 579 tokens long (byte-fallback tokens): it is cut, "<s> " first.
  assert (ctx(d["context"]) != d["context"]) == (lang == "korean")
  assert lang != "korean" or ctx(d["context"]).startswith("<s> ")
  gold = (f"{instructions[0]}\n\n{P} {ctx(d['context'])}\n{Q} {d['question']}\n{A} {d['answer']}\n\n"
          f"{P} {ctx(it['context'])}\n{Q} {it['question']}\n")
  no_ctx = f"{instructions[1]}\n\n{Q} {d['question']}\n{A} {d['answer']}\n\n{Q} {it['question']}\n"
  for no_context, text in ((False, gold), (True, no_ctx)):
    s = {**BORROW, "no_context": no_context}
    plain = next(r for r in tydiqa.requests(items, s, tok) if r.id == it["id"])
    chat = next(r for r in tydiqa.requests(items, {**s, "chat": True}, tok) if r.id == it["id"])
    assert plain.prompt == text + A and plain.stop == ("\n",) and plain.max_new_tokens == 50
    assert chat.prompt == f"<|user|>\n{text}\n<|assistant|>\n{A}" and chat.stop == ()
    assert plain.temperature == 0.0 and not plain.choices
  zero = tydiqa.requests([it], {**BORROW, "n_shot": 0}, tok)[0].prompt
  assert zero == f"{instructions[0]}\n\n{P} {it['context']}\n{Q} {it['question']}\n{A}"
  # Without a tokenizer no context is cut.
  uncut = tydiqa.requests([it], BORROW, None)[0].prompt
  assert uncut == gold.replace(ctx(d["context"]), d["context"]) + A


@pytest.mark.shared_data
def test_tydiqa_context_truncation(shared_data, tok):
  items = tydiqa.load(shared_data / OIE, BORROW)
  it = _item(items, "english")
  body = tok.encode(" ".join(f"Sentence {i} is about the river." for i in range(200)), add_special_tokens=False)
  assert len(body) > 600
  long_ctx = tok.decode(body[:600])
  cut = tok.decode([tok.bos_token_id] + tok.encode(long_ctx, add_special_tokens=False)[:511])
  assert cut.startswith("<s> Sentence 0") and "<s>" not in long_ctx and len(cut) < len(long_ctx)
  test_item = {**it, "context": long_ctx, "shots": [{**it["shots"][0], "context": long_ctx}]}
  prompt = tydiqa.requests([test_item], BORROW, tok)[0].prompt
  assert prompt.count(f"Passage: {cut}\nQuestion: ") == 2 and long_ctx not in prompt
  # Without a tokenizer nothing is cut; with max_context_length None neither.
  assert prompt != tydiqa.requests([test_item], BORROW, None)[0].prompt
  assert long_ctx in tydiqa.requests([test_item], {**BORROW, "max_context_length": None}, tok)[0].prompt


@pytest.mark.shared_data
def test_tydiqa_truncation_boundary(tok):
  words = tok.encode(" ".join(["river"] * 700), add_special_tokens=False)
  text = lambda n: tok.decode(words[:n])  # noqa: E731
  n = next(n for n in range(505, 520) if len(tok.encode(text(n), add_special_tokens=False)) == 511)
  assert tydiqa.truncate_context(text(n), tok, 512) == text(n)              # BOS + 511 = 512
  longer = text(n + 1)
  assert len(tok.encode(longer, add_special_tokens=False)) == 512
  assert tydiqa.truncate_context(longer, tok, 512) == "<s> " + text(n).lstrip(" ")
  assert tydiqa.encode_with_bos(tok, "river")[0] == tok.bos_token_id == 1


@pytest.mark.shared_data
def test_tydiqa_score(shared_data):
  items = tydiqa.load(shared_data / OIE, {"n_shot": 0})
  assert len(items) == 36
  gold = tydiqa.score(items, {it["id"]: [" " + it["answers"][0] + "\n"] for it in items})
  assert gold["score"] == 1.0 and gold["f1"] == gold["exact_match"] == gold["recall"] == 100.0
  assert len(gold["per_language"]) == 9 and gold["n"] == 36
  assert all(m["f1"] == m["exact_match"] == 100.0 and m["n"] == 4 for m in gold["per_language"].values())
  # Answers of other questions of the same language: EM 0 everywhere, F1 near 0 (different
  # questions share at most a stray word of their answers: one Indonesian pair does).
  by_lang = {}
  for it in items:
    by_lang.setdefault(it["language"], []).append(it)
  rotated = {it["id"]: [its[(i + 1) % len(its)]["answers"][0]] for its in by_lang.values() for i, it in enumerate(its)}
  r = tydiqa.score(items, rotated)
  assert r["exact_match"] == 0.0 and r["f1"] < 5.0 and r["score"] < 0.05
  # Missing outputs score as empty; the average is unweighted over languages.
  english = [it for it in items if it["language"] == "english"]
  half = tydiqa.score(english + by_lang["korean"], {it["id"]: [it["answers"][0]] for it in english})
  assert half["f1"] == 50.0 and half["per_language"]["korean"]["f1"] == 0.0


def test_squad_normalisation_and_f1():
  assert tydiqa.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
  assert tydiqa.normalize_answer("An apple a day; theater") == "apple day theater"
  assert tydiqa.normalize_answer("«В ожидании Годо»") == "«в ожидании годо»"   # ASCII punctuation only
  assert tydiqa.normalize_answer("«the»") == "« »"                 # An article becomes a space.
  assert tydiqa.f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
  assert tydiqa.f1_score("cat cat", "cat") == pytest.approx(2 / 3)
  assert tydiqa.f1_score("dog", "cat") == 0.0 and tydiqa.f1_score("", "") == 0.0
  assert tydiqa.exact_match_score("Louis XVI.", "louis xvi") == 1.0
  assert tydiqa.exact_match_score("", "the") == 1.0                 # both normalise to ""
  assert tydiqa.exact_match_score("1,5 kg", "15 kg") == 1.0
  item = {"id": "english-1", "language": "english", "answers": ["Paris", "city of Paris"]}
  r = tydiqa.score([item], {"english-1": ["It is the city of Paris."]})
  assert r["exact_match"] == 0.0 and r["recall"] == 100.0
  # "it is city of paris" vs "city of paris": 3 shared of 5 and 3 tokens, F1 = 2 * 0.6 * 1 / 1.6.
  assert r["f1"] == pytest.approx(75.0)
  # Recall strips the gold answer too (upstream: ref.strip().lower() in pred.strip().lower()).
  spaced = {"id": "english-2", "language": "english", "answers": [" Paris "]}
  assert tydiqa.score([spaced], {"english-2": ["in Paris."]})["recall"] == 100.0


def test_tydiqa_settings():
  with pytest.raises(ConfigError, match="missing_shots"):
    tydiqa.requests([], {"missing_shots": "borrow"}, None)
  with pytest.raises(ConfigError, match="unknown setting"):
    tydiqa.requests([], {"max_num_examples": 5}, None)


# ============================================================================= AlpacaEval

@pytest.mark.shared_data
def test_alpaca_eval(shared_data, tmp_path):
  items = alpaca_eval.load(shared_data / OIE, {})
  assert [it["id"] for it in items] == [str(i) for i in range(13)]
  with open(shared_data / OIE / "alpaca_eval/results/text_davinci_003/model_outputs.json", encoding="utf-8") as f:
    reference = json.load(f, object_pairs_hook=lambda pairs: pairs)
  assert [dict(r)["instruction"] for r in reference] == [it["instruction"] for it in items]
  reqs = alpaca_eval.requests(items, {}, None)
  assert reqs[0].prompt == "<|user|>\n" + items[0]["instruction"] + "\n<|assistant|>\n"
  assert reqs[0].max_new_tokens == 8192 and reqs[0].stop == () and reqs[0].temperature == 0.0
  assert alpaca_eval.requests(items, {"chat": False}, None)[0].prompt == items[0]["instruction"]

  outputs = {it["id"]: [f" Réponse {it['id']}\n"] for it in items}
  records = alpaca_eval.model_outputs(items, outputs, "tulu-7b")
  assert records[3]["output"] == " Réponse 3\n" and records[3]["generator"] == "tulu-7b-greedy-long"
  assert records[3]["dataset"] == items[3]["row"]["dataset"]
  path = tmp_path / "model_outputs.json"
  alpaca_eval.write_model_outputs(str(path), records)
  text = path.read_text(encoding="utf-8")
  assert "Réponse" in text
  with open(path, encoding="utf-8") as f:
    pairs = json.load(f, object_pairs_hook=lambda pairs: pairs)
  assert [[k for k, _ in p] for p in pairs] == [[k for k, _ in r] for r in reference]
  assert [k for k, _ in pairs[0]] == ["dataset", "instruction", "output", "generator"]
  assert json.loads(text) == records

  r = alpaca_eval.score(items, outputs, {})
  assert r["score"] is None and r["n"] == 13 and r["missing"] == 0 and "alpaca_eval" in r["note"]
  assert len(alpaca_eval.load(shared_data / OIE, {"max_num_examples": 5})) == 5
  with pytest.raises(ConfigError, match="unknown setting"):
    alpaca_eval.load(shared_data / OIE, {"n_shot": 1})


def test_benchmark_objects():
  from peft_jax.evals.benchmarks import benchmark
  for name, module in (("mmlu", mmlu), ("tydiqa", tydiqa), ("alpaca_eval", alpaca_eval)):
    b = benchmark(name)
    assert b is module.BENCHMARK and b.name == name and "chat" in b.defaults
  assert mmlu.BENCHMARK.defaults == {"n_shot": 0, "chat": False, "max_prompt_tokens": 2048, "n_instances": None}
  assert tydiqa.BENCHMARK.defaults["max_context_length"] == 512
  assert alpaca_eval.BENCHMARK.defaults["max_new_tokens"] == 8192


@pytest.mark.shared_data
def test_tydiqa_no_sampling_below_the_limit(shared_data, tmp_path):
  """A language with at most max_num_examples_per_lang questions keeps them all, in file
  order, without a random.sample call: the shots are then the first draws of seed 42."""
  src = shared_data / OIE / "tydiqa"
  keep = ("english", "finnish", "korean", "swahili")      # The languages with train shots.
  with open(src / "tydiqa-goldp-v1.1-dev.json", encoding="utf-8") as f:
    doc = json.load(f)
  doc["data"] = [a for a in doc["data"] if a["paragraphs"][0]["qas"][0]["id"].split("-")[0] in keep]
  (tmp_path / "tydiqa").mkdir()
  (tmp_path / "tydiqa" / "tydiqa-goldp-v1.1-dev.json").write_text(json.dumps(doc, ensure_ascii=False))
  (tmp_path / "tydiqa" / "tydiqa-goldp-v1.1-train.json").write_bytes((src / "tydiqa-goldp-v1.1-train.json").read_bytes())
  train = tydiqa.read_squad(str(src / "tydiqa-goldp-v1.1-train.json"))
  random.seed(42)
  shots = {lang: random.sample([q["id"] for q in train if q["language"] == lang], 1)[0] for lang in keep}
  items = tydiqa.load(tmp_path, {})
  assert [it["id"] for it in items] == [a["paragraphs"][0]["qas"][0]["id"] for a in doc["data"]]
  assert {it["language"]: it["shots"][0]["id"] for it in items} == shots
  assert len(tydiqa.load(tmp_path, {"max_num_examples_per_lang": 3})) == 12
  at_limit = tydiqa.load(tmp_path, {"max_num_examples_per_lang": 4})     # 4 per language: no draw
  assert [it["id"] for it in at_limit] == [it["id"] for it in items]


@pytest.mark.shared_data
def test_mmlu_too_few_dev_rows(shared_data):
  with pytest.raises(DataError, match="has 5 rows; expected at least n_shot=6"):
    mmlu.load(shared_data / OIE, {"n_shot": 6})


class _CharTokenizer:
  """One id per character (ids from 10); ``add_bos`` decides whether encode adds BOS 1."""
  bos_token_id = 1

  def __init__(self, add_bos):
    self.add_bos = add_bos

  def encode(self, text, add_special_tokens=True):
    return ([1] if self.add_bos and add_special_tokens else []) + [10 + ord(c) for c in text]

  def decode(self, ids):
    return "".join("<s>" if i == 1 else chr(i - 10) for i in ids)


@pytest.mark.parametrize("add_bos", [False, True])
def test_tydiqa_truncation_adds_bos_once(add_bos):
  t = _CharTokenizer(add_bos)
  assert tydiqa.encode_with_bos(t, "abc") == [1, 10 + 97, 10 + 98, 10 + 99]
  assert tydiqa.truncate_context("abcdef", t, 4) == "<s>abc"
  assert tydiqa.truncate_context("abc", t, 4) == "abc"
