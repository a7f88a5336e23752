"""Run an experiment: one runner, five visible phases, the same for the CLI and for library users.

    validate  the experiment file, every model (fingerprints and tokenizers, no weights), task, setting and
              adaptation, and every test prompt of every run against its model's context — all before the
              database is opened, so bad input leaves nothing behind;
    adapt     each adaptation (fine-tuning today; distillation and prompt compilation plug in through the same
              interface, adapt/adaptation.py) prints its estimate, then runs or reuses an identical result;
    plan      the runs of the adapted models join the model × task × setting grid;
    evaluate  first a line with the runs and requests ahead ("N runs, M requests (K cached, …)"), then every run
              through the generation cache (engine/runner.py), results stored as each run finishes;
    report    the markdown report, from the database alone.

`run_experiment(path_or_experiment, db=…, limit=…)` returns `Results` (labscale/results.py): scores with CIs per
run, the database and report paths, and the request counts. `labscale run` is this function plus printing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from labscale.config import Experiment
from labscale.errors import LabscaleError
from labscale.results import Results

if TYPE_CHECKING:
    from labscale.adapt.adaptation import Adaptation

DEFAULT_DB_DIR = Path("runs")

Say = Callable[[str], None]


def default_db(name: str) -> Path:
    return DEFAULT_DB_DIR / f"{name}.db"


@dataclass
class Validated:
    """Everything the validate phase resolved: what later phases work from."""

    exp: Experiment
    plans: list  # engine.plan.RunPlan of the base grid
    adaptations: list  # adapt.adaptation.Adaptation
    tasks: dict = field(default_factory=dict)  # name -> Task
    test_sets: dict = field(default_factory=dict)  # task name -> its test examples (after the limit)
    notices: list[str] = field(default_factory=list)
    models: list = field(default_factory=list)  # the model entries evaluated (optional ones without keys left out)

    def summary(self) -> str:
        return (f"{len(self.plans)} runs ({len(self.models)} models × {len(self.tasks)} tasks × "
                f"{len(self.exp.settings)} settings)"
                + (f" + {len(self.adaptations)} adaptation(s)" if self.adaptations else ""))


def _quiet(msg: str) -> None:
    """A data-parallel worker's say: the main process speaks for the launch."""


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def validate(exp: Experiment, limit: int | None = None, status: Callable | None = None) -> Validated:
    """Phase 1: resolve and check everything; raises LabscaleError before any work is done."""
    from labscale.adapt.distill import distill_adaptations
    from labscale.adapt.experiment import finetune_adaptations
    from labscale.adapt.optimize import compile_adaptations
    from labscale.config import task_name
    from labscale.engine.plan import check_prices, plan_run, skipped_models
    from labscale.models.registry import resolve_model
    from labscale.settings.setting import check_shots, parse_setting
    from labscale.tasks.registry import get_task

    from labscale.secrets import register_env

    limit = limit or exp.limit
    for spec in exp.models:  # keys never reach an error text, the database or a report
        register_env(spec.api_key_env)
    skipped = skipped_models(exp)
    notices = [f"skipped optional model '{spec.label}': {why}" for spec, why in skipped]
    skipped_labels = {spec.label for spec, _ in skipped}
    settings = [parse_setting(s) for s in exp.settings]
    tasks = [get_task(t, exp.base_dir, exp.tasks, exp.task_options(task_name(t))) for t in exp.task_entries()]
    for task in tasks:
        for setting in settings:
            check_shots(task, setting)
    test_sets = {task.name: task.split("test", limit) for task in tasks}
    models = [spec.resolved(exp.base_dir) for spec in exp.models if spec.label not in skipped_labels]
    backends = [resolve_model(spec) for spec in models]
    notices += [b.info.notice for b in backends if b.info.notice]
    check_prices(exp, backends)
    plans = [plan_run(exp, spec, backend, task, setting, test_sets[task.name])
             for spec, backend in zip(models, backends) for task in tasks for setting in settings
             if not setting.deferred]  # optimized settings are planned once compiled (the adapt phase)
    adaptations: list[Adaptation] = []
    if exp.adaptations:
        adaptations += finetune_adaptations(exp, tasks)
        adaptations += distill_adaptations(exp, tasks, backends)
    adaptations += compile_adaptations(exp, tasks, models, backends)
    return Validated(exp, plans, adaptations, {t.name: t for t in tasks}, test_sets, notices, models)


def adapt(v: Validated, store, say: Say = _stderr) -> list:
    """Phase 2: print every adaptation's estimate first (so a refusal comes before any spending), then run each;
    their model calls go through `store`'s generation cache."""
    from labscale.adapt.adaptation import AdaptContext

    if not v.adaptations:
        return []
    say(f"adapt: {len(v.adaptations)} adaptation(s)")
    for a in v.adaptations:
        say(f"  {a.estimate()}")
    adapted = []
    ctx = AdaptContext(store, say)
    for i, a in enumerate(v.adaptations, 1):
        say(f"adapt [{i}/{len(v.adaptations)}]: {a.kind} {a.label} on {a.task.name} (identity {a.identity})")
        adapted.append(a.run(ctx))
    return adapted


def plan(v: Validated, adapted: list) -> list:
    """Phase 3: the base grid plus one run per adapted model, each checked like the others."""
    from labscale.engine.plan import plan_run

    return v.plans + [plan_run(v.exp, a.spec, a.backend, a.task, a.setting, v.test_sets[a.task.name])
                      for a in adapted]


