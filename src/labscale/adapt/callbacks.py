"""Trainer callbacks: progress lines, and the budget guard that stops training before a cap would be crossed.

Durations come from an injected clock (default `time.monotonic`; the session passes its own), so the budget logic
can be tested on a fake clock."""

from __future__ import annotations

import time
from typing import Callable

from transformers import TrainerCallback

from labscale.adapt.budget import Budget
from labscale.adapt.carbon import CarbonMeter
from labscale.adapt.ledger import Ledger


def any_rank(flag: bool, device) -> bool:
    """True when `flag` holds on any process (one all-reduce under DDP), so every rank takes the same decision."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class TrainTimer(TrainerCallback):
    """Training time without validation, and tokens/s over it (for progress lines and the card)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.begin = None
        self.eval_s = 0.0
        self.tokens_at_begin = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = self.clock()
        self.tokens_at_begin = state.num_input_tokens_seen

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.begin is not None:  # validation inside training (not the dev loss measured before it)
            self.eval_s += float((metrics or {}).get("eval_runtime", 0.0))

    def train_seconds(self) -> float:
        return 0.0 if self.begin is None else max(self.clock() - self.begin - self.eval_s, 1e-9)

    def tokens_per_s(self, state) -> float | None:
        tokens = state.num_input_tokens_seen - self.tokens_at_begin
        return tokens / self.train_seconds() if self.begin is not None and tokens > 0 else None


class Progress(TrainerCallback):
    """One line per logged step (about 20 per run) and one per validation, on the main process."""

    def __init__(self, say: Callable[[str], None], timer: TrainTimer, budget: Budget, ledger: Ledger):
        self.say, self.timer, self.budget, self.ledger = say, timer, budget, ledger

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        every = max(1, state.max_steps // 20)
        if "loss" in logs and (state.global_step % every == 0 or state.global_step in (1, state.max_steps)):
            tps = self.timer.tokens_per_s(state)
            spent = self.ledger.total_seconds()
            self.say(f"step {state.global_step}/{state.max_steps} · loss {logs['loss']:.4f} · "
                     f"lr {logs.get('learning_rate', 0):.2e} · "
                     + (f"{tps:,.0f} tokens/s · " if tps else "")
                     + f"{spent / 60:.1f} min · ${self.budget.usd(spent):.4f}")
        if "eval_loss" in logs and state.global_step > 0:  # step 0: the dev loss before training
            best = state.best_metric is None or logs["eval_loss"] <= state.best_metric
            self.say(f"dev loss {logs['eval_loss']:.4f} at step {state.global_step}" + (" (best)" if best else ""))


class BudgetGuard(TrainerCallback):
    """After each step: stop when spent + next step + a final validation would cross the $ or CO2 cap.

    Also keeps the ledger current (time every step, emissions at every checkpoint). Step durations are timed on
    `clock`; validation durations are reported to it (the Trainer's `eval_runtime`, or `evaluated(seconds)`)."""

    def __init__(self, budget: Budget, ledger: Ledger, carbon: CarbonMeter, intensity: float | None,
                 clock: Callable[[], float] = time.monotonic):
        self.budget, self.ledger, self.carbon, self.intensity = budget, ledger, carbon, intensity
        self.clock = clock
        self.stopped: str | None = None
        self._t0 = None
        self.step_s: list[float] = []
        self.eval_s: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_runtime" in metrics:
            self.evaluated(float(metrics["eval_runtime"]))

    def on_save(self, args, state, control, **kwargs):
        self.saved()

    def on_step_end(self, args, state, control, **kwargs):
        reason = self.step_ended(state.is_world_process_zero)
        if any_rank(reason is not None, args.device) and state.global_step < state.max_steps:
            self.stopped = reason or "budget"
            control.should_training_stop = True
            if state.best_metric is None:  # no validated checkpoint yet: make one now
                control.should_evaluate = True
                control.should_save = True

    # the guard itself, also driven directly by the DP training loop (dp.py)

    def step_started(self) -> None:
        self._t0 = self.clock()

    def evaluated(self, seconds: float) -> None:
        self.eval_s.append(seconds)

    def _measure(self) -> None:
        self.ledger.kg = self.carbon.emissions_kg()
        if self.intensity:
            self.ledger.kwh = self.ledger.kg * 1000 / self.intensity

    def saved(self) -> None:
        self._measure()
        self.ledger.save()

    def step_ended(self, main: bool = True) -> str | None:
        """After a step: "budget" or "co2" when the next step and a final validation would cross a cap."""
        if self._t0 is not None:
            self.step_s.append(self.clock() - self._t0)
        recent = self.step_s[-5:]
        step = max(recent) if recent else 0.0
        final_eval = max(self.eval_s[-3:]) if self.eval_s else step
        ahead = 2 * step + final_eval  # the next step (with margin) and a last validation + checkpoint
        spent = self.ledger.total_seconds()
        reason = None
        if self.budget.usd(spent + ahead) > self.budget.cap_usd:
            reason = "budget"
        elif self.budget.cap_kg is not None and main:
            self._measure()
            rate = self.ledger.kg / max(self.ledger.segment_seconds, 1e-9)
            if self.ledger.total_kg() + rate * ahead > self.budget.cap_kg:
                reason = "co2"
        self.ledger.save()
        return reason
