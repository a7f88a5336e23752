"""The OpenAI wire format: request schemas, their translation to labscale requests, and error bodies.

Every value the model code cannot take is refused here with a 400 that names the field (`param`), never left to
fail later as a 500. The bounds, all explicit below:

- `model`: a string (an unknown name is 404). `messages` (chat): 1 or more; role one of system, developer, user,
  assistant, tool; content a string, null, or a list of text parts. `prompt` (completions): a string, a list of
  token ids, or a list of up to MAX_PROMPTS strings or token-id lists (one choice per prompt, in order; as the
  OpenAI API allows and lm-evaluation-harness sends). Token ids are integers in [0, vocabulary size). No text may
  hold a lone UTF-16 surrogate (`"\\ud800"`: not encodable). A prompt with no tokens is refused; a prompt that
  fills the context is a 400 (`code: context_length_exceeded`).
- `max_tokens` / `max_completion_tokens`: an integer, 1 … MAX_TOKENS (0 too, on completions with `echo: true`:
  score the prompt, generate nothing), and prompt + completion must fit the model's context (checked once the
  prompt is counted: `max_tokens_for`).
- Log-probabilities. Completions: `logprobs` an integer 0 … MAX_LOGPROBS (that many top alternatives per token),
  `echo` a boolean (the prompt's tokens and their log-probabilities come back before the completion's). Chat:
  `logprobs` a boolean, `top_logprobs` 0 … MAX_LOGPROBS, only with `logprobs: true`. Not with `stream: true`.
- `temperature`: a finite number in [0, 2]; below MIN_TEMPERATURE it is greedy (0), its limit: dividing logits by
  a temperature like 1e-100 overflows to infinity. `top_p`: a finite number in (0, 1]. No NaN or infinity
  (Python's JSON reader accepts the literals `NaN` and `Infinity`; they are refused here).
- `seed`: an integer in [0, MAX_SEED] (torch seeds are 64-bit).
- `stop`: a string or a list of at most MAX_STOPS strings, each 1 … MAX_STOP_CHARS characters.
- `n` and completions' `best_of`: 1 only. `stream`, `echo`, `logprobs` (chat): booleans; `stream_options` only
  with `stream: true`, its `include_usage` a boolean. A streamed request has one prompt.
- Integers must be JSON integers and booleans JSON booleans (`true` is not 1, `2.0` is not 2).

Unknown fields. Fields labscale does not implement are ignored, as long as ignoring them cannot change the answer
(`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`, unknown vendor extensions, …): that keeps
clients written for other servers working. Known OpenAI (and vLLM) fields that would change the answer are
refused with a 400 naming them when set to anything but their neutral value (`UNSUPPORTED`: `logit_bias`,
`frequency_penalty`, `presence_penalty`, tools, `response_format` other than text, `suffix`,
`top_k`, `min_p`, `repetition_penalty`, …). Defaults follow OpenAI: temperature 1, top_p 1; `seed` defaults to 0,
so sampling is reproducible for the same batch.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from labscale.models.base import DecodingParams

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MIN_TEMPERATURE = 1e-5  # lower temperatures decode greedily
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's and OpenAI's chat limit)
MAX_PROMPTS = 64  # prompts in one completions request

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status and `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def shutting_down(message: str = "the server is shutting down and takes no new requests") -> APIError:
    """The 503 for requests refused or cancelled at shutdown."""
    return APIError(503, f"{message}; retry on another server", type="server_error", code="server_shutting_down",
                    headers={"Connection": "close"})


def check_text(text: str, param: str) -> None:
    """A 400 naming `param` for text no tokenizer can take (lone surrogates cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"invalid '{param}': the text holds an unpaired surrogate ({text[e.start]!r}) at "
                            f"character {e.start}; send valid Unicode", param=param) from None


def _neutral(*values: Any) -> Any:
    """A test for a field's neutral values (null always is)."""
    return lambda v: v is None or v in values


