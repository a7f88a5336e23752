"""API prices: a dated table of list prices ($ per million input / output tokens) and the cost arithmetic.

Prices change; the table records the date it was taken from the vendors' public pricing pages, every run stores
the price it was costed with, and an experiment overrides any entry with `price: {input: …, output: …}` on the
model. Dated model snapshots (`gpt-4o-2024-08-06`) take the price of their family (`gpt-4o`): the longest table
key that prefixes the model name wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from labscale.errors import LabscaleError

PRICES_AS_OF = "2025-06-01"


@dataclass(frozen=True)
class ModelPrice:
    input: float  # $ per 1M prompt tokens
    output: float  # $ per 1M completion tokens
    context_length: int
    source: str = f"built-in table ({PRICES_AS_OF})"


# model → (input $/1M, output $/1M, context tokens), list prices without batch or cached-input discounts
_TABLE: dict[str, tuple[float, float, int]] = {
    "gpt-4.1": (2.00, 8.00, 1_047_576),
    "gpt-4.1-mini": (0.40, 1.60, 1_047_576),
    "gpt-4.1-nano": (0.10, 0.40, 1_047_576),
    "gpt-4o": (2.50, 10.00, 128_000),
    "gpt-4o-mini": (0.15, 0.60, 128_000),
    "gpt-4-turbo": (10.00, 30.00, 128_000),
    "gpt-4": (30.00, 60.00, 8_192),
    "gpt-3.5-turbo": (0.50, 1.50, 16_385),
    "o1": (15.00, 60.00, 200_000),
    "o3": (2.00, 8.00, 200_000),
    "o3-mini": (1.10, 4.40, 200_000),
    "o4-mini": (1.10, 4.40, 200_000),
    "claude-3-5-haiku": (0.80, 4.00, 200_000),
    "claude-3-7-sonnet": (3.00, 15.00, 200_000),
    "claude-sonnet-4": (3.00, 15.00, 200_000),
    "claude-opus-4": (15.00, 75.00, 200_000),
    "gemini-2.0-flash": (0.10, 0.40, 1_048_576),
    "gemini-2.5-flash": (0.30, 2.50, 1_048_576),
    "gemini-2.5-pro": (1.25, 10.00, 1_048_576),
}


def lookup(model: str) -> ModelPrice | None:
    """The table's price for a model name, matching dated snapshots to their family; None when unknown."""
    name = model.lower().rsplit("/", 1)[-1]  # "openai/gpt-4o" as some gateways name it
    best = max((k for k in _TABLE if name == k or name.startswith(k + "-")), key=len, default=None)
    return ModelPrice(*_TABLE[best]) if best else None


def cost_usd(price, prompt_tokens: int, completion_tokens: int) -> float | None:
    """Tokens × price ($ per million input / output tokens): `price` is anything with `input` and `output` (a
    ModelPrice, a models.base.TokenPrice, or the dict a stored run recorded); None when there is no price."""
    if price is None:
        return None
    p_in, p_out = (price["input"], price["output"]) if isinstance(price, dict) else (price.input, price.output)
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6


def estimate_tokens(text: str) -> int:
    """An upper-leaning token estimate for text we cannot tokenize (closed models' tokenizers are not local):
    one token per 2 UTF-8 bytes. Real BPE tokenizers average about 4 bytes per token on English, so budgets built
    on this stop early rather than late."""
    return (len(text.encode()) + 1) // 2 + 4


class CostLimitReached(LabscaleError):
    """Raised by `SpendingCap.admit` when not even one more request fits under the cap."""


class SpendingCap:
    """The experiment's `cost_limit`: what its API results cost (stored ones included, so re-running after a stop
    does not spend the limit again) plus a worst-case reservation for each request about to be sent must stay
    within the limit. Worst case = the backend's prompt-token estimate (see `estimate_tokens`) and the whole
    max_new_tokens."""

    def __init__(self, limit_usd: float | None):
        self.limit = limit_usd
        self.spent = 0.0
        self._counted: set[str] = set()

    def add(self, key: str, usd: float | None) -> None:
        """Count a stored or just-made request once, however many runs share it."""
        if usd and key not in self._counted:
            self._counted.add(key)
            self.spent += usd

    def admit(self, estimates: list[float]) -> int:
        """How many of the next requests (with these worst-case costs) may be sent; raises when none may."""
        if self.limit is None:
            return len(estimates)
        total, n = self.spent, 0
        for e in estimates:
            if total + e > self.limit:
                break
            total, n = total + e, n + 1
        if n == 0 and estimates:
            raise CostLimitReached(
                f"cost_limit ${self.limit:.2f} reached: this experiment's API results cost ${self.spent:.4f} and the "
                f"next request could cost up to ${estimates[0]:.4f}",
                "raise cost_limit in the experiment file and run it again; finished requests are stored")
        return n
