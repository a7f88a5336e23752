"""Log-likelihoods of continuations given contexts, as lm-evaluation-harness computes them.

Pairs are tokenized by `Encoder.encode_pair` (trailing context whitespace moves to the continuation; an empty
context becomes the BOS or EOS token). Input longer than the context window is truncated from the left; a
continuation longer than the window is an error. Identical (context, continuation) pairs are computed once.
`is_greedy`: every continuation token is the argmax. A result's `compute_s` is its share of its batch's wall time
(split among duplicates).

Shared-prefix scoring (the default where the model suits it). A multiple-choice question asks for the same
context with several continuations; lm-evaluation-harness runs one row (context + continuation) per choice, so the
context is computed once per choice. Here the requests that share a context's tokens are packed into ONE row:

    context c_1…c_n | choice 1 (all but its last token) | choice 2 (all but its last token) | …

with an explicit 4-D attention mask (each choice's tokens see the context and the earlier tokens of their own
choice only) and explicit position ids (every choice starts at position n, as in its own row). Each choice's
first token is predicted at c_n, shared by all (lm-eval's one-token-continuation trick, generalised), and its
later tokens at its own positions. Mathematically this is the same computation as one row per choice (each
position sees exactly the tokens it would see there); in floating point the sums differ by rounding only. A packed
row is at most the context window long (more choices go to more rows).

Short packed rows then share a model row (`fill_bins`, best-fit decreasing into bins as long as the longest packed
row): each packed row is a segment with its own positions (from 0) and its own block of the mask, so padding is
spent only where a batch's bins differ in length — the same idea as TRL's padding-free packing, done with a mask
instead of variable-length kernels. Bins are sorted by length and right-padded (padding attends to itself only,
so nothing is NaN); only the logits from the first scored position on are computed where the model accepts
`logits_to_keep`. On OpenBookQA (150 questions × 4 choices) this makes 42 model rows of 3,098 positions for 3,043 real
tokens, where one packed row per model row took 150 rows of 3,706.

Packing applies to decoder-only models with position ids, full attention everywhere (no sliding window: a custom
mask replaces the model's own) and an SDPA or eager attention. The first packed row of each backend is also scored
the plain way and compared (`PACK_TOLERANCE`); a model that does not honour a custom 4-D mask falls back to the plain
path for good. Requests that need left truncation are scored the plain way: one right-padded row each.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labscale.errors import ModelError
from labscale.models.base import LoglikelihoodRequest, LoglikelihoodResult, Progress
from labscale.models.hf.loading import oom_guard

if TYPE_CHECKING:
    from labscale.models.hf.backend import HFBackend

PACK_TOLERANCE = 1e-3  # largest |packed - plain| log-probability (nats) accepted by the first-batch check
PACK_ATTENTION = ("sdpa", "eager", "labscale_sdpa")  # implementations that take a custom 4-D mask


@dataclass
class _Row:
    """One packed row: a context and the continuations scored against it."""

    ctx: tuple
    conts: list[tuple]

    @property
    def length(self) -> int:
        return len(self.ctx) + sum(len(c) - 1 for c in self.conts)


def packing_suits(model) -> bool:
    """Whether shared-prefix scoring applies to `model` (see the module docstring; checked again on first use)."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    if getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None):
        return False
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    return getattr(cfg, "_attn_implementation", None) in PACK_ATTENTION


