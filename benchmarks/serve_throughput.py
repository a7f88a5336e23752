"""Serving throughput: `labscale serve` with concurrent clients vs sequential ones, and mixed-adapter batches.

Starts `labscale serve` (a subprocess, the real CLI) on the embedded SmolLM2-135M-Instruct with four random
LoRA adapters (peft, r=8 on q_proj/v_proj, made in a temporary folder), then sends the same N short chat
requests (greedy, max_tokens 32) with the official openai client:

  (a) one at a time vs from 16 concurrent clients, to the base model: requests/s and the ratio (goal >= 4x);
  (b) from 16 concurrent clients, all to one adapter vs spread over four: the throughput loss (goal <= 20%).

Prints requests/s, completion tokens/s, and whether concurrent answers equal sequential ones. On a shared machine
other processes' CPU use distorts single runs, so the concurrent measurements are repeated (`--reps`, (b) in
interleaved rounds) and the best run of each counts; the load average is printed alongside.

    .venv/bin/python benchmarks/serve_throughput.py [--n 32] [--clients 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

MODEL = "embedded:smollm2-135m-instruct"
TOPICS = [
    "the ocean", "a mountain village", "the history of bread", "a rainy afternoon", "how bees communicate",
    "a train journey", "the night sky", "an old library", "a busy market", "learning to swim", "autumn leaves",
    "a lighthouse keeper", "the first snow", "a desert at noon", "city traffic", "a garden in spring",
]


def prompts(n: int) -> list[str]:
    return [f"Write a detailed paragraph about {TOPICS[i % len(TOPICS)]}." + (" Be vivid." if i >= len(TOPICS)
                                                                              else "") for i in range(n)]


def make_adapters(folder: Path, k: int) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from labscale.models.embedded import ensure_converted

    base = ensure_converted("smollm2-135m-instruct")
    out = {}
    for i in range(k):
        model = AutoModelForCausalLM.from_pretrained(str(base))
        torch.manual_seed(i)
        cfg = LoraConfig(init_lora_weights=False, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's deprecation notices about transformers internals
            get_peft_model(model, cfg).save_pretrained(str(folder / f"lora{i}"))
        out[f"lora{i}"] = str(folder / f"lora{i}")
    return out


async def send(url: str, calls: list[dict], clients: int) -> tuple[float, list]:
    """Run `calls` from `clients` concurrent clients; (wall seconds, responses in call order)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    results: list = [None] * len(calls)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(calls)):
        queue.put_nowait(i)

    async def worker():
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await client.chat.completions.create(**calls[i])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return wall, results


def report(label: str, runs: list[tuple[float, list]]) -> tuple[float, float]:
    """Print the best of `runs` (wall seconds, responses); returns its (requests/s, completion tokens/s)."""
    wall, results = min(runs, key=lambda r: r[0])
    toks = sum(r.usage.completion_tokens for r in results)
    rps, tps = len(results) / wall, toks / wall
    all_runs = f"  runs: {', '.join(f'{w:.1f}' for w, _ in runs)} s" if len(runs) > 1 else ""
    print(f"{label:<34} {wall:7.2f} s  {rps:6.2f} requests/s  {tps:7.1f} completion tokens/s  ({toks} tokens)"
          f"{all_runs}")
    return rps, tps


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="requests per measurement (default 32)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="the server's --batch-size (default 16)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each concurrent measurement (default 3)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx2

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), 4)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "labscale.cli", "serve", "--model", MODEL, "--port", str(port),
               "--batch-size", str(args.batch_size)]
        for name, path in adapters.items():
            cmd += ["--adapter", f"{name}={path}"]
        server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        try:
            base = f"http://127.0.0.1:{port}"
            t0 = time.perf_counter()
            while True:
                if server.poll() is not None:
                    sys.exit(f"labscale serve exited: {server.stderr.read()}")
                try:
                    if httpx2.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                time.sleep(0.2)
            import torch

            print(f"server up in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, "
                  f"torch threads {torch.get_num_threads()} (client side); {args.n} requests, "
                  f"max_tokens {args.max_tokens}, greedy, server batch size {args.batch_size}; {load()}")
            url = base + "/v1"

            def calls(models: list[str]) -> list[dict]:
                return [{"model": models[i % len(models)], "messages": [{"role": "user", "content": p}],
                         "max_tokens": args.max_tokens, "temperature": 0} for i, p in enumerate(prompts(args.n))]

            for warm in (calls([MODEL])[:2], calls(list(adapters))[:4]):  # first-call allocations, both paths
                asyncio.run(send(url, warm, len(warm)))
            print(f"(a) base model ({args.reps} concurrent runs, best counts)")
            seq = asyncio.run(send(url, calls([MODEL]), 1))
            conc = [asyncio.run(send(url, calls([MODEL]), args.clients)) for _ in range(args.reps)]
            rps_seq, _ = report("sequential (1 client)", [seq])
            rps_conc, _ = report(f"concurrent ({args.clients} clients)", conc)
            same = sum(a.choices[0].message.content == b.choices[0].message.content
                       for a, b in zip(seq[1], conc[0][1]))
            print(f"    concurrent / sequential: {rps_conc / rps_seq:.2f}x requests/s (goal >= 4x); "
                  f"identical answers {same}/{args.n}; {load()}")
            print(f"(b) adapters, {args.clients} concurrent clients ({args.reps} interleaved rounds, best counts)")
            one, four = [], []
            for _ in range(args.reps):
                one.append(asyncio.run(send(url, calls(["lora0"]), args.clients)))
                four.append(asyncio.run(send(url, calls(list(adapters)), args.clients)))
            rps_one, tps_one = report("all requests on 1 adapter", one)
            rps_four, tps_four = report("spread over 4 adapters", four)
            print(f"    throughput loss with 4 adapters: {100 * (1 - rps_four / rps_one):.1f}% requests/s, "
                  f"{100 * (1 - tps_four / tps_one):.1f}% completion tokens/s (goal <= 20%); {load()}")
            print(f"server stats: {httpx2.get(base + '/health').json()['stats']}")
        finally:
            server.terminate()
            server.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
