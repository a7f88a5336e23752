"""LoRA / QLoRA training with TRL's SFTTrainer (the completion-only head of trainer.py): the `TrainingRun` of every
job without DP (DP-SGD is dp.py). The session (session.py) does the announcing, metering, budget and card.

1. loads the base (session.load_base: NF4 + double quantization for 4bit, compute in bf16 on CUDA, fp32 on CPU),
   attaches the recipe's LoRA (peft) and builds the SFTTrainer;
2. probes: times a few real micro-batches forward + backward (gradients discarded) for the session's estimate;
3. trains: dev loss every `eval_every` steps, a checkpoint each time, early stopping after `patience`
   evaluations without improvement, the session's budget guard after every step; resumes from the job's
   checkpoint (the Trainer restores optimizer, scheduler, RNG states and data position);
4. saves the best checkpoint as a standard PEFT adapter.

Seeds: `seed` drives LoRA initialisation, dropout and the data order (Trainer `seed` and `data_seed`), and is
re-applied after the probe so the probe changes nothing. Multi-process (`accelerate launch`): every process runs
this; `main` is process 0.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from labscale.adapt.session import (
    CHECKPOINTS,
    PROBE_BATCHES,
    Clock,
    FinetuneSession,
    TrainingRun,
    load_base,
    peak_accelerator_bytes,
    precision,
    read_json,
)

if TYPE_CHECKING:
    from labscale.adapt.callbacks import TrainTimer
    from labscale.adapt.trainer import CompletionSFTTrainer


def sft_config(job, report_to: list[str]):
    import torch
    from trl import SFTConfig

    r = job.recipe
    _, flags = precision()
    return SFTConfig(
        output_dir=str(job.out / CHECKPOINTS), run_name=f"{job.options.task.name}-{job.identity}",
        per_device_train_batch_size=r.batch_size, per_device_eval_batch_size=r.batch_size,
        gradient_accumulation_steps=r.grad_accum, max_steps=job.steps,
        learning_rate=r.learning_rate, lr_scheduler_type=r.lr_scheduler, warmup_steps=r.warmup_ratio,
        weight_decay=r.weight_decay, max_grad_norm=r.max_grad_norm, optim=r.optimizer,
        eval_strategy="steps", eval_steps=r.eval_every, save_strategy="steps", save_steps=r.eval_every,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_strategy="steps", logging_steps=1, report_to=report_to, disable_tqdm=True, log_level="error",
        seed=job.options.seed, data_seed=job.options.seed, use_cpu=not torch.cuda.is_available(), **flags,
        gradient_checkpointing=r.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if r.gradient_checkpointing else None,
        max_length=r.max_seq_len, packing=r.packing,
        train_sampling_strategy="group_by_length" if r.batch_size > 1 and not r.packing else "random",
        include_num_input_tokens_seen="non_padding", prediction_loss_only=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def _curves(log_history: list[dict]) -> tuple[list, list]:
    train = [[h["step"], round(h["loss"], 6)] for h in log_history if "loss" in h and "step" in h]
    dev = [[h["step"], round(h["eval_loss"], 6)] for h in log_history if "eval_loss" in h and "step" in h]
    return train, dev


class SFTRun(TrainingRun):
    """The Trainer path (see the module docstring); `callbacks`: extra TrainerCallbacks (tests, tracking)."""

    trainer: CompletionSFTTrainer  # once loaded
    timer: TrainTimer

    def __init__(self, job, callbacks: tuple = ()):
        import datasets
        from transformers.utils import logging as hf_logging

        from labscale.adapt.tracking import report_to

        hf_logging.set_verbosity_error()  # labscale prints its own progress
        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(gradient checkpointing|use_cache|torch.utils.checkpoint).*")
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        self.job, self.callbacks = job, callbacks
        self.cfg = sft_config(job, report_to(job.options.log, job.out, f"{job.options.task.name}-{job.identity}"))
        self.main = self.cfg.process_index == 0
        self.device = self.cfg.device

    def load(self, session: FinetuneSession) -> None:
        import datasets
        from transformers import EarlyStoppingCallback, PrinterCallback, set_seed

        from labscale.adapt.callbacks import Progress, TrainTimer
        from labscale.adapt.trainer import CompletionSFTTrainer

        job, r = self.job, self.job.recipe
        self.timer = TrainTimer(session.clock)
        cbs = [self.timer, session.guard, Progress(session.tell, self.timer, job.budget(), session.ledger),
               *self.callbacks]
        if r.patience > 0:
            cbs.append(EarlyStoppingCallback(early_stopping_patience=r.patience))
        set_seed(job.options.seed)
        model = load_base(job, str(self.cfg.device))
        dev_rows = sorted(job.dev.rows(), key=lambda row: row["length"])  # similar lengths batch together
        self.trainer = CompletionSFTTrainer(
            model=model, args=self.cfg, train_dataset=datasets.Dataset.from_list(job.train.rows()),
            eval_dataset=datasets.Dataset.from_list(dev_rows), processing_class=job.backend.tokenizer,
            peft_config=r.lora_config(), callbacks=cbs,
        )
        self.trainer.remove_callback(PrinterCallback)  # progress lines come from `Progress`

    def done_steps(self) -> int:
        if self.job.checkpoint is None:
            return 0
        return int((read_json(self.job.checkpoint / "trainer_state.json") or {}).get("global_step", 0))

    def probe(self, clock: Clock) -> float:
        """Training tokens/s per process: forward + backward of a few real micro-batches near the mean length (the
        first untimed), gradients then discarded."""
        import torch

        job, trainer = self.job, self.trainer
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
            t0 = clock()
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i > 0 or len(batches) == 1:
                tokens += sum(r["length"] for r in batch)
                seconds += clock() - t0
        model.zero_grad(set_to_none=True)
        for metrics in trainer._metrics.values():
            metrics.clear()
        return tokens / max(seconds, 1e-9)

    def evaluate(self) -> float:
        return self.trainer.evaluate()["eval_loss"]

    def train(self, session: FinetuneSession) -> str:
        from transformers import set_seed

        job = self.job
        set_seed(job.options.seed)  # training does not depend on the probe
        self.trainer.train(resume_from_checkpoint=str(job.checkpoint) if job.checkpoint else None)
        steps = self.trainer.state.global_step
        return session.guard.stopped or ("early_stopping" if steps < job.steps else "max_steps")

    def save(self, out: Path):
        self.trainer.save_model(str(out))
        return self.trainer.model

    def training_card(self, session: FinetuneSession) -> dict:
        job, trainer, ledger, run_info = self.job, self.trainer, session.ledger, session.run_info
        state = trainer.state
        train_curve, dev_curve = _curves(state.log_history)
        return {
            "steps": state.global_step, "max_steps": job.steps, "epochs": round(state.epoch or 0.0, 4),
            "processes": job.world_size, "distributed": str(trainer.args.distributed_state.distributed_type),
            "backend": trainer.args.distributed_state.backend,
            "best_step": state.best_global_step or (dev_curve[-1][0] if dev_curve else state.global_step),
            "dev_loss_before": run_info.get("dev_loss_before"), "best_dev_loss": state.best_metric,
            "train_loss_curve": train_curve, "dev_loss_curve": dev_curve,
            "train_tokens": state.num_input_tokens_seen, "train_tokens_per_s": self.timer.tokens_per_s(state),
            "wall_s": ledger.total_seconds(), "segments": ledger.segments(),
            "resumed_from": run_info.get("resumed_from", []),
            "peak_rss_bytes": session.peak_rss, "peak_accelerator_bytes": peak_accelerator_bytes(),
        }

    def close(self, keep_model: bool) -> None:
        self.trainer.accelerator.wait_for_everyone()
        if not keep_model:
            del self.trainer
