"""`labscale serve` end to end: bind the port, load the model and its adapters, run uvicorn until a signal.

The port is bound first, so a busy port fails before the model loads; connections are refused until the model
is loaded (then /health answers 200). On SIGTERM or SIGINT uvicorn stops accepting connections, lets running
requests finish, and the app's lifespan stops the batcher; the process then exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys

from labscale.errors import LabscaleError, ModelError


def load_backend(model: str, adapters: dict[str, str], batch_size: int):
    """The local backend for `model` (embedded:… or hf:…), weights loaded, with `adapters` (name -> folder)."""
    from labscale.config import ModelSpec
    from labscale.models.hf import HFBackend
    from labscale.models.registry import resolve_model

    if not model.startswith(("embedded:", "hf:")):
        raise ModelError(f"'{model}' is not a local model", "labscale serve serves embedded:<name> or hf:<id or path>")
    try:
        spec = ModelSpec(id=model, batch_size=batch_size)
    except ValueError as e:
        raise LabscaleError(f"invalid model '{model}': {e}", "use embedded:<name> or hf:<hub id or path>") from None
    backend = resolve_model(spec)
    assert isinstance(backend, HFBackend)
    _ = backend.model
    for name, path in adapters.items():
        backend.load_adapter(name, path)
    return backend


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LabscaleError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                            "pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def serve(
    model: str,
    adapters: dict[str, str],
    host: str = "127.0.0.1",
    port: int = 8000,
    served_name: str | None = None,
    api_key: str | None = None,
    batch_size: int = 16,
    max_body_bytes: int = 4 << 20,
    batch_wait_ms: float = 10.0,
) -> None:
    import uvicorn

    from labscale.serve.app import create_app
    from labscale.serve.batcher import Batcher

    from labscale.secrets import register

    register(api_key)  # never printed, but an error text could carry it
    base_name = served_name or model
    if base_name in adapters:
        raise LabscaleError(f"adapter name '{base_name}' is also the base model's name", "rename the adapter")
    sock = bind(host, port)
    try:
        backend = load_backend(model, adapters, batch_size)
        app = create_app(backend, Batcher(backend, batch_size, batch_wait_ms), base_name, list(adapters), api_key,
                         max_body_bytes)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=60)
        server = uvicorn.Server(config)
        bound = sock.getsockname()
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        names = ", ".join([base_name, *adapters])
        print(f"labscale serve: {names} at http://{url_host}:{bound[1]}/v1"
              f"{' (API key required)' if api_key else ''}; Ctrl-C to stop", file=sys.stderr, flush=True)
        if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {host} without --api-key-env: anyone who can reach it can use it",
                  file=sys.stderr, flush=True)
        # uvicorn re-raises the signal it shut down on once it is done; a requested shutdown is a clean exit
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        sock.close()
