"""Fine-tune a local model on a task with LoRA (or QLoRA: a 4-bit NF4 base with double quantization).

`prepare_job` resolves and validates everything without loading weights: the base model (embedded: or hf:), the
hardware class and its price, the recipe (auto or named, with overrides), the training and validation examples
(rendered exactly as evaluation renders them, see data.py), the optimizer steps, the adapter's identity and its
folder. `run_job` then trains:

1. loads the base (NF4 + double quantization for 4bit, compute in bf16 on CUDA, fp32 on CPU), attaches LoRA
   (peft) and builds TRL's SFTTrainer (with the completion-only head of trainer.py);
2. probes: times a few real micro-batches, estimates the whole run's time, $ and CO2eq, prints it, and refuses
   when a cap would be exceeded (nothing is left behind);
3. measures the dev loss before training, then trains: dev loss every `eval_every` steps, a checkpoint each time,
   early stopping after `patience` evaluations without improvement, the budget guard after every step;
4. saves the best checkpoint as a standard PEFT adapter in the folder, writes the `labscale.json` card last, and
   removes the checkpoints.

Identity = hash(base fingerprint, quantization, task, exact training/validation tokens, recipe, seed, processes,
and — when asked for — the DP settings and the canaries).
The default folder is `runs/adapters/<identity>`; a folder holding a finished adapter of the same identity is
reused as is. A folder with checkpoints of the same identity is resumed from its last complete checkpoint (the
Trainer restores optimizer, scheduler, RNG states and data position), so an interrupted run — Ctrl-C or kill -9 —
continues where it stopped when the same command is run again. Seeds: `seed` drives LoRA initialisation, dropout
and the data order (Trainer `seed` and `data_seed`), and is re-applied after the probe so the probe changes
nothing.

Privacy (optional): `dp` trains with DP-SGD instead of the Trainer (Opacus; see dp.py), and `canaries` adds secret
canaries to the training data and measures their exposure in the trained adapter (see canary.py); both go into
the card.

Multi-process: under `accelerate launch` (DDP; FSDP / DeepSpeed through accelerate configs, see
docs/finetune.md) every process runs this same code; the main process prints, measures energy and writes files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from labscale.adapt import card as cards
from labscale.adapt.budget import Budget, BudgetExceeded, Estimate, Hardware, hardware_class
from labscale.adapt.canary import DEFAULT_CANDIDATES, DEFAULT_REPEATS, CanarySpec
from labscale.adapt.carbon import carbon_intensity, check_country
from labscale.adapt.data import SplitData, build_split, digest
from labscale.adapt.recipes import Recipe, apply_overrides, describe, pick_recipe, size_class, task_kind
from labscale.adapt.tracking import check_tracking
from labscale.config import DPSpec, ModelSpec
from labscale.errors import ConfigError, LabscaleError
from labscale.hashing import sha
from labscale.models.hf import HFBackend
from labscale.settings.setting import PROMPT_FORMAT_VERSION
from labscale.tasks.base import Task

ADAPT_FORMAT = 1  # bump when what training does for the same inputs changes
DEFAULT_ADAPTERS_DIR = Path("runs") / "adapters"
CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
LEDGER_FILE = "ledger.json"
PROBE_BATCHES = 2  # timed micro-batches, after one untimed warm-up

Say = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class FinetuneOptions:
    model: ModelSpec
    task: Task
    recipe: str = "auto"
    overrides: dict = field(default_factory=dict)  # recipe field -> value
    max_steps: int | None = None
    out: Path | None = None
    adapters_dir: Path = DEFAULT_ADAPTERS_DIR
    log: str = "none"  # none | wandb | mlflow
    seed: int = 0
    budget_usd: float = 25.0
    co2_cap_kg: float | None = None
    hardware: str = "auto"  # auto | cpu | t4 | a100
    price_per_hour: float | None = None
    country: str = "USA"
    dp: DPSpec | None = None  # differentially private training (dp.py)
    canaries: int = 0  # secret canaries inserted into the training data (canary.py)
    canary_repeats: int = DEFAULT_REPEATS
    canary_candidates: int = DEFAULT_CANDIDATES


@dataclass
class Job:
    options: FinetuneOptions
    backend: HFBackend
    hardware: Hardware
    usd_per_hour: float
    recipe: Recipe
    train: SplitData
    dev: SplitData
    steps: int
    world_size: int
    identity: str
    out: Path
    state: str  # "new" | "resume" | "done"
    checkpoint: Path | None = None
    dp: object | None = None  # dp.DPPlan
    canaries: CanarySpec | None = None

    @property
    def quantization(self) -> str:
        return self.options.model.quantization

    def budget(self) -> Budget:
        return Budget(self.options.budget_usd, self.options.co2_cap_kg, self.usd_per_hour, self.world_size)


@dataclass
class FinetuneResult:
    out: Path
    card: dict
    reused: bool
    model: object | None = None  # the trained PeftModel (best checkpoint), when asked for


# ------------------------------------------------------------------------------------------------------ prepare


def _base_backend(spec: ModelSpec) -> HFBackend:
    from labscale.models.registry import resolve_model

    prefix = spec.id.partition(":")[0]
    if prefix not in ("embedded", "hf"):
        raise ConfigError(f"cannot fine-tune '{spec.id}'", "fine-tune a local model: embedded:<name> or "
                                                           "hf:<hub id or local path>")
    backend = resolve_model(spec)
    assert isinstance(backend, HFBackend)
    return backend


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written (the Trainer writes it last)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _folder_state(out: Path, identity: str) -> tuple[str, Path | None]:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"'{out}' is a file", "pass a folder with --out")
    card = cards.read_card(out)
    if card is not None:
        if card.get("identity") == identity and cards.is_finished(out):
            return "done", None
        raise ConfigError(f"'{out}' already holds an adapter trained with other settings "
                          f"(identity {card.get('identity')}; this run is {identity})",
                          "pass another --out, or delete that folder to train again")
    run = _read_json(out / CHECKPOINTS / RUN_FILE)
    if run is not None:
        if run.get("identity") != identity:
            raise ConfigError(f"'{out}' holds an unfinished training run with other settings "
                              f"(identity {run.get('identity')}; this run is {identity})",
                              "pass another --out, or delete that folder to start over")
        return "resume", _last_checkpoint(out / CHECKPOINTS)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not empty", "pass another --out (an empty or new folder)")
    return "new", None


def prepare_job(options: FinetuneOptions, world_size: int | None = None) -> Job:
    """Resolve and validate a fine-tuning job (tokenizer and config only; no weights)."""
    if options.budget_usd <= 0:
        raise ConfigError("the budget must be a positive number of dollars", "e.g. --budget 25")
    if options.co2_cap_kg is not None and options.co2_cap_kg <= 0:
        raise ConfigError("the CO2 cap must be a positive number of kg", "e.g. --co2-cap 0.5")
    if options.price_per_hour is not None and options.price_per_hour < 0:
        raise ConfigError("the price per hour cannot be negative", "e.g. --price-per-hour 0.35")
    check_tracking(options.log)
    country = check_country(options.country)
    options.country = country
    backend = _base_backend(options.model)
    hw = hardware_class(options.hardware)
    price = hw.usd_per_hour if options.price_per_hour is None else options.price_per_hour
    quant = options.model.quantization
    recipe = pick_recipe(options.recipe, size_class(backend.info.parameters), task_kind(options.task.type), quant,
                         hw.name)
    overrides = dict(options.overrides)
    if options.max_steps is not None:
        overrides["max_steps"] = options.max_steps
    recipe = apply_overrides(recipe, overrides)
    canaries = None
    if options.canaries:
        canaries = CanarySpec(options.canaries, options.canary_repeats, options.canary_candidates, options.seed)
        canaries.check()
    train = build_split(backend, options.task, "train", options.seed, recipe.max_seq_len)
    dev = build_split(backend, options.task, "dev", options.seed, recipe.max_seq_len)
    if canaries is not None:
        from labscale.adapt.canary import insert

        train = insert(train, backend, canaries)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    steps = recipe.steps(len(train.examples), world)
    dp = None
    if options.dp is not None:
        from labscale.adapt.dp import plan_dp

        if options.log != "none":
            raise ConfigError(f"--log {options.log} is not available with --dp", "use --log none")
        dp = plan_dp(options.dp, recipe, len(train.examples), steps, world)

    identity = sha({
        "format": ADAPT_FORMAT, "prompt_format": PROMPT_FORMAT_VERSION, "base": backend.info.fingerprint,
        "quantization": quant, "task": options.task.name, "data": digest(train, dev),
        "recipe": recipe.training_fields(), "steps": steps, "seed": options.seed, "processes": world,
        **({"dp": dp.identity()} if dp is not None else {}),
        **({"canaries": canaries.identity()} if canaries is not None else {}),
    })[:16]
    out = Path(options.out) if options.out is not None else Path(options.adapters_dir) / identity
    state, checkpoint = _folder_state(out, identity)
    return Job(options, backend, hw, price, recipe, train, dev, steps, world, identity, out, state, checkpoint, dp,
               canaries)


# ---------------------------------------------------------------------------------------------------------- run


def _precision() -> tuple[object, dict]:
    """(weights dtype, Trainer precision flags): bf16 on CUDA when supported, else fp16; fp32 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32, {"bf16": False, "fp16": False}
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, {"bf16": True, "fp16": False}
    return torch.float16, {"bf16": False, "fp16": True}


