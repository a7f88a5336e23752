"""The model backend protocol: every backend (local transformers, OpenAI-compatible API, adapters, …) implements it.

A prompt is either a list of chat messages or a raw string. `render` turns it into the exact text the model sees
(chat template applied); that text is what the cache keys on and what the store records. Backends that take
messages natively (chat APIs) render to canonical JSON instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Union

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
Prompt = Union[str, list[Message]]
Progress = Callable[[int], None]  # called with the number of requests just finished


@dataclass(frozen=True)
class DecodingParams:
    """Decoding parameters; part of the cache key. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def key(self) -> dict:
        d = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "stop": list(self.stop)}
        if self.temperature > 0:  # top_p and seed only matter when sampling
            d.update(top_p=self.top_p, seed=self.seed)
        return d


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # already rendered by `ModelBackend.render`
    params: DecodingParams
    adapter: str | None = None  # a LoRA adapter loaded into the backend (HFBackend.load_adapter); None: base model


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    latency_s: float  # wall time the caller waited for this request (its whole batch)
    compute_s: float  # this request's share of the batch's wall time (sums to the run's compute time)
    finish_reason: str = "stop"  # "stop" (EOS or stop string) | "length" | "error" | "cancelled" (serve shutdown;
    # partial: never cached or scored)
    error: str | None = None  # why the request failed after its retries (API backends); such results are not cached
    retries: int = 0  # attempts beyond the first (API backends)
    usage_estimated: bool = False  # token counts estimated because the API reported no usage


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuation: str


@dataclass
class LoglikelihoodResult:
    logprob: float  # sum of log-probabilities of the continuation tokens given the context
    is_greedy: bool  # every continuation token was the argmax
    n_tokens: int  # continuation tokens
    compute_s: float = 0.0


@dataclass(frozen=True)
class TokenPrice:
    """US dollars per million tokens, and where the numbers come from (a dated table, the experiment file)."""

    input: float
    output: float
    source: str = ""


@dataclass
class ModelInfo:
    """What the planner, the runner, the store and the report know about a model. Logic keys on these typed
    fields, never on the backend's name; `extra` is provenance only (shown and stored, never branched on)."""

    name: str  # as written in the experiment, e.g. "embedded:smollm2-135m-instruct"
    fingerprint: str  # hash of weight files, or API model id
    backend: str  # a label for reports ("hf", "openai", "adapter", …)
    context_length: int
    parameters: int | None = None
    dtype: str | None = None
    device: str | None = None
    quantization: str | None = None
    supports_loglikelihood: bool = True  # False: multiple-choice tasks use the generative letter protocol
    is_remote: bool = False  # requests leave the machine (an API): keys, retries, failures, API cost
    price: TokenPrice | None = None  # per million tokens; None = no per-token price (local, or unknown for an API)
    context_known: bool = True  # False: context_length is a placeholder and prompts are not checked against it
    adaptation: dict | None = None  # how an adapted model was made (its card summary), for the report
    notice: str | None = None  # a line the experiment shows and records (e.g. a protocol fallback)
    extra: dict = field(default_factory=dict)


class ModelBackend(ABC):
    """Loads lazily: constructing a backend and calling `render`/`count_tokens` must not load weights."""

    @property
    @abstractmethod
    def info(self) -> ModelInfo:
        """Typed capabilities and provenance (see ModelInfo); cheap — must not load weights."""

    @property
    def supports_loglikelihood(self) -> bool:
        return self.info.supports_loglikelihood

    @abstractmethod
    def render(self, prompt: Prompt) -> str:
        """The exact model input for a prompt: chat template for messages (with the generation prompt), or as-is."""

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def generate(self, requests: list[GenerationRequest], progress: Progress | None = None) -> list[GenerationResult]:
        """Results in request order. Implementations batch as they see fit."""

    def loglikelihood(
        self, requests: list[LoglikelihoodRequest], progress: Progress | None = None
    ) -> list[LoglikelihoodResult]:
        raise NotImplementedError(f"{type(self).__name__} does not give log-likelihoods")

    def close(self) -> None:
        """Free weights and accelerator memory."""

    def peak_memory_bytes(self) -> int | None:
        """Peak accelerator memory since load, or None on CPU (the runner records process RSS)."""
        return None
