"""The `labscale` command. Imports nothing heavy at module level: torch loads only inside commands."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Can a small open model compete with a large closed one on your task, and at what cost?",
    pretty_exceptions_enable=False,
)

DEFAULT_DB_DIR = Path("runs")


def _fail(message: str, code: int = 2) -> None:
    # one line, whatever the message quotes (a key or a value from the user's file may hold newlines)
    line = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)
    typer.echo(f"error: {line}", err=True)
    sys.exit(code)


def _table_console():
    """A console for listings: full width when piped, so rows are not wrapped into unreadable columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


@app.command()
def run(
    file: Path = typer.Argument(..., help="experiment YAML file"),
    db: Optional[Path] = typer.Option(None, help="SQLite database (default: runs/<experiment name>.db)"),
    limit: Optional[int] = typer.Option(None, min=1, help="test examples per task (overrides the file's limit)"),
) -> None:
    """Run every model × task × setting of an experiment, store the results, and write the report."""
    from labscale.experiment import run_experiment

    results = run_experiment(file, db=db, limit=limit, say=lambda m: typer.echo(m, err=True))
    if results.worker:  # a data-parallel worker: the main process reports
        return
    g, ll = results.generations, results.loglikelihoods
    typer.echo(f"database: {results.db}")
    typer.echo(f"report: {results.report}")
    if results.stopped is not None:
        raise results.stopped
    if g.failed:
        typer.echo(f"failed requests: {g.failed} (recorded and scored as wrong; run again to retry them)")
    typer.echo(f"log-likelihood requests: {ll.new} new, {ll.cached} cached")
    typer.echo(f"generations: {g.new + ll.new} new, {g.cached + ll.cached} cached")
    if results.unanswered:
        from labscale.errors import RunFailed

        names = ", ".join(f"{r.model} · {r.task} · {r.setting}" for r in results.unanswered[:3])
        more = f" and {len(results.unanswered) - 3} more" if len(results.unanswered) > 3 else ""
        raise RunFailed(f"{len(results.unanswered)} run(s) got no successful answer, so they have no score: "
                        f"{names}{more}", "the reasons are in the report and predictions.error; fix the "
                        "endpoint or model and run again (only the failed requests are retried)")


@app.command()
def report(
    db: Optional[Path] = typer.Option(None, help="database written by `labscale run` (default: the only one in runs/)"),
    out: Optional[Path] = typer.Option(None, help="markdown file (default: beside the database, .md)"),
    experiment: Optional[str] = typer.Option(None, help="experiment name (default: the latest in the database)"),
    html: bool = typer.Option(False, "--html", help="also write the self-contained HTML report (beside the "
                              "markdown, .html): charts, verdicts, drill-down to examples; opens offline"),
) -> None:
    """Regenerate the report from the database alone."""
    from labscale.errors import LabscaleError
    from labscale.report.markdown import write_report

    db = _default_db(db)
    import sqlite3

    try:
        path = write_report(db, out, experiment)
        if html:
            from labscale.report.html import write_html

            html_path = write_html(db, path.with_suffix(".html"), experiment)
    except sqlite3.DatabaseError as e:
        raise LabscaleError(f"'{db}' is not a usable labscale database ({e})", "pass another --db path") from None
    typer.echo(f"report: {path}")
    if html:
        typer.echo(f"html: {html_path}")


def _default_db(db: Optional[Path]) -> Path:
    """--db, or the only database in runs/ (a one-line error otherwise)."""
    from labscale.errors import LabscaleError

    if db is not None:
        return db
    found = sorted(DEFAULT_DB_DIR.glob("*.db"))
    if len(found) != 1:
        raise LabscaleError(
            f"found {len(found)} databases in {DEFAULT_DB_DIR}/" if found else f"no database in {DEFAULT_DB_DIR}/",
            "pass --db PATH",
        )
    return found[0]


