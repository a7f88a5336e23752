"""One fine-tuning session: everything a training run does that does not depend on how it trains.

`FinetuneSession(job, say, clock).run(training)` runs a prepared job (finetune.py) with a `TrainingRun`, which
supplies what differs between the Trainer path (sft.py: TRL's SFTTrainer) and DP-SGD (dp.py): how the model and
trainer are built, probed, evaluated, trained and saved. The session owns the rest, in this order:

1. announce what is about to be trained (recipe, data, canaries, privacy, hardware, price, caps);
2. the run record `checkpoints/run.json` (identity, start, checkpoints resumed from, dev loss before training);
3. the ledger (wall time and CO2eq of every segment, ledger.py) and CodeCarbon metering around the work — on
   failure the ledger is kept (a resumed run counts what was spent), except that a fresh start refused as bad
   input (e.g. over budget) leaves nothing behind;
4. after the training's probe: the estimate of the whole run's time, $ and CO2eq, printed, and a refusal when a
   cap would be exceeded (budget.py); then the dev loss before training, once per run (not again on resume);
5. the budget guard (callbacks.BudgetGuard) that the training consults after every step;
6. canary exposure of the trained model (canary.py), the card (card.py), written last, the checkpoints removed,
   and the outcome printed.

Durations (ledger, guard, probe) come from the session's `clock` (default `time.monotonic`), so a test can run the
budget logic on a fake clock. Under `accelerate launch` only the main process (`training.main`) prints, measures
energy and writes files.
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
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from labscale.adapt import card as cards
from labscale.adapt.budget import BudgetExceeded, Estimate
from labscale.adapt.carbon import carbon_intensity
from labscale.adapt.data import digest
from labscale.adapt.recipes import describe, size_class
from labscale.errors import LabscaleError
from labscale.settings.setting import PROMPT_FORMAT_VERSION

if TYPE_CHECKING:
    from labscale.adapt.callbacks import BudgetGuard
    from labscale.adapt.carbon import CarbonMeter
    from labscale.adapt.finetune import Job
    from labscale.adapt.ledger import Ledger

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
LEDGER_FILE = "ledger.json"
PROBE_BATCHES = 2  # timed micro-batches, after one untimed warm-up

Say = Callable[[str], None]
Clock = Callable[[], float]  # seconds, monotonic


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class FinetuneResult:
    out: Path
    card: dict
    reused: bool
    model: object | None = None  # the trained PeftModel (best checkpoint), when asked for


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ shared by both trainers


def precision() -> tuple[object, dict]:
    """(weights dtype, Trainer precision flags): bf16 on CUDA when supported, else fp16; fp32 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32, {"bf16": False, "fp16": False}
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, {"bf16": True, "fp16": False}
    return torch.float16, {"bf16": False, "fp16": True}


def load_base(job: Job, device):
    """The base weights, ready for LoRA training: the precision above (or the model entry's dtype), quantized as
    the entry says (k-bit layers prepared for training)."""
    import torch

    dtype, _ = precision()
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


