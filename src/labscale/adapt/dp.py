"""Differentially private LoRA fine-tuning: DP-SGD (Abadi et al., 2016) with Opacus, on the LoRA weights only.

Why a loop of its own. DP-SGD needs each example's gradient, clipped to norm C, summed over a batch drawn by
Poisson sampling (every example independently with probability q), plus Gaussian noise of std σ·C — the
Trainer's micro-batch + accumulation loop computes none of that. This loop keeps everything else the same: the
training and validation examples of data.py (evaluation prompts, prompt tokens masked), the completion-only head
of trainer.py, the recipe's LoRA, learning rate, schedule and `max_steps`, dev loss every `eval_every` steps with
early stopping and the best checkpoint as the adapter, the budget probe and guard, resume, the card.

The mechanism (Opacus `PrivacyEngine.make_private`, RDP accountant):

* Only LoRA A/B matrices (nn.Linear) are trainable; base weights, embeddings and the LM head are frozen (checked).
  Opacus' GradSampleModule computes per-example gradients of exactly those.
* Each example's loss is the mean NLL over its completion tokens (the non-DP loss's tokens, averaged per example
  so that every example's gradient is clipped on its own); the batch loss is their mean (`loss_reduction="mean"`),
  so the update is (Σ clip_C(∇ℓ_i) + N(0, σ²C²)) / B, B = int(q·n) the expected batch. A Poisson batch is split
  into physical micro-batches of the recipe's `batch_size` (no padding at 1); clipped sums accumulate across them
  (`signal_skip_step`, as Opacus' BatchMemoryManager does), and noise is added once per logical step. An empty
  Poisson batch is a noise-only step, as the analysis assumes.
* Sampling: Opacus' Poisson sampler with q = 1 / ceil(n / (batch_size × grad_accum)) over all n training examples
  (canary copies included) — the sampled Gaussian mechanism the accountant analyses.
* σ is the smallest noise multiplier (Opacus `get_noise_multiplier`, RDP accountant) for which the planned steps
  spend at most the target ε at δ; it is computed before anything is loaded, so an impossible budget is a one-line
  error. δ defaults to 1/(2n) and must be below 1/n (a δ of 1/n allows publishing one example outright).
* ε spent is the accountant's, for the steps actually taken (fewer after early stopping or a budget stop). The
  adapter is the best-dev-loss checkpoint, chosen by looking at every step taken, so all of them are counted.
* Randomness (Poisson draws, noise, dropout) comes from torch generators re-seeded per step from the training seed:
  a run is reproducible and a resumed run equals an uninterrupted one. This is Opacus without `secure_mode`: the
  guarantee holds against an adversary who does not know the seed (the card records it); for a release, train with
  a secret seed.

Resume: a checkpoint (`checkpoints/checkpoint-N/`) holds the LoRA weights, the optimizer and scheduler states and,
in `trainer_state.json` (written last), the step, curves, best checkpoint, patience counter and the accountant's
history — so ε after a resume counts every step of every segment.

Refused, with the fix: gradient checkpointing (Opacus' hooks keep every layer's activations anyway), packing (one
example per row is what gets clipped), several processes. QLoRA works: only the LoRA layers get grad samplers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

from labscale.adapt.data import IGNORE
from labscale.adapt.session import (
    CHECKPOINTS,
    PROBE_BATCHES,
    FinetuneSession,
    TrainingRun,
    load_base,
    peak_accelerator_bytes,
)
from labscale.errors import ConfigError

if TYPE_CHECKING:
    from labscale.adapt.finetune import Job

ACCOUNTANT = "rdp"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint (see _last_checkpoint)
WEIGHTS_FILE = "dp_state.pt"


@dataclass(frozen=True)
class DPPlan:
    """The DP settings of a job, resolved before training: target (ε, δ), clip C, noise σ, sampling rate q."""

    epsilon: float
    delta: float
    delta_default: bool
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    examples: int
    steps: int
    accountant: str = ACCOUNTANT

    def identity(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"DP-SGD (Opacus, {self.accountant} accountant): ε ≤ {self.epsilon:g} at δ {self.delta:.3g}"
                f"{' (1/2n)' if self.delta_default else ''}, per-example clip {self.max_grad_norm:g}, noise "
                f"multiplier {self.noise_multiplier:.3f}, Poisson sampling q={self.sample_rate:.4f} (expected "
                f"batch {self.expected_batch_size}), LoRA weights only")


@contextlib.contextmanager
def _quiet():
    """Opacus' notices that do not apply here (RDP order range, secure RNG off, backward hooks without inputs)."""
    with warnings.catch_warnings():
        for message in ("Optimal order is", "Secure RNG turned off", "Full backward hook is firing",
                        "Using a non-full backward hook"):
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        yield


