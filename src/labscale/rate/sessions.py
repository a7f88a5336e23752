"""A rater's session: a seeded, blinded order of the items, opaque item codes, repeats, and resuming.

- The order is a shuffle of the items by the session's seed (random per rater, stored in `rating_sessions`), so
  raters see different orders and one rater always sees the same one.
- About `REPEAT_SHARE` (10%) of the items are shown a second time, later in the sequence (at least `REPEAT_GAP`
  positions after the first showing when there is room), to measure the rater's consistency.
- Pairwise items are shown left/right at random, drawn per position from the seed (a repeat may swap sides).
- Each position has an opaque code (a hash of the seed, the position and the item), the only identifier the page
  gets: no run, model or setting name reaches it. A rating names its code; the server maps it back.
- Resuming: the next item is the first position without a stored rating, so a rater who closes the tab
  continues where they were (by entering the same rater id).
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
from dataclasses import dataclass

from labscale.engine.store import Store
from labscale.rate.items import Item

REPEAT_SHARE = 0.1
REPEAT_GAP = 5
RATER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.@-]{0,63}$"
CODE_PATTERN = r"^[0-9a-f]{12}$"
ABSOLUTE_CHOICES = ("A", "B", "C", "D")
PAIRWISE_CHOICES = ("left", "right", "tie", "both_bad")


def choices(mode: str) -> tuple[str, ...]:
    return ABSOLUTE_CHOICES if mode == "absolute" else PAIRWISE_CHOICES


@dataclass(frozen=True)
class Slot:
    position: int
    item: Item
    repeat: bool
    swapped: bool  # pairwise: the item's second output is shown on the left
    code: str

    @property
    def left_run(self) -> str:
        return self.item.other_run_id if self.swapped and self.item.other_run_id else self.item.run_id

    @property
    def right_run(self) -> str | None:
        if self.item.other_run_id is None:
            return None
        return self.item.run_id if self.swapped else self.item.other_run_id

    def shown_outputs(self) -> list[str]:
        return list(reversed(self.item.outputs)) if self.swapped else list(self.item.outputs)


def sequence(items: list[Item], seed: int, repeats: bool = True) -> list[Slot]:
    """The rater's order (see the module docstring): deterministic in (items, seed)."""
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    seq: list[tuple[int, bool]] = [(i, False) for i in order]
    k = max(1, round(REPEAT_SHARE * len(items))) if repeats and len(items) >= 3 else 0
    if k:
        # repeat items from the first part of the order, so there is room to show them again later
        pool = order[: max(k, (2 * len(order)) // 3)]
        for i in rng.sample(pool, k):
            first = seq.index((i, False))
            lo = min(first + 1 + REPEAT_GAP, len(seq))
            seq.insert(rng.randint(lo, len(seq)), (i, True))
    slots = []
    for pos, (i, rep) in enumerate(seq):
        item = items[i]
        swapped = item.other_run_id is not None and random.Random(f"{seed}:{pos}:{item.key}").random() < 0.5
        code = hashlib.sha256(f"{seed}:{pos}:{item.key}".encode()).hexdigest()[:12]
        slots.append(Slot(pos, item, rep, swapped, code))
    return slots


def valid_rater(rater: str) -> bool:
    return re.fullmatch(RATER_PATTERN, rater) is not None


class RaterSession:
    """One rater's progress through the sequence, backed by the store."""

    def __init__(self, store: Store, exp_id: int, rater: str, mode: str, task: str | None, items: list[Item],
                 source: str = "human"):
        self.store, self.mode = store, mode
        row = store.start_rating_session(exp_id, rater, mode, task or "*", source, secrets.randbits(31))
        self.id, self.seed, self.rater = row["id"], row["seed"], rater
        self.slots = sequence(items, self.seed, repeats=source == "human")
        self.by_code = {s.code: s for s in self.slots}

    def rated(self) -> set[int]:
        return {r["position"] for r in self.store.session_ratings(self.id)}

    def next_slot(self) -> Slot | None:
        done = self.rated()
        return next((s for s in self.slots if s.position not in done), None)

    def record(self, slot: Slot, rating: str | None, seconds: float | None, raw: str | None = None) -> bool:
        """Store the rating of `slot`; False when that position was already rated (the first rating is kept)."""
        return self.store.put_ratings(self.id, [{
            "position": slot.position, "item": slot.code, "example_id": slot.item.example_id,
            "run_id": slot.left_run, "other_run_id": slot.right_run, "repeat": slot.repeat, "rating": rating,
            "seconds": seconds, "raw": raw}]) == 1
