"""llama.cpp vs labscale's transformers engine on the same model: speed, and what quantization costs in quality.

Speed: the same 32 MTS-Dialog prompts as benchmarks/eval_throughput.py (rendered by each backend with the model's
own chat template — the same text), greedy, 64 new tokens, through
  * `embedded:smollm2-135m-instruct` — labscale's HF engine, the converted fp32 weights, one batch of 32;
  * `llamacpp:embedded:smollm2-135m-instruct` — llama-server on the packaged Q4_1 GGUF the fp32 weights were
    converted from, for each `--parallel` value (continuous batching slots; requests sent `parallel` at a time).
Model load / server start is timed apart; the rates are over the generation calls after a warm-up request.

Quality ("quantization", measured): one `labscale run` of both models on `mts-summarization` and `fact-check`
(`--limit` test examples each, greedy), and for each task's main metric the paired bootstrap (metrics/stats.py
`paired_bootstrap`, the same resampled examples for both) of Q4_1 − fp32: the difference with its 95% CI and p.

    .venv/bin/python benchmarks/llamacpp_throughput.py [--n 32] [--parallel 1 2] [--limit 32]

Needs `scripts/setup.sh --llamacpp`. On a shared machine the rates move with the load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_throughput import INSTRUCTION, load_dialogues  # noqa: E402

EMBEDDED = "embedded:smollm2-135m-instruct"
LLAMACPP = "llamacpp:embedded:smollm2-135m-instruct"


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def timed(backend, prompts, max_new_tokens: int):
    from labscale.models.base import DecodingParams, GenerationRequest

    backend.generate([GenerationRequest(prompts[0], DecodingParams(max_new_tokens=4))])  # warm-up
    params = DecodingParams(max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    out = backend.generate([GenerationRequest(p, params) for p in prompts])
    wall = time.perf_counter() - t0
    failed = [r.error for r in out if r.error]
    if failed:
        sys.exit(f"{len(failed)} requests failed: {failed[0]}")
    return wall, out


def speed(args) -> None:
    from labscale.config import LlamaServerSpec, ModelSpec
    from labscale.models.registry import resolve_model

    rows = []
    t0 = time.perf_counter()
    hf = resolve_model(ModelSpec(id=EMBEDDED, batch_size=args.n))
    prompts = [hf.render([{"role": "user", "content": INSTRUCTION + d}]) for d in load_dialogues(args.n)]
    _ = hf.model
    load_s = time.perf_counter() - t0
    lengths = [hf.count_tokens(p) for p in prompts]
    print(f"{len(prompts)} MTS prompts, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f});"
          f" {args.max_new_tokens} new tokens, greedy; {os.cpu_count()} CPUs, {load()}")
    wall, ref = timed(hf, prompts, args.max_new_tokens)
    rows.append(("embedded: (transformers, fp32, batch %d)" % args.n, load_s, wall, ref))
    hf.close()
    for parallel in args.parallel:
        spec = ModelSpec(id=LLAMACPP, batch_size=args.n,
                         server=LlamaServerSpec(parallel=parallel, threads=args.threads))
        backend = resolve_model(spec)
        assert backend.render([{"role": "user", "content": INSTRUCTION + "x"}]) == \
            hf.render([{"role": "user", "content": INSTRUCTION + "x"}])  # the same text reaches both engines
        t0 = time.perf_counter()
        backend._ensure_server()
        start_s = time.perf_counter() - t0
        wall, out = timed(backend, prompts, args.max_new_tokens)
        rows.append((f"llamacpp: (llama-server, Q4_1, --parallel {parallel})", start_s, wall, out))
        backend.close()
    base_rate = sum(r.new_tokens for r in ref) / rows[0][2]
    print(f"\n| engine | load (s) | wall (s) | new tokens/s | examples/s | × embedded | same text as fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, load_s, wall, out in rows:
        toks = sum(r.new_tokens for r in out)
        same = sum(a.text == b.text for a, b in zip(out, ref))
        print(f"| {name} | {load_s:.1f} | {wall:.1f} | {toks / wall:.1f} | {len(out) / wall:.2f} | "
              f"{toks / wall / base_rate:.2f} | {same}/{len(out)} |")
    print(f"({load()})")


def quality(args) -> None:
    import numpy as np

    from labscale.experiment import run_experiment
    from labscale.config import parse_experiment
    from labscale.metrics.registry import get_metric
    from labscale.metrics.stats import paired_bootstrap
    from labscale.results import load_results

    best = args.parallel[0]
    folder = Path(tempfile.mkdtemp(prefix="labscale-llamacpp-bench-"))
    exp = parse_experiment({
        "name": "quantization",
        "models": [EMBEDDED, {"id": LLAMACPP, "server": {"parallel": best, "threads": args.threads}}],
        "tasks": ["mts-summarization", "fact-check"], "limit": args.limit,
        "generation": {"max_new_tokens": args.quality_max_new_tokens}}, folder)
    t0 = time.perf_counter()
    run_experiment(exp, db=folder / "q.db", say=lambda m: None)
    print(f"\nquality: one labscale run, {args.limit} test examples per task, {time.perf_counter() - t0:.0f} s "
          f"({load()})")
    res = load_results(folder / "q.db")
    conn = sqlite3.connect(folder / "q.db")
    print("\n| task | metric | embedded: fp32 | llamacpp: Q4_1 | Q4_1 − fp32 [95% CI] | p | fp32 ex/s | Q4_1 ex/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for task in ("mts-summarization", "fact-check"):
        a, b = res.run(task, EMBEDDED), res.run(task, LLAMACPP)
        metric = get_metric(a.main_metric)

        def stats(run):
            rows = conn.execute("SELECT example_id, stats_json FROM predictions WHERE run_id = ?", (run.id,))
            return {eid: json.loads(s)[a.main_metric] for eid, s in rows}

        sa, sb = stats(a), stats(b)
        ids = sorted(sa)
        pa = np.array([sa[i] for i in ids], dtype=float)
        pb = np.array([sb[i] for i in ids], dtype=float)
        pa, pb = pa.reshape(len(ids), -1), pb.reshape(len(ids), -1)
        d = paired_bootstrap(pb, pa, metric.aggregate, n_boot=1000, seed=0)
        print(f"| {task} | {a.main_metric} | {a.main.value:.3f} | {b.main.value:.3f} | {d['diff']:+.3f} "
              f"[{d['low']:+.3f}, {d['high']:+.3f}] | {d['p_value']:.2f} | "
              f"{a.efficiency.get('examples_per_s') or 0:.2f} | {b.efficiency.get('examples_per_s') or 0:.2f} |")
    conn.close()
    print(f"(database: {folder / 'q.db'})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="MTS prompts for the speed part (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2],
                    help="llama-server --parallel values to time (the first is used for the quality run)")
    ap.add_argument("--threads", type=int, default=None, help="llama-server threads (default: all cores)")
    ap.add_argument("--limit", type=int, default=32, help="test examples per task for the quality part")
    ap.add_argument("--quality-max-new-tokens", type=int, default=128)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each table row as it is measured
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from labscale.models.llamacpp import installed

    if not installed():
        sys.exit("llama.cpp's server is not installed: run scripts/setup.sh --llamacpp")
    if not args.skip_speed:
        speed(args)
    if not args.skip_quality:
        quality(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