@app.command()
def export(
    format: str = typer.Option("json", "--format", help="json | csv"),
    db: Optional[Path] = typer.Option(None, help="database written by `labscale run` (default: the only one in runs/)"),
    out: Optional[Path] = typer.Option(None, help="results file (default: beside the database, .json / .csv)"),
    experiment: Optional[str] = typer.Option(None, help="experiment name (default: the latest in the database)"),
    samples: bool = typer.Option(True, "--samples/--no-samples", help="also write <out>.samples.jsonl: one line "
                                 "per run × example (prompt, output, parsed answer, gold, per-example scores)"),
) -> None:
    """Write machine-readable results: scores with CIs, verdicts, costs, efficiency and provenance per run (schema:
    docs/report.md)."""
    import sqlite3

    from labscale.errors import LabscaleError
    from labscale.report.export import write_export

    db = _default_db(db)
    try:
        paths = write_export(db, format, out, experiment, samples)
    except sqlite3.DatabaseError as e:
        raise LabscaleError(f"'{db}' is not a usable labscale database ({e})", "pass another --db path") from None
    typer.echo(f"results: {paths[0]}")
    if len(paths) > 1:
        typer.echo(f"samples: {paths[1]}")


@app.command()
def rate(
    db: Optional[Path] = typer.Option(None, help="database written by `labscale run` (default: the only one in runs/)"),
    task: Optional[str] = typer.Option(None, help="rate only this task's outputs (default: every generate task)"),
    mode: str = typer.Option("absolute", help="absolute (A–D per output) | pairwise (two outputs, which is better)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, min=0, max=65535, help="port to listen on (0: any free port)"),
    token_env: Optional[str] = typer.Option(None, help="require the access token in $VAR (raters open the page "
                                            "with ?token=<token>)"),
    experiment: Optional[str] = typer.Option(None, help="experiment name (default: the latest in the database)"),
    judge: Optional[str] = typer.Option(None, help="instead of serving the page, rate the same items with this "
                                        "model of the experiment (LLM as judge; pairwise: both orders)"),
) -> None:
    """Human evaluation in the browser: blinded A–D or pairwise ratings of the experiment's outputs, stored in its
    database (the report gains a Human evaluation section); see docs/report.md."""
    from labscale.errors import LabscaleError

    db = _default_db(db)
    if mode not in ("absolute", "pairwise"):
        raise LabscaleError(f"unknown --mode '{mode}'", "use absolute or pairwise")
    if judge is not None:
        from labscale.rate.judge import run_judge

        s = run_judge(db, judge, mode, task, experiment, say=lambda m: typer.echo(m, err=True))
        typer.echo(f"judge {s.judge}: {s.prompts} prompts on {s.items} items ({s.new_calls} new, {s.cached_calls} "
                   f"cached), parse failures {s.parse_failures}" + (f", {s.skipped} too long, skipped" if s.skipped
                                                                    else ""))
        return
    from labscale.rate.app import check_token_env
    from labscale.rate.server import serve as serve_rating

    serve_rating(db, mode, task, host, port, check_token_env(token_env), experiment)


@app.command("export-prompt")
def export_prompt(
    db: Path = typer.Option(..., help="database written by `labscale run`"),
    task: Optional[str] = typer.Option(None, help="the compiled prompt's task (needed when several match)"),
    model: Optional[str] = typer.Option(None, help="its model (name as in the report)"),
    setting: Optional[str] = typer.Option(None, help="its setting, e.g. optimized:fewshot"),
    out: Optional[Path] = typer.Option(None, help="YAML file (default: beside the database)"),
    experiment: Optional[str] = typer.Option(None, help="experiment name (default: the latest in the database)"),
) -> None:
    """Write a compiled (optimized) prompt as a YAML task entry: the instruction and demonstrations, reusable."""
    from labscale.report.prompt_export import export_prompt as export

    typer.echo(f"prompt: {export(db, out, task, model, setting, experiment)}")


@app.command()
def tasks() -> None:
    """List the builtin tasks: description, split sizes, metrics, group fields, data source and licence."""
    from rich.table import Table

    from labscale.tasks.registry import list_tasks

    t = Table("task", "type", "description", "train/dev/test", "metrics (main first)", "per group of",
              "source · licence")
    for task in list_tasks():
        info = task.info()
        s = info["splits"]
        metrics = [info["main_metric"]] + [m for m in info["metrics"] if m != info["main_metric"]]
        t.add_row(task.name, task.type, task.description, f"{s['train']}/{s['dev']}/{s['test']}",
                  ", ".join(metrics), ", ".join(task.group_fields) or "—", f"{task.source} · {task.license}")
    console = _table_console()
    console.print(t)
    console.print("Add +names to a task name (e.g. mts-summarization+names) for counterfactual name swaps.")
    from labscale.taskgroups import TASK_GROUPS

    for group in TASK_GROUPS.values():
        console.print(f"Task group {group.name}: {', '.join(group.members)} — {group.description}; list it under "
                      "`tasks:` for its members and a macro-average row.")


@app.command()
def models() -> None:
    """List the embedded models: size, licence, and whether they are installed and converted."""
    from rich.table import Column, Table

    from labscale.models.embedded import list_embedded

    t = Table(Column("model", no_wrap=True), "parameters", "licence", "package size", "installed", "converted", "description")
    for m in list_embedded():
        mib = lambda n: f"{n / 2**20:,.0f} MiB" if n else "—"  # noqa: E731
        t.add_row(m["id"], f"{m['params'] / 1e6:.1f}M", m["license"], mib(m["size_bytes"]),
                  "yes" if m["installed"] else f"no — {m['install_hint']}",
                  f"yes ({mib(m['converted_size_bytes'])})" if m["converted"] else "no (on first use)",
                  m["description"])
    _table_console().print(t)
    typer.echo("Any transformers causal LM also works as hf:<hub id or local folder>.")


@app.command()
def serve(
    model: str = typer.Option(..., "--model", help="embedded:<name>, hf:<hub id or local path> or adapter:<folder>"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="LoRA adapter NAME=PATH (repeatable)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, min=0, max=65535, help="port to listen on"),
    api_key_env: Optional[str] = typer.Option(None, help="require `Authorization: Bearer $VAR` on /v1 routes"),
    served_name: Optional[str] = typer.Option(None, help="the base model's name in the API (default: --model)"),
    batch_size: int = typer.Option(16, min=1, help="most requests per forward batch"),
    max_body_bytes: int = typer.Option(4 << 20, min=1024, help="larger request bodies get 413"),
    batch_wait_ms: float = typer.Option(10.0, min=0, help="how long a batch waits for more requests"),
    grace_s: float = typer.Option(30.0, "--grace-s", min=0, max=86400,
                                  help="on SIGTERM/Ctrl-C: seconds in-flight requests may take to finish before "
                                  "they are cancelled (503)"),
    batching: str = typer.Option("continuous", help="continuous (requests join a running batch at the next decode "
                                 "step) | dynamic (a batch runs to its end before the next starts)"),
) -> None:
    """Serve a local model (and LoRA adapters) over an OpenAI-compatible HTTP API; see docs/serve.md."""
    import os

    from labscale.errors import LabscaleError

    adapters: dict[str, str] = {}
    for item in adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise LabscaleError(f"--adapter '{item}' is not NAME=PATH", "e.g. --adapter notes=./lora-notes")
        if name.strip() in adapters:
            raise LabscaleError(f"--adapter name '{name.strip()}' is given twice", "give each adapter its own name")
        adapters[name.strip()] = path.strip()
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env, "")
        if not api_key:
            raise LabscaleError(f"--api-key-env {api_key_env}: ${api_key_env} is not set",
                                f"export {api_key_env}=<key>, or drop --api-key-env to serve without a key")
    if batching not in ("continuous", "dynamic"):
        raise LabscaleError(f"--batching '{batching}' is not continuous or dynamic", "use --batching continuous")
    from labscale.serve.server import serve as run_server

    run_server(model, adapters, host, port, served_name, api_key, batch_size, max_body_bytes, batch_wait_ms, grace_s,
               continuous=batching == "continuous")


# The training flags `finetune` and both `distill` commands share (config.FinetuneSpec's fields), declared once.
QUANT_OPT = typer.Option(None, "--quant", help="none | 8bit | 4bit (QLoRA: NF4, double quantization); default: "
                         "none, or the --experiment model entry's")
RECIPE_OPT = typer.Option(None, "--recipe", help="auto (default) or a recipe name (see `labscale recipes`)")
MAX_STEPS_OPT = typer.Option(None, "--max-steps", help="optimizer steps (overrides epochs)")
SET_OPT = typer.Option(None, "--set", help="override a recipe field: FIELD=VALUE (repeatable)")
CO2_CAP_OPT = typer.Option(None, "--co2-cap", help="kg CO2eq cap of the training")
HARDWARE_OPT = typer.Option(None, help="auto (default) | cpu | t4 | a100: picks the recipe and the price")
PRICE_OPT = typer.Option(None, help="US $ per device-hour (default: by --hardware)")
COUNTRY_OPT = typer.Option(None, help="ISO alpha-3 code for the grid carbon intensity (default USA)")
LOG_OPT = typer.Option(None, "--log", help="none (default) | wandb (offline) | mlflow (SQLite beside the adapter)")

# `labscale finetune` spells config.FinetuneSpec's fields as flags; bounds, defaults and checks live there only.
FINETUNE_FLAGS = {"quantization": "--quant", "overrides": "--set", "budget_usd": "--budget", "co2_cap_kg": "--co2-cap"}


@app.command()
def finetune(
    model: str = typer.Option(..., "--model", help="embedded:<name> or hf:<hub id or local path>"),
    task: str = typer.Option(..., "--task", help="a builtin task, or one defined in --experiment"),
    quant: Optional[str] = QUANT_OPT,
    recipe: Optional[str] = RECIPE_OPT,
    max_steps: Optional[int] = MAX_STEPS_OPT,
    out: Optional[Path] = typer.Option(None, "--out", help="adapter folder (default: runs/adapters/<identity>)"),
    log: Optional[str] = LOG_OPT,
    set_: Optional[list[str]] = SET_OPT,
    seed: Optional[int] = typer.Option(None, help="LoRA initialisation, dropout and data order (default 0)"),
    budget: Optional[float] = typer.Option(None, "--budget", help="US $ cap: refuse or stop before spending more "
                                           "(default 25)"),
    co2_cap: Optional[float] = CO2_CAP_OPT,
    hardware: Optional[str] = HARDWARE_OPT,
    price_per_hour: Optional[float] = PRICE_OPT,
    country: Optional[str] = COUNTRY_OPT,
    experiment: Optional[Path] = typer.Option(None, help="look --task and --model up in this experiment file too"),
    dp: bool = typer.Option(False, "--dp", help="differentially private training (DP-SGD with Opacus, LoRA only)"),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help="--dp: the ε the whole training may spend"),
    delta: Optional[float] = typer.Option(None, "--delta", help="--dp: δ, below 1/n (default 1/(2n), n = train "
                                          "examples)"),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="--dp: per-example clipping norm "
                                                  "(default 1)"),
    canaries: Optional[int] = typer.Option(None, "--canaries", help="insert K secret canaries into the training "
                                           "data and measure their exposure after training"),
    canary_repeats: Optional[int] = typer.Option(None, "--canary-repeats", help="copies of each canary (default 4)"),
    canary_candidates: Optional[int] = typer.Option(None, "--canary-candidates", help="random secrets each canary "
                                                    "is ranked against (default 1000)"),
) -> None:
    """Fine-tune a local model on a task's train split (LoRA / QLoRA, optionally DP); see docs/finetune.md."""
    from labscale.adapt.experiment import base_model_spec
    from labscale.adapt.finetune import FinetuneOptions, finetune as run_finetune
    from labscale.adapt.recipes import parse_set
    from labscale.config import FinetuneSpec
    from labscale.tasks.registry import get_task

    _check_flag_combinations(dp, epsilon, delta, max_grad_norm, canaries, canary_repeats, canary_candidates)
    dp_values = {"epsilon": epsilon, "delta": delta, "max_grad_norm": max_grad_norm}
    spec = FinetuneSpec.from_flags({
        "quantization": quant, "recipe": recipe, "overrides": parse_set(set_ or []), "max_steps": max_steps,
        "seed": seed, "budget_usd": budget, "co2_cap_kg": co2_cap, "hardware": hardware,
        "price_per_hour": price_per_hour, "country": country, "log": log,
        "dp": {k: v for k, v in dp_values.items() if v is not None} if dp else None, "canaries": canaries,
        "canary_repeats": canary_repeats, "canary_candidates": canary_candidates,
    }, FINETUNE_FLAGS)
    exp, entry = None, task
    if experiment is not None:
        from labscale.config import load_experiment

        exp = load_experiment(experiment)
        entry = next((t for t in exp.tasks if (t if isinstance(t, str) else t.name) == task), task)
    base = base_model_spec(exp, model, spec.quantization)
    task_obj = get_task(entry, exp.base_dir if exp else Path("."))
    result = run_finetune(FinetuneOptions.of(spec, base, task_obj, out=out))
    if result.card:  # the main process (under accelerate launch, the others stay quiet)
        typer.echo(f"adapter: {result.out}")


