"""Fine-tuning throughput: `labscale finetune`'s training vs TRL's SFTTrainer, with its defaults and at its best.

One run of each side, in its own process (so peak RSS is each side's own), on the same model (the embedded
SmolLM2-135M-Instruct, fp32 on CPU), the same data (the MTS-Dialog train split, each example rendered as evaluation
renders it: zero-shot chat prompt + the reference section; examples over 1024 tokens left out on both sides), the
same LoRA config (r=16, alpha=32, dropout 0.05, all linear layers), learning rate and schedule (TRL's default:
linear, no warm-up), seed and number of optimizer steps, and the same examples per step (`--batch`, default 8; both samplers draw the same seeded order).

* labscale: what `labscale finetune` runs (recipe cpu-tiny-lora): micro-batches of one example with gradient
  accumulation (no padding), the completion-only LM head, no gradient checkpointing; validation only at the end.
* trl-defaults: `SFTTrainer(model, args=SFTConfig(...), train_dataset=prompt/completion conversations,
  peft_config=LoraConfig(...))` with TRL's defaults — batches of `--batch` padded to the longest, no packing,
  gradient checkpointing on, completion-only loss — except `use_cpu=True` and `bf16=False` (TRL's default bf16
  does not run on a CPU-only setup without `use_cpu`, and both sides should compute in fp32).
* trl-best: the same SFTTrainer with its efficient options and labscale's micro-batching: micro-batches of one
  example × `--batch` accumulation steps (no padding at all), `gradient_checkpointing=False`,
  `completion_only_loss=True` (TRL's own fused, chunked LM head).
* trl-padfree: TRL's padding-free batching: `padding_free=True` (the `--batch` examples of a step flattened into
  one row with position ids, no padding, one micro-batch per step), `gradient_checkpointing=False`,
  `completion_only_loss=True`.

The dev loss (completion tokens, token mean, the dev split rendered the same way) is computed after training on
every side; equal within noise means the sides trained the same thing.

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


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


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
            "final_loss": t["train_loss_curve"][-1][1], "dev_loss": t["dev_loss_curve"][-1][1],
            "peak_rss": _peak_rss()}


TRL_SIDES = {
    "trl-defaults": {},
    "trl-best": {"micro_batch": 1, "gradient_checkpointing": False, "completion_only_loss": True},
    # max_length None: TRL does not truncate padding-free rows; examples over MAX_LEN are left out beforehand
    "trl-padfree": {"padding_free": True, "gradient_checkpointing": False, "completion_only_loss": True,
                    "max_length": None},
}


def run_trl(side: str, steps: int, batch: int, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from labscale.settings.setting import chat_prompt, parse_setting

    backend, task, examples = _examples()

    def rows(exs):
        return [{"prompt": chat_prompt(task, parse_setting("zero-shot"), ex, seed),
                 "completion": [{"role": "assistant", "content": ex.target}]} for ex in exs]

    options = dict(TRL_SIDES[side])
    micro = options.pop("micro_batch", batch)
    model = AutoModelForCausalLM.from_pretrained(backend.source, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, use_cpu=True, bf16=False, max_steps=steps, per_device_train_batch_size=micro,
                         gradient_accumulation_steps=batch // micro, per_device_eval_batch_size=1,
                         learning_rate=LR, seed=seed, report_to="none", save_strategy="no", logging_steps=1,
                         disable_tqdm=True, include_num_input_tokens_seen="non_padding",
                         **{"max_length": MAX_LEN, **options})
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows(examples)),
                             eval_dataset=Dataset.from_list(rows(_dev(task, backend))),
                             processing_class=backend.tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
        dev_loss = trainer.evaluate()["eval_loss"]
    tokens = trainer.state.num_input_tokens_seen
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": out.metrics.get("train_runtime", seconds),
            "tokens_per_s": tokens / out.metrics.get("train_runtime", seconds), "first_loss": losses[0],
            "final_loss": losses[-1], "dev_loss": dev_loss,
            "peak_rss": _peak_rss()}


def _dev(task, backend):
    from labscale.adapt.data import build_split

    kept = {e.id for e in build_split(backend, task, "dev", 0, MAX_LEN).examples}
    return [ex for ex in task.split("dev") if ex.id in kept]


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
    ap.add_argument("--side", choices=["labscale", *TRL_SIDES], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.side == "labscale":
            result = run_labscale(args.steps, args.batch, args.seed)
        else:
            result = run_trl(args.side, args.steps, args.batch, args.seed)
        result["threads"] = torch.get_num_threads()
        print(json.dumps(result))
        return 0

    print(f"SmolLM2-135M-Instruct, MTS-Dialog train split, LoRA r={LORA['r']} all-linear, {args.steps} steps × "
          f"{args.batch} examples, fp32 on CPU")
    results = {}
    for name in ("labscale", *TRL_SIDES):
        results[name] = _side(name, args)
        print(f"  {name} done; {load()}", flush=True)
    print(f"torch threads: {results['labscale']['threads']}")
    print(f"{'':<14}{'tokens':>8}{'train s':>10}{'tokens/s':>10}{'peak RSS':>12}{'loss step 1':>13}{'last step':>11}"
          f"{'dev loss':>10}{'labscale x':>12}{'RSS ratio':>11}")
    ls = results["labscale"]
    for name, r in results.items():
        print(f"{name:<14}{r['tokens']:>8,}{r['seconds']:>10.1f}{r['tokens_per_s']:>10.1f}"
              f"{r['peak_rss'] / 2**20:>8,.0f} MiB{r['first_loss']:>13.4f}{r['final_loss']:>11.4f}"
              f"{r['dev_loss']:>10.4f}{ls['tokens_per_s'] / r['tokens_per_s']:>11.2f}x"
              f"{ls['peak_rss'] / r['peak_rss']:>11.2f}")
    best = max((n for n in TRL_SIDES), key=lambda n: results[n]["tokens_per_s"])
    print(f"labscale vs TRL at its best ({best}): {ls['tokens_per_s'] / results[best]['tokens_per_s']:.2f}x "
          f"tokens/s at {ls['peak_rss'] / results[best]['peak_rss']:.2f}x the peak RSS (goal >= 1.3x at <= 1x); "
          f"vs TRL's defaults: {ls['tokens_per_s'] / results['trl-defaults']['tokens_per_s']:.2f}x")
    print(load())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
