"""Log-likelihood (multiple choice) throughput: `labscale run` vs lm-evaluation-harness's `hf` backend.

Both score the same OpenBookQA test questions (labscale's packaged copy, `tasks/openbookqa.py`, which follows
lm-eval's `openbookqa` definition: context = the question stem, continuations = " " + each choice text, acc and
acc_norm) on the same model (the embedded SmolLM2-135M-Instruct, its converted HF folder, fp32 on CPU), with the
same batch size (16). Each side is one command, run as a user would run it, in its own process, timed from start
to exit (imports, model load, scoring, writing results):

* labscale: `labscale run exp.yaml --db …` with `models: [embedded:smollm2-135m-instruct]`,
  `tasks: [openbookqa]`, `settings: [zero-shot]` (an empty database: nothing cached);
* lm-eval: `lm-eval run --model hf --model_args pretrained=<the same folder>,dtype=float32 --tasks <a task over a
  local JSONL file written here from the same questions, lm-eval's openbookqa.yaml with a local dataset_path>
  --batch_size 16 --device cpu --log_samples`.

The sides run `--reps` times in interleaved order (median counts). Prints wall seconds, questions/s, the speed-up,
acc / acc_norm of each, and per question whether both chose the same answer (by acc and by acc_norm), from
the per-choice log-likelihoods each stored (labscale's database, lm-eval's logged samples).

    .venv/bin/python benchmarks/loglikelihood_throughput.py [--n 500] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "embedded:smollm2-135m-instruct"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def choose(lls: list[float], choices, gold: int) -> tuple[int, int, float, float]:
    """(choice, length-normalised choice, acc, acc_norm) as lm-eval's multiple_choice process_results."""
    from labscale.tasks.lm_eval_task import picks

    pred, pred_norm = picks(lls, choices)
    return pred, pred_norm, float(pred == gold), float(pred_norm == gold)


def write_inputs(folder: Path, n: int, batch: int):
    """The lm-eval task folder and the labscale experiment file, over the same `n` questions."""
    from labscale.tasks.lm_eval_task import write_lm_eval_task
    from labscale.tasks.registry import get_task

    examples = get_task("openbookqa", folder).split("test", n)  # exactly the questions `labscale run` scores
    tasks = write_lm_eval_task(examples, folder)
    exp = folder / "exp.yaml"
    exp.write_text(json.dumps({"name": "obqa-bench", "models": [{"id": MODEL, "batch_size": batch}],
                               "tasks": ["openbookqa"], "settings": ["zero-shot"], "limit": n,
                               "bootstrap_samples": 1000}))
    return tasks, exp, examples


def run_labscale(folder: Path, exp: Path, rep: int, n: int) -> tuple[float, dict[str, dict]]:
    db = folder / f"labscale-{rep}.db"
    cmd = [sys.executable, "-m", "labscale", "run", str(exp), "--db", str(db)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"labscale run failed:\n{res.stderr[-3000:]}")
    import sqlite3

    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT example_id, output FROM predictions").fetchall()
    conn.close()
    per = {eid: json.loads(output)["logprobs"] for eid, output in rows}
    if len(per) != n:
        sys.exit(f"labscale scored {len(per)} questions, expected {n}")
    return wall, per


def run_lmeval(folder: Path, tasks: Path, pretrained: Path, rep: int, batch: int, n: int):
    out = folder / f"lmeval-{rep}"
    exe = Path(sys.executable).with_name("lm-eval")
    cmd = [str(exe) if exe.exists() else "lm-eval", "run", "--model", "hf",
           "--model_args", f"pretrained={pretrained},dtype=float32", "--tasks", "obqa_local",
           "--include_path", str(tasks), "--batch_size", str(batch), "--device", "cpu",
           "--output_path", str(out), "--log_samples"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"lm-eval failed:\n{res.stderr[-3000:]}")
    from labscale.tasks.lm_eval_task import lm_eval_samples

    try:
        per = lm_eval_samples(out)
    except FileNotFoundError as e:
        sys.exit(str(e))
    if len(per) != n:
        sys.exit(f"lm-eval scored {len(per)} questions, expected {n}")
    return wall, per


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="questions (default 500: the whole test split)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="runs of each side, interleaved (default 3)")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("lm_eval is not installed: scripts/setup.sh --dev (lm_eval==0.4.13)")
    from labscale.models.embedded import ensure_converted

    pretrained = ensure_converted("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tasks, exp, examples = write_inputs(folder, args.n, args.batch_size)
        ids = [ex.id for ex in examples]
        choices = {ex.id: ex.choices for ex in examples}
        gold = {ex.id: ex.gold for ex in examples}
        print(f"OpenBookQA test, {len(ids)} questions x 4 choices; SmolLM2-135M-Instruct fp32 on CPU; batch "
              f"{args.batch_size}; {os.cpu_count()} CPUs; {load()}")
        times: dict[str, list[float]] = {"labscale": [], "lm-eval hf": []}
        per: dict[str, dict] = {}
        for rep in range(args.reps):
            order = ["labscale", "lm-eval hf"] if rep % 2 == 0 else ["lm-eval hf", "labscale"]
            for side in order:
                if side == "labscale":
                    wall, got = run_labscale(folder, exp, rep, len(ids))
                else:
                    wall, got = run_lmeval(folder, tasks, pretrained, rep, args.batch_size, len(ids))
                times[side].append(wall)
                per.setdefault(side, got)
                if got != per[side]:
                    print(f"  note: {side} run {rep + 1} scored differently from its first run")
            print(f"  round {rep + 1}: " + ", ".join(f"{s} {t[-1]:.1f} s" for s, t in times.items()) + f"; {load()}")
        t_ls, t_lm = statistics.median(times["labscale"]), statistics.median(times["lm-eval hf"])
        picks = {side: {i: choose(per[side][i], choices[i], gold[i]) for i in ids} for side in per}
        print(f"\n{'':<12}{'median s':>9}{'questions/s':>13}{'acc':>8}{'acc_norm':>10}   runs (s)")
        for side, t in (("labscale", t_ls), ("lm-eval hf", t_lm)):
            acc = statistics.mean(picks[side][i][2] for i in ids)
            accn = statistics.mean(picks[side][i][3] for i in ids)
            print(f"{side:<12}{t:>9.1f}{len(ids) / t:>13.2f}{acc:>8.3f}{accn:>10.3f}   "
                  f"{', '.join(f'{x:.1f}' for x in times[side])}")
        a, b = picks["labscale"], picks["lm-eval hf"]
        same = sum(a[i][0] == b[i][0] for i in ids)
        same_norm = sum(a[i][1] == b[i][1] for i in ids)
        diff = max(abs(x - y) for i in ids for x, y in zip(per["labscale"][i], per["lm-eval hf"][i]))
        print(f"speed-up (end to end, median): {t_lm / t_ls:.2f}x (target >= 1.2x)")
        print(f"same choice (acc): {same}/{len(ids)}; same choice (acc_norm): {same_norm}/{len(ids)}; "
              f"largest log-likelihood difference {diff:.2e}")
        for i in ids:
            if a[i][:2] != b[i][:2]:
                print(f"  {i}: labscale {per['labscale'][i]} vs lm-eval {per['lm-eval hf'][i]}")
        print(load())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