def _check_flag_combinations(dp: bool, epsilon, delta, max_grad_norm, canaries, canary_repeats,
                             canary_candidates) -> None:
    """What the flat flags can say that the options cannot: DP settings without --dp, --dp without ε, canary
    settings without canaries."""
    from labscale.errors import ConfigError

    if not dp:
        given = [n for n, v in (("--epsilon", epsilon), ("--delta", delta), ("--max-grad-norm", max_grad_norm))
                 if v is not None]
        if given:
            raise ConfigError(f"{given[0]} only applies to differentially private training", "add --dp")
    elif epsilon is None:
        raise ConfigError("--dp needs a privacy budget", "add --epsilon E, e.g. --epsilon 8")
    if not canaries and (canary_repeats is not None or canary_candidates is not None):
        flag = "--canary-repeats" if canary_repeats is not None else "--canary-candidates"
        raise ConfigError(f"{flag} only applies with canaries", "add --canaries K")


@app.command()
def recipes() -> None:
    """List the fine-tuning recipes (what `--recipe auto` chooses from)."""
    from rich.table import Table

    from labscale.adapt.recipes import RECIPES

    t = Table("recipe", "size", "task", "quant", "hardware", "LoRA r/alpha/dropout", "targets", "lr (schedule)",
              "batch × accum", "max len", "length", "eval/patience", "other")
    for r in RECIPES:
        targets = r.target_modules if isinstance(r.target_modules, str) else ",".join(r.target_modules)
        other = [x for x in ("grad-ckpt" if r.gradient_checkpointing else "", "packing" if r.packing else "",
                             r.optimizer if r.optimizer != "adamw_torch" else "") if x]
        t.add_row(r.name, r.size, r.task, r.quant, r.hardware, f"{r.lora_r}/{r.lora_alpha:g}/{r.lora_dropout:g}",
                  targets, f"{r.learning_rate:g} ({r.lr_scheduler})", f"{r.batch_size} × {r.grad_accum}",
                  str(r.max_seq_len), f"{r.max_steps} steps" if r.max_steps else f"{r.epochs:g} epochs",
                  f"{r.eval_every}/{r.patience}", ", ".join(other))
    _table_console().print(t)
    for r in RECIPES:
        if r.note:
            typer.echo(f"{r.name}: {r.note}")
    typer.echo("Size classes: tiny < 0.6B ≤ small < 4B ≤ 7b < 10B ≤ 13b. Task: generate, or short (classify, "
               "multiple choice). `--recipe auto` picks the matching row with the fewest `*`; override any field "
               "with --set FIELD=VALUE.")


