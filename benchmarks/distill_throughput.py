"""Teacher labelling for distillation: throughput through labscale's engine vs a one-at-a-time loop, and the
teacher's $ estimate vs what it was billed.

1. Throughput. The embedded Qwen2.5-Coder-0.5B-Instruct teacher labels the first N train inputs of a task with
   the task's zero-shot prompt (what `method: distill` does): once through labscale's generation cache with
   batching (`GenerationCache.generate`, batch B, into a fresh database), once one prompt at a time
   (`backend.generate([request])` in a loop, the same backend object, the same greedy decoding). Prints
   examples/s of both, the ratio, and how many labels agree.
2. $ estimate vs actual. An `openai:` teacher with a price, behind a loopback OpenAI-compatible server
   (tests/fault_server.py: its usage counts whitespace-separated words, a real API's tokenizer counts more), labels
   M inputs through a real `TaskDistillation`: the estimate printed before any call (each prompt's estimated
   tokens × the input price + the whole max_new_tokens × the output price) vs the tokens × price the server
   billed.

    .venv/bin/python benchmarks/distill_throughput.py [--task siqa] [--n 32] [--batch-size 16] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the loopback server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="siqa")
    ap.add_argument("--n", type=int, default=32, help="train inputs the local teacher labels (default 32)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--api-n", type=int, default=200, help="train inputs the API teacher labels (default 200)")
    ap.add_argument("--skip-local", action="store_true", help="only the $ estimate part")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from labscale.adapt.adaptation import AdaptContext
    from labscale.adapt.distill import TaskDistillation, resolve_teacher
    from labscale.config import DistillSpec, ModelSpec
    from labscale.engine.cache import GenerationCache
    from labscale.engine.store import Store
    from labscale.models.base import DecodingParams, GenerationRequest
    from labscale.settings.setting import chat_prompt, parse_setting
    from labscale.tasks.registry import get_task

    task = get_task(args.task, Path("."))
    setting = parse_setting("zero-shot")
    decoding = DecodingParams(max_new_tokens=args.max_new_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="labscale-distill-bench-"))

    if not args.skip_local:
        from labscale.models.registry import resolve_model

        teacher = resolve_model(ModelSpec(id="embedded:qwen2.5-coder-0.5b-instruct", batch_size=args.batch_size))
        examples = task.split("train", args.n)
        prompts = [teacher.render(chat_prompt(task, setting, ex, 0)) for ex in examples]
        pairs = [(p, teacher.count_tokens(p)) for p in prompts]
        lengths = [t for _, t in pairs]
        print(f"teacher {teacher.info.name} ({teacher.info.parameters / 1e6:.0f}M), task {task.name}: {len(prompts)} "
              f"train inputs, {min(lengths)}-{max(lengths)} prompt tokens (mean {sum(lengths) / len(lengths):.0f}), "
              f"{args.max_new_tokens} new tokens, greedy; torch threads {torch.get_num_threads()}")
        teacher.generate([GenerationRequest(prompts[0], decoding)])  # load and warm up (both sides alike)
        store = Store(tmp / "bench.db")
        t0 = time.perf_counter()
        calls = GenerationCache(store).generate(teacher, pairs, decoding, args.batch_size)
        engine_s = time.perf_counter() - t0
        engine = [calls.text(i) for i in range(len(prompts))]
        store.close()
        t0 = time.perf_counter()
        loop = [teacher.generate([GenerationRequest(p, decoding)])[0].text for p in prompts]
        loop_s = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(engine, loop))
        print(f"labscale engine (cache + batch {args.batch_size}): {engine_s:.1f} s, {len(prompts) / engine_s:.2f} "
              "examples/s")
        print(f"one at a time: {loop_s:.1f} s, {len(prompts) / loop_s:.2f} examples/s")
        print(f"speed-up: {loop_s / engine_s:.2f}x examples/s; {same}/{len(prompts)} labels identical")
        teacher.close()

    from fault_server import FaultServer

    with FaultServer() as server:
        price = {"input": 0.15, "output": 0.60}  # gpt-4o-mini's list price, $ per 1M tokens
        from labscale.config import parse_experiment

        exp = parse_experiment({"name": "bench", "tasks": [args.task], "models": [{
            "id": "openai:gpt-4o-mini", "base_url": server.url, "api_key_env": None, "price": price,
            "batch_size": 32}]})
        teacher = resolve_teacher(exp, "openai:gpt-4o-mini")
        d = DistillSpec(method="distill", teacher="openai:gpt-4o-mini", student="embedded:smollm2-135m-instruct",
                        task=args.task, train_limit=args.api_n, budget_usd=5.0)
        adaptation = TaskDistillation("bench", d, teacher, ModelSpec(id="embedded:smollm2-135m-instruct"), task,
                                      setting, decoding, 0, tmp / "api")
        print(adaptation.estimate())
        store = Store(tmp / "api.db")
        dataset = adaptation.label_train(AdaptContext(store, lambda m: None))
        store.close()
        billed = dataset["card"]["accounting"]["teacher"]
        est = adaptation.estimated_usd
        print(f"API teacher behind a loopback server, {args.api_n} calls at ${price['input']}/${price['output']} per "
              f"1M tokens: estimated ${est:.6f} before any call, billed ${billed['api_usd']:.6f} "
              f"({billed['prompt_tokens']:,} prompt + {billed['completion_tokens']:,} completion tokens reported); "
              f"estimate / actual = {est / billed['api_usd']:.2f}x (an upper bound: 2 bytes per token and the whole "
              f"max_new_tokens={args.max_new_tokens} per call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
