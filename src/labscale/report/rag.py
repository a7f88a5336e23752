"""The report's Retrieval section, for experiments with rag:K runs (the run record's `task_info["retrieval"]`).

1. Retrieval quality per rag:K run: the retrieval metrics of its task (family "retrieval": recall@K, MRR,
   faithfulness overlap; metrics/retrieval.py) with their bootstrap CIs, beside the index searched (retriever,
   collection size, index version, built or read from the cache).
2. Closed-book vs rag:K: for every rag:K run whose model also ran the task zero-shot (the closed-book run), the main
   metric of both and their difference rag:K − zero-shot on the same test examples with a paired-bootstrap 95% CI
   and p-value (report/paired.py). A difference whose CI excludes 0 is marked *.
"""

from __future__ import annotations

from labscale.report.format import fmt, table
from labscale.report.paired import diff_cells, paired_main
from labscale.report.runs import StoredRun, result_cell, shown_metric
from labscale.report.values import family

CLOSED_BOOK = "zero-shot"


def rag_section(runs: list[StoredRun], n_boot: int, seed: int) -> list[str]:
    """Empty when no run retrieved."""
    rag = [r for r in runs if r.task_info.get("retrieval")]
    if not rag:
        return []
    lines = ["## Retrieval", "",
             "rag:K runs put the K best passages of the task's collection (chunked by the rule in docs/rag.md) into "
             "each prompt, numbered [1]…[K]. recall_at_k: share of questions whose gold passage or document is "
             "among them; mrr: reciprocal rank of the first gold one (0 when absent); faithfulness_overlap: share "
             "of the answer's content words found in the passages — a lexical proxy, not entailment (n/a for "
             "one-word answers). Passages are never cut or dropped to fit the context.", ""]
    rows = []
    for r in rag:
        info = r.task_info["retrieval"]
        coll = info.get("collection", {})
        metrics = [m for m in r.task_info["metrics"] if family(m) == "retrieval"]
        cells = [f"{m} {result_cell(r, m)}" for m in metrics] or ["no retrieval metric on this task"]
        built = "read from cache" if info.get("index_reused") else f"built in {fmt(info.get('index_build_s'))} s"
        rows.append([r.model, r.task, r.setting, info.get("retriever", "?"),
                     f"{coll.get('documents', '?'):,} docs / {coll.get('passages', '?'):,} passages"
                     if isinstance(coll.get("documents"), int) else "?",
                     f"`{info.get('index_version', '?')}` ({built})", str(r.row["n_examples"]), "; ".join(cells)])
    lines += table(["model", "task", "setting", "retriever", "collection", "index", "n", "retrieval metrics"], rows)

    by_key = {(r.task, r.model, r.setting): r for r in runs}
    rows = []
    for r in rag:
        closed = by_key.get((r.task, r.model, CLOSED_BOOK))
        if closed is None:
            continue
        d = paired_main(r, closed, n_boot, seed)
        metric = d["metric"] if d else shown_metric(r, r.task_info["main_metric"])
        rows.append([r.task, r.model, metric, result_cell(closed, metric), f"{r.setting}: {result_cell(r, metric)}",
                     *diff_cells(d)])
    if rows:
        lines += ["### Closed-book vs rag:K", "",
                  "Main metric; difference = rag:K − zero-shot (closed-book) on the same test examples, paired "
                  "bootstrap 95% CI. * : the CI excludes 0.", ""]
        lines += table(["task", "model", "metric", "closed-book (zero-shot)", "rag:K", "difference", "95% CI", "p"],
                       rows)
    else:
        lines += ["No closed-book comparison: add the zero-shot setting to compare rag:K with the model alone.", ""]
    return lines
