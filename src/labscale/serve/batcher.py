"""Dynamic batching: one worker thread turns concurrent requests into batched `backend.generate` calls.

`submit` queues a request and returns a `concurrent.futures.Future` at once (HTTP handlers await it with
`asyncio.wrap_future`, so the event loop never waits on the model). The worker takes the first queued request,
gathers whatever else arrives within `wait_ms` (at most `batch_size` in all; what is already queued is taken
without waiting), and runs one `generate` call for the lot: requests for different adapters share it, requests
with different decoding parameters become separate sub-batches inside it. A request cancelled before its batch
starts is skipped. Per-token callbacks (streaming) run on the worker thread.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from labscale.models.base import GenerationRequest, GenerationResult, ModelBackend


class ShuttingDown(RuntimeError):
    """The batcher stopped before the request ran."""


@dataclass
class _Job:
    request: GenerationRequest
    future: Future = field(default_factory=Future)
    on_token: Callable[[int], None] | None = None


@dataclass
class BatcherStats:
    batches: int = 0  # generate calls made
    requests: int = 0  # requests they served
    largest_batch: int = 0
    busy_s: float = 0.0  # time spent in generate

    def as_dict(self) -> dict:
        return {"batches": self.batches, "requests": self.requests, "largest_batch": self.largest_batch,
                "busy_s": round(self.busy_s, 3)}


class Batcher:
    def __init__(self, backend: ModelBackend, batch_size: int = 16, wait_ms: float = 5.0):
        self.backend = backend
        self.batch_size = batch_size
        self.wait_s = wait_ms / 1000
        self.stats = BatcherStats()
        self.streams = "on_token" in inspect.signature(backend.generate).parameters  # token-level streaming
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # no request is queued after `stop` drained the queue
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="labscale-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, fail those still queued, and wait for the running batch to finish."""
        with self._lock:
            self._stopping.set()
            self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_queued()

    def submit(self, request: GenerationRequest, on_token: Callable[[int], None] | None = None) -> Future:
        """Queue a request; the future gets its GenerationResult (or the backend's exception)."""
        job = _Job(request, on_token=on_token)
        with self._lock:
            if self._stopping.is_set():
                job.future.set_exception(ShuttingDown("the server is shutting down"))
            else:
                self._queue.put(job)
        return job.future

    def _gather(self, first: _Job) -> list[_Job]:
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if job is None:  # stop sentinel: run what we have, then stop
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while not self._stopping.is_set():
            first = self._queue.get()
            if first is None:
                break
            jobs = [j for j in self._gather(first) if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._run_batch(jobs)

    def _run_batch(self, jobs: list[_Job]) -> None:
        kw = {}
        if self.streams and any(j.on_token for j in jobs):
            callbacks = [j.on_token for j in jobs]

            def on_token(i: int, token: int) -> None:
                cb = callbacks[i]
                if cb is not None:
                    try:
                        cb(token)
                    except Exception:  # noqa: BLE001 - a broken stream must not fail the batch
                        callbacks[i] = None

            kw["on_token"] = on_token
        t0 = time.perf_counter()
        try:
            results: list[GenerationResult] = self.backend.generate([j.request for j in jobs], **kw)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request
            for j in jobs:
                j.future.set_exception(e)
            return
        finally:
            s = self.stats
            s.batches += 1
            s.requests += len(jobs)
            s.largest_batch = max(s.largest_batch, len(jobs))
            s.busy_s += time.perf_counter() - t0
        for j, r in zip(jobs, results):
            j.future.set_result(r)

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server is shutting down"))
