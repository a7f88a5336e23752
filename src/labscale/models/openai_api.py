"""`openai:<model>`: any OpenAI-compatible API (OpenAI, vLLM, llama.cpp server, Ollama, `labscale serve`).

Requests go through the official `openai` client with its own retries turned off: labscale retries itself so it
can count retries, honour `Retry-After`, treat a malformed reply like a transient error, and turn a request that
still fails into a recorded failure (scored as wrong) instead of an aborted run. A rejected key (401/403) is not
an example's fault: it stops the run with a one-line error.

Generation uses the chat API: prompts render to canonical JSON of the chat messages, which is what the cache keys
on and the store records. (`text_prompts=True`, for backends that render prompts themselves, e.g. `llamacpp:`,
sends the rendered text to /v1/completions instead.)

Log-likelihoods. Chat APIs give no prompt log-probabilities, so by default multiple-choice tasks use the
generative letter protocol (`ModelInfo.supports_loglikelihood` is False). With `loglikelihood: completions` on
the model entry they are scored like a local model: one /v1/completions request per (context, continuation) with
the whole text as the prompt, `echo: true`, `logprobs: 1` and `max_tokens: 0` (as vLLM serves them and
lm-evaluation-harness's `local-completions` asks for them; a server refusing 0 is asked with 1 and the generated
token is ignored). The continuation's log-likelihood is the sum of the echoed `token_logprobs` of the tokens that
start at or after the context's end (`text_offset`); trailing whitespace of the context moves to the continuation
first, as the local backend does (lm-eval's rule), so both score the same tokens. `is_greedy`: every such token
is the top-1 alternative. Whether the endpoint gives prompt log-probabilities at all is checked with one small
request while the experiment is validated: an endpoint that does not is a one-line error, or — with
`loglikelihood_fallback: true` — the letter protocol with a notice.

Keys are read from the environment when the first request is sent and are never stored, logged or reported.
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
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from labscale.config import ModelSpec
from labscale.efficiency.cost import ModelPrice, estimate_tokens, lookup
from labscale.errors import ModelError
from labscale.secrets import redact, register_env
from labscale.models.base import (
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    ModelBackend,
    ModelInfo,
    Progress,
    Prompt,
    TokenPrice,
)

R = TypeVar("R")  # a result type of `_concurrently`

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


class Failed(Exception):
    """A request that failed for good (after its retries, or refused): `reason` is recorded, `retries` counted."""

    def __init__(self, reason: str, retries: int, status: int | None = None):
        super().__init__(reason)
        self.reason, self.retries, self.status = reason, retries, status


PROBE_TEXT = "The capital of France is Paris."  # scored once to check that an endpoint gives prompt logprobs
PROBE_RETRIES = 2  # the check fails fast on an unreachable endpoint


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
    """`alive()` (for a server labscale runs itself) returns why the server is gone, or None: a request then
    fails at once instead of being retried. `text_prompts`: see the module docstring. `extra_body`: fields added
    to every generation request (a server's own sampler settings, e.g. llama.cpp's top_k)."""

    def __init__(self, spec: ModelSpec, model: str, text_prompts: bool = False,
                 alive: Callable[[], str | None] | None = None, extra_body: dict | None = None):
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
        self.text_prompts = text_prompts
        self.alive = alive
        self.extra_body = dict(extra_body or {})  # server-specific generation fields (e.g. samplers off)
        self._echo_max_tokens = 0  # 1 once the server refused max_tokens 0 with echo
        self._loglikelihood: tuple[bool, str | None] | None = None  # (supported, notice), once checked

    @property
    def info(self) -> ModelInfo:
        ctx = self.spec.context_length or (self.price.context_length if self.price else UNKNOWN_CONTEXT)
        fingerprint = "api-" + hashlib.sha256(f"{self.base_url}|{self.model}".encode()).hexdigest()[:16]
        price = None if self.price is None else TokenPrice(self.price.input, self.price.output, self.price.source)
        supported, notice = self.loglikelihood_support()
        extra = {"api_model": self.model, "base_url": self.base_url}
        if self.spec.loglikelihood != "none":
            extra["loglikelihood"] = "completions (echo + logprobs)" if supported else "letter protocol (fallback)"
        return ModelInfo(
            name=self.spec.label, fingerprint=fingerprint, backend="openai", context_length=ctx,
            device=urlsplit(self.base_url).netloc, supports_loglikelihood=supported, is_remote=True, price=price,
            context_known=ctx != UNKNOWN_CONTEXT, notice=notice, extra=extra,
        )

    def loglikelihood_support(self) -> tuple[bool, str | None]:
        """(log-likelihoods through /v1/completions, a notice when falling back); checked once with one request.
        An endpoint without prompt logprobs is a ModelError unless the entry allows the fallback."""
        if self.spec.loglikelihood == "none":
            return False, None
        if self._loglikelihood is None:
            why = self._probe()
            if why is None:
                self._loglikelihood = (True, None)
            elif self.spec.loglikelihood_fallback:
                self._loglikelihood = (False, f"model '{self.spec.label}': the endpoint gives no prompt "
                                              f"log-probabilities ({why}); multiple-choice tasks use the letter "
                                              "protocol (loglikelihood_fallback: true)")
            else:
                raise ModelError(
                    f"model '{self.spec.label}' asks for loglikelihood: completions, but {self.base_url} gives no "
                    f"prompt log-probabilities ({why})",
                    "serve the model with vLLM or `labscale serve` (they answer /v1/completions with echo and "
                    "logprobs), remove `loglikelihood`, or set loglikelihood_fallback: true to use the letter "
                    "protocol")
        return self._loglikelihood

    def _probe(self) -> str | None:
        """None when the endpoint echoes prompt log-probabilities, else why not (one short line)."""
        try:
            scored = self._score_text(self.client, PROBE_TEXT, 0, probe=True)
        except Failed as e:
            if e.status is None or e.status in (408, 409, 429) or e.status >= 500:  # not an answer to the question
                raise ModelError(f"cannot check that {self.base_url} gives prompt log-probabilities for model "
                                 f"'{self.spec.label}': {redact(e.reason)}",
                                 "start the server, or check base_url") from None
            return redact(e.reason)
        return None if scored else "its echoed tokens carry no log-probabilities"

    def render(self, prompt: Prompt) -> str:
        if self.text_prompts:
            raise ModelError("this API backend takes rendered prompts", "render them with the owning backend")
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
        return self._concurrently(lambda r, i: self._one(client, r, i), requests, progress)

    def _concurrently(self, call: Callable[[Any, int], R], requests: list, progress: Progress | None) -> list[R]:
        """`call(request, index)` for every request on `spec.concurrency` threads, results in request order; the
        batch's wall time is split evenly into each result's `compute_s` (they sum to the run's API time). The
        first failure cancels what has not started and propagates."""
        results: list[Any] = [None] * len(requests)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(self.spec.concurrency, len(requests))) as pool:
            futures = {pool.submit(call, r, i): i for i, r in enumerate(requests)}
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
            r.compute_s = share
        return results

    def _one(self, client, request: GenerationRequest, index: int) -> GenerationResult:
        params = request.params
        body: dict[str, Any] = {"model": self.model, self.token_limit_field: params.max_new_tokens,
                                "temperature": params.temperature, "n": 1}
        if self.text_prompts:
            body["prompt"] = request.prompt
        else:
            body["messages"] = json.loads(request.prompt)
        if params.temperature > 0:
            body.update(top_p=params.top_p, seed=params.seed)
        if params.stop:
            body["stop"] = list(params.stop)
        if self.extra_body:
            body["extra_body"] = self.extra_body
        rng = random.Random(f"{params.seed}|{index}|{request.prompt}")
        started = time.perf_counter()
        send = client.completions.create if self.text_prompts else client.chat.completions.create
        try:
            return self._with_retries(lambda: send(**body), lambda resp, tries: self._parse(resp, request, started,
                                                                                            tries), rng)
        except Failed as e:
            return _failed(request, e.reason, started, e.retries)

    def _with_retries(self, send: Callable[[], Any], parse: Callable[[Any, int], Any], rng: random.Random,
                      max_retries: int | None = None):
        """`parse(send(), retries)`, retrying transient failures; raises Failed for good, KeyRejected on 401/403."""
        import openai

        attempt, reason = 0, ""
        max_retries = self.spec.max_retries if max_retries is None else max_retries
        while True:
            status = None
            try:
                return parse(send(), attempt)
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
                    raise Failed(reason, attempt, status) from None
                wait = _retry_after(e.response.headers)
            except openai.APITimeoutError:
                reason, wait = f"timed out after {self.spec.timeout_s:g} s", None
            except openai.APIConnectionError as e:
                reason, wait = f"connection failed: {e.__cause__ or e}", None
            except (openai.APIResponseValidationError, ValueError, LookupError, TypeError, AttributeError) as e:
                reason, wait = f"malformed reply: {type(e).__name__}: {str(e)[:120]}", None
            gone = self.alive() if self.alive is not None else None
            if gone is not None:
                raise Failed(f"{reason} ({gone})", attempt, status)
            if attempt >= max_retries:
                raise Failed(f"{reason} (after {attempt + 1} attempts)", attempt, status)
            attempt += 1
            with self._lock:
                self.retries += 1
            time.sleep(backoff_s(attempt, wait, rng))

    def _parse(self, resp, request: GenerationRequest, started: float, retries: int) -> GenerationResult:
        choice = resp.choices[0]
        text = choice.text if self.text_prompts else choice.message.content
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

    # -- log-likelihoods through /v1/completions (echo + logprobs) --------------------------------------------

    def loglikelihood(self, requests: list[LoglikelihoodRequest],
                      progress: Progress | None = None) -> list[LoglikelihoodResult]:
        """See the module docstring. A request that fails after its retries raises ModelError: a log-likelihood
        has no "wrong answer" to record, and what finished is already stored (a re-run resumes)."""
        if not requests:
            return []
        if not self.loglikelihood_support()[0]:
            raise NotImplementedError(f"model '{self.spec.label}' gives no log-likelihoods")
        client = self.client
        return self._concurrently(lambda r, i: self._one_loglikelihood(client, r), requests, progress)

    def _one_loglikelihood(self, client, request: LoglikelihoodRequest) -> LoglikelihoodResult:
        context, continuation = request.context, request.continuation
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # lm-eval's rule, as the local backend applies it (models/hf/encoding.py)
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            raise ModelError("an empty context cannot be scored over HTTP (its first token has no log-probability)",
                             "give every multiple-choice question some text before the choices")
        try:
            scored = self._score_text(client, context + continuation, len(context))
        except Failed as e:
            raise ModelError(f"model '{self.spec.label}' could not score a continuation: {redact(e.reason)}",
                             "check the endpoint and run again (finished work is stored)") from None
        if not scored:
            raise ModelError(f"model '{self.spec.label}' returned no log-probabilities for the continuation "
                             f"{continuation[:40]!r}", "check that the endpoint supports echo with logprobs")
        logprob = sum(lp for lp, _ in scored)
        return LoglikelihoodResult(logprob=logprob, is_greedy=all(g for _, g in scored), n_tokens=len(scored))

    def _score_text(self, client, text: str, start: int, probe: bool = False) -> list[tuple[float, bool]]:
        """(log-probability, is top-1) of each echoed token of `text` that starts at character `start` or later."""
        rng = random.Random(f"ll|{text}")

        def send():
            body = {"model": self.model, "prompt": text, "max_tokens": self._echo_max_tokens, "echo": True,
                    "logprobs": 1, "temperature": 0}
            return client.completions.create(**body)

        def parse(resp, _tries):
            lp = resp.choices[0].logprobs
            if lp is None or lp.token_logprobs is None or lp.text_offset is None:
                if probe:
                    return []
                raise ValueError("the reply has no logprobs")
            out = []
            tops = lp.top_logprobs or [None] * len(lp.token_logprobs)
            for offset, value, top in zip(lp.text_offset, lp.token_logprobs, tops):
                if offset < start or offset >= len(text):  # the context, or a generated token
                    continue
                if value is None:
                    if probe:
                        continue
                    raise ValueError("a continuation token has no log-probability")
                best = max(top.values()) if top else value
                out.append((float(value), float(value) >= float(best) - 1e-6))
            return out

        retries = min(self.spec.max_retries, PROBE_RETRIES) if probe else None
        try:
            return self._with_retries(send, parse, rng, retries)
        except Failed as e:
            if e.status == 400 and self._echo_max_tokens == 0 and "max_tokens" in e.reason:
                self._echo_max_tokens = 1  # the server wants at least one new token: ignore it
                return self._with_retries(send, parse, rng, retries)
            raise

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
