"""Evaluation metrics: ROUGE-L, exact match, token F1, accuracy, macro F1, MCC, with
multi-reference max and per-task / per-category aggregation.

All corpus-level functions return fractions in [0, 1] (multiply by 100 for the
percentages papers print), except :func:`superni_compute_metrics`, which reproduces
natural-instructions' ``compute_metrics`` output (percent, rounded to 4 places).

SuperNI conventions (natural-instructions ``eval/automatic/evaluation.py`` and
Tk-Instruct ``compute_metrics.py``):

* ROUGE-L: ``rouge_score.rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)``
  (``default_rouge_scorer``) on the *raw* prediction and reference; the package's
  tokenizer lower-cases, replaces every character outside ``[a-z0-9]`` by a space and
  Porter-stems tokens longer than 3 characters. F-measure, max over the references.
  (Their cross-lingual track's GPT-2 tokenizer is not needed for the English tasks.)
* Exact match: :func:`normalize_answer` on both sides, i.e. lower-case, delete every
  ``string.punctuation`` character, collapse whitespace. Articles are *not* removed
  (their comment: "adapted from Squad v1.1 evaluation, without removing the
  articles"); ``remove_articles=True`` gives SQuAD's normaliser. Max over references.
* Token F1 (Tk-Instruct): SQuAD token-overlap F1 on the same normalised tokens.

Classification (``accuracy``, ``macro_f1``, ``matthews_corrcoef``) compares
``str.strip()``-ed predictions with labels, case-sensitively: a generated label must
be the label string. ``macro_f1`` is the unweighted mean over the gold classes of the
per-class F1 (a prediction outside the label set counts as a miss for the gold class).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Union

Refs = Union[str, Sequence[str]]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SCORERS: Dict[tuple, object] = {}


def _as_list(refs: Refs) -> List[str]:
  if isinstance(refs, str):
    return [refs]
  refs = list(refs)
  if not refs:
    raise ValueError("empty reference list; expected at least one reference string")
  return refs


def normalize_answer(s: str, remove_articles: bool = False) -> str:
  """SuperNI's normaliser: lower-case, remove punctuation, collapse whitespace
  (SQuAD's, which also removes a/an/the, with ``remove_articles=True``)."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
  if remove_articles:
    s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def rouge_scorer(rouge_types=("rougeL",), use_stemmer: bool = True):
  """A cached ``rouge_score`` scorer (SuperNI's default: rougeL with the stemmer)."""
  key = (tuple(rouge_types), use_stemmer)
  if key not in _SCORERS:
    from peft_jax.imports import without
    with without("scipy"):     # nltk's optional scipy, unused by rouge (peft_jax/imports.py)
      from rouge_score import rouge_scorer as rs
    _SCORERS[key] = rs.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
  return _SCORERS[key]


def rouge_l(prediction: str, reference: str, use_stemmer: bool = True) -> float:
  """ROUGE-L F-measure of one prediction against one reference."""
  return rouge_scorer(("rougeL",), use_stemmer).score(target=reference,
                                                      prediction=prediction)["rougeL"].fmeasure


def exact_match(prediction: str, reference: str, remove_articles: bool = False) -> float:
  return float(normalize_answer(prediction, remove_articles)
               == normalize_answer(reference, remove_articles))


def token_f1(prediction: str, reference: str, remove_articles: bool = False) -> float:
  """SQuAD-style token-overlap F1 on normalised tokens (Tk-Instruct's ``f1_score``)."""
  p = normalize_answer(prediction, remove_articles).split()
  r = normalize_answer(reference, remove_articles).split()
  same = sum((Counter(p) & Counter(r)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(r)
  return 2 * precision * recall / (precision + recall)


def max_over_references(metric_fn: Callable[[str, str], float], prediction: str,
                        references: Refs) -> float:
  """The best score of ``prediction`` against any reference (multi-reference max)."""
  return max(metric_fn(prediction, r) for r in _as_list(references))


INSTANCE_METRICS: Dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "rougeL": rouge_l, "f1": token_f1,
}


def _check_lengths(preds, refs):
  if len(preds) != len(refs):
    raise ValueError(f"{len(preds)} predictions but {len(refs)} references; expected one "
                     f"reference (or list of references) per prediction")


def corpus_metric(name: str, predictions: Sequence[str], references: Sequence[Refs]) -> float:
  """Mean over examples of the multi-reference max of instance metric ``name``
  (exact_match, rougeL, f1)."""
  _check_lengths(predictions, references)
  fn = INSTANCE_METRICS[name]
  if not predictions:
    return 0.0
  return sum(max_over_references(fn, p, r) for p, r in zip(predictions, references)) / len(predictions)


def compute_metrics(predictions: Sequence[str], references: Sequence[Refs],
                    metrics: Sequence[str] = ("exact_match", "rougeL")) -> Dict[str, float]:
  """{metric: mean}, fractions in [0, 1]; ``references[i]`` is a string or a list."""
  for m in metrics:
    if m not in INSTANCE_METRICS and m not in CLASSIFICATION_METRICS:
      raise ValueError(f"unknown metric {m!r}; expected one of "
                       f"{sorted(INSTANCE_METRICS) + sorted(CLASSIFICATION_METRICS)}")
  out = {}
  for m in metrics:
    if m in INSTANCE_METRICS:
      out[m] = corpus_metric(m, predictions, references)
    else:
      labels = [r if isinstance(r, str) else _as_list(r)[0] for r in references]
      out[m] = CLASSIFICATION_METRICS[m](predictions, labels)
  return out


def superni_compute_metrics(predictions: Sequence[str], references: Sequence[Refs]) -> Dict[str, float]:
  """natural-instructions' ``compute_metrics`` (default English track): exact match and
  ROUGE-L in percent, rounded to 4 places."""
  _check_lengths(predictions, references)
  n = max(len(references), 1)
  em = sum(max_over_references(exact_match, p, r) for p, r in zip(predictions, references))
  rl = sum(max_over_references(rouge_l, p, r) for p, r in zip(predictions, references))
  return {"exact_match": round(100.0 * em / n, 4), "rougeL": round(100.0 * rl / n, 4)}


# ----------------------------------------------------------------------------- classification

def accuracy(predictions: Sequence[str], labels: Sequence[str], normalize: bool = False) -> float:
  """Fraction of predictions equal to the label (after ``strip()``; after
  :func:`normalize_answer` when ``normalize``)."""
  _check_lengths(predictions, labels)
  f = normalize_answer if normalize else str.strip
  if not predictions:
    return 0.0
  return sum(f(p) == f(l) for p, l in zip(predictions, labels)) / len(predictions)


def macro_f1(predictions: Sequence[str], labels: Sequence[str],
             classes: Optional[Sequence[str]] = None) -> float:
  """Unweighted mean over ``classes`` (default: the gold labels present) of per-class
  F1 = 2 TP / (2 TP + FP + FN)."""
  _check_lengths(predictions, labels)
  p = [x.strip() for x in predictions]
  g = [x.strip() for x in labels]
  classes = sorted(set(g)) if classes is None else list(classes)
  if not classes:
    return 0.0
  scores = []
  for c in classes:
    tp = sum(1 for a, b in zip(p, g) if a == c and b == c)
    fp = sum(1 for a, b in zip(p, g) if a == c and b != c)
    fn = sum(1 for a, b in zip(p, g) if a != c and b == c)
    scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
  return sum(scores) / len(scores)


def matthews_corrcoef(predictions: Sequence[str], labels: Sequence[str]) -> float:
  """Matthews correlation (multi-class form; GLUE's CoLA metric); 0 when undefined."""
  _check_lengths(predictions, labels)
  p = [x.strip() for x in predictions]
  g = [x.strip() for x in labels]
  s = len(g)
  if not s:
    return 0.0
  correct = sum(a == b for a, b in zip(p, g))
  pc, tc = Counter(p), Counter(g)
  keys = set(pc) | set(tc)
  cov_pt = correct * s - sum(pc[k] * tc[k] for k in keys)
  cov_pp = s * s - sum(pc[k] ** 2 for k in keys)
  cov_tt = s * s - sum(tc[k] ** 2 for k in keys)
  if cov_pp == 0 or cov_tt == 0:
    return 0.0
  return cov_pt / math.sqrt(cov_pp * cov_tt)


CLASSIFICATION_METRICS: Dict[str, Callable] = {
    "accuracy": accuracy, "macro_f1": macro_f1, "mcc": matthews_corrcoef,
}


# ----------------------------------------------------------------------------- aggregation

def category_key(category: Optional[str]) -> str:
  """natural-instructions' per-category key: ``"_".join(category.lower().split())``."""
  return "_".join(str(category).lower().split()) if category is not None else "none"


def grouped_metrics(predictions: Sequence[str], references: Sequence[Refs],
                    groups: Sequence[str], metrics: Sequence[str] = ("exact_match", "rougeL")
                    ) -> Dict[str, Dict[str, float]]:
  """{group: {metric: mean over the group's examples, 'n': count}}."""
  _check_lengths(predictions, references)
  if len(groups) != len(predictions):
    raise ValueError(f"{len(groups)} group labels for {len(predictions)} predictions; expected "
                     f"one per prediction")
  by: Dict[str, List[int]] = defaultdict(list)
  for i, g in enumerate(groups):
    by[g].append(i)
  out = {}
  for g, idx in by.items():
    res = compute_metrics([predictions[i] for i in idx], [references[i] for i in idx], metrics)
    res["n"] = len(idx)
    out[g] = res
  return out


def macro_average(per_group: Dict[str, Dict[str, float]]) -> Dict[str, float]:
  """Unweighted mean over groups of each metric."""
  if not per_group:
    return {}
  names = [k for k in next(iter(per_group.values())) if k != "n"]
  return {m: sum(v[m] for v in per_group.values()) / len(per_group) for m in names}


def per_task_and_category(predictions: Sequence[str], rows: Sequence[dict],
                          metrics: Sequence[str] = ("exact_match", "rougeL")) -> Dict[str, dict]:
  """Overall (micro, over instances, as SuperNI reports), per task, per category
  (``meta['category']`` keyed by :func:`category_key`) and the task macro average, for
  rows that carry ``references`` and ``meta['task']`` (SuperNI rows)."""
  refs = [r.get("references", r["target"]) for r in rows]
  tasks = [r["meta"].get("task") or "none" for r in rows]
  cats = [category_key(r["meta"].get("category")) for r in rows]
  per_task = grouped_metrics(predictions, refs, tasks, metrics)
  return {"overall": dict(compute_metrics(predictions, refs, metrics), n=len(rows)),
          "per_task": per_task,
          "per_category": grouped_metrics(predictions, refs, cats, metrics),
          "task_macro": macro_average(per_task)}


# Tk-Instruct's metric per SuperNI category in its per-category report.
SUPERNI_CATEGORY_METRIC = {
    category_key(c): m for c, m in [
        ("Textual Entailment", "exact_match"), ("Cause Effect Classification", "exact_match"),
        ("Coreference Resolution", "exact_match"), ("Dialogue Act Recognition", "exact_match"),
        ("Answerability Classification", "exact_match"), ("Word Analogy", "exact_match"),
        ("Overlap Extraction", "rougeL"), ("Keyword Tagging", "rougeL"),
        ("Question Rewriting", "rougeL"), ("Title Generation", "rougeL"),
        ("Data to Text", "rougeL"), ("Grammar Error Correction", "rougeL")]
}

# Default metrics per data set (the seeds: accuracy for classification, ROUGE-L for
# generation; SuperNI: ROUGE-L and exact match).
DEFAULT_METRICS = {
    "superni": ("rougeL", "exact_match"),
    "tulu": ("rougeL",),
    "boolq": ("accuracy", "macro_f1"), "rte": ("accuracy", "macro_f1"),
    "copa": ("accuracy", "macro_f1"), "ag_news": ("accuracy", "macro_f1"),
    "cola": ("accuracy", "macro_f1", "mcc"),
    "cnn_dailymail": ("rougeL",), "e2e_nlg": ("rougeL",), "samsum": ("rougeL",),
}


def evaluate_rows(dataset: str, predictions: Sequence[str], rows: Sequence[dict],
                  metrics: Optional[Sequence[str]] = None) -> Dict[str, object]:
  """Score predictions for loader rows with the data set's default metrics; SuperNI
  adds ``per_task``, ``per_category`` and ``task_macro``. Classification metrics use
  ``target`` as the label; the others use ``references`` (multi-reference max)."""
  if metrics is None:
    if dataset not in DEFAULT_METRICS:
      raise ValueError(f"unknown data set {dataset!r}; expected one of {sorted(DEFAULT_METRICS)}")
    metrics = DEFAULT_METRICS[dataset]
  _check_lengths(predictions, rows)
  if dataset == "superni":
    out = per_task_and_category(predictions, rows, metrics)
    res = dict(out.pop("overall"))
    res.update(out)
    return res
  refs = [r.get("references", r["target"]) for r in rows]
  labels = [r["target"] for r in rows]
  res: Dict[str, object] = {}
  for m in metrics:
    if m in CLASSIFICATION_METRICS:
      res[m] = CLASSIFICATION_METRICS[m](predictions, labels)
    elif m not in INSTANCE_METRICS:
      raise ValueError(f"unknown metric {m!r}; expected one of "
                       f"{sorted(INSTANCE_METRICS) + sorted(CLASSIFICATION_METRICS)}")
    else:
      res[m] = corpus_metric(m, predictions, refs)
  res["n"] = len(rows)
  return res
