"""Runs as the report reads them back from the store: one `StoredRun` per run, with its scores parsed once."""

from __future__ import annotations

import json

import numpy as np

from labscale.engine.store import Store


class StoredRun:
    """A stored run with its scores, parsed once."""

    def __init__(self, store: Store, row):
        self.row = row
        self.id, self.task, self.model, self.setting = row["id"], row["task"], row["model"], row["setting"]
        self.protocol = row["protocol"]
        self.complete = row["status"] == "complete"
        self.task_info = json.loads(row["task_json"])
        self.model_info = json.loads(row["model_json"])
        self.efficiency = json.loads(row["efficiency_json"]) if row["efficiency_json"] else {}
        self.scores = {s["metric"]: s for s in store.scores(self.id)}
        self.group_scores = store.group_scores(self.id)
        self._store = store
        info, extra = self.model_info, self.model_info.get("extra", {})
        # Typed model fields; databases written before they existed kept them in `extra` (read as such).
        self.is_remote = info.get("is_remote", info.get("backend") == "openai")
        self.price = info["price"] if "price" in info else extra.get("price_per_million")
        self.context_known = info.get("context_known", extra.get("context_known", True))
        self.adaptation = info.get("adaptation") or extra.get("adaptation")

    def stats(self, metric: str) -> tuple[list[str], np.ndarray]:
        preds = self._store.predictions(self.id)
        ids = [p["example_id"] for p in preds]
        return ids, np.array([json.loads(p["stats_json"])[metric] for p in preds], dtype=float).reshape(len(ids), -1)


def shown_metric(run: StoredRun, main: str) -> str:
    """The main metric, except where the run's protocol cannot compute it: a multiple-choice task answered by
    letter (API models, cot) has no length-normalised log-likelihood, so its results cell shows accuracy."""
    if run.protocol == "generate" and run.task_info.get("type") == "multiple_choice" and main == "acc_norm":
        return "acc"
    return main


def result_cell(run: StoredRun | None, metric: str) -> str:
    """A results-table cell: `score [low, high]`, with `(k failed)` when some requests failed; `failed n/n` (no
    score) when all did; `pending` for an unfinished run, `—` for none."""
    from labscale.report.format import fmt_ci

    if run is None:
        return "—"
    if not run.complete:
        return "pending"
    n, failed = run.row["n_examples"], int(run.efficiency.get("failed") or 0)
    s = run.scores.get(metric)
    if failed and failed >= n:
        return f"failed {failed}/{n}"
    if s is None:
        return "n/a"
    cell = fmt_ci(s["value"], s["ci_low"], s["ci_high"])
    return cell + (f" ({failed} failed)" if failed else "")


def adapter_runs(runs: list[StoredRun]):
    """(first run, card summary) of each adapter with a labscale.json card among the runs."""
    seen = set()
    for r in runs:
        if r.adaptation and r.model_info["fingerprint"] not in seen:
            seen.add(r.model_info["fingerprint"])
            yield r, r.adaptation