def _load_model(job: Job, device):
    import torch

    dtype, _ = _precision()
    if job.options.model.dtype != "auto":
        dtype = getattr(torch, job.options.model.dtype)
    model = job.backend.load_for_training(str(device), dtype)
    if job.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPU inference the first time a layer runs in eval
        # mode (validation), and that layout has no backward: it would corrupt every later training step.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=job.recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _sft_config(job: Job, report_to: list[str]):
    import torch
    from trl import SFTConfig

    r = job.recipe
    _, precision = _precision()
    return SFTConfig(
        output_dir=str(job.out / CHECKPOINTS), run_name=f"{job.options.task.name}-{job.identity}",
        per_device_train_batch_size=r.batch_size, per_device_eval_batch_size=r.batch_size,
        gradient_accumulation_steps=r.grad_accum, max_steps=job.steps,
        learning_rate=r.learning_rate, lr_scheduler_type=r.lr_scheduler, warmup_steps=r.warmup_ratio,
        weight_decay=r.weight_decay, max_grad_norm=r.max_grad_norm, optim=r.optimizer,
        eval_strategy="steps", eval_steps=r.eval_every, save_strategy="steps", save_steps=r.eval_every,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_strategy="steps", logging_steps=1, report_to=report_to, disable_tqdm=True, log_level="error",
        seed=job.options.seed, data_seed=job.options.seed, use_cpu=not torch.cuda.is_available(), **precision,
        gradient_checkpointing=r.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if r.gradient_checkpointing else None,
        max_length=r.max_seq_len, packing=r.packing,
        train_sampling_strategy="group_by_length" if r.batch_size > 1 and not r.packing else "random",
        include_num_input_tokens_seen="non_padding", prediction_loss_only=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def _lora_config(recipe: Recipe):
    from peft import LoraConfig

    return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=recipe.target_modules, bias="none", task_type="CAUSAL_LM")


