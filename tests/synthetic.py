"""A database with chosen per-example scores, written through the real Store (no model): for report, export and
rating tests that need exact control over the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labscale.engine.store import Store
from labscale.metrics.registry import get_metric
from labscale.metrics.stats import bootstrap_ci

ENV = {"python": "3.11", "platform": "test", "cpus": 2, "packages": {"labscale": "0.1.0"}}


def run_spec(task: str, model: str, setting: str, scores: list[float], metric: str = "accuracy", **extra) -> dict:
    return {"task": task, "model": model, "setting": setting, "scores": scores, "metric": metric, **extra}


def make_db(path: Path, runs: list[dict], config: dict | None = None, name: str = "syn", n_boot: int = 1000) -> Path:
    """One experiment with the given runs (see run_spec): outputs `out-<model>-<i>` unless `outputs` is given,
    inputs `input <i>`, example ids `e<i>`; `remote` + `cost_usd` make an API run."""
    store = Store(path)
    config = {"name": name, "seed": 0, "bootstrap_samples": n_boot, **(config or {})}
    records = []
    for k, r in enumerate(runs):
        r["id"] = r.get("id") or f"run{k:02d}"
        remote = bool(r.get("remote"))
        records.append({
            "id": r["id"], "task": r["task"], "model": r["model"], "model_fingerprint": f"fp-{r['model']}",
            "setting": r["setting"], "protocol": r.get("protocol", "generate"), "n_examples": len(r["scores"]),
            "seed": 0, "decoding": {"max_new_tokens": 8, "temperature": 0.0, "stop": []},
            "task_info": {"name": r["task"], "type": r.get("type", "generate"), "metrics": [r["metric"]],
                          "main_metric": r["metric"], "instruction": r.get("instruction", f"Do {r['task']}."),
                          **({"group_fields": ["grp"]} if r.get("groups") else {})},
            "model_info": {"name": r["model"], "fingerprint": f"fp-{r['model']}", "backend": "openai" if remote else "hf",
                           "context_length": 2048, "device": "cpu", "is_remote": remote,
                           "price": {"input": 1.0, "output": 2.0, "source": "test"} if remote else None,
                           "context_known": True, "adaptation": r.get("adaptation"), "extra": {},
                           "spec": {"id": r.get("model_id", f"hf:/nowhere/{r['model']}"), "name": r["model"]}},
        })
    exp_id = store.begin_experiment(name, "cafe0000cafe0000", config, ENV, records)
    for r in runs:
        metric = get_metric(r["metric"])
        stats = np.asarray(r["scores"], dtype=float).reshape(-1, 1)
        n = len(stats)
        low, high = bootstrap_ci(stats, metric.aggregate, n_boot=n_boot, seed=0)
        outputs = r.get("outputs") or [f"out-{r['model']}-{r['setting']}-{i}" for i in range(n)]
        preds = [{"example_id": f"e{i}", "prompt": f"<|user|>input {i}<|assistant|>", "output": outputs[i],
                  "prediction": outputs[i], "target": f"gold {i}", "cache_keys": [f"k{r['id']}{i}"],
                  "stats": {r["metric"]: [float(stats[i, 0])]}, "error": None, "input": f"input {i}"}
                 for i in range(n)]
        eff = {"examples": n, "compute_s": r.get("compute_s", 2.0), "wall_s": 3.0, "peak_rss_bytes": 1 << 30,
               "peak_accelerator_bytes": None, "examples_per_s": n / r.get("compute_s", 2.0), "new_tokens": 10 * n,
               "prompt_tokens": 20 * n, "new_tokens_per_s": 5.0, "mean_latency_s": r.get("latency_s", 0.2),
               "truncated": 0, "failed": 0, "retries": 0}
        if r.get("remote"):
            eff.update(cost_usd=r.get("cost_usd", 0.01), price_per_million={"input": 1.0, "output": 2.0},
                       usage_estimated=r.get("usage_estimated", 0))
        groups = []
        if r.get("groups"):
            for gname in sorted(set(r["groups"])):
                rows = stats[[g == gname for g in r["groups"]]]
                lo, hi = bootstrap_ci(rows, metric.aggregate, n_boot=200, seed=0)
                groups.append({"field": "grp", "metric": r["metric"], "kind": "group", "group": gname,
                               "value": float(metric.aggregate(rows)), "ci_low": lo, "ci_high": hi, "n": len(rows)})
            worst = min(groups, key=lambda g: g["value"])
            groups.append({**worst, "kind": "worst"})
            groups.append({**worst, "kind": "gap", "group": "max-min", "value": max(g["value"] for g in groups)
                           - worst["value"]})
        store.complete_run(r["id"], preds, [{"metric": r["metric"], "value": float(metric.aggregate(stats)),
                                              "ci_low": low, "ci_high": high, "n": n,
                                              "higher_is_better": metric.higher_is_better}], eff, 0.0, groups)
    store.finish_experiment(exp_id)
    store.close()
    return path
