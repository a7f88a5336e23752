"""The retriever contract: `search(queries, k)` → for each query, its k best passages as `Hit`s, best first.

Every retriever scores all passages of its collection and orders them by score, higher first, ties broken by the
passage's position in the collection (earlier first): the same collection and queries give the same hits, in the
same order, on every run. `k` larger than the collection returns every passage; `k < 1` is a ConfigError.

An index (built once, cached on disk by index.py) implements:
    name: str                                  registry name ("bm25", "dense")
    version() -> dict                          what the stored index depends on (format, library versions, model)
    build(collection) -> index                 (classmethod) compute the index
    save(folder) / load(folder, collection)    persist it / read it back (classmethod) without recomputing
    search(queries, k) -> list[list[Hit]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from labscale.errors import ConfigError

__all__ = ["QUERY_KEY", "Hit", "Retriever", "check_k", "hits", "query_for", "top_k"]

QUERY_KEY = "query"  # Example.meta key: the text to search with, when it differs from the example's input


@dataclass(frozen=True)
class Hit:
    """One retrieved passage: its id (`<doc id>#<k>`), document id, score, text and title; rank 1 is the best."""

    passage_id: str
    doc_id: str
    score: float
    text: str
    title: str = ""
    rank: int = 1


class Retriever(Protocol):
    name: str

    def search(self, queries: list[str], k: int) -> list[list[Hit]]: ...


def query_for(example) -> str:
    """What a retrieval setting searches with for an example: `meta["query"]` when the task sets it (rag-qa sets
    the bare question, without the "Question: " frame), else the example's input."""
    query = example.meta.get(QUERY_KEY)
    return str(query) if query else example.input


def check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"retrieval needs k >= 1 passages per query, got {k!r}", "use e.g. rag:3")
    return k


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first, ties by lower index: deterministic, unlike a bare
    argpartition. Candidates are every index scoring at least the k-th best, so no tie at the cut is dropped
    arbitrarily; they are then sorted stably by descending score."""
    n = scores.shape[0]
    k = min(k, n)
    if k == n:
        candidates = np.arange(n)
    else:
        kth = np.partition(scores, n - k)[n - k]
        candidates = np.flatnonzero(scores >= kth)
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order][:k]


def hits(passages, scores: np.ndarray, k: int) -> list[Hit]:
    """The top-k `Hit`s of one query given its score for every passage (in collection order)."""
    return [Hit(passages[i].id, passages[i].doc_id, float(scores[i]), passages[i].text, passages[i].title, r)
            for r, i in enumerate(top_k(scores, k), start=1)]
