"""Continuous (or dynamic) batching: one worker thread turns concurrent requests into batched `backend.generate`
calls.

`submit` queues a request and returns a `concurrent.futures.Future` at once (HTTP handlers await it with
`asyncio.wrap_future`, so the event loop never waits on the model). The worker takes the first queued request,
gathers whatever else arrives within `wait_ms` (at most `batch_size` in all; what is already queued is taken
without waiting), and runs one `generate` call for the lot: requests for different adapters share it. A request
cancelled before it joins a batch is skipped. Per-token callbacks (streaming) run on the worker thread.

Continuous batching, where the backend's `generate` takes `admit` and `on_result` (the HF backend; see
models/hf/generation.py): the call keeps decoding while requests come and go. Before each decode step it asks
for queued requests to fill the free rows, and they join the batch at that step instead of waiting for the
whole batch to finish; each request's future is resolved the moment its row finishes. Requests with different
decoding parameters and adapters share the batch. Otherwise (backends without those hooks): dynamic batching,
one `generate` call per gathered batch, requests with different decoding parameters in separate sub-batches
inside it. `continuous=False` forces dynamic batching (the serving benchmark's "before").

Stopping, in three steps the server's shutdown drives (server.py):
- `close()`: no new request is taken (`submit` fails with `ShuttingDown`); what is queued or running still runs,
  and the worker exits once the queue is empty. `wait_idle(timeout)` waits for that.
- `cancel()`: the running batch stops at its next decode step (the backend's `should_stop` hook, where its
  `generate` takes one) and queued requests are failed; unfinished requests fail with `Cancelled`.
- `join(timeout)`: wait for the worker thread to exit. `stop(grace_s)` does all three.

`hold()` (a context manager) keeps the worker from starting a new batch, or admitting requests into a running
one, while it is held, so that requests queue up: the tests use it to build batches deterministically instead of
relying on `wait_ms`. `stats` counts batches (`generate` calls), the requests they served and the most requests
decoding at once (`largest_batch`); `reset_stats()` starts them afresh.
"""

from __future__ import annotations

import contextlib
import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from labscale.models.base import GenerationRequest, GenerationResult, ModelBackend

CANCELLED = "cancelled"  # the finish reason the backend gives a row cut by `should_stop`


class ShuttingDown(RuntimeError):
    """The batcher is closed: the request was not taken, or was cancelled (`Cancelled`)."""


class Cancelled(ShuttingDown):
    """The request was accepted but cancelled by `Batcher.cancel` before it finished."""


@dataclass
class _Job:
    request: GenerationRequest
    future: Future = field(default_factory=Future)
    on_token: Callable[[int], None] | None = None


@dataclass
class BatcherStats:
    batches: int = 0  # generate calls made
    requests: int = 0  # requests they served
    largest_batch: int = 0  # most requests in one generate call at once
    busy_s: float = 0.0  # time spent in generate
    cancelled: int = 0  # requests cancelled (by `cancel`) before they finished

    def as_dict(self) -> dict:
        return {"batches": self.batches, "requests": self.requests, "largest_batch": self.largest_batch,
                "busy_s": round(self.busy_s, 3), "cancelled": self.cancelled}


