"""BM25 retrieval with bm25s (Lù, 2024, "BM25S: Orders of magnitude faster lexical search via eager sparse scoring").

Scoring: bm25s's default Lucene variant of Okapi BM25 (Robertson & Zaragoza, 2009), k1 = 1.5, b = 0.75,
idf = log(1 + (N - df + 0.5) / (df + 0.5)); a passage's score is the sum over the query's tokens (a repeated query
token counts again, as a repeated clause does in Lucene).

Tokens (for passages and queries alike): the passage title and text, lowercased, split by scikit-learn's
CountVectorizer pattern `\\b\\w\\w+\\b` (words of 2+ word characters), Lucene's English stop words removed (the 33
words of bm25s's STOPWORDS_EN), then Porter-stemmed (nltk's PorterStemmer). No weights, nothing downloaded.

Ties are broken by passage order (base.top_k); a query with no token in the vocabulary scores every passage 0 and
so returns the first k passages of the collection, with score 0.0.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from labscale.retrieval.base import Hit, check_k, hits
from labscale.retrieval.collection import Collection

FORMAT_VERSION = 1  # bump when tokenization or storage changes
K1, B, METHOD = 1.5, 0.75, "lucene"
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@lru_cache(maxsize=262144)
def _stem(word: str) -> str:
    return _stemmer().stem(word)


def tokenize(text: str) -> list[str]:
    stop = _stopwords()
    return [_stem(w) for w in _TOKEN.findall(text.lower()) if w not in stop]


def indexed_text(title: str, text: str) -> str:
    """What a passage is indexed by: its title (when it has one) and its text, as DPR does for Wikipedia."""
    return f"{title}\n{text}" if title else text


class BM25Index:
    name = "bm25"

    def __init__(self, collection: Collection, model):
        self.collection = collection
        self.passages = collection.passages
        self._model = model  # bm25s.BM25

    @staticmethod
    def version() -> dict:
        from importlib.metadata import version

        return {"format": FORMAT_VERSION, "bm25s": version("bm25s"), "nltk": version("nltk"),
                "k1": K1, "b": B, "method": METHOD}

    @classmethod
    def build(cls, collection: Collection) -> "BM25Index":
        import bm25s

        corpus = [tokenize(indexed_text(p.title, p.text)) for p in collection.passages]
        model = bm25s.BM25(k1=K1, b=B, method=METHOD)
        model.index(corpus, show_progress=False)
        return cls(collection, model)

    def save(self, folder: Path) -> None:
        self._model.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: Path, collection: Collection) -> "BM25Index":
        import bm25s

        model = bm25s.BM25.load(str(folder), mmap=False, show_progress=False)
        params = json.loads((Path(folder) / "params.index.json").read_text())
        if params.get("num_docs") != len(collection.passages):
            raise ValueError(f"stored BM25 index has {params.get('num_docs')} passages, the collection "
                             f"{len(collection.passages)}")
        return cls(collection, model)

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every passage for one query, in collection order."""
        ids = self._model.get_tokens_ids(tokenize(query))
        if not ids:
            return np.zeros(len(self.passages), dtype=np.float32)
        return self._model.get_scores_from_ids(ids)

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        check_k(k)
        return [hits(self.passages, self.scores(q), k) for q in queries]
