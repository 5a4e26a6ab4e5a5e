"""Metrics: ROUGE-L against the rouge-score package and hand-computed values, SuperNI's
normalisation, exact match / token F1, classification metrics and aggregation."""
import math

import pytest
from rouge_score import rouge_scorer

from peft_jax import metrics

PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("Hello, World!", "hello world"),
    ("running dogs", "run dog"),
    ("", "something"),
    ("A completely different sentence.", "Nothing in common here"),
    ("The Eiffel Tower is in Paris, France.", "Paris is where the Eiffel Tower stands."),
]


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_rouge_l_equals_rouge_score_package(pred, ref):
  ref_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  assert metrics.rouge_l(pred, ref) == ref_scorer.score(ref, pred)["rougeL"].fmeasure
  plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  assert metrics.rouge_l(pred, ref, use_stemmer=False) == plain.score(ref, pred)["rougeL"].fmeasure


def test_rouge_l_hand_values():
  # LCS(the cat sat on the mat, the cat is on the mat) = 5 of 6 tokens each way
  assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
  assert metrics.rouge_l("Hello, World!", "hello world") == 1.0          # case/punctuation-blind
  assert metrics.rouge_l("running dogs", "run dog") == 1.0               # Porter stemmer
  assert metrics.rouge_l("running dogs", "run dog", use_stemmer=False) == 0.0
  # [blue sky] vs [the sky is blue]: LCS 1, P = 1/2, R = 1/4, F = 1/3
  assert metrics.rouge_l("blue sky", "the sky is blue") == pytest.approx(1 / 3)


def test_multi_reference_max():
  refs = ["the sky is blue", "blue sky", "grass"]
  assert metrics.max_over_references(metrics.rouge_l, "blue sky", refs) == 1.0
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  for pred in ("the blue sky", "grass is green", "nothing"):
    assert metrics.max_over_references(metrics.rouge_l, pred, refs) == pytest.approx(
        scorer.score_multi(refs, pred)["rougeL"].fmeasure)
  assert metrics.corpus_metric("rougeL", ["blue sky", "grass"], [refs, "green grass"]) == pytest.approx(
      (1.0 + 2 * 1 * 0.5 / 1.5) / 2)
  with pytest.raises(ValueError, match="empty reference list"):
    metrics.max_over_references(metrics.rouge_l, "x", [])


def test_superni_normalisation():
  assert metrics.normalize_answer("  The  Cat's HAT!  ") == "the cats hat"
  assert metrics.normalize_answer("a dog, an apple & the end.") == "a dog an apple the end"   # articles kept
  assert metrics.normalize_answer("a dog, an apple & the end.", remove_articles=True) == "dog apple end"
  assert metrics.normalize_answer("Sci/Tech") == "scitech"
  assert metrics.normalize_answer("line\none\ttab") == "line one tab"


def test_exact_match_and_token_f1():
  assert metrics.exact_match("Paris.", "paris") == 1.0
  assert metrics.exact_match("a dog", "dog") == 0.0                      # SuperNI keeps articles
  assert metrics.exact_match("a dog", "dog", remove_articles=True) == 1.0
  assert metrics.exact_match("1,000", "1000") == 1.0
  assert metrics.token_f1("the cat sat", "the cat") == pytest.approx(0.8)
  assert metrics.token_f1("x y", "z") == 0.0
  assert metrics.token_f1("a a b", "a b b") == pytest.approx(2 / 3)      # multiset overlap {a, b}
  assert metrics.corpus_metric("exact_match", ["yes", "No"], [["no", "yes"], "no"]) == 1.0


def test_superni_compute_metrics_percent():
  preds = ["Paris", "blue sky"]
  refs = [["paris", "Paris, France"], ["the sky is blue"]]
  assert metrics.superni_compute_metrics(preds, refs) == {"exact_match": 50.0, "rougeL": 66.6667}
  assert metrics.compute_metrics(preds, refs) == pytest.approx({"exact_match": 0.5, "rougeL": 2 / 3})
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.compute_metrics(preds, refs[:1])
  with pytest.raises(ValueError, match="unknown metric 'bleu'"):
    metrics.compute_metrics(preds, refs, ["bleu"])