def _probe(trainer, job: Job) -> float:
    """Training tokens/s per process: forward + backward of a few real micro-batches near the mean length (the first
    untimed), gradients then discarded."""
    import torch

    rows = job.train.rows()
    mean = sum(r["length"] for r in rows) / len(rows)
    order = sorted(rows, key=lambda r: abs(r["length"] - mean))
    size = job.recipe.batch_size
    batches = [order[i * size:(i + 1) * size] for i in range(PROBE_BATCHES + 1)]
    batches = [b for b in batches if b] or [order[:size]]
    model = trainer.model
    if job.recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tokens, seconds = 0, 0.0
    for i, batch in enumerate(batches):
        inputs = trainer._prepare_inputs(trainer.data_collator([{k: r[k] for k in ("input_ids", "labels")}
                                                                 for r in batch]))
        t0 = time.perf_counter()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i > 0 or len(batches) == 1:
            tokens += sum(r["length"] for r in batch)
            seconds += time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    for metrics in trainer._metrics.values():
        metrics.clear()
    return tokens / max(seconds, 1e-9)


def _estimate(job: Job, tps: float, done_steps: int, initial_eval: bool, ledger, carbon) -> Estimate:
    r = job.recipe
    remaining = max(job.steps - done_steps, 0)
    per_step = r.batch_size * r.grad_accum * job.train.tokens / len(job.train.examples)
    evals = job.steps // r.eval_every - done_steps // r.eval_every + (job.steps % r.eval_every != 0) + initial_eval
    kg_rate = spent_kg = None
    if carbon.enabled:  # the main process; CO2 extrapolates what was measured since this segment started
        now = carbon.emissions_kg()
        kg_rate = now / max(ledger.segment_seconds, 1e-9)
        spent_kg = ledger.prior_kg + now
    return job.budget().estimate(tps, remaining, per_step, evals, job.dev.tokens / job.world_size,
                                 ledger.total_seconds(), kg_rate, spent_kg or 0.0)


