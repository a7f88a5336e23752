"""Log-likelihoods of continuations given contexts, as lm-evaluation-harness computes them.

Pairs are tokenized by `Encoder.encode_pair` (trailing context whitespace moves to the continuation; an empty
context becomes the BOS or EOS token). Input longer than the context window is truncated from the left; a
continuation longer than the window is an error. Identical (input, continuation) pairs are computed once;
batches are sorted longest first, right-padded, and only the logits at continuation positions are computed where
the model accepts `logits_to_keep`. `is_greedy`: every continuation token is the argmax. A result's `compute_s`
is its share of its batch's wall time (split among duplicates).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from labscale.errors import ModelError
from labscale.models.base import LoglikelihoodRequest, LoglikelihoodResult, Progress
from labscale.models.hf.loading import oom_guard

if TYPE_CHECKING:
    from labscale.models.hf.backend import HFBackend


def loglikelihood(
    backend: HFBackend, requests: list[LoglikelihoodRequest], progress: Progress | None = None
) -> list[LoglikelihoodResult]:
    if not requests:
        return []
    max_len = backend.context_length
    pairs = [backend.encode_pair(r.context, r.continuation) for r in requests]
    items = []  # (input tokens, continuation length)
    for (ctx, cont), r in zip(pairs, requests):
        if not cont:
            raise ModelError(
                f"empty continuation for context ending '{r.context[-40:]}'", "every choice must be non-empty"
            )
        if len(cont) > max_len:
            raise ModelError(
                f"a continuation of {len(cont)} tokens exceeds {backend.display_name}'s context length of {max_len}",
                "shorten the answer choices",
            )
        inp = (ctx + cont)[-(max_len + 1) :][:-1]
        items.append((inp, cont))
    model = backend.model
    # Identical inputs are computed once; longest first, and ties kept together so shared contexts batch.
    unique: dict[tuple, list[int]] = defaultdict(list)
    for i, (inp, cont) in enumerate(items):
        unique[(tuple(inp), tuple(cont))].append(i)
    keys = sorted(unique, key=lambda k: (-len(k[0]), k[0][:64]))
    results: list[LoglikelihoodResult | None] = [None] * len(requests)
    bs = backend.spec.batch_size
    pad = backend.pad_id
    for start in range(0, len(keys), bs):
        batch = keys[start : start + bs]
        with oom_guard(backend.display_name, backend.device, len(batch)):
            out = score_batch(model, batch, pad, backend.accepts_logits_to_keep)
        for key, res in zip(batch, out):
            for i in unique[key]:
                results[i] = LoglikelihoodResult(res.logprob, res.is_greedy, res.n_tokens, res.compute_s)
        if progress is not None:
            progress(sum(len(unique[k]) for k in batch))
    # compute_s is shared among duplicates so it still sums to the compute time
    for idxs in unique.values():
        for i in idxs:
            results[i].compute_s /= len(idxs)  # type: ignore[union-attr]
    return results  # type: ignore[return-value]


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
