"""lm-evaluation-harness as the client: its `local-completions` model (token-id prompts, `echo` + `logprobs`,
several prompts per request) scores OpenBookQA through a real `labscale serve` process, and agrees with labscale
scoring the same questions locally (the `embedded:` backend) and through the same server (`openai:` with
`loglikelihood: completions`): the same log-likelihood per choice (to float noise), the same chosen answer for every
question, the same acc and acc_norm."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, write_experiment
from test_serve_eval import EMBEDDED, start_server, stop_server

N = 24  # questions


def _labscale(db, model: str) -> dict[str, list[float]]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT p.example_id, p.output FROM predictions p JOIN runs r ON r.id = p.run_id "
                        "WHERE r.model = ?", (model,)).fetchall()
    conn.close()
    return {eid: json.loads(out)["logprobs"] for eid, out in rows}


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.subprocess
def test_lm_eval_through_labscale_serve_agrees_with_labscale(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm_eval is a test-only dependency: scripts/setup.sh --dev")
    from labscale.models.embedded import ensure_converted
    from labscale.tasks.lm_eval_task import lm_eval_samples, picks, write_lm_eval_task
    from labscale.tasks.registry import get_task

    examples = get_task("openbookqa", tmp_path).split("test", N)  # exactly the questions `labscale run` scores
    tasks = write_lm_eval_task(examples, tmp_path)
    tokenizer = ensure_converted("smollm2-135m-instruct")  # the served model's own tokenizer

    proc, url = start_server("--model", EMBEDDED, "--served-name", "smollm2", "--batch-size", "8")
    try:
        exe = Path(sys.executable).with_name("lm-eval")
        out = tmp_path / "lmeval"
        res = subprocess.run(
            [str(exe) if exe.exists() else "lm-eval", "run", "--model", "local-completions", "--model_args",
             f"model=smollm2,base_url={url}/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,"
             "num_concurrent=1,max_retries=1", "--batch_size", "4", "--tasks", "obqa_local", "--include_path", str(tasks),
             "--output_path", str(out), "--log_samples"],
            capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        served = {"id": "openai:smollm2", "base_url": url, "api_key_env": None, "loglikelihood": "completions",
                  "concurrency": 4}
        exp = write_experiment(tmp_path / "obqa.yaml", name="obqa", models=[EMBEDDED, served],
                               tasks=["openbookqa"], limit=N, bootstrap_samples=200)
        code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "obqa.db")
        assert code == 0, err
    finally:
        assert stop_server(proc) == 0

    lm_eval = lm_eval_samples(out)
    local, http = _labscale(tmp_path / "obqa.db", EMBEDDED), _labscale(tmp_path / "obqa.db", "openai:smollm2")
    assert len(lm_eval) == len(local) == len(http) == N
    worst = 0.0
    for ex in examples:
        a, b, c = lm_eval[ex.id], local[ex.id], http[ex.id]
        worst = max(worst, *(abs(x - y) for x, y in zip(a, b)), *(abs(x - y) for x, y in zip(c, b)))
        assert picks(a, ex.choices) == picks(b, ex.choices) == picks(c, ex.choices), ex.id
    assert worst < 1e-3, worst
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]["obqa_local"]
    from labscale.results import load_results

    res = load_results(tmp_path / "obqa.db")
    for metric in ("acc", "acc_norm"):
        assert results[f"{metric},none"] == pytest.approx(res.score("openbookqa", EMBEDDED, metric=metric).value)
        assert res.score("openbookqa", "openai:smollm2", metric=metric).value == \
            res.score("openbookqa", EMBEDDED, metric=metric).value
    assert res.run("openbookqa", "openai:smollm2").protocol == "loglikelihood"
    print(f"lm-eval agreement: {N} questions, max |Δ log-likelihood| {worst:.2e}; lm-eval through labscale serve "
          f"acc {results['acc,none']:.3f} acc_norm {results['acc_norm,none']:.3f}; labscale local acc "
          f"{res.score('openbookqa', EMBEDDED, metric='acc').value:.3f} acc_norm "
          f"{res.score('openbookqa', EMBEDDED, metric='acc_norm').value:.3f}")