distill_app = typer.Typer(no_args_is_help=True, help="Distil a teacher into a small student: on a task's train "
                          "inputs, or LaMini-style on generated instructions (see docs/distill.md).")
app.add_typer(distill_app, name="distill")

# Flags both `distill` commands share, declared once.
DISTILL_DB_OPT = typer.Option(None, "--db", help="the generation cache (default runs/distill.db)")
STUDENT_NAME_OPT = typer.Option(None, "--name", help="the student's name in its card")
DISTILL_SEED_OPT = typer.Option(None, help="seed (default 0, or --experiment's)")
DISTILL_BUDGET_OPT = typer.Option(None, "--budget", help="US $ cap for teacher and student together (default 25)")

# `labscale distill` spells config.DistillSpec's fields (FinetuneSpec's and its own) as flags; checks live there.
DISTILL_FLAGS = {**FINETUNE_FLAGS, "teacher_setting": "--teacher-setting"}


def _distill(values: dict, instructions: Optional[dict], experiment: Optional[Path], db: Optional[Path],
             max_new_tokens: Optional[int] = None, data_only: bool = False) -> None:
    from labscale.adapt.distill import run_distillation
    from labscale.adapt.recipes import parse_set
    from labscale.config import DistillSpec

    overrides = parse_set(values.pop("set_", None) or [])
    values = {**values, "overrides": overrides, "method": "distill"}
    if instructions is not None:
        values["instructions"] = {k: v for k, v in instructions.items() if v is not None}
    spec = DistillSpec.from_flags(values, DISTILL_FLAGS)
    exp = None
    if experiment is not None:
        from labscale.config import load_experiment

        exp = load_experiment(experiment)
    result = run_distillation(spec, exp, db, say=lambda m: typer.echo(m, err=True), max_new_tokens=max_new_tokens,
                              data_only=data_only)
    if data_only:
        typer.echo(f"dataset: {Path(result['folder']) / 'data.jsonl'}")
        return
    folder = Path(result.card["distillation"]["folder"])
    typer.echo(f"dataset: {folder / 'data.jsonl'}")
    typer.echo(f"student: {result.spec.id}")


