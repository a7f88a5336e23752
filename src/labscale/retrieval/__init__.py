"""Retrieval for the `rag` setting: document collections and chunking, BM25 and dense retrievers, cached indexes.

    from labscale.retrieval import load_collection, load_index
    collection = load_collection("docs/", base_dir)          # or a task's `collection()`
    retriever = load_index(collection, "bm25")               # built once, cached under LABSCALE_HOME/indexes
    hits = retriever.search(questions, k=3)                  # one list of Hit per question, best first

Importing this package is cheap: bm25s, nltk and sentence-transformers are imported when an index is built or
loaded. The retrieval metrics (recall@K, MRR, faithfulness overlap) live in labscale.metrics.retrieval.
"""

from labscale.retrieval.base import Hit, Retriever, query_for
from labscale.retrieval.collection import Collection, Document, Passage, chunk_text, load_collection
from labscale.retrieval.index import RETRIEVERS, check_retriever, index_dir, load_index, retriever_names

__all__ = ["RETRIEVERS", "Collection", "Document", "Hit", "Passage", "Retriever", "check_retriever", "chunk_text",
           "index_dir", "load_collection", "load_index", "query_for", "retriever_names"]
