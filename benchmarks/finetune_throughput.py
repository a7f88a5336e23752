"""Fine-tuning throughput: `labscale finetune`'s training vs a plain TRL SFTTrainer with default settings.

One run each, in its own process (so peak RSS is each side's own), on the same model (the embedded
SmolLM2-135M-Instruct, fp32 on CPU), the same data (the MTS-Dialog train split, each example rendered as evaluation
renders it: zero-shot chat prompt + the reference section; examples over 1024 tokens left out on both sides), the
same LoRA config (r=16, alpha=32, dropout 0.05, all linear layers), learning rate and schedule (TRL's default:
linear, no warm-up), seed and number of optimizer steps, and the same examples per step (`--batch`, default 8; both samplers draw the same seeded order).

* labscale: what `labscale finetune` runs (recipe cpu-tiny-lora): micro-batches of one example with gradient
  accumulation (no padding), the completion-only LM head, no gradient checkpointing; validation only at the end.
* baseline: `SFTTrainer(model, args=SFTConfig(...), train_dataset=prompt/completion conversations,
  peft_config=LoraConfig(...))` with TRL's defaults — batches of `--batch` padded to the longest, no packing,
  gradient checkpointing on, completion-only loss — except `use_cpu=True` and `bf16=False` (TRL's default bf16
  does not run on a CPU-only setup without `use_cpu`, and both sides should compute in fp32).

tokens/s = non-padding training tokens / training time (validation excluded); peak RSS = the process's maximum
resident set (`ru_maxrss`), model loading included (the same on both sides).

    .venv/bin/python benchmarks/finetune_throughput.py [--steps 4] [--batch 8] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "embedded:smollm2-135m-instruct"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
LR = 3e-4
MAX_LEN = 1024


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _examples():
    from labscale.adapt.data import build_split
    from labscale.config import ModelSpec
    from labscale.models.registry import resolve_model
    from labscale.tasks.registry import get_task

    backend = resolve_model(ModelSpec(id=MODEL))
    task = get_task("mts-summarization", Path("."))
    kept = {e.id for e in build_split(backend, task, "train", 0, MAX_LEN).examples}
    return backend, task, [ex for ex in task.split("train") if ex.id in kept]


def run_labscale(steps: int, batch: int, seed: int) -> dict:
    from labscale.adapt.finetune import FinetuneOptions, finetune
    from labscale.config import ModelSpec

    _, task, _ = _examples()
    with tempfile.TemporaryDirectory() as tmp:
        options = FinetuneOptions(
            model=ModelSpec(id=MODEL), task=task, recipe="cpu-tiny-lora", max_steps=steps, seed=seed,
            overrides={"batch_size": 1, "grad_accum": batch, "learning_rate": LR, "eval_every": steps, "patience": 0,
                       "lr_scheduler": "linear", "warmup_ratio": 0.0,  # TRL's defaults, so the losses compare
                       "max_seq_len": MAX_LEN, "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"],
                       "lora_dropout": LORA["lora_dropout"]},
            out=Path(tmp) / "adapter")
        card = finetune(options, say=lambda m: None).card
    t = card["training"]
    return {"tokens": t["train_tokens"], "seconds": t["train_tokens"] / t["train_tokens_per_s"],
            "tokens_per_s": t["train_tokens_per_s"], "first_loss": t["train_loss_curve"][0][1],
            "final_loss": t["train_loss_curve"][-1][1],
            "peak_rss": _peak_rss()}


def run_baseline(steps: int, batch: int, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from labscale.settings.setting import chat_prompt, parse_setting

    backend, task, examples = _examples()
    rows = [{"prompt": chat_prompt(task, parse_setting("zero-shot"), ex, seed),
             "completion": [{"role": "assistant", "content": ex.target}]} for ex in examples]
    model = AutoModelForCausalLM.from_pretrained(backend.source, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, use_cpu=True, bf16=False, max_steps=steps, per_device_train_batch_size=batch,
                         learning_rate=LR, seed=seed, report_to="none", save_strategy="no", logging_steps=1,
                         disable_tqdm=True, include_num_input_tokens_seen="non_padding")
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=backend.tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
    tokens = trainer.state.num_input_tokens_seen
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": out.metrics.get("train_runtime", seconds),
            "tokens_per_s": tokens / out.metrics.get("train_runtime", seconds), "first_loss": losses[0],
            "final_loss": losses[-1],
            "peak_rss": _peak_rss()}


def _side(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", name, "--steps", str(args.steps), "--batch", str(args.batch),
           "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        sys.exit(f"{name} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps (default 4)")
    ap.add_argument("--batch", type=int, default=8, help="examples per optimizer step (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    ap.add_argument("--side", choices=["labscale", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = (run_labscale if args.side == "labscale" else run_baseline)(args.steps, args.batch, args.seed)
        result["threads"] = torch.get_num_threads()
        print(json.dumps(result))
        return 0

    print(f"SmolLM2-135M-Instruct, MTS-Dialog train split, LoRA r={LORA['r']} all-linear, {args.steps} steps × "
          f"{args.batch} examples, fp32 on CPU")
    results = {name: _side(name, args) for name in ("labscale", "baseline")}
    print(f"torch threads: {results['labscale']['threads']}")
    print(f"{'':<10}{'tokens':>8}{'train s':>10}{'tokens/s':>10}{'peak RSS':>12}{'loss step 1':>13}{'last step':>11}")
    for name, r in results.items():
        print(f"{name:<10}{r['tokens']:>8,}{r['seconds']:>10.1f}{r['tokens_per_s']:>10.1f}"
              f"{r['peak_rss'] / 2**20:>8,.0f} MiB{r['first_loss']:>13.4f}{r['final_loss']:>11.4f}")
    ls, bl = results["labscale"], results["baseline"]
    print(f"speed-up (tokens/s): {ls['tokens_per_s'] / bl['tokens_per_s']:.2f}x   "
          f"peak RSS ratio (labscale / baseline): {ls['peak_rss'] / bl['peak_rss']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