def test_classification_metrics():
  preds = ["Sports ", "World", "World", "Business", "oops"]
  gold = ["Sports", "World", "Sports", "Business", "World"]
  assert metrics.accuracy(preds, gold) == pytest.approx(3 / 5)
  assert metrics.accuracy(["sports"], ["Sports"]) == 0.0
  assert metrics.accuracy(["sports"], ["Sports"], normalize=True) == 1.0
  # per class: Business 1.0; Sports tp1 fp0 fn1 -> 2/3; World tp1 fp1 fn1 -> 1/2
  assert metrics.macro_f1(preds, gold) == pytest.approx((1.0 + 2 / 3 + 1 / 2) / 3)
  assert metrics.macro_f1(preds, gold, classes=["World", "Sports", "Business", "Sci/Tech"]) == \
      pytest.approx((1.0 + 2 / 3 + 1 / 2 + 0.0) / 4)
  # binary MCC: TP 2, TN 1, FP 0, FN 1 -> 2 / sqrt(2*3*1*2)
  assert metrics.matthews_corrcoef(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx(2 / math.sqrt(12))
  assert metrics.matthews_corrcoef(["a", "a"], ["a", "b"]) == 0.0        # constant prediction
  assert metrics.matthews_corrcoef(["x", "y", "z"], ["x", "y", "z"]) == pytest.approx(1.0)


def _row(task, cat, refs, target=None):
  return {"input": "", "target": target or refs[0], "references": refs,
          "meta": {"task": task, "category": cat}}


def test_per_task_and_category_aggregation():
  rows = [_row("t1", "Title Generation", ["a b c"]), _row("t1", "Title Generation", ["x"]),
          _row("t2", "Textual Entailment", ["yes"]), _row("t3", "Title Generation", ["q r"])]
  preds = ["a b c", "y", "Yes", "q"]
  out = metrics.per_task_and_category(preds, rows)
  assert out["overall"]["n"] == 4
  assert out["overall"]["exact_match"] == pytest.approx(2 / 4)
  assert out["per_task"]["t1"] == {"exact_match": 0.5, "rougeL": 0.5, "n": 2}
  assert out["per_task"]["t2"]["exact_match"] == 1.0
  assert out["per_task"]["t3"]["rougeL"] == pytest.approx(2 / 3)
  cat = out["per_category"]["title_generation"]
  assert cat["n"] == 3 and cat["exact_match"] == pytest.approx(1 / 3)
  assert out["task_macro"]["exact_match"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  assert metrics.category_key("Cause Effect Classification") == "cause_effect_classification"
  assert metrics.SUPERNI_CATEGORY_METRIC["title_generation"] == "rougeL"
  ev = metrics.evaluate_rows("superni", preds, rows)
  assert ev["rougeL"] == out["overall"]["rougeL"] and "per_category" in ev


def test_evaluate_rows_defaults():
  rows = [{"input": "", "target": "acceptable", "references": ["acceptable"], "meta": {}},
          {"input": "", "target": "unacceptable", "references": ["unacceptable"], "meta": {}}]
  ev = metrics.evaluate_rows("cola", ["acceptable", "acceptable"], rows)
  assert ev["accuracy"] == 0.5 and ev["n"] == 2 and ev["mcc"] == 0.0
  assert ev["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
  e2e = [{"input": "", "target": "A serves food.", "references": ["A serves food.", "Food at A."],
          "meta": {}}]
  assert metrics.evaluate_rows("e2e_nlg", ["Food at A."], e2e) == {"rougeL": 1.0, "n": 1}
  with pytest.raises(ValueError, match="unknown data set 'glue'"):
    metrics.evaluate_rows("glue", [], [])
