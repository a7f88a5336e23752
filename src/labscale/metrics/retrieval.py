"""Retrieval metrics for the rag setting: recall@K and MRR against a gold passage, and a lexical faithfulness proxy.

They read `Outcome.retrieved` (the passages the setting put in the prompt, best first; K = their number) and
`Example.meta["gold_passage"]`: one id or a list of ids. A gold id matches a retrieved passage when it equals the
passage id (`<doc id>#<k>`) or its document id, so a gold *document* is found by any of its chunks.

* recall_at_k: 1 when a gold passage is among the K retrieved, else 0 (with one gold id this is also hit@K).
* mrr: 1 / rank of the first gold passage among the K retrieved, 0 when none is (MRR truncated at K; Voorhees,
  1999, TREC-8 QA track).
* faithfulness_overlap: the share of the answer's distinct content words that occur in the retrieved passages
  (token-overlap precision of the answer against the passages). The answer is the raw generation (`output`, so a
  chain of thought counts too). Words are maximal runs of letters and digits, lowercased; content words are those
  of two or more characters (any number counts) that are not in scikit-learn's ENGLISH_STOP_WORDS (the 318-word
  Glasgow IR list) nor "yes" (that list has "no" but not "yes", which would otherwise penalise every "Yes").
  It is a deterministic lexical proxy, not entailment: an answer that copies passage words while negating them
  scores 1, and a correct paraphrase or an inflected form ("elected" vs "election") scores as unsupported. A
  one-word label answer ("yes", "no") has no content word and is NaN, as is any answer without one.

Rows where a metric is not defined hold NaN (no retrieval in the run, no gold passage, a failed call, a
log-likelihood outcome), and the aggregate is the mean over the defined rows: a closed-book run scores NaN
("n/a"), not 0.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from labscale.example import Outcome
from labscale.metrics.base import Metric, nanmean_of_first_column

GOLD_KEY = "gold_passage"
_WORD = re.compile(r"[^\W_]+")


def gold_ids(meta: dict) -> tuple[str, ...]:
    gold = meta.get(GOLD_KEY)
    if gold is None:
        return ()
    if isinstance(gold, str):
        gold = [gold]
    return tuple(str(g) for g in gold if str(g).strip())


def first_gold_rank(hits, gold: tuple[str, ...]) -> int | None:
    """1-based rank of the first hit matching a gold id (by passage id or document id), None when none does."""
    wanted = set(gold)
    for rank, h in enumerate(hits, start=1):
        if h.passage_id in wanted or h.doc_id in wanted:
            return rank
    return None


def recall_at_k(hits, gold) -> float:
    return float(first_gold_rank(hits, tuple(gold)) is not None)


def reciprocal_rank(hits, gold) -> float:
    rank = first_gold_rank(hits, tuple(gold))
    return 0.0 if rank is None else 1.0 / rank


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) | {"yes"}


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def content_words(text: str) -> set[str]:
    stop = stopwords()
    return {w for w in words(text) if w not in stop and (len(w) >= 2 or w.isdigit())}


def faithfulness_overlap(answer: str, passages: list[str]) -> float:
    """Share of the answer's distinct content words found in the passages; NaN when it has none."""
    claimed = content_words(answer)
    if not claimed:
        return float("nan")
    supported = set().union(*(words(p) for p in passages)) if passages else set()
    return len(claimed & supported) / len(claimed)


def _retrieval_stat(fn):
    def per_example(outcomes: list[Outcome]) -> np.ndarray:
        out = []
        for o in outcomes:
            gold = gold_ids(o.example.meta)
            out.append(np.nan if o.retrieved is None or not gold else fn(o.retrieved, gold))
        return np.array(out, dtype=float)

    return per_example


def _faithfulness(outcomes: list[Outcome]) -> np.ndarray:
    out = []
    for o in outcomes:
        if o.retrieved is None or o.failed is not None or o.logprobs is not None:
            out.append(np.nan)
        else:
            out.append(faithfulness_overlap(o.output, [f"{h.title}\n{h.text}" for h in o.retrieved]))
    return np.array(out, dtype=float)


def _metric(name: str, description: str, per_example) -> Metric:
    return Metric(name, description, per_example, nanmean_of_first_column, higher_is_better=True, family="retrieval")


METRICS = [
    _metric("recall_at_k", "share of questions whose gold passage is among the K retrieved (rag:K runs only)",
            _retrieval_stat(recall_at_k)),
    _metric("mrr", "mean reciprocal rank of the gold passage among the K retrieved, 0 when absent (rag:K runs only)",
            _retrieval_stat(reciprocal_rank)),
    _metric("faithfulness_overlap",
            "share of the answer's content words found in the retrieved passages: a lexical proxy, not entailment "
            "(rag:K runs only; NaN for answers without content words)", _faithfulness),
]