def _curves(log_history: list[dict]) -> tuple[list, list]:
    train = [[h["step"], round(h["loss"], 6)] for h in log_history if "loss" in h and "step" in h]
    dev = [[h["step"], round(h["eval_loss"], 6)] for h in log_history if "eval_loss" in h and "step" in h]
    return train, dev


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("labscale", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "codecarbon",
                "opacus"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _announce(job: Job, tell: Say) -> None:
    """What is about to be trained, with which recipe, data and price."""
    tell(f"fine-tuning {job.options.model.label} on {job.options.task.name} "
         f"({'QLoRA, 4-bit NF4 base' if job.quantization == '4bit' else 'LoRA'}"
         f"{', 8-bit base' if job.quantization == '8bit' else ''}{', DP-SGD' if job.dp else ''}) → {job.out}")
    for key, value in describe(job.recipe, job.steps):
        tell(f"  {key:<9} {value}")
    t, d = job.train.summary(), job.dev.summary()
    tell(f"  data      {t['examples']} train examples ({t['tokens']:,} tokens, {t['completion_tokens']:,} in "
         f"completions; {t['skipped_too_long']} skipped as longer than max_seq_len), {d['examples']} dev"
         + (f" ({d['skipped_too_long']} skipped)" if d["skipped_too_long"] else ""))
    if job.canaries is not None:
        from labscale.adapt.canary import DIGITS, PREFIX

        c = job.canaries
        tell(f"  canaries  {c.k} secrets \"{PREFIX} <{DIGITS} digits>\" × {c.repeats} copies in the train examples "
             f"(+ {c.k} controls not inserted); exposure against {c.candidates} random candidates after training")
    if job.dp is not None:
        tell(f"  privacy   {job.dp.describe()}")
    tell(f"  hardware  {job.hardware.name} ({job.hardware.description}) at ${job.usd_per_hour:g}/h"
         + (f" × {job.world_size} processes" if job.world_size > 1 else "") + f"; budget ${job.options.budget_usd:g}"
         + (f", CO2 cap {job.options.co2_cap_kg:g} kg" if job.options.co2_cap_kg is not None else ""))


def _start_run(job: Job, main: bool) -> dict:
    """The run record beside the checkpoints (identity, start, checkpoints resumed from, dev loss before)."""
    ckpt_dir = job.out / CHECKPOINTS
    run_info = _read_json(ckpt_dir / RUN_FILE) or {}
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        run_info.setdefault("identity", job.identity)
        run_info.setdefault("started_at", time.time())
        run_info.setdefault("resumed_from", [])
        if job.checkpoint is not None:
            run_info["resumed_from"].append(job.checkpoint.name)
        _write_run(job, run_info, main)
    return run_info


def _write_run(job: Job, run_info: dict, main: bool) -> None:
    if main:
        (job.out / CHECKPOINTS / RUN_FILE).write_text(json.dumps(run_info, indent=1))


@contextlib.contextmanager
def _metered(job: Job, ledger, carbon, existed: bool, main: bool):
    """Energy metering around a training segment. On failure the ledger is kept (a resumed run counts what was
    spent), except that a fresh start refused as bad input (e.g. over budget) leaves nothing behind."""
    carbon.start()
    try:
        yield
    except BaseException as e:
        ledger.kwh, ledger.kg = carbon.stop()
        if isinstance(e, LabscaleError) and job.state == "new":
            if main:
                shutil.rmtree(job.out if not existed else job.out / CHECKPOINTS, ignore_errors=True)
        else:
            ledger.save()
        raise
    ledger.kwh, ledger.kg = carbon.stop()
    ledger.save()


def _refuse_over_budget(job: Job, est: Estimate, tell: Say, device=None) -> None:
    from labscale.adapt.callbacks import any_rank

    tell(f"  estimate  {est.line()} — budget ${job.options.budget_usd:g}")
    refused = None
    try:
        job.budget().check(est)
    except BudgetExceeded as e:
        refused = e
    if any_rank(refused is not None, device):
        raise refused or BudgetExceeded("another process's estimate exceeds the budget", "see its message")


def _measure_canaries(job: Job, model) -> dict | None:
    from labscale.adapt.canary import measure

    return measure(job.backend, model, job.canaries) if job.canaries is not None else None


def _finish(job: Job, card: dict, tell: Say) -> None:
    """Write the card (last: the folder is now a finished adapter), drop the checkpoints, print the outcome."""
    cards.write_card(job.out, card)
    shutil.rmtree(job.out / CHECKPOINTS, ignore_errors=True)
    s = card["summary"]
    loss = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    tell(f"adapter: {job.out} · {s['steps']} steps ({card['stopped']}) · dev loss {loss(s['dev_loss_before'])} → "
         f"{loss(s['best_dev_loss'])} (best, step {card['training']['best_step']}) · {s['wall_s'] / 60:.1f} min · "
         f"{(s['tokens_per_s'] or 0):,.0f} tokens/s · ${s['cost_usd']:.4f} · "
         f"{s['co2eq_kg'] * 1000:.2f} g CO2eq")
    if s.get("dp"):
        p = s["dp"]
        spent = math.floor(p["epsilon_spent"] * 1000) / 1000  # rounded down: never shown above the target
        tell(f"privacy: ε {spent:.3f} spent of {p['epsilon_target']:g} at δ {p['delta']:.3g} "
             f"(noise multiplier {p['noise_multiplier']:.3f}, per-example clip {p['max_grad_norm']:g})")
    if s.get("canaries"):
        c = s["canaries"]
        tell(f"canaries: exposure {c['exposure_mean']:.2f} [{c['exposure_ci_low']:.2f}, {c['exposure_ci_high']:.2f}] "
             f"bits, max {c['exposure_max']:.2f}, of at most {card['canaries']['exposure_measurable_max']:.2f} "
             f"measurable ({c['candidates']} candidates; log2|R| = {c['space_bits']:.2f}); controls "
             f"{c['control_exposure_mean']:.2f}")
    tell(f"evaluate it as the model adapter:{job.out}")


def run_job(job: Job, say: Say = _stderr, callbacks: tuple = (), keep_model: bool = False) -> FinetuneResult:
    """Train (or resume, or reuse) the adapter of a prepared job; returns its folder and card."""
    if job.state == "done":
        if int(os.environ.get("RANK", "0")) == 0:
            say(f"adapter already trained with these settings: {job.out} (identity {job.identity}) — reusing it")
        return FinetuneResult(job.out, cards.read_card(job.out), True)
    if job.dp is not None:
        from labscale.adapt.dp import run_dp_job

        return run_dp_job(job, say, callbacks, keep_model)

    import warnings

    import datasets
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed
    from transformers.utils import logging as hf_logging

    from labscale.adapt.callbacks import BudgetGuard, Clock, Progress
    from labscale.adapt.carbon import CarbonMeter
    from labscale.adapt.ledger import Ledger
    from labscale.adapt.tracking import report_to
    from labscale.adapt.trainer import CompletionSFTTrainer
    from labscale.efficiency.meter import PeakRSS

    hf_logging.set_verbosity_error()  # labscale prints its own progress
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(gradient checkpointing|use_cache|torch.utils.checkpoint).*")
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    existed = job.out.exists()
    ckpt_dir = job.out / CHECKPOINTS
    cfg = _sft_config(job, report_to(job.options.log, job.out, f"{job.options.task.name}-{job.identity}"))
    main = cfg.process_index == 0

    def tell(msg: str) -> None:
        if main:
            say(msg)

    r = job.recipe
    _announce(job, tell)
    run_info = _start_run(job, main)
    ledger = Ledger(ckpt_dir / LEDGER_FILE, writable=main)
    carbon = CarbonMeter(job.options.country, enabled=main, machine=job.world_size > 1)
    clock = Clock()
    guard = BudgetGuard(job.budget(), ledger, carbon, carbon_intensity(job.options.country))
    cbs = [clock, guard, Progress(tell, clock, job.budget(), ledger), *callbacks]
    if r.patience > 0:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=r.patience))

    with PeakRSS() as mem, _metered(job, ledger, carbon, existed, main):
        if job.checkpoint is not None:
            tell(f"resuming from {job.checkpoint.name}")
        set_seed(job.options.seed)
        model = _load_model(job, str(cfg.device))
        dev_rows = sorted(job.dev.rows(), key=lambda row: row["length"])  # similar lengths batch together
        trainer = CompletionSFTTrainer(
            model=model, args=cfg, train_dataset=datasets.Dataset.from_list(job.train.rows()),
            eval_dataset=datasets.Dataset.from_list(dev_rows), processing_class=job.backend.tokenizer,
            peft_config=_lora_config(r), callbacks=cbs,
        )
        trainer.remove_callback(PrinterCallback)  # progress lines come from `Progress`
        done = 0
        if job.checkpoint is not None:
            done = int((_read_json(job.checkpoint / "trainer_state.json") or {}).get("global_step", 0))
        tps = _probe(trainer, job)
        fresh = "dev_loss_before" not in run_info
        est = _estimate(job, tps, done, fresh, ledger, carbon)
        _refuse_over_budget(job, est, tell, cfg.device)
        if fresh:
            before = trainer.evaluate()["eval_loss"]
            tell(f"dev loss {before:.4f} before training")
            run_info["dev_loss_before"] = before
            _write_run(job, run_info, main)
        set_seed(job.options.seed)  # training does not depend on the probe
        trainer.train(resume_from_checkpoint=str(job.checkpoint) if job.checkpoint else None)
    trainer.save_model(str(job.out))
    state = trainer.state
    stopped = guard.stopped or ("early_stopping" if state.global_step < job.steps else "max_steps")
    if main:
        canaries = _measure_canaries(job, trainer.model)
        card = _card(job, _sft_training(job, trainer, run_info, ledger, clock, mem.peak_bytes), ledger, est,
                     stopped, canaries=canaries)
        _finish(job, card, tell)
    else:
        card = {}
    trainer.accelerator.wait_for_everyone()
    model = trainer.model if keep_model else None
    if not keep_model:
        del trainer
    return FinetuneResult(job.out, card, False, model)


