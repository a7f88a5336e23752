"""Results as a library user sees them: `load_results(db)` (or what `run_experiment` returns).

    >>> import labscale
    >>> res = labscale.load_results("runs/quickstart.db")
    >>> res.score("fact-check", "embedded:smollm2-135m-instruct", "zero-shot")
    Score(metric='accuracy', value=0.35, ci_low=0.15, ci_high=0.6, n=20, higher_is_better=True)
    >>> res.to_pandas()          # one row per run × metric

Everything here is read from the database, so results of an earlier `labscale run` load the same way.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from labscale.errors import LabscaleError


@dataclass(frozen=True)
class Score:
    metric: str
    value: float | None  # None where the metric is undefined (e.g. precision with no positive prediction)
    ci_low: float | None  # 95% percentile-bootstrap interval
    ci_high: float | None
    n: int
    higher_is_better: bool


@dataclass
class Run:
    id: str
    model: str
    task: str
    setting: str
    protocol: str  # "generate" | "loglikelihood"
    n_examples: int
    complete: bool
    main_metric: str
    scores: dict[str, Score]
    efficiency: dict
    model_info: dict

    @property
    def main(self) -> Score | None:
        return self.scores.get(self.main_metric)

    @property
    def failed(self) -> int:
        """Requests that failed after their retries (scored as wrong)."""
        return int(self.efficiency.get("failed") or 0)


@dataclass
class Results:
    experiment: str
    db: Path
    runs: list[Run]
    config_hash: str
    notices: list[str] = field(default_factory=list)
    report: Path | None = None
    generations: object | None = None  # engine.runner.Counts of this invocation (run_experiment only)
    loglikelihoods: object | None = None
    stopped: LabscaleError | None = None  # why the evaluation stopped early (cost limit, rejected key)
    worker: bool = False  # returned to a data-parallel worker process: the main process has the results

    @property
    def unanswered(self) -> list[Run]:
        """Finished runs without a single successful request: they have no score."""
        return [r for r in self.runs if r.complete and r.n_examples and r.failed >= r.n_examples]

    def run(self, task: str, model: str, setting: str = "zero-shot") -> Run:
        for r in self.runs:
            if (r.task, r.model, r.setting) == (task, model, setting):
                return r
        known = sorted({(r.task, r.model, r.setting) for r in self.runs})
        raise KeyError(f"no run {task} · {model} · {setting}; runs: {known}")

    def score(self, task: str, model: str, setting: str = "zero-shot", metric: str | None = None) -> Score | None:
        """A run's score on `metric` (default: the task's main metric); None while the run is pending."""
        r = self.run(task, model, setting)
        return r.scores.get(metric or r.main_metric)

    def rows(self) -> list[dict]:
        """One dict per run × metric: the shape of a tidy data frame."""
        return [{"task": r.task, "model": r.model, "setting": r.setting, "protocol": r.protocol, "metric": s.metric,
                 "value": s.value, "ci_low": s.ci_low, "ci_high": s.ci_high, "n": s.n,
                 "main": s.metric == r.main_metric, "run_id": r.id}
                for r in self.runs for s in r.scores.values()]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows())


def load_results(db: str | Path, experiment: str | None = None) -> Results:
    """The latest stored invocation of `experiment` (default: the latest of any) in database `db`."""
    from labscale.engine.store import Store

    db = Path(db)
    if not db.is_file():
        raise LabscaleError(f"database '{db}' does not exist", "pass the database written by `labscale run`")
    try:
        return _load(Store(db, readonly=True), experiment)
    except sqlite3.DatabaseError as e:
        raise LabscaleError(f"'{db}' is not a usable labscale database ({e})", "pass another database") from None


def _load(store, experiment: str | None) -> Results:
    db = store.path
    try:
        exp = store.require_experiment(experiment)
        runs = []
        for row in store.experiment_runs(exp["id"]):
            task_info = json.loads(row["task_json"])
            scores = {s["metric"]: Score(s["metric"], s["value"], s["ci_low"], s["ci_high"], s["n"],
                                         bool(s["higher_is_better"])) for s in store.scores(row["id"])}
            runs.append(Run(row["id"], row["model"], row["task"], row["setting"], row["protocol"], row["n_examples"],
                            row["status"] == "complete", task_info["main_metric"], scores,
                            json.loads(row["efficiency_json"]) if row["efficiency_json"] else {},
                            json.loads(row["model_json"])))
        return Results(exp["name"], db, runs, exp["config_hash"], store.notices(exp["id"]))
    finally:
        store.close()