def plan_dp(spec, recipe, n: int, steps: int, world_size: int) -> DPPlan:
    """Check the DP settings (a validated config.DPSpec) against the job — `n` training examples, `steps` steps,
    the recipe, the processes — and calibrate the noise."""
    if world_size > 1:
        raise ConfigError("DP training runs in a single process", "run `labscale finetune --dp` without "
                                                                  "accelerate launch")
    if recipe.gradient_checkpointing:
        raise ConfigError(f"DP training does not support gradient checkpointing (recipe {recipe.name})",
                          "add --set gradient_checkpointing=false (Opacus keeps every layer's activations anyway)")
    if recipe.packing:
        raise ConfigError("DP training clips each example's gradient, so it cannot pack examples",
                          "add --set packing=false")
    delta = spec.delta if spec.delta is not None else 1 / (2 * n)
    if not 0 < delta < 1 / n:
        raise ConfigError(f"δ {delta:g} is not below 1/n = {1 / n:.3g} ({n} training examples); such a δ allows "
                          "publishing an example outright", f"pass a smaller --delta, e.g. {1 / (2 * n):.3g} = 1/(2n), "
                                                            "the default")
    batches = math.ceil(n / (recipe.batch_size * recipe.grad_accum))
    q = 1 / batches  # as Opacus derives it from a DataLoader of this batch size
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet():
        try:
            sigma = get_noise_multiplier(target_epsilon=spec.epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                         accountant=ACCOUNTANT)
        except ValueError:
            raise ConfigError(f"ε {spec.epsilon:g} is too small for {steps} steps at sampling rate {q:.3g}: the noise "
                              "would be over a million times the clipping norm",
                              "raise --epsilon, or lower --max-steps") from None
    return DPPlan(spec.epsilon, delta, spec.delta is None, spec.max_grad_norm, sigma, q, int(n * q), n, steps)


def _seed(seed: int, step: int, what: str) -> int:
    return int(hashlib.sha256(f"labscale-dp:{seed}:{step}:{what}".encode()).hexdigest()[:15], 16)