def _peak_accelerator_bytes() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _sft_training(job: Job, trainer, run_info: dict, ledger, clock, peak_rss: int) -> dict:
    state = trainer.state
    train_curve, dev_curve = _curves(state.log_history)
    return {
        "steps": state.global_step, "max_steps": job.steps, "epochs": round(state.epoch or 0.0, 4),
        "processes": job.world_size, "distributed": str(trainer.args.distributed_state.distributed_type),
        "backend": trainer.args.distributed_state.backend,
        "best_step": state.best_global_step or (dev_curve[-1][0] if dev_curve else state.global_step),
        "dev_loss_before": run_info.get("dev_loss_before"), "best_dev_loss": state.best_metric,
        "train_loss_curve": train_curve, "dev_loss_curve": dev_curve,
        "train_tokens": state.num_input_tokens_seen, "train_tokens_per_s": clock.tokens_per_s(state),
        "wall_s": ledger.total_seconds(), "segments": ledger.segments(),
        "resumed_from": run_info.get("resumed_from", []),
        "peak_rss_bytes": peak_rss, "peak_accelerator_bytes": _peak_accelerator_bytes(),
    }


def _card(job: Job, training: dict, ledger, est: Estimate, stopped: str, dp: dict | None = None,
          canaries: dict | None = None) -> dict:

    info = job.backend.info
    seconds = ledger.total_seconds()
    budget = job.budget()
    card = {
        "labscale_card": cards.CARD_VERSION,
        "identity": job.identity,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "stopped": stopped,
        "base_model": {"id": job.options.model.id, "name": info.name, "fingerprint": info.fingerprint,
                       "source": job.backend.source, "parameters": info.parameters,
                       "size_class": size_class(info.parameters), "quantization": job.quantization},
        "task": {"name": job.options.task.name, "type": job.options.task.type, "train_split": "train",
                 "dev_split": "dev", "prompt": "the finetuned setting's prompt: zero-shot, rendered as evaluation "
                                           "renders it", "prompt_format_version": PROMPT_FORMAT_VERSION},
        "data": {"train": job.train.summary(), "dev": job.dev.summary(), "digest": digest(job.train, job.dev)},
        "recipe": job.recipe.model_dump(mode="json"),
        "seed": job.options.seed,
        "training": training,
        "accounting": {
            "hardware": job.hardware.name, "hardware_description": job.hardware.description,
            "usd_per_hour": job.usd_per_hour,
            "price_source": "--price-per-hour" if job.options.price_per_hour is not None
            else "labscale default table (as of 2025-06, see docs/finetune.md)",
            "devices": job.world_size, "hours": seconds / 3600, "cost_usd": budget.usd(seconds),
            "energy_kwh": ledger.total_kwh(), "co2eq_kg": ledger.total_kg(),
            "country_iso_code": job.options.country,
            "carbon_intensity_g_per_kwh": carbon_intensity(job.options.country),
            "measured_by": "CodeCarbon OfflineEmissionsTracker", "budget_usd": job.options.budget_usd,
            "co2_cap_kg": job.options.co2_cap_kg, "estimate": est.as_dict(),
        },
        "dp": dp,
        "canaries": canaries,
        "environment": _versions(),
    }
    card["summary"] = cards.summary(card)
    return card


def finetune(options: FinetuneOptions, say: Say = _stderr, **kw) -> FinetuneResult:
    return run_job(prepare_job(options), say, **kw)