# Fields labscale does not implement whose non-neutral values would change the answer -> what is neutral.
_NO_EFFECT = _neutral(None)
UNSUPPORTED_COMMON = {
    "logit_bias": lambda v: v is None or v == {},
    "frequency_penalty": _neutral(0, 0.0),
    "presence_penalty": _neutral(0, 0.0),
    "top_k": _neutral(0, -1),
    "min_p": _neutral(0, 0.0),
    "repetition_penalty": _neutral(1, 1.0),
    "min_tokens": _neutral(0),
    "ignore_eos": _neutral(False),
    "stop_token_ids": lambda v: v is None or v == [],
    "guided_json": _NO_EFFECT,
    "guided_regex": _NO_EFFECT,
    "guided_choice": _NO_EFFECT,
    "guided_grammar": _NO_EFFECT,
}
UNSUPPORTED_CHAT = {
    **UNSUPPORTED_COMMON,
    "tools": lambda v: v is None or v == [],
    "functions": lambda v: v is None or v == [],
    "tool_choice": _neutral("none"),
    "function_call": _neutral("none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "audio": _NO_EFFECT,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": _NO_EFFECT,
}
UNSUPPORTED_COMPLETION = {**UNSUPPORTED_COMMON, "suffix": _neutral("")}

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\])$")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    max_tokens: Int | None = Field(None, ge=0, le=MAX_TOKENS)  # 0: only for echo (CompletionRequest.check)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=0, le=MAX_SEED)
    stream: Bool | None = False
    stream_options: dict[str, Any] | None = None
    n: Int | None = None

    def check(self) -> None:
        if self.max_tokens == 0 and not getattr(self, "echo", False):
            raise APIError(400, "invalid 'max_tokens': must be at least 1 (0 only with echo: true, to score the "
                                "prompt)", param="max_tokens")
        if self.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        if self.stream_options is not None:
            if not self.stream:
                raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
            if not isinstance(self.stream_options.get("include_usage", False), bool):
                raise APIError(400, "invalid 'stream_options.include_usage': must be a boolean",
                               param="stream_options.include_usage")
        self.stops()
        extra = self.model_extra or {}
        for name, neutral in self.unsupported().items():
            if name in extra and not neutral(extra[name]):
                raise APIError(400, f"'{name}' is not supported by this server (send it unset, or at its "
                                    f"neutral value, for this model's plain answer)", param=name)

    def unsupported(self) -> dict:
        """Ignored-field names that are refused unless neutral (see the module docstring)."""
        return UNSUPPORTED_COMMON

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"at most {MAX_STOPS} stop strings are supported, got {len(stops)}", param="stop")
        for s in stops:
            if s == "":
                raise APIError(400, "stop strings must not be empty", param="stop")
            if len(s) > MAX_STOP_CHARS:
                raise APIError(400, f"stop strings must be at most {MAX_STOP_CHARS} characters, got {len(s)}",
                               param="stop")
            check_text(s, "stop")
        return tuple(stops)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def params(self, max_tokens: int) -> DecodingParams:
        temperature = 1.0 if self.temperature is None else float(self.temperature)
        return DecodingParams(
            max_new_tokens=max_tokens,
            temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
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

    def as_dict(self, index: int = 0) -> dict:
        """labscale's message: text only; "developer" (OpenAI's newer name for system) becomes "system"."""
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, "only text content parts are supported", param=f"messages.{index}.content")
            content = "".join(p.text for p in content)  # type: ignore[misc]
        check_text(content or "", f"messages.{index}.content")
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.logprobs and self.stream:
            raise APIError(400, "logprobs are not streamed; send stream: false", param="logprobs")
        self.chat_messages()

    @property
    def top_n(self) -> int | None:
        """Top alternatives per completion token, or None when no log-probabilities are asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> dict:
        return UNSUPPORTED_CHAT

    def chat_messages(self) -> list[dict]:
        return [m.as_dict(i) for i, m in enumerate(self.messages)]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = list[Annotated[int, Strict()]]


class CompletionRequest(_Request):
    prompt: str | TokenIds | list[str] | list[TokenIds]
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Int | None = None
    echo: Bool | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "invalid 'prompt': the list is empty", param="prompt")
        if len(self.prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(self.prompts)}", param="prompt")
        if self.stream and len(self.prompts) > 1:
            raise APIError(400, "a streamed request takes one prompt", param="prompt")
        if self.stream and (self.logprobs is not None or self.echo):
            raise APIError(400, "logprobs and echo are not streamed; send stream: false", param="logprobs")
        if self.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        for i, p in enumerate(self.prompts):
            where = "prompt" if not isinstance(self.prompt, list) or len(self.prompts) == 1 else f"prompt.{i}"
            if isinstance(p, str):
                check_text(p, where)
            elif not p:
                raise APIError(400, f"invalid '{where}': no token ids", param=where)

    def unsupported(self) -> dict:
        return UNSUPPORTED_COMPLETION

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @property
    def text(self) -> str:
        """The one text prompt (callers check `prompts` first)."""
        first = self.prompts[0]
        assert isinstance(first, str)
        return first

    @property
    def scores_prompt(self) -> bool:
        """The prompt's own log-probabilities are asked for (echo with logprobs)."""
        return bool(self.echo) and self.logprobs is not None


def _param(loc: tuple) -> str:
    """The field path of a pydantic error location, without its union-branch tags (`messages.0.content.str`
    -> `messages.0.content`)."""
    return ".".join(str(x) for x in loc if not (isinstance(x, str) and _TYPE_TAG.match(x)))


def parse(cls: type[_Request], data: Any) -> Any:
    """Validate a JSON body into `cls`; schema errors become a 400 naming the offending field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        # of a union's failed branches, the one that got furthest (`stop: [5]` -> `stop.0`, not `stop`)
        errors = [(_param(err["loc"]), err["msg"]) for err in e.errors()]
        loc, msg = max(errors, key=lambda x: len(x[0].split(".")) if x[0] else 0)
        raise APIError(400, f"invalid '{loc}': {msg}" if loc else msg, param=loc or None) from None
    req.check()
    return req


def max_tokens_for(requested: int | None, prompt_tokens: int, context_length: int, field: str = "messages") -> int:
    """The completion budget: as requested if prompt + completion fits the context; by default
    min(DEFAULT_MAX_TOKENS, what fits). `field`: the prompt's field, named when the prompt alone fills the
    context."""
    room = context_length - prompt_tokens
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {context_length} tokens, and the prompt "
                            f"alone has {prompt_tokens}; shorten the prompt", param=field,
                       code="context_length_exceeded")
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {context_length} tokens; the request asks for "
                            f"{prompt_tokens + requested} ({prompt_tokens} in the prompt, {requested} in the "
                            f"completion); lower max_tokens or shorten the prompt", param="max_tokens",
                       code="context_length_exceeded")
    return requested
