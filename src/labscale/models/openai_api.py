"""`openai:<model>`: any OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp server, Ollama, `labscale serve`).

Requests go through the official `openai` client with its own retries turned off: labscale retries itself so it
can count retries, honour `Retry-After`, treat a malformed reply like a transient error, and turn a request that
still fails into a recorded failure (scored as wrong) instead of an aborted run. A rejected key (401/403) is not
an example's fault: it stops the run with a one-line error.

Chat APIs give no prompt log-likelihoods, so multiple-choice tasks use the generative letter protocol
(`ModelInfo.supports_loglikelihood` is False). Prompts render to canonical JSON of the chat messages: that text is what the
cache keys on and the store records. Keys are read from the environment when the first request is sent and are
never stored, logged or reported.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urlsplit

from labscale.config import ModelSpec
from labscale.efficiency.cost import ModelPrice, estimate_tokens, lookup
from labscale.errors import ModelError
from labscale.secrets import redact, register_env
from labscale.models.base import (
    GenerationRequest,
    GenerationResult,
    ModelBackend,
    ModelInfo,
    Progress,
    Prompt,
    TokenPrice,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BACKOFF_BASE_S = 0.5  # first retry waits about this long; doubles per attempt, with jitter
BACKOFF_MAX_S = 30.0  # longest wait between attempts, Retry-After included
# OpenAI's reasoning models refuse `max_tokens` and want `max_completion_tokens`; other servers know only the former
REASONING_MODEL = re.compile(r"^(o\d|gpt-5)", re.IGNORECASE)
UNKNOWN_CONTEXT = 10**9  # no context check when the model's context is not known; the server's 400 is recorded


class KeyRejected(ModelError):
    """The API refused the key (401/403): stop rather than record every example as failed."""


class Transient(Exception):
    """A failure worth retrying; `wait_s` is the server's Retry-After when it gave one."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def backoff_s(attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """Wait before retry `attempt` (1-based): the server's Retry-After when given, else exponential with jitter."""
    if retry_after is not None:
        return min(retry_after, BACKOFF_MAX_S)
    base = min(BACKOFF_BASE_S * 2 ** (attempt - 1), BACKOFF_MAX_S)
    return base * (0.5 + rng.random() / 2)


class OpenAIBackend(ModelBackend):
    def __init__(self, spec: ModelSpec, model: str):
        if not model.strip():
            raise ModelError(f"model '{spec.id}' names no model", "write openai:<model name the API knows>")
        self.spec = spec
        self.model = model
        self.base_url = (spec.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ModelError(f"base_url '{self.base_url}' of model '{spec.label}' is not an http(s) URL",
                             "write e.g. base_url: http://127.0.0.1:8000/v1")
        if parts.username or parts.password:
            raise ModelError(f"base_url of model '{spec.label}' carries credentials",
                             "put the key in the environment variable named by api_key_env instead")
        if spec.price is not None:
            known = lookup(model)
            self.price: ModelPrice | None = ModelPrice(spec.price.input, spec.price.output,
                                                       known.context_length if known else UNKNOWN_CONTEXT,
                                                       source="experiment file")
        else:
            self.price = lookup(model)
        self.token_limit_field = spec.token_limit_field or (
            "max_completion_tokens" if REASONING_MODEL.match(model.rsplit("/", 1)[-1]) else "max_tokens")
        self._client = None
        self._lock = threading.Lock()
        self.retries = 0  # retries made so far (all requests)

    @property
    def info(self) -> ModelInfo:
        ctx = self.spec.context_length or (self.price.context_length if self.price else UNKNOWN_CONTEXT)
        fingerprint = "api-" + hashlib.sha256(f"{self.base_url}|{self.model}".encode()).hexdigest()[:16]
        price = None if self.price is None else TokenPrice(self.price.input, self.price.output, self.price.source)
        return ModelInfo(
            name=self.spec.label, fingerprint=fingerprint, backend="openai", context_length=ctx,
            device=urlsplit(self.base_url).netloc, supports_loglikelihood=False, is_remote=True, price=price,
            context_known=ctx != UNKNOWN_CONTEXT, extra={"api_model": self.model, "base_url": self.base_url},
        )

    def render(self, prompt: Prompt) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)

    def count_tokens(self, text: str) -> int:
        """An upper-leaning estimate (the model's tokenizer is not local): message contents plus a few tokens of
        chat framing per message."""
        try:
            messages = json.loads(text)
            return sum(estimate_tokens(m["content"]) for m in messages) + 4 * len(messages)
        except (ValueError, TypeError, KeyError):
            return estimate_tokens(text)

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                import openai

                from labscale.models.registry import missing_key, missing_key_error

                missing = missing_key(self.spec)
                if missing:
                    raise missing_key_error(self.spec, missing)
                var = self.spec.api_key_env
                register_env(var)
                self._client = openai.OpenAI(api_key=(os.environ.get(var) if var else None) or "no-key",
                                             base_url=self.base_url, max_retries=0, timeout=self.spec.timeout_s)
            return self._client

    def generate(self, requests: list[GenerationRequest], progress: Progress | None = None) -> list[GenerationResult]:
        if not requests:
            return []
        client = self.client
        results: list[GenerationResult | None] = [None] * len(requests)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(self.spec.concurrency, len(requests))) as pool:
            futures = {pool.submit(self._one, client, r, i): i for i, r in enumerate(requests)}
            try:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    if progress is not None:
                        progress(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        share = (time.perf_counter() - t0) / len(requests)
        for r in results:
            r.compute_s = share  # wall time of the batch split evenly: sums to the run's API time
        return results  # type: ignore[return-value]

    def _one(self, client, request: GenerationRequest, index: int) -> GenerationResult:
        import openai

        params = request.params
        body = {"model": self.model, "messages": json.loads(request.prompt),
                self.token_limit_field: params.max_new_tokens, "temperature": params.temperature, "n": 1}
        if params.temperature > 0:
            body.update(top_p=params.top_p, seed=params.seed)
        if params.stop:
            body["stop"] = list(params.stop)
        rng = random.Random(f"{params.seed}|{index}|{request.prompt}")
        started = time.perf_counter()
        attempt, reason = 0, ""
        while True:
            try:
                return self._parse(client.chat.completions.create(**body), request, started, attempt)
            except openai.APIStatusError as e:
                status = e.status_code
                detail = _error_message(e)
                if status in (401, 403):
                    raise KeyRejected(
                        f"the API at {self.base_url} rejected the request for '{self.spec.label}' ({status}: {detail})",
                        f"check the key in ${self.spec.api_key_env} and its access to model '{self.model}'",
                    ) from None
                reason = f"HTTP {status}: {detail}"
                if status not in (408, 409, 429) and status < 500:
                    return _failed(request, reason, started, attempt)
                wait = _retry_after(e.response.headers)
            except openai.APITimeoutError:
                reason, wait = f"timed out after {self.spec.timeout_s:g} s", None
            except openai.APIConnectionError as e:
                reason, wait = f"connection failed: {e.__cause__ or e}", None
            except (openai.APIResponseValidationError, ValueError, LookupError, TypeError, AttributeError) as e:
                reason, wait = f"malformed reply: {type(e).__name__}: {str(e)[:120]}", None
            if attempt >= self.spec.max_retries:
                return _failed(request, f"{reason} (after {attempt + 1} attempts)", started, attempt)
            attempt += 1
            with self._lock:
                self.retries += 1
            time.sleep(backoff_s(attempt, wait, rng))

    def _parse(self, resp, request: GenerationRequest, started: float, retries: int) -> GenerationResult:
        choice = resp.choices[0]
        text = choice.message.content
        if not isinstance(text, str):
            raise ValueError("the reply has no message content")
        usage = resp.usage
        estimated = usage is None
        prompt_tokens = usage.prompt_tokens if usage else self.count_tokens(request.prompt)
        new_tokens = usage.completion_tokens if usage else estimate_tokens(text)
        finish = "length" if choice.finish_reason == "length" else "stop"
        return GenerationResult(text=text, prompt_tokens=int(prompt_tokens), new_tokens=int(new_tokens),
                                latency_s=time.perf_counter() - started, compute_s=0.0, finish_reason=finish,
                                retries=retries, usage_estimated=estimated)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _error_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else None
        if msg:
            return str(msg)[:200]
    return (str(getattr(e, "message", "")) or type(e).__name__)[:200]


def _failed(request: GenerationRequest, reason: str, started: float, retries: int) -> GenerationResult:
    return GenerationResult(text="", prompt_tokens=0, new_tokens=0, latency_s=time.perf_counter() - started,
                            compute_s=0.0, finish_reason="error", error=redact(reason), retries=retries)
