"""The OpenAI wire format: request schemas, their translation to labscale requests, and error bodies.

Requests are validated with pydantic; fields labscale does not use are ignored, as OpenAI ignores them, except
ones whose silent omission would change the answer (`n` > 1, `best_of` > 1, log-probabilities, non-text
content), which are rejected. Defaults follow OpenAI: temperature 1, top_p 1; `seed` defaults to 0, so
sampling is reproducible for the same batch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labscale.models.base import DecodingParams

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status and `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None

    def check(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return tuple(stops)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def params(self, max_tokens: int) -> DecodingParams:
        return DecodingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            stop=self.stops(),
            seed=0 if self.seed is None else int(self.seed),
        )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_dict(self) -> dict:
        """labscale's message: text only; "developer" (OpenAI's newer name for system) becomes "system"."""
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "".join(p.text for p in content)  # type: ignore[misc]
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    def check(self) -> None:
        super().check()
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = None
    best_of: int | None = None
    echo: bool | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise APIError(400, "only a single prompt string is supported", param="prompt")
        if self.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if self.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def parse(cls: type[_Request], data: Any) -> Any:
    """Validate a JSON body into `cls`; schema errors become a 400 naming the offending field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"invalid '{loc}': {err['msg']}", param=loc or None) from None
    req.check()
    return req


def max_tokens_for(requested: int | None, prompt_tokens: int, context_length: int) -> int:
    """The completion budget: as requested if prompt + completion fits the context; by default
    min(DEFAULT_MAX_TOKENS, what fits)."""
    room = context_length - prompt_tokens
    if requested is None:
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {context_length} tokens, and the prompt "
                                f"alone has {prompt_tokens}; shorten the prompt", param="messages",
                           code="context_length_exceeded")
        return min(DEFAULT_MAX_TOKENS, room)
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {context_length} tokens; the request asks for "
                            f"{prompt_tokens + requested} ({prompt_tokens} in the prompt, {requested} in the "
                            f"completion); lower max_tokens or shorten the prompt", param="max_tokens",
                       code="context_length_exceeded")
    return requested
