"""`labscale rate`: check the database and the items first (one-line errors, nothing written), then bind the port
(127.0.0.1 by default) and serve the rating app until Ctrl-C."""

from __future__ import annotations

import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def prepare(db: Path, mode: str, task: str | None, experiment: str | None):
    """(experiment id, items) of the database, read-only; a one-line error when there is nothing to rate."""
    from labscale.engine.store import Store, check_db_path, require_db
    from labscale.rate.items import load_items

    require_db(db)
    check_db_path(db)
    store = Store(db, readonly=True)
    try:
        exp = store.require_experiment(experiment)
        return int(exp["id"]), load_items(store, exp["id"], mode, task)
    finally:
        store.close()


def serve(db: Path, mode: str = "absolute", task: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, experiment: str | None = None) -> None:
    import signal

    import uvicorn

    from labscale.rate.app import create_app
    from labscale.secrets import register
    from labscale.serve.server import bind

    register(token)  # never printed, but an error text could carry it
    exp_id, items = prepare(db, mode, task, experiment)
    sock = bind(host, port)
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them: the URL works once printed
    try:
        app = create_app(db, exp_id, mode, task, items, token)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        bound = sock.getsockname()
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        print(f"labscale rate: {len(items)} {mode} items at http://{url_host}:{bound[1]}/"
              f"{' (open it with ?token=<your token>)' if token else ''}; Ctrl-C to stop", file=sys.stderr, flush=True)
        if token is None and host not in LOOPBACK:
            print(f"warning: listening on {host} without --token-env: anyone who can reach it can rate",
                  file=sys.stderr, flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        sock.close()
