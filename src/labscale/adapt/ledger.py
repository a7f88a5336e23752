"""The ledger: wall time and emissions of every training segment (a first run and each resumption), so cost and
carbon cover all the work, including work lost to an interruption.

Stored as JSON beside the checkpoints, rewritten atomically after every step (time) and every checkpoint
(emissions); only the main process writes. Durations come from `clock` (default `time.monotonic`; injectable for
tests); `started_at` is the wall-clock time the segment began.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from labscale.atomic import write_atomic


class Ledger:
    def __init__(self, path: Path, writable: bool = True, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.clock = clock
        self.writable = writable
        try:
            self.prior: list[dict] = json.loads(path.read_text())["segments"]
        except (OSError, ValueError, KeyError, TypeError):
            self.prior = []
        self.started = time.time()
        self._t0 = clock()
        self.kg = 0.0  # this segment's emissions measured so far
        self.kwh = 0.0

    @property
    def segment_seconds(self) -> float:
        return self.clock() - self._t0

    @property
    def prior_seconds(self) -> float:
        return sum(s.get("seconds", 0.0) for s in self.prior)

    @property
    def prior_kg(self) -> float:
        return sum(s.get("kg", 0.0) or 0.0 for s in self.prior)

    @property
    def prior_kwh(self) -> float:
        return sum(s.get("kwh", 0.0) or 0.0 for s in self.prior)

    def total_seconds(self) -> float:
        return self.prior_seconds + self.segment_seconds

    def total_kg(self) -> float:
        return self.prior_kg + self.kg

    def total_kwh(self) -> float:
        return self.prior_kwh + self.kwh

    def segments(self) -> int:
        return len(self.prior) + 1

    def save(self) -> None:
        if not self.writable:
            return
        current = {"started_at": self.started, "seconds": self.segment_seconds, "kg": self.kg, "kwh": self.kwh}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"segments": [*self.prior, current]}, indent=1))