class Batcher:
    def __init__(self, backend: ModelBackend, batch_size: int = 16, wait_ms: float = 5.0, continuous: bool = True):
        self.backend = backend
        self.batch_size = batch_size
        self.wait_s = wait_ms / 1000
        self.stats = BatcherStats()
        params = inspect.signature(backend.generate).parameters
        self.streams = "on_token" in params  # token-level streaming
        self.cancellable = "should_stop" in params  # a running batch can be cut short
        # requests join a running batch (see the module docstring)
        self.continuous = continuous and "admit" in params and "on_result" in params
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._cond = threading.Condition()  # guards the fields below
        self._closed = False  # no request is queued once closed
        self._held = False
        self._pending = 0  # submitted and not yet resolved
        self._running = 0  # requests in the batch being generated
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="labscale-batcher", daemon=True)
            self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Requests submitted and not yet answered (queued or running)."""
        return self._pending

    @property
    def running(self) -> int:
        """Requests in the batch being generated now."""
        return self._running

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Take no new request; queued and running ones still run, then the worker exits."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
            self._cond.notify_all()

    def cancel(self) -> None:
        """Close, cut the running batch at its next decode step, and fail the queued requests (`Cancelled`)."""
        self.close()
        with self._cond:
            self._cancel.set()
            self._cond.notify_all()
        self._fail_queued()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is pending; False if some still are after `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker thread to exit; False if it is still running after `timeout` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    def stop(self, grace_s: float = 0.0, join_s: float | None = 30.0) -> bool:
        """Close, let pending requests finish for up to `grace_s` seconds, cancel the rest, join the worker.
        True once the worker has exited."""
        self.close()
        self.wait_idle(grace_s)
        self.cancel()
        return self.join(join_s)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While held, the worker starts no new batch (a running one finishes): requests queue up."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def reset_stats(self) -> BatcherStats:
        """Start the statistics afresh; returns the old ones."""
        with self._cond:
            old, self.stats = self.stats, BatcherStats()
        return old

    # ----------------------------------------------------------------------------------------------- requests

    def submit(self, request: GenerationRequest, on_token: Callable[[int], None] | None = None) -> Future:
        """Queue a request; the future gets its GenerationResult (or the backend's exception, or ShuttingDown)."""
        job = _Job(request, on_token=on_token)
        with self._cond:
            if self._closed:
                job.future.set_exception(ShuttingDown("the server is shutting down and takes no new requests"))
                return job.future
            self._pending += 1
            self._queue.put(job)
        job.future.add_done_callback(self._resolved)
        return job.future

    def _resolved(self, _future: Future) -> None:
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def _should_stop(self) -> bool:
        return self._cancel.is_set()

    # ----------------------------------------------------------------------------------------------- worker

    def _gather(self, first: _Job) -> list[_Job]:
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.batch_size and not self._cancel.is_set():
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
            if job is None:  # closed: run what we have, then stop
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            with self._cond:
                self._cond.wait_for(lambda: not self._held or self._cancel.is_set())
            jobs = [j for j in self._gather(first) if j.future.set_running_or_notify_cancel()]
            if self._cancel.is_set():
                self._fail(jobs, "the server shut down before the request started")
                continue
            if jobs:
                (self._run_continuous if self.continuous else self._run_batch)(jobs)
        self._fail_queued()

    def _run_continuous(self, jobs: list[_Job]) -> None:
        """One `generate` call that admits queued requests at every decode step (see the module docstring)."""
        order = dict(enumerate(jobs))  # request index (as the backend numbers them) -> job not yet answered
        count = [len(jobs)]

        def admit(n: int) -> list[GenerationRequest]:
            if self._cancel.is_set() or self._held:
                return []
            taken: list[_Job] = []
            while len(taken) < n:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:  # closed: what was queued before still runs; the marker goes back
                    self._queue.put(None)
                    break
                if job.future.set_running_or_notify_cancel():
                    taken.append(job)
            if taken:
                for job in taken:
                    order[count[0]] = job
                    count[0] += 1
                with self._cond:
                    self._running += len(taken)
                    self.stats.largest_batch = max(self.stats.largest_batch, self._running)
            return [j.request for j in taken]

        def on_result(i: int, res) -> None:
            job = order.pop(i)
            with self._cond:
                self._running -= 1
                self.stats.requests += 1
            if isinstance(res, BaseException):
                job.future.set_exception(res)
            elif res.finish_reason == CANCELLED:
                self._fail([job], f"the server shut down before the request finished (cancelled after "
                                  f"{res.new_tokens} of {job.request.params.max_new_tokens} tokens)")
            else:
                job.future.set_result(res)

        kw: dict = {"admit": admit, "on_result": on_result}
        if self.streams:
            def on_token(i: int, token: int) -> None:
                job = order.get(i)
                if job is not None and job.on_token is not None:
                    try:
                        job.on_token(token)
                    except Exception:  # noqa: BLE001 - a broken stream must not fail the batch
                        job.on_token = None

            kw["on_token"] = on_token
        if self.cancellable:
            kw["should_stop"] = self._should_stop
        with self._cond:
            self._running = len(jobs)
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        t0 = time.perf_counter()
        try:
            self.backend.generate([j.request for j in jobs], **kw)
        except BaseException as e:  # noqa: BLE001 - handed to every request still waiting
            for job in order.values():
                job.future.set_exception(e)
                with self._cond:
                    self.stats.requests += 1
            order.clear()
        finally:
            with self._cond:
                self._running = 0
                self.stats.batches += 1
                self.stats.busy_s += time.perf_counter() - t0
        for job in order.values():  # a backend that returned without answering every request
            job.future.set_exception(RuntimeError("the backend returned no result for the request"))

    def _run_batch(self, jobs: list[_Job]) -> None:
        kw: dict = {}
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
        if self.cancellable:
            kw["should_stop"] = self._should_stop
        with self._cond:
            self._running = len(jobs)
        t0 = time.perf_counter()
        try:
            results: list[GenerationResult] = self.backend.generate([j.request for j in jobs], **kw)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request
            for j in jobs:
                j.future.set_exception(e)
            return
        finally:
            with self._cond:
                self._running = 0
                s = self.stats
                s.batches += 1
                s.requests += len(jobs)
                s.largest_batch = max(s.largest_batch, len(jobs))
                s.busy_s += time.perf_counter() - t0
        for j, r in zip(jobs, results):
            if r.finish_reason == CANCELLED:
                self._fail([j], f"the server shut down before the request finished (cancelled after "
                                f"{r.new_tokens} of {j.request.params.max_new_tokens} tokens)")
            else:
                j.future.set_result(r)

    def _fail(self, jobs: list[_Job], why: str) -> None:
        if jobs:
            with self._cond:
                self.stats.cancelled += len(jobs)
        for j in jobs:
            j.future.set_exception(Cancelled(why))

    def _fail_queued(self) -> None:
        """Fail every queued request that has not started (the stop marker, if taken, is put back)."""
        marker = False
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                marker = True
            elif job.future.set_running_or_notify_cancel():
                self._fail([job], "the server shut down before the request started")
        if marker and self.alive and threading.current_thread() is not self._thread:
            self._queue.put(None)