def loglikelihood(
    backend: HFBackend, requests: list[LoglikelihoodRequest], progress: Progress | None = None
) -> list[LoglikelihoodResult]:
    if not requests:
        return []
    max_len = backend.context_length
    pairs = [backend.encode_pair(r.context, r.continuation) for r in requests]
    for (_, cont), r in zip(pairs, requests):
        if not cont:
            raise ModelError(
                f"empty continuation for context ending '{r.context[-40:]}'", "every choice must be non-empty"
            )
        if len(cont) > max_len:
            raise ModelError(
                f"a continuation of {len(cont)} tokens exceeds {backend.display_name}'s context length of {max_len}",
                "shorten the answer choices",
            )
    model = backend.model
    # Identical pairs are computed once.
    unique: dict[tuple, list[int]] = defaultdict(list)
    for i, (ctx, cont) in enumerate(pairs):
        unique[(tuple(ctx), tuple(cont))].append(i)
    results: list[LoglikelihoodResult | None] = [None] * len(requests)
    done: dict[tuple, LoglikelihoodResult] = {}

    def deliver(out: dict[tuple, LoglikelihoodResult]) -> None:
        n = 0
        for key, res in out.items():
            done[key] = res
            for i in unique[key]:
                results[i] = LoglikelihoodResult(res.logprob, res.is_greedy, res.n_tokens,
                                                 res.compute_s / len(unique[key]))
            n += len(unique[key])
        if progress is not None:
            progress(n)

    bs = backend.spec.batch_size
    pad = backend.pad_id
    keep = backend.accepts_logits_to_keep
    if backend.pack_loglikelihoods is None:
        backend.pack_loglikelihoods = packing_suits(model)
    fits = [k for k in unique if len(k[0]) + len(k[1]) <= max_len + 1]
    plain = [k for k in unique if len(k[0]) + len(k[1]) > max_len + 1]
    if backend.pack_loglikelihoods and fits:
        rows = pack_rows(fits, max_len)
        rows.sort(key=lambda r: (-r.length, r.ctx[:64]))
        bins = fill_bins(rows)
        for start in range(0, len(bins), bs):
            batch = bins[start : start + bs]
            with oom_guard(backend.display_name, backend.device, len(batch)):
                out = score_packed(model, batch, pad, keep)
                if backend.pack_verified is None:  # the first row again, the plain way
                    first = [(batch[0][0].ctx, cont) for cont in batch[0][0].conts]
                    backend.pack_verified = agrees(out, score_plain_keys(model, first, max_len, pad, keep))
                    if not backend.pack_verified:
                        backend.pack_loglikelihoods = False
                        plain += [k for k in fits if k not in done]
                        break
            deliver(out)
    else:
        plain += fits
    # Plain scoring: one row per pair, longest first, ties kept together so shared contexts batch.
    plain.sort(key=lambda k: (-(len(k[0]) + len(k[1])), k[0][:64]))
    for start in range(0, len(plain), bs):
        batch = plain[start : start + bs]
        with oom_guard(backend.display_name, backend.device, len(batch)):
            deliver(score_plain_keys(model, batch, max_len, pad, keep))
    return results  # type: ignore[return-value]


def agrees(packed: dict[tuple, LoglikelihoodResult], plain: dict[tuple, LoglikelihoodResult]) -> bool:
    """Whether the packed results of the keys in `plain` equal those (within PACK_TOLERANCE)."""
    return all(abs(packed[k].logprob - r.logprob) <= PACK_TOLERANCE and packed[k].is_greedy == r.is_greedy
               for k, r in plain.items())


def pack_rows(keys: list[tuple], max_len: int) -> list[_Row]:
    """Group (context, continuation) keys by context into rows of at most `max_len` tokens."""
    by_ctx: dict[tuple, list[tuple]] = defaultdict(list)
    for ctx, cont in keys:
        by_ctx[ctx].append(cont)
    rows: list[_Row] = []
    for ctx, conts in by_ctx.items():
        row = _Row(ctx, [])
        for cont in sorted(conts, key=len, reverse=True):
            if row.conts and row.length + len(cont) - 1 > max_len:
                rows.append(row)
                row = _Row(ctx, [])
            row.conts.append(cont)
        rows.append(row)
    return rows