def peak_accelerator_bytes() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def versions() -> dict:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("labscale", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "codecarbon",
                "opacus"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class TrainingRun(ABC):
    """What a way of training supplies to the session (see the module docstring)."""

    main: bool = True  # this process prints, measures energy and writes files
    device: object = None  # the device for cross-process decisions (callbacks.any_rank); None: a single process

    @abstractmethod
    def load(self, session: FinetuneSession) -> None:
        """Build the model and the trainer; restore the job's checkpoint, if any. Runs metered."""

    @abstractmethod
    def done_steps(self) -> int:
        """Optimizer steps already taken (those of the checkpoint resumed from)."""

    @abstractmethod
    def probe(self, clock: Clock) -> float:
        """Training tokens/s per process, timed on `clock`; changes nothing."""

    @abstractmethod
    def evaluate(self) -> float:
        """The dev loss now."""

    @abstractmethod
    def train(self, session: FinetuneSession) -> str:
        """Train to the end (consulting `session.guard`); why it stopped: max_steps | early_stopping | budget |
        co2."""

    @abstractmethod
    def save(self, out: Path):
        """Save the best checkpoint as a standard PEFT adapter in `out`; returns the trained model."""

    @abstractmethod
    def training_card(self, session: FinetuneSession) -> dict:
        """The card's `training` section."""

    def privacy_card(self) -> dict | None:
        """The card's `dp` section (None: not private)."""
        return None

    def close(self, keep_model: bool) -> None:
        """After the card: wait for the other processes, free what is not kept."""


class FinetuneSession:
    """The shared part of training one job (see the module docstring). After `run` starts: `run_info` (the run
    record), `ledger`, `carbon`, `guard`, `estimate` and, after training, `peak_rss`."""

    ledger: Ledger
    carbon: CarbonMeter
    guard: BudgetGuard

    def __init__(self, job: Job, say: Say = stderr, clock: Clock = time.monotonic):
        self.job, self.say, self.clock = job, say, clock
        self.existed = job.out.exists()
        self.main = True
        self.run_info: dict = {}
        self.estimate: Estimate | None = None
        self.peak_rss = 0

    def tell(self, msg: str) -> None:
        if self.main:
            self.say(msg)

    def run(self, training: TrainingRun, keep_model: bool = False) -> FinetuneResult:
        from transformers.utils import logging as hf_logging

        from labscale.adapt.callbacks import BudgetGuard
        from labscale.adapt.carbon import CarbonMeter
        from labscale.adapt.ledger import Ledger

        hf_logging.set_verbosity_error()  # labscale prints its own progress
        job = self.job
        self.main = training.main
        self.announce()
        self.start_record()
        self.ledger = Ledger(job.out / CHECKPOINTS / LEDGER_FILE, writable=self.main, clock=self.clock)
        self.carbon = CarbonMeter(job.country, enabled=self.main, machine=job.world_size > 1)
        self.guard = BudgetGuard(job.budget(), self.ledger, self.carbon, carbon_intensity(job.country),
                                 clock=self.clock)
        with self.metered():
            if job.checkpoint is not None:
                self.tell(f"resuming from {job.checkpoint.name}")
            training.load(self)
            tps = training.probe(self.clock)
            fresh = "dev_loss_before" not in self.run_info
            self.estimate = self.check_budget(tps, training.done_steps(), fresh, training.device)
            if fresh:
                before = training.evaluate()
                self.tell(f"dev loss {before:.4f} before training")
                self.run_info["dev_loss_before"] = before
                self.write_record()
            stopped = training.train(self)
        model = training.save(job.out)
        card: dict = {}
        if self.main:
            card = self.card(training.training_card(self), stopped, training.privacy_card(),
                             self.measure_canaries(model))
            self.finish(card)
        training.close(keep_model)
        return FinetuneResult(job.out, card, False, model if keep_model else None)

    # ------------------------------------------------------------------------------------------- the steps

    def announce(self) -> None:
        """What is about to be trained, with which recipe, data and price."""
        job, tell = self.job, self.tell
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
            tell(f"  canaries  {c.k} secrets \"{PREFIX} <{DIGITS} digits>\" × {c.repeats} copies in the train "
                 f"examples (+ {c.k} controls not inserted); exposure against {c.candidates} random candidates "
                 "after training")
        if job.dp is not None:
            tell(f"  privacy   {job.dp.describe()}")
        tell(f"  hardware  {job.hardware.name} ({job.hardware.description}) at ${job.usd_per_hour:g}/h"
             + (f" × {job.world_size} processes" if job.world_size > 1 else "")
             + f"; budget ${job.options.budget_usd:g}"
             + (f", CO2 cap {job.options.co2_cap_kg:g} kg" if job.options.co2_cap_kg is not None else ""))

    def start_record(self) -> None:
        """The run record beside the checkpoints (identity, start, checkpoints resumed from, dev loss before)."""
        job = self.job
        ckpt_dir = job.out / CHECKPOINTS
        self.run_info = read_json(ckpt_dir / RUN_FILE) or {}
        if self.main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.run_info.setdefault("identity", job.identity)
            self.run_info.setdefault("started_at", time.time())
            self.run_info.setdefault("resumed_from", [])
            if job.checkpoint is not None:
                self.run_info["resumed_from"].append(job.checkpoint.name)
            self.write_record()

    def write_record(self) -> None:
        if self.main:
            (self.job.out / CHECKPOINTS / RUN_FILE).write_text(json.dumps(self.run_info, indent=1))

    @contextlib.contextmanager
    def metered(self):
        """Energy metering and peak memory around a training segment; the ledger saved at the end (see the module
        docstring for what a failure leaves behind)."""
        from labscale.efficiency.meter import PeakRSS

        job, ledger, carbon = self.job, self.ledger, self.carbon
        with PeakRSS() as mem:
            carbon.start()
            try:
                yield
            except BaseException as e:
                ledger.kwh, ledger.kg = carbon.stop()
                if isinstance(e, LabscaleError) and job.state == "new":
                    if self.main:
                        shutil.rmtree(job.out if not self.existed else job.out / CHECKPOINTS, ignore_errors=True)
                else:
                    ledger.save()
                raise
            ledger.kwh, ledger.kg = carbon.stop()
            ledger.save()
        self.peak_rss = mem.peak_bytes

    def check_budget(self, tokens_per_s: float, done_steps: int, initial_eval: bool, device=None) -> Estimate:
        """The estimate for the rest of the run, printed; BudgetExceeded (on every process) when over a cap."""
        from labscale.adapt.callbacks import any_rank

        job, ledger, carbon = self.job, self.ledger, self.carbon
        r = job.recipe
        remaining = max(job.steps - done_steps, 0)
        per_step = r.batch_size * r.grad_accum * job.train.tokens / len(job.train.examples)
        evals = (job.steps // r.eval_every - done_steps // r.eval_every + (job.steps % r.eval_every != 0)
                 + initial_eval)
        kg_rate = spent_kg = None
        if carbon.enabled:  # the main process; CO2 extrapolates what was measured since this segment started
            now = carbon.emissions_kg()
            kg_rate = now / max(ledger.segment_seconds, 1e-9)
            spent_kg = ledger.prior_kg + now
        est = job.budget().estimate(tokens_per_s, remaining, per_step, evals, job.dev.tokens / job.world_size,
                                    ledger.total_seconds(), kg_rate, spent_kg or 0.0)
        self.tell(f"  estimate  {est.line()} — budget ${job.options.budget_usd:g}")
        refused = None
        try:
            job.budget().check(est)
        except BudgetExceeded as e:
            refused = e
        if any_rank(refused is not None, device):
            raise refused or BudgetExceeded("another process's estimate exceeds the budget", "see its message")
        return est

    def measure_canaries(self, model) -> dict | None:
        from labscale.adapt.canary import measure

        return measure(self.job.backend, model, self.job.canaries) if self.job.canaries is not None else None

    def card(self, training: dict, stopped: str, dp: dict | None = None, canaries: dict | None = None) -> dict:
        job, ledger = self.job, self.ledger
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
                     "dev_split": "dev", "prompt": "the finetuned setting's prompt: zero-shot, rendered as "
                                               "evaluation renders it", "prompt_format_version": PROMPT_FORMAT_VERSION},
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
                "country_iso_code": job.country,
                "carbon_intensity_g_per_kwh": carbon_intensity(job.country),
                "measured_by": "CodeCarbon OfflineEmissionsTracker", "budget_usd": job.options.budget_usd,
                "co2_cap_kg": job.options.co2_cap_kg, "estimate": self.estimate.as_dict() if self.estimate else None,
            },
            "dp": dp,
            "canaries": canaries,
            "environment": versions(),
        }
        card["summary"] = cards.summary(card)
        return card

    def finish(self, card: dict) -> None:
        """Write the card (last: the folder is now a finished adapter), drop the checkpoints, print the outcome."""
        job, tell = self.job, self.tell
        cards.write_card(job.out, card)
        shutil.rmtree(job.out / CHECKPOINTS, ignore_errors=True)
        s = card["summary"]
        loss = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        tell(f"adapter: {job.out} · {s['steps']} steps ({card['stopped']}) · dev loss "
             f"{loss(s['dev_loss_before'])} → {loss(s['best_dev_loss'])} (best, step "
             f"{card['training']['best_step']}) · {s['wall_s'] / 60:.1f} min · {(s['tokens_per_s'] or 0):,.0f} "
             f"tokens/s · ${s['cost_usd']:.4f} · {s['co2eq_kg'] * 1000:.2f} g CO2eq")
        if s.get("dp"):
            p = s["dp"]
            spent = math.floor(p["epsilon_spent"] * 1000) / 1000  # rounded down: never shown above the target
            tell(f"privacy: ε {spent:.3f} spent of {p['epsilon_target']:g} at δ {p['delta']:.3g} "
                 f"(noise multiplier {p['noise_multiplier']:.3f}, per-example clip {p['max_grad_norm']:g})")
        if s.get("canaries"):
            c = s["canaries"]
            tell(f"canaries: exposure {c['exposure_mean']:.2f} [{c['exposure_ci_low']:.2f}, "
                 f"{c['exposure_ci_high']:.2f}] bits, max {c['exposure_max']:.2f}, of at most "
                 f"{card['canaries']['exposure_measurable_max']:.2f} measurable ({c['candidates']} candidates; "
                 f"log2|R| = {c['space_bits']:.2f}); controls {c['control_exposure_mean']:.2f}")
        tell(f"evaluate it as the model adapter:{job.out}")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
