"""Graceful shutdown of one served app: serving → draining → cancelling → stopped.

- **serving**: requests are taken.
- **draining** (on the first SIGTERM/SIGINT, `request()`): new /v1 requests get 503 (`code: server_shutting_down`,
  `Connection: close`) and /health answers 503 with `"status": "shutting_down"`, while the listening socket stays
  open so clients are told rather than refused; the batcher is closed, so requests already accepted (running or
  queued) still run. As soon as no request is in flight the state is **stopped**.
- **cancelling** (`grace_s` after the first signal, or at once on a second signal): the batcher cancels: the
  running batch stops at its next decode step and every unfinished request is answered 503 (a stream gets a final
  error event, then closes). Once those answers are sent, or `settle_s` later at the latest: **stopped**.
- **stopped**: `poll()` returns True; the server closes its socket and connections, and the app's lifespan joins
  the batcher's worker thread.

`poll()` runs on the event loop (server.py calls it every 0.1 s); `request()` only counts, so it is safe to call
from a signal handler. `clock` is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from labscale.serve.batcher import Batcher

DEFAULT_GRACE_S = 30.0
SETTLE_S = 5.0  # after cancelling: how long the cancelled requests' answers may take to be sent


class Shutdown:
    def __init__(self, batcher: Batcher, grace_s: float = DEFAULT_GRACE_S, settle_s: float = SETTLE_S,
                 log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.batcher = batcher
        self.grace_s, self.settle_s = grace_s, settle_s
        self.state = "serving"
        self.in_flight = 0  # /v1 requests being answered (counted by the app's middleware)
        self._signals = 0
        self._seen = 0
        self._deadline = 0.0
        self._log = log or (lambda _msg: None)
        self._clock = clock

    @property
    def accepting(self) -> bool:
        return self.state == "serving"

    def request(self) -> None:
        """Ask for a shutdown (a signal): the first starts draining, a later one cancels at once."""
        self._signals += 1

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    def poll(self) -> bool:
        """Advance the state machine; True once the server may stop."""
        now = self._clock()
        signals, self._seen = self._signals - self._seen, self._signals
        if self.state == "serving" and signals:
            signals -= 1  # the first drains; another one (even before this poll) cancels
            self.state = "draining"
            self._deadline = now + self.grace_s
            self.batcher.close()
            if self.in_flight:
                self._log(f"shutting down: {self.in_flight} request(s) in flight, finishing them for up to "
                          f"{self.grace_s:g} s (signal again to cancel them now)")
        if self.state == "draining":
            if self.in_flight == 0:
                self.state = "stopped"
            elif signals or now >= self._deadline:
                self.state = "cancelling"
                self._deadline = now + self.settle_s
                self._log(f"shutting down: cancelling {self.in_flight} unfinished request(s) (answered 503)")
                self.batcher.cancel()
        if self.state == "cancelling" and (self.in_flight == 0 or now >= self._deadline):
            self.state = "stopped"
        return self.state == "stopped"
