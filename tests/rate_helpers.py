"""Shared by the rating tests: a small experiment database with generated outputs, and the rating app served on
a free loopback port in a background thread."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from synthetic import make_db, run_spec

MODELS = ("closed-model-x", "small-model-y")


def rating_db(path: Path, n: int = 10) -> Path:
    """Task `summ` with two models' outputs (`closed-model-x` / `small-model-y` in the names: they must never
    reach the page), and task `cls` with one."""
    runs = [run_spec("summ", MODELS[0], "zero-shot", [0.5] * n, metric="rougeL", remote=True,
                     outputs=[f"closed summary {i}" for i in range(n)], instruction="Summarize the dialogue."),
            run_spec("summ", MODELS[1], "zero-shot", [0.3] * n, metric="rougeL",
                     outputs=[f"small summary {i}" for i in range(n)], instruction="Summarize the dialogue."),
            run_spec("cls", MODELS[1], "zero-shot", [1.0] * 4, outputs=["yes", "no", "yes", "no"])]
    return make_db(path, runs, {"reference": MODELS[0]})


@contextlib.contextmanager
def serving(db: Path, mode: str = "absolute", task: str | None = "summ", token: str | None = None):
    import uvicorn

    from labscale.rate.app import create_app
    from labscale.rate.server import prepare
    from labscale.serve.server import bind

    exp_id, items = prepare(db, mode, task, None)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(db, exp_id, mode, task, items, token), log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", items
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
