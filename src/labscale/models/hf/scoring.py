"""Per-token log-probabilities of whole token sequences (teacher forcing), for `labscale serve`'s `echo` +
`logprobs` and chat `logprobs`: what vLLM returns as prompt log-probabilities and lm-evaluation-harness's
`local-completions` sums into a continuation's log-likelihood.

`token_logprobs(backend, sequences, top_n)` gives, for every position i of every sequence, log p(token_i |
tokens_<i) under the model (None at position 0, which has no context, as the OpenAI API does) and the `top_n` most
likely tokens there with their log-probabilities; with `next_token`, also the greedy next token after the last
position (how an `echo` request with `max_tokens: 1` at temperature 0 is answered without a second pass).

Sequences run in batches of rows of similar length, right-padded (causal attention: padding after a row never
changes it), bounded so that a batch's float32 logits stay under MAX_LOGIT_ELEMENTS. These are the logits the
local log-likelihood path (loglikelihood.py) sums, so the same (context, continuation) scores the same up to
floating-point noise of a different batch shape. Models with adapters loaded per request are not scored here
(the caller refuses them): only the plain model, or an adapter pinned on it (`adapter:` models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labscale.models.hf.loading import oom_guard

if TYPE_CHECKING:
    from labscale.models.hf.backend import HFBackend

MAX_LOGIT_ELEMENTS = 1 << 27  # float32 logits per forward pass (512 MB); a longer single row still runs alone


@dataclass
class Scored:
    ids: list[int]
    logprobs: list[float | None]  # per position; None at position 0
    top: list[list[tuple[int, float]]]  # per position, the top_n (token id, log-probability), most likely first
    next_token: tuple[int, float, list[tuple[int, float]]] | None = None  # greedy next (id, logprob, top_n)
    compute_s: float = field(default=0.0)


def token_logprobs(backend: HFBackend, sequences: list[list[int]], top_n: int = 0,
                   next_token: bool = False) -> list[Scored]:
    import time

    import torch

    if not sequences:
        return []
    model = backend.model
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else \
        int(model.config.vocab_size)
    pad = backend.pad_id
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[Scored | None] = [None] * len(sequences)
    start = 0
    while start < len(order):
        width = len(sequences[order[start]])
        rows = max(1, min(backend.spec.batch_size, MAX_LOGIT_ELEMENTS // max(1, width * vocab)))
        batch = order[start: start + rows]
        start += len(batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, i in enumerate(batch):
            seq = sequences[i]
            ids[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[j, : len(seq)] = 1
        t0 = time.perf_counter()
        with oom_guard(backend.display_name, backend.device, len(batch)), torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           use_cache=False).logits
            for j, i in enumerate(batch):
                seq = sequences[i]
                n = len(seq)
                lp = logits[j, :n].float().log_softmax(-1)  # position t predicts token t + 1
                target = torch.tensor(seq[1:], dtype=torch.long, device=lp.device)
                chosen = lp[: n - 1].gather(-1, target[:, None])[:, 0].tolist() if n > 1 else []
                k = min(top_n, vocab)
                if k:
                    values, indices = lp.topk(k, dim=-1)
                    tops = [list(zip(a, b)) for a, b in zip(indices.tolist(), values.tolist())]
                else:
                    tops = [[] for _ in range(n)]
                nxt = None
                if next_token:
                    value, index = lp[n - 1].max(-1)
                    nxt = (int(index), float(value), tops[n - 1])
                results[i] = Scored(list(seq), [None, *chosen], [[], *tops[: n - 1]], nxt)
        wall = time.perf_counter() - t0
        for i in batch:
            results[i].compute_s = wall / len(batch)  # type: ignore[union-attr]
    return results  # type: ignore[return-value]
