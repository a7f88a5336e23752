"""Model calls through the generation cache — for evaluation runs, and for anything else that asks a model
(a teacher labelling training data, a prompt optimizer's trials).

A generation is keyed by (model fingerprint, exact rendered prompt, decoding parameters); a cached one is never
requested again. `GenerationCache.generate` sends only the missing prompts, longest first, one backend batch at a
time, and commits every batch to the store as soon as it returns, so a killed process loses at most the batch in
flight and a re-run repeats no finished call. For a priced model every batch is first admitted by the spending
cap (worst case: the prompt's tokens and the whole max_new_tokens), and what stored calls cost counts against it
once. Failed requests (API errors after retries) are returned, not cached, so a re-run retries them.

Where the calls run is the `executor`'s business (engine/parallel.py): in this process, or — in a data-parallel
launch — one batch per process at a time, each exactly a batch this process would have run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from labscale.efficiency.cost import SpendingCap, cost_usd
from labscale.engine.parallel import LOCAL, Executor
from labscale.engine.store import Store
from labscale.hashing import sha
from labscale.models.base import DecodingParams, GenerationRequest, ModelBackend


@dataclass
class Counts:
    new: int = 0
    cached: int = 0
    failed: int = 0  # requests that failed after their retries (recorded, not cached)


def generation_key(fingerprint: str, prompt: str, params: dict) -> str:
    return sha(["generate", fingerprint, prompt, params])


def loglikelihood_key(fingerprint: str, context: str, continuation: str) -> str:
    return sha(["loglikelihood", fingerprint, context, continuation])


@dataclass
class CachedCalls:
    """The outcome of one `generate`: a key per prompt (in order), the stored row of every answered key, and the
    reason of every key whose request failed."""

    keys: list[str]
    rows: dict = field(default_factory=dict)  # key -> sqlite3.Row of the generations table
    failures: dict[str, str] = field(default_factory=dict)
    retries: int = 0

    def text(self, i: int) -> str | None:
        """The i-th prompt's generation, or None when its request failed."""
        row = self.rows.get(self.keys[i])
        return None if row is None else row["text"]


class GenerationCache:
    def __init__(self, store: Store, counts: Counts | None = None, cap: SpendingCap | None = None,
                 executor: Executor = LOCAL):
        self.store = store
        self.counts = counts if counts is not None else Counts()
        self.cap = cap if cap is not None else SpendingCap(None)
        self.executor = executor

    def generate(self, backend: ModelBackend, prompts: list[tuple[str, int]], decoding: DecodingParams,
                 batch_size: int, advance: Callable[[int], None] = lambda n: None) -> CachedCalls:
        """Generations for (rendered prompt, prompt tokens) pairs; `advance(n)` reports prompts done."""
        fp = backend.info.fingerprint
        price = backend.info.price
        params = decoding.key()
        keys = [generation_key(fp, prompt, params) for prompt, _ in prompts]
        have = self.store.cached_generations(keys)
        for key, row in have.items():
            self.cap.add(key, cost_usd(price, row["prompt_tokens"], row["new_tokens"]))
        todo: dict[str, tuple[str, int]] = {}
        for key, p in zip(keys, prompts):
            if key not in have and key not in todo:
                todo[key] = p
        hits = sum(k in have for k in keys)
        self.counts.cached += hits
        advance(hits)
        calls = CachedCalls(keys)
        pending = sorted(todo.items(), key=lambda kv: -kv[1][1])  # longest prompts first
        width = self.executor.width_for(backend)
        while pending:
            chunk = pending[:batch_size * width]
            if price is not None:  # spending: admit only what fits under the cap, worst case
                worst = [cost_usd(price, tokens, decoding.max_new_tokens) or 0.0 for _, (_, tokens) in chunk]
                chunk = chunk[: self.cap.admit(worst)]
            pending = pending[len(chunk):]
            results = self.executor.generate(backend, [GenerationRequest(prompt, decoding) for _, (prompt, _) in chunk],
                                             batch_size)
            self.store.put_generations([
                {"key": key, "model_fingerprint": fp, "prompt": prompt, "params": params, "text": r.text,
                 "prompt_tokens": r.prompt_tokens, "new_tokens": r.new_tokens, "latency_s": r.latency_s,
                 "compute_s": r.compute_s, "finish_reason": r.finish_reason, "usage_estimated": r.usage_estimated}
                for (key, (prompt, _)), r in zip(chunk, results) if r.error is None
            ])
            for (key, _), r in zip(chunk, results):
                if r.error is None:
                    self.cap.add(key, cost_usd(price, r.prompt_tokens, r.new_tokens))
                    self.counts.new += 1
                else:
                    calls.failures[key] = r.error
                    self.counts.failed += 1
                calls.retries += r.retries
            done = {key for key, _ in chunk}
            advance(sum(k in done for k in keys))
        calls.rows = self.store.cached_generations(keys)
        return calls
