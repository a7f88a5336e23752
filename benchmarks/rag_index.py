"""Retrieval throughput on the rag-qa collection: indexing (passages/s) and search (queries/s), BM25 vs dense.

The collection is the builtin rag-qa one (BoolQ dev passages + PubMedQA pqal abstracts, 4,332 passages of at most
150 words); the queries are the questions of rag-qa's test split (1,101), searched in one batched call with k=5.
Each figure is the median of `--repeats` runs (default 3) of `Index.build(collection)` (nothing read from the
cache) and of `index.search(queries, k)`. Dense times exclude loading the encoder (timed once, shown apart) and
include encoding the queries. Also prints recall@1/5 and MRR@5 on those questions, so speed is read beside
quality, and the dense/BM25 ratios.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rag_index.py [--repeats 3] [--k 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def _median_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the dense encoder (default 1)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from labscale.metrics.retrieval import recall_at_k, reciprocal_rank
    from labscale.retrieval import dense, query_for
    from labscale.retrieval.bm25 import BM25Index
    from labscale.retrieval.dense import DenseIndex
    from labscale.tasks.registry import get_task

    torch.set_num_threads(args.threads)
    task = get_task("rag-qa", Path("."))
    collection = task.collection()
    test = task.split("test")
    queries = [query_for(e) for e in test]
    golds = [[e.meta["gold_passage"]] for e in test]
    n = len(collection.passages)
    start = time.perf_counter()
    dense.load_encoder()
    load_s = time.perf_counter() - start
    print(f"rag-qa collection: {len(collection.documents)} documents, {n} passages; {len(queries)} test questions, "
          f"k={args.k}; median of {args.repeats}; torch threads {torch.get_num_threads()}; "
          f"MiniLM load {load_s:.1f} s (not counted)")

    rows = {}
    for cls in (BM25Index, DenseIndex):
        build_s, index = _median_time(lambda: cls.build(collection), args.repeats)
        search_s, found = _median_time(lambda: index.search(queries, args.k), args.repeats)
        rows[cls.name] = {
            "build_s": build_s, "passages_per_s": n / build_s, "search_s": search_s,
            "queries_per_s": len(queries) / search_s,
            "recall@1": statistics.mean(recall_at_k(h[:1], g) for h, g in zip(found, golds)),
            f"recall@{args.k}": statistics.mean(recall_at_k(h, g) for h, g in zip(found, golds)),
            f"mrr@{args.k}": statistics.mean(reciprocal_rank(h, g) for h, g in zip(found, golds)),
        }
    cols = list(next(iter(rows.values())))
    print("| retriever | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" if v < 100 else f"{v:.0f}" for v in r.values()) + " |")
    b, d = rows["bm25"], rows["dense"]
    print(f"dense / bm25: indexing {d['passages_per_s'] / b['passages_per_s']:.3f}x the passages/s, "
          f"search {d['queries_per_s'] / b['queries_per_s']:.3f}x the queries/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