class DPTrainer:
    """The model, optimizer, privacy engine and progress of one DP training run (see the module docstring)."""

    def __init__(self, job: Job, callbacks: tuple = (), clock: Callable[[], float] = time.monotonic):
        import torch
        from opacus import PrivacyEngine
        from peft import get_peft_model
        from torch.utils.data import DataLoader, TensorDataset
        from transformers import get_scheduler

        from labscale.adapt.trainer import add_completion_head

        assert job.dp is not None
        self.job, self.plan, self.callbacks, self.clock = job, job.dp, callbacks, clock
        r = job.recipe
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(job.options.seed)  # LoRA initialisation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside peft
            self.peft = get_peft_model(load_base(job, self.device), r.lora_config())
        add_completion_head(self.peft.get_base_model())
        trainable = [(n, p) for n, p in self.peft.named_parameters() if p.requires_grad]
        others = [n for n, _ in trainable if ".lora_A." not in n and ".lora_B." not in n]
        if others:
            raise ConfigError(f"DP training trains LoRA weights only, but '{others[0]}' is trainable",
                              "drop modules_to_save / trainable embeddings from the LoRA settings")
        self.params = [p for _, p in trainable]
        self.names = [n for n, _ in trainable]
        optimizer = torch.optim.AdamW(self.params, lr=r.learning_rate, weight_decay=r.weight_decay)
        self.scheduler = get_scheduler(r.lr_scheduler, optimizer,
                                       num_warmup_steps=math.ceil(r.warmup_ratio * job.steps)
                                       if r.warmup_ratio < 1 else int(r.warmup_ratio),
                                       num_training_steps=job.steps)
        self.rows = job.train.rows()
        # Opacus' Poisson sampler draws example indices; the rows themselves stay in the job
        loader = DataLoader(TensorDataset(torch.arange(len(self.rows))), batch_size=r.batch_size * r.grad_accum,
                            generator=torch.Generator())
        self.peft.train()
        with _quiet():
            self.engine = PrivacyEngine(accountant=ACCOUNTANT)
            self.module, self.optimizer, private = self.engine.make_private(
                module=self.peft, optimizer=optimizer, data_loader=loader,
                noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.plan.max_grad_norm,
                poisson_sampling=True, noise_generator=torch.Generator(device=self.device))
        self.sampler = private.batch_sampler
        assert math.isclose(self.sampler.sample_rate, self.plan.sample_rate), (self.sampler.sample_rate, self.plan)
        self.pad = job.backend.pad_id
        self.state: dict[str, Any] = {"global_step": 0, "train_loss_curve": [], "dev_loss_curve": [], "best_step": None,
                      "best_metric": None, "bad_evals": 0, "train_tokens": 0, "train_seconds": 0.0,
                      "examples_sampled": 0, "accountant": None}

    # ------------------------------------------------------------------------------------------------- batches

    def _inputs(self, rows: list[dict]) -> dict:
        import torch

        width = max(r["length"] for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):  # right padding: positions are those of the unpadded example
            ids[j, : r["length"]] = torch.tensor(r["input_ids"])
            labels[j, : r["length"]] = torch.tensor(r["labels"])
            mask[j, : r["length"]] = 1
        return {"input_ids": ids.to(self.device), "labels": labels.to(self.device),
                "attention_mask": mask.to(self.device)}

    def _chunks(self, rows: list[dict]) -> list[list[dict]]:
        rows = sorted(rows, key=lambda r: r["length"])
        size = self.job.recipe.batch_size
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    def _backward(self, rows: list[dict]) -> list[float]:
        """Forward + backward of one micro-batch through the grad-sample module; each example's token-mean loss."""
        with _quiet():
            out = self.module(**self._inputs(rows), completion_loss=True)
            per_row = out.row_nll / out.row_tokens.clamp(min=1)
            per_row.mean().backward()
        return per_row.detach().tolist()

    # ---------------------------------------------------------------------------------------------------- steps

    def step(self) -> float | None:
        """One DP-SGD step on a Poisson batch; the batch's mean example loss (None for an empty batch)."""
        import torch

        t = self.state["global_step"] + 1
        seed = self.job.options.seed
        self.sampler.generator.manual_seed(_seed(seed, t, "sample"))
        self.optimizer.generator.manual_seed(_seed(seed, t, "noise"))
        torch.manual_seed(_seed(seed, t, "dropout"))
        indices = next(iter(self.sampler))
        chunks = self._chunks([self.rows[i] for i in indices])
        losses: list[float] = []
        with _quiet():
            if not chunks:  # an empty Poisson batch: noise only
                for p in self.params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            for j, chunk in enumerate(chunks):
                losses += self._backward(chunk)
                if j < len(chunks) - 1:  # clip and accumulate; noise once, on the last micro-batch
                    self.optimizer.signal_skip_step(True)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.lr = self.scheduler.get_last_lr()[0]  # the step's learning rate, as the Trainer logs it
        self.scheduler.step()
        self.state["global_step"] = t
        self.state["train_tokens"] += sum(self.rows[i]["length"] for i in indices)
        self.state["examples_sampled"] += len(indices)
        loss = sum(losses) / len(losses) if losses else None
        if loss is not None:
            self.state["train_loss_curve"].append([t, round(loss, 6)])
        return loss

    def evaluate(self) -> float:
        """Dev loss: the mean over dev examples of each one's token-mean completion NLL (the Trainer's eval loss at
        micro-batch 1)."""
        import torch

        self.peft.eval()
        losses: list[float] = []
        with torch.no_grad():
            for chunk in self._chunks(self.job.dev.rows()):
                out = self.peft(**self._inputs(chunk), completion_loss=True)
                losses += (out.row_nll / out.row_tokens.clamp(min=1)).tolist()
        self.peft.train()
        return sum(losses) / len(losses)

    def probe(self) -> float:
        """Training tokens/s: forward + backward with per-example gradients of a few micro-batches near the mean
        length (the first untimed), then discarded — like the Trainer path's probe."""
        import torch

        mean = sum(r["length"] for r in self.rows) / len(self.rows)
        order = sorted(self.rows, key=lambda r: abs(r["length"] - mean))
        size = self.job.recipe.batch_size
        batches = [b for b in (order[i * size:(i + 1) * size] for i in range(PROBE_BATCHES + 1)) if b]
        tokens, seconds = 0, 0.0
        with _quiet():
            for i, batch in enumerate(batches):
                t0 = self.clock()
                self._backward(batch)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if i > 0 or len(batches) == 1:
                    tokens += sum(r["length"] for r in batch)
                    seconds += self.clock() - t0
                self.optimizer.zero_grad(set_to_none=True)
        return tokens / max(seconds, 1e-9)

    def epsilon(self) -> float:
        """ε spent so far at δ. The RDP → (ε, δ) conversion can return a negative bound when the noise is huge
        relative to δ: the mechanism is then (0, δ)-DP, reported as 0."""
        with _quiet():
            return max(0.0, float(self.engine.accountant.get_epsilon(delta=self.plan.delta)))

    # ------------------------------------------------------------------------------------------- checkpoints

    def _lora(self) -> dict:
        return {n: p.detach().to("cpu", copy=True) for n, p in zip(self.names, self.params)}

    def save(self, folder: Path) -> None:
        import torch

        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"lora": self._lora(), "optimizer": self.optimizer.original_optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, folder / WEIGHTS_FILE)
        self.state["accountant"] = {"mechanism": ACCOUNTANT,
                                    "history": [list(h) for h in self.engine.accountant.history]}
        (folder / STATE_FILE).write_text(json.dumps(self.state, indent=1))

    def _load_lora(self, folder: Path) -> dict:
        import torch

        saved = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(saved["lora"][n])
        return saved

    def restore(self, folder: Path) -> None:
        saved = self._load_lora(folder)
        self.optimizer.original_optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = json.loads((folder / STATE_FILE).read_text())
        self.engine.accountant.load_state_dict({"mechanism": ACCOUNTANT, "history": [
            tuple(h) for h in self.state["accountant"]["history"]]})

    def prune(self, ckpt_dir: Path) -> None:
        """Keep the best and the latest checkpoint (the Trainer's save_total_limit=2 with the best kept)."""
        import shutil

        keep = {self.state["global_step"], self.state["best_step"]}
        for p in ckpt_dir.glob("checkpoint-*"):
            if p.name.split("-")[-1].isdigit() and int(p.name.split("-")[-1]) not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ the loop

    def validate(self, ckpt_dir: Path, guard, tell) -> bool:
        """Dev loss, checkpoint, early-stopping bookkeeping; True when patience is exhausted."""
        t0 = self.clock()
        loss = self.evaluate()
        guard.evaluated(self.clock() - t0)
        s = self.state
        t = s["global_step"]
        s["dev_loss_curve"].append([t, round(loss, 6)])
        better = s["best_metric"] is None or loss < s["best_metric"]
        if better:
            s["best_metric"], s["best_step"], s["bad_evals"] = loss, t, 0
        else:
            s["bad_evals"] += 1
        tell(f"dev loss {loss:.4f} at step {t}" + (" (best)" if better else ""))
        self.save(ckpt_dir / f"checkpoint-{t}")
        self.prune(ckpt_dir)
        guard.saved()
        patience = self.job.recipe.patience
        return patience > 0 and s["bad_evals"] >= patience

    def train(self, ckpt_dir: Path, guard, ledger, tell) -> str:
        """Steps until max_steps, early stopping or a cap; returns why it stopped."""
        job, r = self.job, self.job.recipe
        every = max(1, job.steps // 20)
        args, control = SimpleNamespace(device=self.device), SimpleNamespace()
        while self.state["global_step"] < job.steps:
            cb_state = SimpleNamespace(global_step=self.state["global_step"], max_steps=job.steps)
            for cb in self.callbacks:
                getattr(cb, "on_step_begin", lambda *a, **k: None)(args, cb_state, control)
            guard.step_started()
            t0 = self.clock()
            loss = self.step()
            self.state["train_seconds"] += self.clock() - t0
            t = self.state["global_step"]
            if t % every == 0 or t in (1, job.steps):
                tps = self.state["train_tokens"] / max(self.state["train_seconds"], 1e-9)
                tell(f"step {t}/{job.steps} · loss {'n/a (empty batch)' if loss is None else f'{loss:.4f}'} · "
                     f"lr {self.lr:.2e} · {tps:,.0f} tokens/s · ε {math.floor(self.epsilon() * 1000) / 1000:.3f} · "
                     f"{ledger.total_seconds() / 60:.1f} min · ${job.budget().usd(ledger.total_seconds()):.4f}")
            if (t % r.eval_every == 0 or t == job.steps) and self.validate(ckpt_dir, guard, tell) and t < job.steps:
                return "early_stopping"
            reason = guard.step_ended(True)
            cb_state.global_step = t
            for cb in self.callbacks:
                getattr(cb, "on_step_end", lambda *a, **k: None)(args, cb_state, control)
            if reason is not None and t < job.steps:
                if self.state["best_step"] is None:  # no validated checkpoint yet: make one now
                    self.validate(ckpt_dir, guard, tell)
                return reason
        return "max_steps"

    def finish(self, ckpt_dir: Path, out: Path) -> None:
        """Load the best checkpoint, drop Opacus' hooks, and save it as a standard PEFT adapter in `out`."""
        best = self.state["best_step"]
        if best is not None:
            self._load_lora(ckpt_dir / f"checkpoint-{best}")
        self.module._close()  # the plain PeftModel again (no grad-sample hooks)
        self.peft.save_pretrained(str(out))
        self.job.backend.tokenizer.save_pretrained(str(out))

    def privacy_card(self) -> dict:
        from importlib import metadata

        p, s = self.plan, self.state
        return {
            "enabled": True, "mechanism": "DP-SGD: per-example clipping + Gaussian noise (Opacus make_private)",
            "trainable": "LoRA A/B weights only", "epsilon_target": p.epsilon, "epsilon_spent": self.epsilon(),
            "delta": p.delta, "delta_source": "1/(2n)" if p.delta_default else "--delta", "max_grad_norm":
            p.max_grad_norm, "noise_multiplier": p.noise_multiplier, "sample_rate": p.sample_rate,
            "expected_batch_size": p.expected_batch_size, "sampling": "Poisson", "accountant": p.accountant,
            "accountant_history": [list(h) for h in self.engine.accountant.history],
            "examples": p.examples, "steps": s["global_step"], "planned_steps": p.steps,
            "epochs": round(s["global_step"] * p.sample_rate, 4), "examples_sampled": s["examples_sampled"],
            "per_example_loss": "mean NLL over the example's completion tokens",
            "randomness": "torch generators seeded per step from the training seed (reproducible; not secure_mode)",
            "opacus": metadata.version("opacus"),
        }

    def training_card(self, run_info: dict, ledger, peak_rss: int) -> dict:
        s = self.state
        return {
            "steps": s["global_step"], "max_steps": self.job.steps,
            "epochs": round(s["global_step"] * self.plan.sample_rate, 4), "processes": 1, "distributed": "NO",
            "backend": None, "best_step": s["best_step"], "dev_loss_before": run_info.get("dev_loss_before"),
            "best_dev_loss": s["best_metric"], "train_loss_curve": s["train_loss_curve"],
            "dev_loss_curve": s["dev_loss_curve"], "train_tokens": s["train_tokens"],
            "train_tokens_per_s": s["train_tokens"] / s["train_seconds"] if s["train_seconds"] > 0 else None,
            "wall_s": ledger.total_seconds(), "segments": ledger.segments(),
            "resumed_from": run_info.get("resumed_from", []), "peak_rss_bytes": peak_rss,
            "peak_accelerator_bytes": peak_accelerator_bytes(),
        }


class DPRun(TrainingRun):
    """The DP-SGD `TrainingRun` for the session (session.py): one process, the loop of `DPTrainer`."""

    trainer: DPTrainer  # once loaded

    def __init__(self, job: Job, callbacks: tuple = ()):
        self.job, self.callbacks = job, callbacks

    def load(self, session: FinetuneSession) -> None:
        self.trainer = DPTrainer(self.job, self.callbacks, session.clock)
        if self.job.checkpoint is not None:
            self.trainer.restore(self.job.checkpoint)

    def done_steps(self) -> int:
        return self.trainer.state["global_step"]

    def probe(self, clock) -> float:
        return self.trainer.probe()  # timed on the session's clock, which the DPTrainer was given

    def evaluate(self) -> float:
        return self.trainer.evaluate()

    def train(self, session: FinetuneSession) -> str:
        return self.trainer.train(self.job.out / CHECKPOINTS, session.guard, session.ledger, session.tell)

    def save(self, out: Path):
        self.trainer.finish(self.job.out / CHECKPOINTS, out)
        return self.trainer.peft

    def training_card(self, session: FinetuneSession) -> dict:
        return self.trainer.training_card(session.run_info, session.ledger, session.peak_rss)

    def privacy_card(self) -> dict:
        return self.trainer.privacy_card()