@distill_app.command("task")
def distill_task(
    teacher: str = typer.Option(..., "--teacher", help="any model id (openai:, hf:, embedded:, adapter:), or a "
                                "model of --experiment"),
    student: str = typer.Option(..., "--student", help="embedded:<name> or hf:<hub id or local path>"),
    task: str = typer.Option(..., "--task", help="a builtin task, or one defined in --experiment"),
    teacher_setting: Optional[str] = typer.Option(None, "--teacher-setting", help="zero-shot (default) | "
                                                  "few-shot:K | cot (the default with --rationales)"),
    rationales: bool = typer.Option(False, "--rationales", help="distilling step-by-step: the teacher's cot "
                                    "rationale is a second (explain) training prompt"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="with --rationales: loss = α·predict + "
                                          "(1 − α)·explain (default 0.5)"),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="label the first N train inputs only"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="the teacher's output budget "
                                                 "(default 64; 256 with cot; or --experiment's generation)"),
    data_only: bool = typer.Option(False, "--data-only", help="stop after the teacher's dataset"),
    db: Optional[Path] = DISTILL_DB_OPT,
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the data and the student (default "
                                       "runs/distilled/<identity>)"),
    experiment: Optional[Path] = typer.Option(None, help="look --teacher, --student and --task up in this "
                                              "experiment file too (its decoding and seed apply)"),
    name: Optional[str] = STUDENT_NAME_OPT,
    quant: Optional[str] = QUANT_OPT,
    recipe: Optional[str] = RECIPE_OPT,
    max_steps: Optional[int] = MAX_STEPS_OPT,
    set_: Optional[list[str]] = SET_OPT,
    seed: Optional[int] = DISTILL_SEED_OPT,
    budget: Optional[float] = DISTILL_BUDGET_OPT,
    co2_cap: Optional[float] = CO2_CAP_OPT,
    hardware: Optional[str] = HARDWARE_OPT,
    price_per_hour: Optional[float] = PRICE_OPT,
    country: Optional[str] = COUNTRY_OPT,
    log: Optional[str] = LOG_OPT,
) -> None:
    """Task distillation: the teacher answers a task's train inputs; the student is fine-tuned on its answers."""
    _distill({"teacher": teacher, "student": student, "task": task, "teacher_setting": teacher_setting,
              "rationales": rationales, "alpha": alpha, "train_limit": train_limit, "name": name,
              "out": None if out is None else str(out.resolve()), "quantization": quant,
              "recipe": recipe, "max_steps": max_steps, "set_": set_, "seed": seed, "budget_usd": budget, "co2_cap_kg": co2_cap,
              "hardware": hardware, "price_per_hour": price_per_hour, "country": country, "log": log},
             None, experiment, db, max_new_tokens, data_only)