def fill_bins(rows: list[_Row]) -> list[list[_Row]]:
    """Best-fit decreasing: rows (sorted longest first) into bins as long as the longest row, so that short
    questions share one model row, each a segment with its own positions and its own block of the mask. Bins come
    out longest first, each holding its rows longest first."""
    import bisect

    if not rows:
        return []
    cap = rows[0].length
    bins: list[list[_Row]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for row in rows:
        k = bisect.bisect_left(free, (row.length, -1))  # the fullest bin the row still fits in
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(row)
            bisect.insort(free, (room - row.length, b))
        else:
            bins.append([row])
            bisect.insort(free, (cap - row.length, len(bins) - 1))
    bins.sort(key=lambda b: -sum(r.length for r in b))
    return bins


def score_packed(model, batch: list[list[_Row]], pad: int, logits_to_keep: bool) -> dict[tuple, LoglikelihoodResult]:
    """One forward pass over model rows, each a bin of packed rows laid end to end (see the module docstring)."""
    import torch

    device = model.device
    width = max(sum(r.length for r in segments) for segments in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    allowed = torch.zeros((n, width, width), dtype=torch.bool)
    # per model row, per packed row: (context start, context length, [(first own position, length) per choice])
    layout: list[list[tuple[int, int, list[tuple[int, int]]]]] = []
    for j, segments in enumerate(batch):
        base = 0
        placed = []
        for row in segments:
            c = len(row.ctx)
            input_ids[j, base : base + c] = torch.tensor(row.ctx, dtype=torch.long)
            position_ids[j, base : base + c] = torch.arange(c)
            allowed[j, base : base + c, base : base + c] = torch.ones((c, c), dtype=torch.bool).tril()
            at = base + c
            spans = []
            for cont in row.conts:
                k = len(cont) - 1  # the last token is only a target
                if k:
                    input_ids[j, at : at + k] = torch.tensor(cont[:-1], dtype=torch.long)
                    position_ids[j, at : at + k] = torch.arange(c, c + k)
                    allowed[j, at : at + k, base : base + c] = True
                    allowed[j, at : at + k, at : at + k] = torch.ones((k, k), dtype=torch.bool).tril()
                spans.append((at, k))
                at += k
            placed.append((base, c, spans))
            base = at
        for p in range(base, width):  # padding: positions continue, each attends to itself (finite, never read)
            position_ids[j, p] = p
            allowed[j, p, p] = True
        layout.append(placed)
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = model.dtype if model.dtype.is_floating_point else torch.float32
        mask = torch.zeros((n, 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    else:  # SDPA takes a boolean mask (True: attend), as transformers' own sdpa_mask builds
        mask = allowed[:, None]
    lo = min(len(segments[0].ctx) - 1 for segments in batch)
    kw: dict[str, Any] = {}
    offset = 0
    if logits_to_keep:
        kw["logits_to_keep"] = torch.arange(lo, width, device=device)
        offset = lo
    t0 = time.perf_counter()
    scored: list[tuple[tuple, float, bool, int]] = []
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       position_ids=position_ids.to(device), use_cache=False, **kw).logits
        for j, segments in enumerate(batch):
            for row, (base, c, spans) in zip(segments, layout[j]):
                lp_first = logits[j, base + c - 1 - offset].float().log_softmax(-1)
                for cont, (at, k) in zip(row.conts, spans):
                    target = torch.tensor(cont, dtype=torch.long, device=lp_first.device)
                    lp = lp_first[None]
                    if k:
                        lp = torch.cat([lp, logits[j, at - offset : at - offset + k].float().log_softmax(-1)])
                    logprob = lp.gather(-1, target[:, None]).sum().item()
                    greedy = bool((lp.argmax(-1) == target).all().item())
                    scored.append(((row.ctx, cont), logprob, greedy, len(cont)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {key: LoglikelihoodResult(lp, g, m, wall / len(scored)) for key, lp, g, m in scored}


def score_plain_keys(model, keys: list[tuple], max_len: int, pad: int,
                     logits_to_keep: bool) -> dict[tuple, LoglikelihoodResult]:
    """(context, continuation) keys scored one row each: input = (context + continuation), left-truncated to the
    window, without its last token (lm-evaluation-harness's layout)."""
    items = [(tuple((ctx + cont)[-(max_len + 1) :][:-1]), cont) for ctx, cont in keys]
    return dict(zip(keys, score_batch(model, items, pad, logits_to_keep)))


def score_batch(model, batch: list[tuple[tuple, tuple]], pad: int, logits_to_keep: bool) -> list[LoglikelihoodResult]:
    """One forward pass over (input tokens, continuation tokens) rows, right-padded."""
    import torch

    device = model.device
    width = max(len(inp) for inp, _ in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for j, (inp, _) in enumerate(batch):  # right padding: positions are those of the unpadded input
        input_ids[j, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        mask[j, : len(inp)] = 1
    # logits are needed at positions len(inp) - len(cont) … len(inp) - 1 of each row; compute only their union
    lo = min(len(inp) - len(cont) for inp, cont in batch)
    hi = max(len(inp) for inp, _ in batch)
    kw: dict[str, Any] = {}
    if logits_to_keep:
        kw["logits_to_keep"] = torch.arange(lo, hi, device=device)
        offset = lo
    else:
        offset = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False, **kw).logits
        out = []
        for j, (inp, cont) in enumerate(batch):
            a = len(inp) - len(cont) - offset
            lp = logits[j, a : a + len(cont)].float().log_softmax(-1)
            target = torch.tensor(cont, dtype=torch.long, device=lp.device)
            logprob = lp.gather(-1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all().item())
            out.append((logprob, greedy, len(cont)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return [LoglikelihoodResult(lp, g, n, wall / len(batch)) for lp, g, n in out]
