"""Generation: requests → batches → new tokens → text.

Requests are grouped by decoding parameters, sorted by prompt length (longest first) and run in batches of
`spec.batch_size`. Each batch runs on labscale's own decode path (fastdecode.py) where the model suits it, else as
one left-padded `model.generate` call (`generate_with_transformers`). Greedy when temperature is 0, else sampling
with temperature and top_p (top_k off) after `torch.manual_seed(seed)` per batch. The model's own
`generation_config` sampling defaults (repetition penalty, top_k, …) are not applied: the experiment's decoding
parameters are the whole story. A row stops at EOS (the tokenizer's and the generation config's) or once its
generated text contains a stop string; its text is then cut at the first stop string. Greedy batched output
equals one-at-a-time `model.generate` output (tested); in floating point the two can in principle differ on a
near-tie, as any change of batch shape can.

Streaming. `generate(..., on_token=f)` calls `f(request index, token id)` for every new token as the fast path
produces it (EOS included); the `model.generate` fallback produces no per-token calls.

Cancellation. `generate(..., should_stop=f)` polls `f()` before each batch and once per decode step (on the
fallback, a StoppingCriteria after each step). Once it returns True the call returns promptly: rows of the running
batch that had not finished keep the tokens generated so far, and requests whose batch had not started get no
tokens; both have finish_reason "cancelled". Cancelled results are partial: callers must not cache or score them
(`labscale serve` answers them 503 at shutdown; evaluation never passes `should_stop`).

Continuous batching. `generate(..., admit=f, on_result=g)` keeps one batch decoding while requests come and go
(what `labscale serve` uses): before each decode step it asks `admit(n)` for at most n new requests (n = the free
rows of `spec.batch_size`), which are prefilled and join the batch at that step (fastdecode.py `DecodeBatch`); a
request that finishes leaves the batch at once and is handed to `on_result(index, result)` (indices: `requests`
first, then admitted requests in the order admitted). Requests with different decoding parameters and adapters
share the batch. The call returns once the batch is empty and `admit` offers nothing; results are handed to
`on_result` only (the call returns an empty list, and keeps nothing of a request once it is handed over: a
server's generation can run for as long as requests keep coming). A request that cannot run (unknown adapter, too long) gets its ModelError as its result instead of
failing the others. Models the fast path does not suit run each admitted group through `model.generate`.
`latency_s` is then the request's time from joining to finishing and `compute_s` its share of the steps and
prefill it took part in.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from labscale.errors import ModelError
from labscale.models.base import GenerationRequest, GenerationResult, Progress
from labscale.models.hf.loading import oom_guard

if TYPE_CHECKING:
    from labscale.models.hf.backend import HFBackend

TokenCallback = Callable[[int, int], None]  # (request index, new token id)
ShouldStop = Callable[[], bool]  # True: cancel (see the module docstring)
Admit = Callable[[int], list[GenerationRequest]]  # at most n new requests that join the running batch
ResultCallback = Callable[[int, "GenerationResult | Exception"], None]  # (request index, its result)
CANCELLED = "cancelled"  # the finish reason of a row cut by `should_stop`


def generate(
    backend: HFBackend,
    requests: list[GenerationRequest],
    progress: Progress | None = None,
    on_token: TokenCallback | None = None,
    should_stop: ShouldStop | None = None,
    admit: Admit | None = None,
    on_result: ResultCallback | None = None,
) -> list[GenerationResult]:
    """Results in request order (see the module docstring)."""
    if on_result is not None:
        return generate_continuous(backend, requests, progress, on_token, should_stop, admit, on_result)
    if not requests:
        return []
    backend.adapter_set.check([r.adapter for r in requests])
    encoded = [backend.encode(r.prompt) for r in requests]
    ctx = backend.context_length
    for r, ids in zip(requests, encoded):
        if len(ids) + r.params.max_new_tokens > ctx:
            raise ModelError(
                f"a prompt of {len(ids)} tokens plus {r.params.max_new_tokens} new tokens exceeds "
                f"{backend.display_name}'s context length of {ctx}",
                "use fewer or shorter examples in the prompt, or lower max_new_tokens",
            )
    _ = backend.model
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.params].append(i)
    results: list[GenerationResult | None] = [None] * len(requests)
    bs = backend.spec.batch_size
    for params, idxs in groups.items():
        idxs.sort(key=lambda i: (-len(encoded[i]), i))
        for start in range(0, len(idxs), bs):
            batch = idxs[start : start + bs]
            if should_stop is not None and should_stop():
                for i in batch:
                    results[i] = GenerationResult("", len(encoded[i]), 0, 0.0, 0.0, finish_reason=CANCELLED)
                continue
            cb = None if on_token is None else (lambda j, t, batch=batch: on_token(batch[j], t))
            with oom_guard(backend.display_name, backend.device, len(batch)):
                out = generate_batch(backend, [encoded[i] for i in batch], params,
                                     [requests[i].adapter for i in batch], cb, should_stop)
            for i, res in zip(batch, out):
                results[i] = res
            if progress is not None:
                progress(len(batch))
    return results  # type: ignore[return-value]


def generate_batch(
    backend: HFBackend,
    batch: list[list[int]],
    params,
    adapters: list[str | None] | None = None,
    on_token: TokenCallback | None = None,
    should_stop: ShouldStop | None = None,
) -> list[GenerationResult]:
    """One batch of encoded prompts: new tokens (fast path, else `model.generate`), decoded and cut at stops."""
    import torch

    model = backend.model
    device = model.device
    tok = backend.tokenizer
    adapter_set = backend.adapter_set
    names = adapter_set.row_names(adapters)
    eos = backend.eos_ids
    pad = backend.pad_id
    if params.temperature > 0:
        torch.manual_seed(params.seed)
    t0 = time.perf_counter()
    with torch.inference_mode(), adapter_set.scope(names):
        out = None
        fast = backend.fast_decoder
        if fast.suitable is not False:
            out = fast.decode(batch, params, lambda ns: adapter_set.forward(model, ns), names, set(eos), pad, tok,
                              on_token, should_stop)
        if out is None:
            generator, kw = adapter_set.generating_model(model, names)
            out = generate_with_transformers(generator, tok, batch, params, eos, pad, should_stop=should_stop, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return [finished_result(tok, ids, gen, reason, params, wall, wall / len(batch)) for ids, (gen, reason) in
            zip(batch, out)]


def finished_result(tok, ids: list[int], gen: list[int], reason: str, params, latency: float,
                    compute: float) -> GenerationResult:
    """A row's GenerationResult: its new tokens decoded (special tokens skipped), cut at the first stop string."""
    text = tok.decode(gen, skip_special_tokens=True)
    if params.stop:
        cut = min((p for p in (text.find(s) for s in params.stop) if p >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
    return GenerationResult(text=text, prompt_tokens=len(ids), new_tokens=len(gen), latency_s=latency,
                            compute_s=compute, finish_reason=reason)


def generate_continuous(
    backend: HFBackend,
    requests: list[GenerationRequest],
    progress: Progress | None,
    on_token: TokenCallback | None,
    should_stop: ShouldStop | None,
    admit: Admit | None,
    on_result: ResultCallback,
) -> list:
    """Continuous batching (see the module docstring)."""
    import contextlib

    import torch

    from labscale.models.hf.adapters import BASE_ADAPTER
    from labscale.models.hf.fastdecode import DecodeBatch

    model = backend.model
    tok = backend.tokenizer
    adapter_set = backend.adapter_set
    eos, pad = backend.eos_ids, backend.pad_id
    ctx = backend.context_length
    bs = backend.spec.batch_size
    # With (unpinned) adapters loaded every row names its adapter (the base rows "__base__") and adapter layers
    # stay on for the call: a base row then computes exactly the base model, and rows of any adapter share steps.
    per_row = adapter_set.peft is not None and adapter_set.pinned is None
    every: dict[int, GenerationRequest] = {}  # requests not yet handed over, by index
    count = [0]
    encoded: dict[int, list[int]] = {}
    joined: dict[int, float] = {}
    compute: dict[int, float] = {}
    waiting: list[int] = []

    def deliver(i: int, res) -> None:
        for d in (every, encoded, joined, compute):
            d.pop(i, None)
        if on_result is not None:
            on_result(i, res)
        if progress is not None:
            progress(1)

    def take(new: list[GenerationRequest]) -> None:
        for r in new:
            i = count[0]
            count[0] += 1
            every[i] = r
            try:
                adapter_set.check([r.adapter])
                ids = backend.encode(r.prompt)
                if len(ids) + r.params.max_new_tokens > ctx:
                    raise ModelError(f"a prompt of {len(ids)} tokens plus {r.params.max_new_tokens} new tokens "
                                     f"exceeds {backend.display_name}'s context length of {ctx}",
                                     "use a shorter prompt, or lower max_tokens")
            except ModelError as e:
                deliver(i, e)
                continue
            encoded[i] = ids
            waiting.append(i)

    def forward_for(names):
        return adapter_set.forward(model, names)

    take(requests)
    sampled = [r for r in every.values() if r.params.temperature > 0]
    if sampled:
        torch.manual_seed(sampled[0].params.seed)
    batch = DecodeBatch(backend.fast_decoder, forward_for, set(eos), pad, tok, on_token)
    scope = adapter_set.scope([BASE_ADAPTER]) if per_row else contextlib.nullcontext()
    with torch.inference_mode(), scope:
        while True:
            if should_stop is not None and should_stop():
                now = time.perf_counter()
                for j in batch.cancel():
                    gen, _ = batch.take(j)
                    deliver(j, finished_result(tok, encoded[j], gen, CANCELLED, every[j].params, now - joined[j],
                                               compute[j]))
                for i in waiting:
                    deliver(i, GenerationResult("", len(encoded[i]), 0, 0.0, 0.0, finish_reason=CANCELLED))
                break
            free = bs - batch.running
            if admit is not None and free > len(waiting):
                take(admit(free - len(waiting)))
            new, waiting[:] = waiting[:free], waiting[free:]
            if new:
                t0 = time.perf_counter()
                names = [every[i].adapter or BASE_ADAPTER for i in new] if per_row else None
                with oom_guard(backend.display_name, backend.device, batch.running + len(new)):
                    ok = backend.fast_decoder.suitable is not False and batch.add(
                        [encoded[i] for i in new], [every[i].params for i in new], names, new)
                if not ok:  # the model does not suit the fast path (or one-token prompts only): model.generate
                    by_params: dict[Any, list[int]] = defaultdict(list)
                    for i in new:
                        by_params[every[i].params].append(i)
                    for params, idxs in by_params.items():
                        cb = None if on_token is None else (lambda k, t, idxs=idxs: on_token(idxs[k], t))
                        out = generate_batch(backend, [encoded[i] for i in idxs], params,
                                             [every[i].adapter for i in idxs], cb, should_stop)
                        for i, res in zip(idxs, out):
                            deliver(i, res)
                    continue
                dt = (time.perf_counter() - t0) / len(new)
                for i in new:
                    joined[i], compute[i] = t0, dt
            if not batch.running:
                if waiting:
                    continue
                break
            t0 = time.perf_counter()
            rows = [j for k, j in enumerate(batch.rows) if batch.live[k]]
            with oom_guard(backend.display_name, backend.device, len(rows)):
                done = batch.step()
            now = time.perf_counter()
            share = (now - t0) / len(rows)
            for j in rows:
                compute[j] += share
            for j in done:
                gen, reason = batch.take(j)
                deliver(j, finished_result(tok, encoded[j], gen, reason, every[j].params, now - joined[j],
                                           compute[j]))
    return []


def generation_config(params, eos: list[int], pad: int):
    """A GenerationConfig with exactly the experiment's decoding parameters (none of the model's defaults)."""
    from transformers import GenerationConfig

    sample = params.temperature > 0
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=sample,
        temperature=float(params.temperature) if sample else 1.0,
        top_p=float(params.top_p) if sample else 1.0,
        top_k=0 if sample else None,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        eos_token_id=eos or None,
        pad_token_id=pad,
        use_cache=True,
    )


def generate_with_transformers(
    model, tokenizer, batch: list[list[int]], params, eos: list[int], pad: int,
    should_stop: ShouldStop | None = None, **kw
) -> list[tuple[list[int], str]]:
    """The fallback for models the fast path does not handle: one left-padded `model.generate` call (`model` is
    the PeftModel and `kw` carries per-row `adapter_names` when the batch uses adapters). Per row: the new tokens
    up to and including EOS / the token completing a stop string, and the finish reason ("cancelled" for rows
    cut by `should_stop`, polled after each step)."""
    import torch
    from transformers import StoppingCriteriaList

    device = model.device
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for j, ids in enumerate(batch):
        input_ids[j, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[j, width - len(ids) :] = 1
    eos_set = set(eos)
    stopper = stop_strings(tokenizer, params.stop, width, len(batch), eos_set) if params.stop else None
    canceller = cancel_criterion(should_stop) if should_stop is not None else None
    criteria = [c for c in (stopper, canceller) if c is not None]
    if criteria:
        kw["stopping_criteria"] = StoppingCriteriaList(criteria)
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        generation_config=generation_config(params, eos, pad),
        **kw,
    )
    results = []
    for j, gen in enumerate(out[:, width:].tolist()):
        stop_at = stopper.stopped_at[j] if stopper is not None else None
        eos_at = next((k for k, t in enumerate(gen) if t in eos_set), None)
        if stop_at is not None and (eos_at is None or stop_at <= eos_at):
            results.append((gen[:stop_at], "stop"))
        elif eos_at is not None:
            results.append((gen[: eos_at + 1], "stop"))
        elif canceller is not None and canceller.fired and len(gen) < params.max_new_tokens:
            results.append((gen, CANCELLED))
        else:
            results.append((gen, "length"))
    return results


def cancel_criterion(should_stop: ShouldStop):
    """Stopping criterion for `model.generate`: every row stops once `should_stop()` returns True (`fired`)."""
    import torch
    from transformers import StoppingCriteria

    class Cancel(StoppingCriteria):
        fired = False

        def __call__(self, input_ids, scores, **kwargs):
            self.fired = self.fired or bool(should_stop())
            return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)

    return Cancel()


def stop_strings(tokenizer, stops: tuple[str, ...], prompt_width: int, batch: int, eos: set[int]):
    """Stopping criterion: a row stops once its generated text (special tokens skipped) contains a stop string.

    Looks only at the generated part (a stop string spanning the prompt does not count) and records, per row, how
    many tokens had been generated when it stopped (`stopped_at`). Rows that already produced EOS are left to
    `generate`. One batched decode per step, only for rows still running: negligible next to a forward pass.
    """
    import torch
    from transformers import StoppingCriteria

    class StopStrings(StoppingCriteria):
        def __init__(self):
            self.stopped_at: list[int | None] = [None] * batch

        def __call__(self, input_ids, scores, **kwargs):
            gen = input_ids[:, prompt_width:].tolist()
            todo = [j for j, g in enumerate(gen) if self.stopped_at[j] is None and not (eos & set(g))]
            if todo:
                texts = tokenizer.batch_decode([gen[j] for j in todo], skip_special_tokens=True)
                for j, text in zip(todo, texts):
                    if any(s in text for s in stops):
                        self.stopped_at[j] = len(gen[j])
            done = [s is not None for s in self.stopped_at]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopStrings()
