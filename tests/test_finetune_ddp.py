"""`accelerate launch` with two CPU processes (DDP over gloo) trains one valid adapter: the same `labscale
finetune` command, the main process writing the folder and its card."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import write_experiment

SYMPTOMS = ["headache", "fever", "cough", "chest pain", "nausea", "back pain", "sore throat", "dizziness"]
TASK = {"name": "notes", "data": "notes.csv", "type": "generate", "input": "{{ text }}", "target": "note",
        "instruction": "Write the complaint."}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_accelerate_launch_two_cpu_processes(tiny_llm, tmp_path):
    import csv

    with open(tmp_path / "notes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "note"])
        for i in range(40):
            w.writerow([i, f"Patient: I have had {SYMPTOMS[i % 8]} since day {i}.", f"{SYMPTOMS[i % 8]}"])
    exp = write_experiment(tmp_path / "notes.yaml", name="notes", models=[f"hf:{tiny_llm}"], tasks=[TASK])
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "labscale", "finetune", "--model", f"hf:{tiny_llm}",
           "--task", "notes", "--experiment", str(exp), "--max-steps", "3", "--set", "eval_every=2",
           "--set", "grad_accum=2", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(f"adapter: {out}") == 1  # only the main process reports
    card = json.loads((out / "labscale.json").read_text())
    t = card["training"]
    assert t["processes"] == 2 and t["distributed"].endswith("MULTI_CPU") and t["backend"] == "gloo"
    assert t["steps"] == 3 and card["accounting"]["devices"] == 2
    # each optimizer step saw 2 processes × 2 micro-batches of one example
    assert t["train_tokens"] > 3 * 2 * 2 * 20
    # a valid adapter: plain peft loads it, and labscale evaluates it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm), str(out))
    from labscale.config import ModelSpec
    from labscale.models.base import DecodingParams, GenerationRequest
    from labscale.models.registry import resolve_model

    adapter = resolve_model(ModelSpec(id=f"adapter:{out}"))
    prompt = adapter.render([{"role": "user", "content": "Write the complaint.\n\nPatient: I have a cough."}])
    (result,) = adapter.generate([GenerationRequest(prompt, DecodingParams(max_new_tokens=4))])
    assert result.new_tokens >= 1
