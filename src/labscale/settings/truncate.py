"""Opt-in input truncation for long inputs: a task's `max_input_tokens` (config.TaskOptions, on a task entry or under
`task_defaults:`) cuts each example's input — the filled-in `input` template only, never the instruction, a
multiple-choice question's options or the answer cue — to at most that many tokens of the model's own tokenizer.
Counts come from the backend's `count_tokens`, so this works for any backend (for API models the count is
labscale's estimate, which leans high).

    truncate: middle   keep the head and the tail, joined by " […] " (the default: a dialogue or a document
                       usually opens with its setting and closes with its conclusion)
    truncate: end      keep the head, followed by " […]"

The cut is found by binary search over character positions (the longest cut whose `count_tokens` is within the
limit), then moved back to a word boundary when one is within 32 characters. The count is of the input text on its
own, so a prompt is at most max_input_tokens plus the instruction, the few-shot turns and the chat framing. Inputs
that already fit are left exactly as they are. Few-shot demonstrations are cut the same way as test inputs.
"""

from __future__ import annotations

import weakref
from typing import Callable

MARKERS = {"middle": " […] ", "end": " […]"}
_SNAP = 32  # characters a cut may move back to land on whitespace

# backend -> {(limit, strategy, text): cut text or None}: the same input is cut once per model, not once per run.
_CACHE: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _candidate(text: str, keep: int, strategy: str, snap: bool) -> str:
    if strategy == "end":
        head = text[:keep]
        if snap and keep < len(text) and not text[keep].isspace():
            cut = head.rfind(" ", max(0, keep - _SNAP))
            head = head[:cut] if cut > 0 else head
        return (head.rstrip() + MARKERS["end"]).strip()
    n_head = (keep + 1) // 2
    n_tail = keep - n_head
    head, tail = text[:n_head], text[len(text) - n_tail:] if n_tail else ""
    if snap:
        cut = head.rfind(" ", max(0, n_head - _SNAP))
        head = head[:cut] if cut > 0 and not text[n_head].isspace() else head
        start = len(text) - n_tail
        if n_tail and start > 0 and not text[start - 1].isspace():
            nxt = tail.find(" ", 0, _SNAP)
            tail = tail[nxt:] if nxt >= 0 else tail
    return (head.rstrip() + MARKERS["middle"] + tail.lstrip()).strip()


def cut_text(text: str, max_tokens: int, strategy: str, count: Callable[[str], int]) -> str | None:
    """`text` cut to at most `max_tokens` (by `count`) with `strategy` ("middle" | "end"), or None when it fits.
    A limit below the marker's own tokens leaves only the marker."""
    if strategy not in MARKERS:
        raise ValueError(f"unknown truncation strategy {strategy!r}")
    if count(text) <= max_tokens:
        return None
    lo, hi = 0, len(text) - 1  # characters kept: the largest `keep` with a fitting candidate
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(_candidate(text, mid, strategy, snap=False)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    snapped = _candidate(text, lo, strategy, snap=True)
    return snapped if count(snapped) <= max_tokens else _candidate(text, lo, strategy, snap=False)


def cut_input(backend, text: str, max_tokens: int, strategy: str) -> str | None:
    """cut_text with `backend.count_tokens`, cached per backend."""
    try:
        cache = _CACHE.setdefault(backend, {})
    except TypeError:  # a backend that cannot be weakly referenced: no cache
        cache = {}
    key = (max_tokens, strategy, text)
    if key not in cache:
        cache[key] = cut_text(text, max_tokens, strategy, backend.count_tokens)
    return cache[key]
