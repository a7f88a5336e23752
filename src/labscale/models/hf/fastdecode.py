"""labscale's hand-written decode path for a batch of prompts (used instead of `model.generate` where it applies).

Prefill. Prompts are prefilled in length groups, RIGHT-padded without an attention mask: causal attention never
lets a real token see the padding after it, so each row's keys/values are those of the prompt alone (rotary
positions 0…n-2, the positions a left-padded row gets from its mask). The key/value caches are laid out
left-padded (as a padded batched prefill would leave them) in preallocated buffers with room for the new tokens:
DynamicCache's `torch.cat` on every step copies the whole cache, which with long prompts costs more than the
forward pass.

Decode. One token per live row and step, with explicit position ids and a left-padded attention mask; rows that
finished (EOS or a stop string) are dropped from the batch when that saves more than it costs. An optional
`should_stop()` is polled once per step (one Python call): when it returns True the batch ends there, rows still
running finishing "cancelled" with the tokens they have (how `labscale serve` cancels work at shutdown).

Ragged attention. Decoding one token for B rows reads the whole key/value cache, padding included: B x (padded
width) entries per layer. On CPU that read, not arithmetic, is what attention costs, and a batch with one long
prompt makes every short row pay for it. The model keeps its linear layers batched (that is where batching pays),
but its attention runs per bucket of rows of similar length (`plan_buckets`), each over the key range its rows
actually use. Rows are sorted by length, so a bucket is a contiguous row range and its keys are a view, not a copy.
Numerically this is the same attention (the skipped positions are masked out anyway).

Applicability. Models whose cache is not a plain full-attention DynamicCache (sliding windows, recurrent or linear
attention), encoder-decoders, and models whose forward takes no position ids are not decoded here:
`FastDecoder.decode` returns None and the caller falls back to `model.generate` (generation.py).

This module is self-contained on purpose: it can be benchmarked against, or replaced by, transformers' own
generation without touching the rest of the backend.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

# Prefill groups: at most this many tokens (rows x width) per forward pass, and at most this fraction padding.
PREFILL_TOKENS = 2048
PREFILL_WASTE = 0.15

RAGGED_ATTENTION = "labscale_sdpa"
RAGGED_KWARG = "labscale_buckets"
# Fixed cost of one extra attention call, in units of one row's key/value entry read.
RAGGED_CALL_COST = 128

_ragged_seen = [0]  # attention calls that received a bucket plan

TokenCallback = Callable[[int, int], None]  # (row, new token id)
ShouldStop = Callable[[], bool]  # polled once per decode step: True cuts the batch (rows end "cancelled")
Forward = Callable[[list[str] | None], Callable]  # per-row adapter names -> the forward to call


def ragged_calls() -> int:
    """How many attention calls so far received a bucket plan (`FastDecoder.verify_ragged` checks it grows)."""
    return _ragged_seen[0]


def plan_buckets(starts: list[int], length: int) -> list[tuple[int, int, int]]:
    """Split rows into contiguous buckets (row_from, row_to, first key position) minimising
    sum(RAGGED_CALL_COST + rows x (length - first key position)); O(B^2) dynamic programming."""
    n = len(starts)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        lo = starts[i - 1]
        for j in range(i - 1, -1, -1):
            lo = min(lo, starts[j])
            c = best[j] + RAGGED_CALL_COST + (i - j) * max(length - lo, 1)
            if c < best[i]:
                best[i], cut[i] = c, j
    buckets = []
    i = n
    while i > 0:
        j = cut[i]
        buckets.append((j, i, min(starts[j:i])))
        i = j
    return buckets[::-1]


def enable_ragged_attention(model) -> bool:
    """Switch an SDPA model to `labscale_sdpa`: SDPA, except that when decoding with a bucket plan it attends per
    bucket. Without a plan (prefill, log-likelihoods, `generate`) it is plain SDPA. False when not applicable."""
    try:
        if getattr(model.config, "_attn_implementation", None) != "sdpa":
            return False
        params = inspect.signature(model.forward).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return False  # no way to pass the plan down
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        if RAGGED_ATTENTION not in AttentionInterface._global_mapping:
            AttentionInterface.register(RAGGED_ATTENTION, ragged_sdpa)
            AttentionMaskInterface.register(RAGGED_ATTENTION, sdpa_mask)
        model.set_attn_implementation(RAGGED_ATTENTION)
        return model.config._attn_implementation == RAGGED_ATTENTION
    except Exception:  # noqa: BLE001 - an optimisation only: never fail a load over it
        return False


def ragged_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """The registered attention function: SDPA per bucket when given a plan for a one-token decode step."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    buckets = kwargs.pop(RAGGED_KWARG, None)
    if buckets is not None:
        _ragged_seen[0] += 1
    plain = (
        not buckets
        or (len(buckets) == 1 and buckets[0][2] == 0)
        or buckets[-1][1] != query.shape[0]
        or query.shape[2] != 1
        or attention_mask is None
        or attention_mask.shape[0] != query.shape[0]
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    outs = []
    for r0, r1, s in buckets:
        out, _ = sdpa_attention_forward(
            module,
            query[r0:r1],
            key[r0:r1, :, s:],
            value[r0:r1, :, s:],
            attention_mask[r0:r1, ..., s:],
            *args,
            **kwargs,
        )
        outs.append(out)
    return torch.cat(outs, dim=0), None


_PREALLOC = None


def prealloc_layer_class():
    """A DynamicLayer that appends into a preallocated buffer instead of concatenating (values identical)."""
    global _PREALLOC
    if _PREALLOC is not None:
        return _PREALLOC
    import torch
    from transformers.cache_utils import DynamicLayer

    class PreallocLayer(DynamicLayer):
        def __init__(self, kbuf, vbuf, length: int):
            super().__init__()
            self._k, self._v, self._n = kbuf, vbuf, length
            self.dtype, self.device = kbuf.dtype, kbuf.device
            self.is_initialized = True
            self._views()

        def _views(self):
            self.keys = self._k[:, :, : self._n]
            self.values = self._v[:, :, : self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self._n + key_states.shape[-2]
            if end > self._k.shape[2]:  # out of room (not expected): grow by doubling
                pad = (0, 0, 0, max(end, 2 * self._k.shape[2]) - self._k.shape[2])
                self._k = torch.nn.functional.pad(self._k, pad)
                self._v = torch.nn.functional.pad(self._v, pad)
            self._k[:, :, self._n : end] = key_states
            self._v[:, :, self._n : end] = value_states
            self._n = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._n

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0:
                self._n = max(0, self._n + tokens_to_remove)
                self._views()

        def batch_select_indices(self, indices) -> None:
            """Keep the rows `indices` (ascending), moved in place to the front: no new buffer, no page faults."""
            keep = [int(i) for i in indices]
            if keep != sorted(keep):
                self._k, self._v = self._k[indices], self._v[indices]
            else:
                for new, old in enumerate(keep):
                    if new != old:
                        self._k[new, :, : self._n] = self._k[old, :, : self._n]
                        self._v[new, :, : self._n] = self._v[old, :, : self._n]
                self._k, self._v = self._k[: len(keep)], self._v[: len(keep)]
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._views()

        def reorder_cache(self, beam_idx) -> None:
            self._k = self._k.index_select(0, beam_idx.to(self._k.device))
            self._v = self._v.index_select(0, beam_idx.to(self._v.device))
            self._views()

        def reset(self) -> None:
            self._n = 0
            self._views()

    _PREALLOC = PreallocLayer
    return PreallocLayer


class FastDecoder:
    """The decode path of one backend, and what it has learnt about the model.

    `suitable`: whether the model suits this path (None: not yet known; set it to False to always use the
    fallback). `ragged`: whether decoding passes bucket plans to the attention; `ragged_verified`: whether a plan
    was seen to reach the attention function (checked once, on the first decode)."""

    def __init__(self):
        self.suitable: bool | None = None
        self.ragged = False
        self.ragged_verified: bool | None = None
        self.model = None
        self.logits_to_keep = False

    def attach(self, model, ragged: bool = True) -> None:
        """Decode with `model` from now on; `ragged`: switch its attention to `labscale_sdpa` where possible."""
        self.model = model
        self.logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.ragged = enable_ragged_attention(model) if ragged else False

    def detach(self) -> None:
        self.model = None

    def decode(
        self,
        batch: list[list[int]],
        params,
        forward_for: Forward,
        names: list[str] | None,
        eos: set[int],
        pad: int,
        tokenizer,
        on_token: TokenCallback | None = None,
        should_stop: ShouldStop | None = None,
    ) -> list[tuple[list[int], str]] | None:
        """Prefill (see `prefill`), then a decode loop that feeds one token per live row and per step, with
        explicit position ids and a left-padded attention mask; rows that finished (EOS or stop string) are
        dropped from the batch when that saves more than it costs. With ragged attention each group of rows of
        similar length attends only over its own key range instead of the whole padded width.

        Per row: the new tokens up to and including EOS / the token completing a stop string, and the finish
        reason. Returns None when the model does not suit this path. `names`: peft adapter names per row (None:
        no adapters); `on_token(row, token)` is called for each new token. `should_stop()` is called once before
        each decode step; when it returns True the loop ends there and every row still running keeps the tokens
        it has, with finish reason "cancelled". (One `DecodeBatch` that no row joins later.)"""
        rows = DecodeBatch(self, forward_for, eos, pad, tokenizer, on_token)
        if not rows.add(batch, [params] * len(batch), names, list(range(len(batch)))):
            return None
        while rows.running:
            if should_stop is not None and should_stop():
                rows.cancel()
                break
            rows.step()
        return [(rows.gen[j], rows.reason[j]) for j in range(len(batch))]

    def verify_ragged(self, pad: int) -> bool:
        """One one-token forward pass checking that a bucket plan passed to the model reaches the attention
        function (a model may not hand its keyword arguments down); if not, back to plain SDPA."""
        import torch

        model = self.model
        before = ragged_calls()
        try:
            x = torch.tensor([[pad]], dtype=torch.long, device=model.device)
            model(input_ids=x, use_cache=False, **{RAGGED_KWARG: [(0, 1, 0)]})
            ok = ragged_calls() > before
        except TypeError:
            ok = False
        if not ok:
            self.ragged = False
            try:
                model.set_attn_implementation("sdpa")
            except Exception:  # noqa: BLE001
                pass
        return ok

    def prefill(self, batch: list[list[int]], max_new_tokens: int, forward_for: Forward,
                names: list[str] | None, pad: int):
        """The key/value cache of every prompt but its last token, laid out left-padded in buffers with room for
        the new tokens (see the module docstring). Returns (cache, cached length), or None for models this path
        does not suit. `names`: peft adapter names per row, or None."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        model = self.model
        if self.suitable is None:
            params = inspect.signature(model.forward).parameters
            self.suitable = bool(
                not getattr(model.config, "is_encoder_decoder", False)
                and "position_ids" in params
                and "past_key_values" in params
            )
        if not self.suitable:
            return None
        prefix = [len(ids) - 1 for ids in batch]
        cached = max(prefix)
        if cached == 0:
            return None  # one-token prompts only: nothing to prefill
        device = model.device
        kw = {"logits_to_keep": 1} if self.logits_to_keep else {}
        order = sorted((j for j in range(len(batch)) if prefix[j] > 0), key=lambda j: -prefix[j])
        groups: list[list[int]] = []
        for j in order:
            g = groups[-1] if groups else None
            if g is not None:
                width = prefix[g[0]]
                size = len(g) + 1
                used = sum(prefix[i] for i in g) + prefix[j]
                if size * width <= max(PREFILL_TOKENS, width) and used >= (1 - PREFILL_WASTE) * size * width:
                    g.append(j)
                    continue
            groups.append([j])
        room = cached + max_new_tokens + 1
        keys: list | None = None
        values: list = []
        for g in groups:
            width = prefix[g[0]]
            x = torch.full((len(g), width), pad, dtype=torch.long)
            for i, j in enumerate(g):
                x[i, : prefix[j]] = torch.tensor(batch[j][:-1], dtype=torch.long)
            forward = forward_for(None if names is None else [names[j] for j in g])
            pkv = forward(input_ids=x.to(device), use_cache=True, **kw).past_key_values
            if keys is None:
                if type(pkv) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in pkv.layers):
                    self.suitable = False
                    return None
                # uninitialised: each row's left padding is zeroed below, and past `cached` only what
                # decoding writes is ever read
                keys = [
                    layer.keys.new_empty((len(batch), layer.keys.shape[1], room, layer.keys.shape[3]))
                    for layer in pkv.layers
                ]
                values = [
                    layer.values.new_empty((len(batch), layer.values.shape[1], room, layer.values.shape[3]))
                    for layer in pkv.layers
                ]
            for li, layer in enumerate(pkv.layers):
                for i, j in enumerate(g):
                    keys[li][j, :, cached - prefix[j] : cached] = layer.keys[i, :, : prefix[j]]
                    values[li][j, :, cached - prefix[j] : cached] = layer.values[i, :, : prefix[j]]
                    # masked out, but must be finite: softmax weight 0 times NaN would still be NaN
                    keys[li][j, :, : cached - prefix[j]] = 0
                    values[li][j, :, : cached - prefix[j]] = 0
            del pkv
        for j in range(len(batch)):
            if prefix[j] == 0:  # a one-token prompt: all padding
                for k, v in zip(keys, values):
                    k[j, :, :cached] = 0
                    v[j, :, :cached] = 0
        cls = prealloc_layer_class()
        cache = DynamicCache()
        cache.layers = [cls(k, v, cached) for k, v in zip(keys, values)]
        return cache, cached


def _hits_stop(tokenizer, tokens: list[int], stops: tuple[str, ...]) -> bool:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(s in text for s in stops)


class DecodeBatch:
    """Rows decoding together, one token per live row and step (`step`), that new rows can join between steps
    (`add`): what `FastDecoder.decode` runs for one batch and what continuous batching (generation.py
    `generate(..., admit=...)`, `labscale serve`) keeps running while requests come and go.

    Each row has its own decoding parameters (budget, stop strings, temperature / top_p), request index and
    adapter name. `add` prefills the new prompts (length groups, as `FastDecoder.prefill`) and, when rows are
    already decoding, rebuilds the key/value buffers: every live row keeps its cache, laid out left-padded to the
    new common width (rows sorted longest first, so ragged-attention buckets stay contiguous), with room for the
    longest remaining budget; finished rows are left out. A row's numbers do not depend on which rows share its
    batch, except for floating-point rounding (as with any change of batch shape).

    `gen[i]` / `reason[i]`: the tokens and finish reason of request `i` ("stop", "length", "cancelled"); `step`
    returns the requests that finished in it, and `take(i)` hands over (and forgets) a finished request's tokens
    and reason, so that a batch that runs for hours keeps no state of requests long gone. `forward_for(names)`
    gives the forward to call for per-row adapter names (None when no row has one)."""

    def __init__(self, decoder: FastDecoder, forward_for: Forward, eos: set[int], pad: int, tokenizer,
                 on_token: TokenCallback | None = None):
        self.decoder = decoder
        self.forward_for = forward_for
        self.eos, self.pad, self.tokenizer, self.on_token = eos, pad, tokenizer, on_token
        self.kw: dict[str, Any] = {"logits_to_keep": 1} if decoder.logits_to_keep else {}
        self.cache = None
        self.n = 0  # cache positions in use (the next token's key/value goes to position n)
        self.mask = self.pos = self.cur = None
        self.rows: list[int] = []  # tensor row -> request index
        self.starts: list[int] = []  # first real cache position of each tensor row
        self.live: list[bool] = []
        self.params: dict[int, Any] = {}
        self.names: dict[int, str | None] = {}
        self.gen: dict[int, list[int]] = {}
        self.reason: dict[int, str] = {}
        self.forward: Callable | None = None
        self._warps: dict[tuple, Any] = {}

    @property
    def running(self) -> int:
        """Rows still decoding."""
        return sum(self.live)

    def _remaining(self) -> int:
        """Steps the longest-running live row may still take."""
        return max((self.params[j].max_new_tokens - len(self.gen[j]) for k, j in enumerate(self.rows)
                    if self.live[k]), default=0)

    def take(self, j: int) -> tuple[list[int], str]:
        """The tokens and finish reason of finished request `j`, forgotten here."""
        return self.gen.pop(j), self.reason.pop(j)

    def _prune(self) -> None:
        """Forget the parameters and adapter names of requests no longer in the tensor rows."""
        keep = set(self.rows)
        for d in (self.params, self.names):
            for j in [j for j in d if j not in keep]:
                del d[j]

    def _names(self) -> list[str] | None:
        names = [self.names[j] for j in self.rows]
        return None if all(x is None for x in names) else names  # type: ignore[misc]

    def add(self, prompts: list[list[int]], params: list, names: list[str] | None, indices: list[int]) -> bool:
        """Prefill `prompts` (request `indices`, decoding `params`, peft adapter `names` or None) and add them as
        rows that decode from the next step on. False (nothing added) when the model does not suit this path,
        or when the batch is empty and every new prompt is a single token (nothing to prefill)."""
        import torch

        for k, j in enumerate(indices):
            self.params[j], self.names[j] = params[k], None if names is None else names[k]
            self.gen[j], self.reason[j] = [], "length"
        budget = max(p.max_new_tokens for p in params)
        if self.cache is None or not self.running:
            prefilled = self.decoder.prefill(prompts, budget, self.forward_for, names, self.pad)
            if prefilled is None:
                for j in indices:
                    del self.params[j], self.names[j], self.gen[j], self.reason[j]
                return False
            self.cache, cached = prefilled
            device = self.decoder.model.device
            self.n = cached
            self.mask = torch.zeros((len(prompts), cached + budget + 1), dtype=torch.long, device=device)
            self.starts = [cached - (len(ids) - 1) for ids in prompts]
            for k, s in enumerate(self.starts):
                self.mask[k, s:cached] = 1
            self.pos = torch.tensor([len(ids) - 1 for ids in prompts], dtype=torch.long, device=device)
            self.cur = torch.tensor([ids[-1] for ids in prompts], dtype=torch.long, device=device)
            self.rows, self.live = list(indices), [True] * len(prompts)
            self._prune()
            self._replan(cached + budget // 2)
            return True
        self._merge(prompts, names, indices)
        return True

    def _merge(self, prompts: list[list[int]], names: list[str] | None, indices: list[int]) -> None:
        """New rows join the live ones (see the class docstring)."""
        import torch

        device = self.decoder.model.device
        prefix = [len(ids) - 1 for ids in prompts]
        new_cache, new_cached = None, 0
        if max(prefix) > 0:
            # the new rows' caches, left-padded to their own width (no room needed: copied below)
            new_cache, new_cached = self.decoder.prefill(prompts, 0, self.forward_for, names, self.pad)
        old = [k for k, alive in enumerate(self.live) if alive]
        old_len = {k: self.n - self.starts[k] for k in old}
        old_width = max(old_len.values())
        width = max(old_width, new_cached)
        budget = max([self._remaining()] + [self.params[j].max_new_tokens for j in indices])
        room = width + budget + 1
        # combined rows, longest cache first: (length, source, row in source)
        combined = sorted([(old_len[k], 0, k) for k in old] + [(p, 1, i) for i, p in enumerate(prefix)],
                          key=lambda r: -r[0])
        dest = {(src, r): d for d, (_, src, r) in enumerate(combined)}
        old_dest = torch.tensor([dest[(0, k)] for k in old], dtype=torch.long, device=device)
        old_src = torch.tensor(old, dtype=torch.long, device=device)
        new_dest = torch.tensor([dest[(1, i)] for i in range(len(prompts))], dtype=torch.long, device=device)
        layers = []
        for li, layer in enumerate(self.cache.layers):
            kbuf, vbuf = layer._k, layer._v
            shape = (len(combined), kbuf.shape[1], room, kbuf.shape[3])
            k, v = kbuf.new_empty(shape), vbuf.new_empty(shape)
            k[:, :, :width] = 0
            v[:, :, :width] = 0
            k[:, :, width - old_width : width].index_copy_(0, old_dest, kbuf[old_src, :, self.n - old_width : self.n])
            v[:, :, width - old_width : width].index_copy_(0, old_dest, vbuf[old_src, :, self.n - old_width : self.n])
            if new_cache is not None:
                nk, nv = new_cache.layers[li]._k, new_cache.layers[li]._v
                k[:, :, width - new_cached : width].index_copy_(0, new_dest, nk[:, :, :new_cached])
                v[:, :, width - new_cached : width].index_copy_(0, new_dest, nv[:, :, :new_cached])
            layers.append((k, v))
        del new_cache
        cls = prealloc_layer_class()
        self.cache.layers = [cls(k, v, width) for k, v in layers]
        self.starts = [width - length for length, _, _ in combined]
        self.mask = torch.zeros((len(combined), room), dtype=torch.long, device=device)
        for d, s in enumerate(self.starts):
            self.mask[d, s:width] = 1
        pos, cur, rows = [0] * len(combined), [0] * len(combined), [0] * len(combined)
        old_pos, old_cur = self.pos.tolist(), self.cur.tolist()
        for d, (_, src, r) in enumerate(combined):
            if src == 0:
                pos[d], cur[d], rows[d] = old_pos[r], old_cur[r], self.rows[r]
            else:
                pos[d], cur[d], rows[d] = prefix[r], prompts[r][-1], indices[r]
        self.pos = torch.tensor(pos, dtype=torch.long, device=device)
        self.cur = torch.tensor(cur, dtype=torch.long, device=device)
        self.rows, self.live, self.n = rows, [True] * len(combined), width
        self._prune()
        self._replan(width + budget // 2)

    def _replan(self, length: int) -> None:
        """The forward for the rows' adapters, and the ragged-attention bucket plan over `length` keys."""
        self.forward = self.forward_for(self._names())
        dec = self.decoder
        if dec.ragged and dec.ragged_verified is None:
            dec.ragged_verified = dec.verify_ragged(self.pad)
        if dec.ragged:
            self.kw[RAGGED_KWARG] = plan_buckets(self.starts, length)
        else:
            self.kw.pop(RAGGED_KWARG, None)

    def _sample(self, logits):
        """The next token of every tensor row: argmax for greedy rows, else sampled per (temperature, top_p)."""
        import torch

        groups: dict[tuple, list[int]] = {}
        for k, j in enumerate(self.rows):
            p = self.params[j]
            key = (float(p.temperature), float(p.top_p)) if p.temperature > 0 else ()
            groups.setdefault(key, []).append(k)
        if list(groups) == [()]:
            return logits.argmax(-1)
        nxt = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for key, ks in groups.items():
            idx = None if len(ks) == logits.shape[0] else torch.tensor(ks, dtype=torch.long, device=logits.device)
            part = logits if idx is None else logits[idx]
            if key == ():
                out = part.argmax(-1)
            else:
                warp = self._warps.get(key)
                if warp is None:
                    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

                    warp = LogitsProcessorList([TemperatureLogitsWarper(key[0])])
                    if key[1] < 1.0:
                        warp.append(TopPLogitsWarper(key[1]))
                    self._warps[key] = warp
                out = torch.multinomial(warp(None, part).softmax(-1), 1).squeeze(1)
            if idx is None:
                nxt = out
            else:
                nxt[idx] = out
        return nxt

    def step(self) -> list[int]:
        """One decode step for every row; returns the request indices that finished in it."""
        import torch

        self.mask[:, self.n] = 1
        logits = self.forward(
            input_ids=self.cur[:, None],
            attention_mask=self.mask[:, : self.n + 1],
            position_ids=self.pos[:, None],
            past_key_values=self.cache,
            use_cache=True,
            **self.kw,
        ).logits[:, -1, :].float()
        self.n += 1
        nxt = self._sample(logits)
        finished = []
        for k, t in enumerate(nxt.tolist()):
            if not self.live[k]:
                continue
            j = self.rows[k]
            gen, params = self.gen[j], self.params[j]
            gen.append(t)
            if self.on_token is not None:
                self.on_token(j, t)
            if t in self.eos or (params.stop and _hits_stop(self.tokenizer, gen, params.stop)):
                self.live[k], self.reason[j] = False, "stop"
            elif len(gen) >= params.max_new_tokens:
                self.live[k] = False
            if not self.live[k]:
                finished.append(j)
        self.cur, self.pos = nxt, self.pos + 1
        running = self.running
        if running == 0:
            self.cache = None  # nothing left: free the buffers (the next `add` starts afresh)
            return finished
        # Drop finished rows when they would cost more than moving the cache does: a dead row costs its share of
        # the linear layers on every remaining step; moving the live rows' cache costs about one step.
        remaining = self._remaining()
        if (len(self.rows) - running) * remaining >= 2 * len(self.rows):
            keep = [k for k, alive in enumerate(self.live) if alive]
            idx = torch.tensor(keep, dtype=torch.long, device=self.cur.device)
            for layer in self.cache.layers:
                layer.batch_select_indices(idx)
            self.mask, self.pos, self.cur = self.mask[idx], self.pos[idx], self.cur[idx]
            self.rows = [self.rows[k] for k in keep]
            self.starts = [self.starts[k] for k in keep]
            self.live = [True] * len(keep)
            self._prune()
            self._replan(self.n + (remaining + 1) // 2)
        return finished

    def cancel(self) -> list[int]:
        """End every live row ("cancelled", with the tokens it has); returns their request indices."""
        out = [j for k, j in enumerate(self.rows) if self.live[k]]
        for j in out:
            self.reason[j] = "cancelled"
        self.live = [False] * len(self.rows)
        self.cache = None
        return out