@distill_app.command("instructions")
def distill_instructions(
    teacher: str = typer.Option(..., "--teacher", help="any model id, or a model of --experiment"),
    student: str = typer.Option(..., "--student", help="embedded:<name> or hf:<hub id or local path>"),
    seeds: Optional[Path] = typer.Option(None, "--seeds", help="seed instructions: .txt one per line, or .jsonl "
                                         "with `instruction` (default: the packaged set)"),
    topics: Optional[Path] = typer.Option(None, "--topics", help="topics, one per line (default: the packaged "
                                          "list)"),
    count: Optional[int] = typer.Option(None, "--count", help="generated instructions to keep (default 100)"),
    per_prompt: Optional[int] = typer.Option(None, "--per-prompt", help="instructions asked per prompt (default "
                                             "20)"),
    topic_share: Optional[float] = typer.Option(None, "--topic-share", help="share of topic-guided prompts "
                                                "(default 0.5)"),
    no_seeds: bool = typer.Option(False, "--no-seeds", help="do not train on the seed instructions themselves"),
    generation_tokens: Optional[int] = typer.Option(None, "--generation-tokens", help="max_new_tokens of a "
                                                    "generation prompt (default 768)"),
    response_tokens: Optional[int] = typer.Option(None, "--response-tokens", help="max_new_tokens of a response "
                                                  "(default 256)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="of generation prompts (default 0)"),
    data_only: bool = typer.Option(False, "--data-only", help="stop after the dataset (e.g. to rate it)"),
    db: Optional[Path] = DISTILL_DB_OPT,
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the data and the student"),
    experiment: Optional[Path] = typer.Option(None, help="look --teacher and --student up in this experiment file"),
    name: Optional[str] = STUDENT_NAME_OPT,
    quant: Optional[str] = QUANT_OPT,
    recipe: Optional[str] = RECIPE_OPT,
    max_steps: Optional[int] = MAX_STEPS_OPT,
    set_: Optional[list[str]] = SET_OPT,
    seed: Optional[int] = DISTILL_SEED_OPT,
    budget: Optional[float] = DISTILL_BUDGET_OPT,
    co2_cap: Optional[float] = CO2_CAP_OPT,
    hardware: Optional[str] = HARDWARE_OPT,
    price_per_hour: Optional[float] = PRICE_OPT,
    country: Optional[str] = COUNTRY_OPT,
    log: Optional[str] = LOG_OPT,
) -> None:
    """Instruction distillation (LaMini): the teacher writes instructions and responses; the student learns them."""
    _distill({"teacher": teacher, "student": student, "name": name,
              "out": None if out is None else str(out.resolve()),
              "quantization": quant, "recipe": recipe, "max_steps": max_steps, "set_": set_, "seed": seed,
              "budget_usd": budget, "co2_cap_kg": co2_cap, "hardware": hardware, "price_per_hour": price_per_hour,
              "country": country, "log": log},
             {"seeds": None if seeds is None else str(seeds.resolve()),
              "topics": None if topics is None else str(topics.resolve()),
              "count": count, "per_prompt": per_prompt, "topic_share": topic_share,
              "include_seeds": False if no_seeds else None, "generation_tokens": generation_tokens,
              "response_tokens": response_tokens, "temperature": temperature}, experiment, db, None, data_only)


def _click_errors() -> tuple[type, type]:
    """(ClickException, UsageError) of the click typer runs on (typer may vendor its own copy of click)."""
    by_name = {c.__name__: c for c in typer.BadParameter.__mro__}
    return by_name["ClickException"], by_name["UsageError"]


def _usage_line(e: Exception) -> str:
    """A usage error from the argument parser as one line, `cause — fix`, like every other labscale error."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "labscale"
    helps = f"see `{command} --help`"
    message = " ".join(e.format_message().split()).rstrip(".")
    kind = type(e).__name__
    if kind == "NoSuchOption":
        close = getattr(e, "possibilities", None) or []
        guess = f"did you mean {close[0]}? " if close else ""
        return f"unknown option {getattr(e, 'option_name', '')} for `{command}` — {guess}{helps}"
    if kind == "BadParameter" and getattr(e, "param", None) is not None:
        param = e.param
        name = param.opts[0] if getattr(param, "opts", None) else param.name
        reason = message.split(": ", 1)[1] if ": " in message else message
        fix = next((f for word, f in (("integer", "give a whole number, "), ("number", "give a number, "),
                                      ("float", "give a number, ")) if f"valid {word}" in reason), "")
        return f"invalid value for {name}: {_lower(reason)} — {fix}{helps}"
    m = re.fullmatch(r"No such command '(.*)'\.(?: Did you mean '(.*)'\?)?", message)
    if m:
        guess = f"did you mean '{m.group(2)}'? " if m.group(2) else ""
        return f"unknown command '{m.group(1)}' — {guess}{helps}"
    return f"{_lower(message)} — {helps}"


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def main() -> None:
    from labscale.errors import LabscaleError

    click_exception, usage_error = _click_errors()
    try:
        # Parser errors come back as exceptions (not click's usage box), printed below as one line.
        code = app(prog_name="labscale", standalone_mode=False)
    except LabscaleError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; finished work is stored — run the same command again to resume", 130)
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `labscale` alone: the help was shown
            sys.exit(e.exit_code)
        _fail(_usage_line(e), 2)
    except click_exception as e:
        _fail(" ".join(e.format_message().split()), e.exit_code)
    else:
        if code == 130:  # typer turns Ctrl-C inside a command into exit code 130
            _fail("interrupted; finished work is stored — run the same command again to resume", 130)
        if isinstance(code, int) and code:
            sys.exit(code)


if __name__ == "__main__":
    main()
