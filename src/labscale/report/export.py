"""Machine-readable results: a results JSON (or CSV) and a samples JSONL, from the database alone.

Schema (documented in docs/report.md, "Export"; bump `SCHEMA` on any incompatible change):

- results JSON `labscale.results/1`: the experiment (name, config hash, seed, bootstrap resamples, reference,
  margins, environment), and per run: identity (task, model, setting, protocol, n), every score with its 95% CI,
  the verdict against the task's reference (report/verdicts.py), cost ($ per 1,000 examples, measured or
  estimated, API tokens and $), efficiency (as stored), provenance (fingerprint, backend, decoding, config
  hash, seed, packages), group scores, the adaptation card summary, and the human-evaluation summary per task.
- results CSV: one row per run × metric, the run's main-metric verdict and cost repeated on each of its rows.
- samples JSONL `labscale.samples/1`: one line per run × example in the spirit of lm-evaluation-harness's
  `--log_samples` (doc_id, doc, target, arguments, resps, filtered_resps, and the per-example metric values as
  top-level keys), plus labscale's run identity, cache keys and error.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from labscale.engine.store import Store, require_db
from labscale.errors import LabscaleError
from labscale.report.runs import StoredRun, shown_metric

SCHEMA = "labscale.results/1"
SAMPLES_SCHEMA = "labscale.samples/1"
FORMATS = ("json", "csv")


def _finite(obj):
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _human(data: dict) -> dict:
    """The human-evaluation summary (report/human.py) as plain JSON."""
    out = {}
    for task, entry in data.items():
        e: dict = {}
        if "absolute" in entry:
            a = entry["absolute"]
            e["absolute"] = {
                "raters": a["raters"], "krippendorff_alpha_ordinal": a["alpha"],
                "runs": [{"run_id": r["run_id"], "ratings": r["n"],
                          "shares": {g: dict(zip(("value", "ci_low", "ci_high"), v)) for g, v in r["shares"].items()},
                          "judges": r["judges"]} for r in a["runs"]],
                "consistency": {k: dict(zip(("same", "ci_low", "ci_high", "repeats"), v))
                                for k, v in a["consistency"].items()},
                "judges": a["judges"]}
        if "pairwise" in entry:
            p = entry["pairwise"]
            res = p["result"]

            def result(res):
                return {"comparisons": res.comparisons, "regularised": res.regularised, "both_bad": res.both_bad,
                        "runs": {k: {"bradley_terry": dict(zip(("value", "ci_low", "ci_high"), res.strength[k])),
                                     "win_rate": dict(zip(("value", "ci_low", "ci_high"), res.win_rate[k])),
                                     "comparisons": res.games[k]} for k in res.players}}

            e["pairwise"] = {"raters": p["raters"], "krippendorff_alpha_nominal": p["alpha"], **result(res),
                             "consistency": {k: dict(zip(("same", "ci_low", "ci_high", "repeats"), v))
                                             for k, v in p["consistency"].items()},
                             "judges": {j: {**{k: v for k, v in s.items() if k != "result"}, **result(s["result"])}
                                        for j, s in p["judges"].items()}}
        out[task] = e
    return out


def build_results(store: Store, experiment: str | None = None) -> dict:
    from labscale.report.figures import latency_ms, run_cost
    from labscale.report.human import human_data
    from labscale.report.verdicts import compute_verdicts, margin_for

    exp = store.require_experiment(experiment)
    config = json.loads(exp["config_json"])
    env = json.loads(exp["environment_json"])
    runs = [StoredRun(store, r) for r in store.experiment_runs(exp["id"])]
    seed, n_boot = config.get("seed", 0), config.get("bootstrap_samples", 1000)
    verdicts = {v.run_id: v for v in compute_verdicts(runs, config, n_boot, seed)}
    tasks = list(dict.fromkeys(r.task for r in runs))
    out_runs = []
    for r in runs:
        e = r.efficiency
        cost = run_cost(r)
        v = verdicts.get(r.id)
        out_runs.append({
            "id": r.id, "task": r.task, "model": r.model, "setting": r.setting, "protocol": r.protocol,
            "n_examples": r.row["n_examples"], "complete": r.complete,
            "main_metric": shown_metric(r, r.task_info["main_metric"]),
            "scores": {m: {"value": s["value"], "ci_low": s["ci_low"], "ci_high": s["ci_high"], "n": s["n"],
                           "higher_is_better": bool(s["higher_is_better"])} for m, s in r.scores.items()},
            "verdict": v.as_dict() if v is not None else None,
            "cost": {"usd_per_1000_examples": cost.usd_per_1000, "estimated": cost.estimated, "source": cost.source,
                     "api_cost_usd": e.get("cost_usd"), "prompt_tokens": e.get("prompt_tokens"),
                     "completion_tokens": e.get("new_tokens"), "usage_estimated": e.get("usage_estimated"),
                     "price_per_million": r.price},
            "efficiency": {**e, "latency_ms_per_example": latency_ms(r)},
            "provenance": {"model_fingerprint": r.model_info.get("fingerprint"), "backend": r.model_info.get("backend"),
                           "parameters": r.model_info.get("parameters"), "dtype": r.model_info.get("dtype"),
                           "device": r.model_info.get("device"), "quantization": r.model_info.get("quantization"),
                           "decoding": json.loads(r.row["decoding_json"]), "config_hash": r.row["config_hash"],
                           "seed": r.row["seed"], "started_at": r.row["started_at"],
                           "finished_at": r.row["finished_at"]},
            "group_scores": [{k: g[k] for k in ("field", "metric", "kind", "group_name", "value", "ci_low", "ci_high",
                                                "n")} for g in r.group_scores],
            "adaptation": r.adaptation,
        })
    return _finite({
        "schema": SCHEMA,
        "experiment": {"name": exp["name"], "id": exp["id"], "config_hash": exp["config_hash"],
                       "started_at": exp["started_at"], "finished_at": exp["finished_at"], "seed": seed,
                       "bootstrap_samples": n_boot, "reference": config.get("reference"),
                       "margins": {t: margin_for(config, t) for t in tasks}, "config": config},
        "environment": env,
        "runs": out_runs,
        "human_evaluation": _human(human_data(store, runs, n_boot, seed)),
    })


CSV_COLUMNS = ["experiment", "run_id", "task", "model", "setting", "protocol", "n_examples", "complete", "metric",
               "is_main", "value", "ci_low", "ci_high", "higher_is_better", "verdict", "reference_model",
               "reference_setting", "diff", "diff_ci_low", "diff_ci_high", "margin", "more_examples_needed",
               "usd_per_1000_examples", "cost_estimated", "api_cost_usd", "latency_ms_per_example", "examples_per_s",
               "model_fingerprint", "config_hash"]


def results_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in results["runs"]:
        v = r["verdict"] or {}
        ref = v.get("reference") or {}
        base = {"experiment": results["experiment"]["name"], "run_id": r["id"], "task": r["task"], "model": r["model"],
                "setting": r["setting"], "protocol": r["protocol"], "n_examples": r["n_examples"],
                "complete": r["complete"], "verdict": v.get("verdict"), "reference_model": ref.get("model"),
                "reference_setting": ref.get("setting"), "diff": v.get("diff"), "diff_ci_low": v.get("ci_low"),
                "diff_ci_high": v.get("ci_high"), "margin": v.get("margin"),
                "more_examples_needed": v.get("more_examples_needed"),
                "usd_per_1000_examples": r["cost"]["usd_per_1000_examples"], "cost_estimated": r["cost"]["estimated"],
                "api_cost_usd": r["cost"]["api_cost_usd"],
                "latency_ms_per_example": r["efficiency"].get("latency_ms_per_example"),
                "examples_per_s": r["efficiency"].get("examples_per_s"),
                "model_fingerprint": r["provenance"]["model_fingerprint"], "config_hash": r["provenance"]["config_hash"]}
        for metric, s in (r["scores"] or {"": {}}).items():
            w.writerow({**base, "metric": metric, "is_main": metric == r["main_metric"], "value": s.get("value"),
                        "ci_low": s.get("ci_low"), "ci_high": s.get("ci_high"),
                        "higher_is_better": s.get("higher_is_better")})
    return buf.getvalue()


def samples(store: Store, experiment: str | None = None):
    """One dict per run × example (see the module docstring), in run and example order."""
    exp = store.require_experiment(experiment)
    for row in store.experiment_runs(exp["id"]):
        r = StoredRun(store, row)
        decoding = json.loads(row["decoding_json"])
        for p in store.predictions(r.id):
            stats = json.loads(p["stats_json"])
            metrics = {m: (v[0] if isinstance(v, list) and len(v) == 1 else v) for m, v in stats.items()}
            keys = p.keys()
            yield _finite({
                "schema": SAMPLES_SCHEMA, "run_id": r.id, "task": r.task, "model": r.model, "setting": r.setting,
                "protocol": r.protocol, "doc_id": p["position"], "example_id": p["example_id"],
                "doc": {"id": p["example_id"], "input": p["input"] if "input" in keys else None},
                "target": p["target"], "arguments": [[p["prompt"], decoding]], "resps": [[p["output"]]],
                "filtered_resps": [p["prediction"]], **metrics, "metrics": sorted(metrics),
                "model_fingerprint": r.model_info.get("fingerprint"), "cache_keys": json.loads(p["cache_keys_json"]),
                "error": p["error"]})


def samples_path(out: Path) -> Path:
    return out.with_name(out.stem + ".samples.jsonl")


def write_export(db: Path, fmt: str = "json", out: Path | None = None, experiment: str | None = None,
                 with_samples: bool = True) -> list[Path]:
    """Write the results file (and the samples JSONL beside it); returns the paths written."""
    from labscale.atomic import write_atomic
    from labscale.report.markdown import check_output

    if fmt not in FORMATS:
        raise LabscaleError(f"unknown --format '{fmt}'", "use json or csv")
    require_db(db)
    out = out or db.with_suffix(f".{fmt}")
    check_output(out)
    store = Store(db, readonly=True)
    try:
        results = build_results(store, experiment)
        text = json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False, default=str) + "\n" \
            if fmt == "json" else results_csv(results)
        lines = [json.dumps(s, ensure_ascii=False, allow_nan=False, default=str) for s in samples(store, experiment)] \
            if with_samples else None
    finally:
        store.close()
    write_atomic(out, text)
    written = [out]
    if lines is not None:
        path = samples_path(out)
        write_atomic(path, "\n".join(lines) + ("\n" if lines else ""))
        written.append(path)
    return written