def warnings(plans: list) -> list[str]:
    """One line per task and budget whose max_new_tokens is far below the references (RunPlan.output_budget)."""
    groups: dict[tuple, list] = {}
    for p in plans:
        if p.output_budget:
            groups.setdefault((p.task.name, p.output_budget["field"], p.output_budget["max_new_tokens"]), []).append(p)
    lines = []
    for (task, knob, budget), ps in groups.items():
        median = max(p.output_budget["median_target_tokens"] for p in ps)
        runs = ", ".join(dict.fromkeys(f"{p.model.label} · {p.setting.name}" for p in ps))
        lines.append(f"task '{task}': {knob}={budget} is under a quarter of the median reference length "
                     f"({median} tokens) in {len(ps)} run(s) ({runs}): outputs will be cut short and scores "
                     f"understate the models — raise generation.{knob} (e.g. to {median + median // 4})")
    return lines


def run_experiment(experiment: str | Path | Experiment, db: str | Path | None = None, limit: int | None = None,
                   say: Say = _stderr, console=None) -> Results:
    """Run (or resume) an experiment and write its report; returns its results.

    `experiment` is an experiment file or an `Experiment` (labscale.config); `db` defaults to
    runs/<name>.db; `limit` overrides the file's test examples per task. Bad input raises LabscaleError before the
    database is opened. When the run stops early (the cost limit, a rejected API key), finished work is kept,
    the report is still written, and `Results.stopped` holds the error (the CLI then exits non-zero).

    Under `accelerate launch` / torchrun (WORLD_SIZE > 1) every process calls this: the main process does all of
    the above, the others answer its model calls (engine/parallel.py) and get a `Results` with `worker=True`.
    """
    import contextlib

    from rich.console import Console

    from labscale.config import load_experiment
    from labscale.engine.parallel import LOCAL, check_parallel, data_parallel
    from labscale.engine.plan import environment
    from labscale.engine.runner import Runner
    from labscale.engine.store import check_db_path, open_store
    from labscale.report.markdown import write_report
    from labscale.report.outputs import write_beside
    from labscale.results import load_results

    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    db = Path(db) if db is not None else default_db(exp.name)
    parallel = data_parallel()  # an `accelerate launch` / torchrun: every process runs this function
    main = parallel is None or parallel.is_main
    if not main:
        say = _quiet
    console = console or Console(stderr=True)
    problem: LabscaleError | None = None
    try:
        check_db_path(db)  # a foreign or broken database is refused before any work
        if parallel is not None:
            check_parallel(exp.models, exp.adaptations)
        with console.status("validate: loading tasks and tokenizers, checking every prompt…") if main else \
                contextlib.nullcontext():
            v = validate(exp, limit)
    except LabscaleError as e:
        if parallel is None:
            raise
        problem = e
    if parallel is not None:  # all processes go on, or all stop
        problems = parallel.agree(None if problem is None else str(problem))
        first = next(((i, p) for i, p in enumerate(problems) if p), None)
        if first is not None:
            if not main:
                raise SystemExit(problem.exit_code if problem else 2)  # the main process says why
            raise problem or LabscaleError(f"process {first[0]} of the data-parallel launch stopped: {first[1]}")
        if not main:
            parallel.serve({p.model.label: p.backend for p in v.plans})
            return Results(exp.name, db, [], exp.config_hash(), worker=True)
    try:
        for notice in v.notices:
            say(f"notice: {notice}")
        say(f"validate: {v.summary()}")
        if parallel is not None:
            say(f"evaluate: data-parallel over {parallel.world} processes (local models; API models from the "
                "main process)")
        created = not db.exists()
        store = open_store(db)  # only now: bad input leaves the database untouched
        stopped: LabscaleError | None = None
        runner = None
        try:
            try:
                adapted = adapt(v, store, say)
            except BaseException:
                # a refused adaptation (e.g. over budget) before any model call leaves no new database behind
                if created and not any(store.counts()[t] for t in ("generations", "loglikelihoods")):
                    store.close()
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{db}{suffix}").unlink(missing_ok=True)
                raise
            plans = plan(v, adapted)
            if adapted:
                say(f"plan: {len(plans)} runs ({len(plans) - len(v.plans)} of adapted models)")
            for line in warnings(plans):
                say(f"warning: {line}")
            config = exp.model_dump(mode="json")
            if limit:
                config["limit"] = limit
            env = environment()
            if parallel is not None:
                env["processes"] = parallel.world
            exp_id = store.begin_experiment(exp.name, exp.config_hash(), config, env,
                                            [p.record() for p in plans], v.notices)
            runner = Runner(store, console, exp.bootstrap_samples, exp.cost_limit,
                            executor=parallel if parallel is not None else LOCAL)
            estimate = runner.estimate(plans)
            requests, cached = sum(n for n, _ in estimate), sum(c for _, c in estimate)
            say(f"evaluate: {len(plans)} runs, {requests} requests ({cached} cached, {requests - cached} to make)")
            try:
                runner.run_all(plans)
                store.finish_experiment(exp_id)
            except LabscaleError as e:  # e.g. the cost limit, a rejected API key: report what is done, then fail
                stopped = e
        finally:
            store.close()
    finally:
        if parallel is not None:
            parallel.finish()  # the workers exit
    if runner is None:  # stopped while adapting: nothing was evaluated in this invocation
        raise stopped if stopped is not None else LabscaleError("the experiment stopped before evaluating")
    report = write_report(db)
    write_beside(db, report)  # the HTML report and the results JSON
    results = load_results(db, exp.name)
    results.report = report
    results.generations, results.loglikelihoods = runner.generations, runner.loglikelihoods
    results.stopped = stopped
    return results
