"""`labscale serve` end to end: bind the port, load the model and its adapters, run uvicorn until a signal.

The port is bound first, so a busy port fails before the model loads; connections are refused until the model
is loaded (then /health answers 200).

Shutdown. SIGTERM or SIGINT starts the app's drain (shutdown.py): new requests get 503 while requests in flight
finish, for up to `grace_s` seconds; then (or at a second signal) the unfinished ones are cancelled at their next
decode step and answered 503. Once every answer is sent, uvicorn closes the socket and the connections (waiting
at most SETTLE_S more for slow clients), the app's lifespan joins the batcher's worker thread, and the process
exits 0. It never exits while the worker is inside torch: if the worker has not stopped WORKER_JOIN_S after
being cancelled (a forward pass that long), the process says so and exits 1 without running the interpreter's
teardown, which is what aborted it before (`terminate called without an active exception`, status 134).
"""

from __future__ import annotations

import os
import socket
import sys

from labscale.errors import LabscaleError, ModelError


def load_backend(model: str, adapters: dict[str, str], batch_size: int):
    """The local backend for `model` (embedded:… or hf:…), weights loaded, with `adapters` (name -> folder)."""
    from labscale.config import ModelSpec
    from labscale.models.hf import HFBackend
    from labscale.models.registry import resolve_model

    if not model.startswith(("embedded:", "hf:", "adapter:")):
        raise ModelError(f"'{model}' is not a local model",
                         "labscale serve serves embedded:<name>, hf:<id or path> or adapter:<folder>")
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


def draining_server(app, **config):
    """A uvicorn server whose SIGTERM/SIGINT drive `app.state.shutdown` (shutdown.py) instead of stopping at once:
    the first signal drains, a second cancels, and the server stops when the drain is done. `config`: more
    `uvicorn.Config` options. Calling `handle_exit` by hand (from any thread) does what a signal does."""
    import uvicorn

    from labscale.serve.shutdown import SETTLE_S

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # a signal handler: only counts
            app.state.shutdown.request()

        async def on_tick(self, counter: int) -> bool:
            stop = await super().on_tick(counter)
            return app.state.shutdown.poll() or stop

    config = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": SETTLE_S, **config}
    return DrainingServer(uvicorn.Config(app, **config))


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
    grace_s: float = 30.0,
    continuous: bool = True,
) -> None:
    from labscale.serve.app import WORKER_JOIN_S, create_app
    from labscale.serve.batcher import Batcher

    from labscale.secrets import register

    register(api_key)  # never printed, but an error text could carry it
    base_name = served_name or model
    if base_name in adapters:
        raise LabscaleError(f"adapter name '{base_name}' is also the base model's name", "rename the adapter")
    sock = bind(host, port)
    try:
        backend = load_backend(model, adapters, batch_size)
        batcher = Batcher(backend, batch_size, batch_wait_ms, continuous=continuous)

        def log(line: str) -> None:
            print(f"labscale serve: {line}", file=sys.stderr, flush=True)

        app = create_app(backend, batcher, base_name, list(adapters), api_key, max_body_bytes, grace_s, log)
        server = draining_server(app)
        bound = sock.getsockname()
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        names = ", ".join([base_name, *adapters])
        print(f"labscale serve: {names} at http://{url_host}:{bound[1]}/v1"
              f"{' (API key required)' if api_key else ''}; Ctrl-C to stop", file=sys.stderr, flush=True)
        if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {host} without --api-key-env: anyone who can reach it can use it",
                  file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not batcher.stop(0.0, WORKER_JOIN_S):  # normally already stopped by the app's lifespan
        log(f"the generation worker did not stop within {WORKER_JOIN_S:g} s of being cancelled; exiting without "
            "waiting for it")
        sys.stdout.flush()
        os._exit(1)
    log("stopped")
