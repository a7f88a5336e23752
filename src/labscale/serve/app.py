"""The HTTP API: FastAPI routes for OpenAI's /v1/models, /v1/chat/completions and /v1/completions, plus /health.

Each request is validated, its prompt rendered exactly as a direct evaluation renders it (`backend.render`: the
chat template for messages, a completion prompt as-is) and counted with the backend's own encoding, then handed
to the `Batcher`. Handlers are async and only await the batcher's futures. Streaming answers are server-sent
events in OpenAI's chunk format, fed token by token from the decode loop when the backend supports it (text is
released by `TextStream`), ending with `data: [DONE]`.

Log-probabilities. `/v1/completions` with `echo: true` and `logprobs: N` returns every prompt token's
log-probability (None for the first) and its top N alternatives, as vLLM does — what lm-evaluation-harness's
`local-completions` and labscale's own `loglikelihood: completions` mode sum into a continuation's
log-likelihood; `max_tokens: 0` scores the prompt only, and `max_tokens: 1` at temperature 0 takes the greedy next
token from the same forward pass. Other requests with `logprobs` (and chat's `logprobs` / `top_logprobs`) generate
as usual, then score prompt + completion in one teacher-forced pass (models/hf/scoring.py) for the completion
tokens' log-probabilities. Scoring runs on its own worker thread beside the batcher, on the served model (or an
`adapter:` model's pinned adapter); on a server with `--adapter` adapters it is refused (400), because adapters
switch per batch. Prompts may be token ids (decoded to text for generation; scored as sent) and completions may
take several prompts (one choice each, by index). `text_offset` counts characters of the echoed text (of the
completion text without echo); for a token-id prompt, from the tokens' decoded lengths.

Every /v1 route needs `Authorization: Bearer <key>` when the app has an API key; bodies above `max_body_bytes`
get 413. Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: a request the model code
cannot take is a 400 naming the field (protocol.py), never a 500.

Shutdown (shutdown.py): `app.state.shutdown` counts the /v1 requests in flight; once it is draining, new /v1
requests get 503 and requests cancelled at the end of the grace period are answered 503 as well (streams: a final
error event). The lifespan starts the batcher and, at the end, stops and joins its worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from labscale.errors import LabscaleError
from labscale.models.base import GenerationRequest, GenerationResult, ModelBackend
from labscale.serve.batcher import Batcher, ShuttingDown
from labscale.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_text,
    max_tokens_for,
    parse,
    shutting_down,
)
from labscale.serve.logprobs import PromptScorer
from labscale.serve.shutdown import DEFAULT_GRACE_S, Shutdown
from labscale.serve.stream import TextStream

DEFAULT_MAX_BODY_BYTES = 4 << 20
WORKER_JOIN_S = 30.0  # after cancelling: the worker is at most one forward pass from exiting


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Guard:
    """ASGI middleware: counts /v1 requests in flight and refuses new ones (503) once shutting down; then the
    bearer-token check on /v1 routes and the body-size limit (the body is read here, at most `max_body_bytes` of
    it, and replayed to the app)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, shutdown: Shutdown):
        self.app, self.api_key, self.max_body_bytes, self.shutdown = app, api_key, max_body_bytes, shutdown

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        if not self.shutdown.accepting:
            return await _error_response(shutting_down())(scope, receive, send)
        self.shutdown.enter()
        try:
            return await self._guarded(scope, receive, send)
        finally:
            self.shutdown.leave()

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                msg = "incorrect API key provided" if auth else "missing API key: send Authorization: Bearer <key>"
                return await _error_response(APIError(401, msg, code="invalid_api_key"))(scope, receive, send)
        too_large = APIError(413, f"request body larger than {self.max_body_bytes} bytes", code="request_too_large")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _error_response(too_large)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _error_response(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(r: GenerationResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.new_tokens,
            "total_tokens": r.prompt_tokens + r.new_tokens}


def create_app(
    backend: ModelBackend,
    batcher: Batcher,
    base_name: str,
    adapters: list[str] | tuple[str, ...] = (),
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    grace_s: float = DEFAULT_GRACE_S,
    log=None,
) -> FastAPI:
    """The app for one backend (its adapters already loaded). The batcher starts and stops with the app;
    `app.state.shutdown` (shutdown.py, with `grace_s`) is what a server drives on SIGTERM; `log(line)` gets
    its progress lines."""
    models: dict[str, str | None] = {base_name: None, **{a: a for a in adapters}}  # served name -> adapter
    context_length = getattr(backend, "context_length", None) or backend.info.context_length
    created = int(time.time())
    tok = getattr(backend, "tokenizer", None)
    hold_words = bool(getattr(tok, "clean_up_tokenization_spaces", False))

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    shutdown = Shutdown(batcher, grace_s, log=log)
    scorer = PromptScorer(backend, context_length, bool(adapters))
    scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labscale-scorer")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            # after a drain nothing is pending; otherwise (no drain) cancel what is left, then join the worker
            await asyncio.to_thread(batcher.stop, 0.0, WORKER_JOIN_S)
            scoring.shutdown(wait=True, cancel_futures=True)

    async def score(fn, *args):
        """Run scorer work on the scoring thread."""
        return await asyncio.get_running_loop().run_in_executor(scoring, fn, *args)

    app = FastAPI(title="labscale serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.shutdown = shutdown

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return _error_response(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(APIError(400, str(e.errors()[:1])))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "labscale"}
        if models[name] is not None:
            card["parent"] = base_name
        return card

    def adapter_for(name: str) -> str | None:
        if name not in models:
            raise APIError(404, f"the model '{name}' does not exist; this server has: {', '.join(models)}",
                           param="model", code="model_not_found")
        return models[name]

    async def body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None

    def prepare(req, prompt: Any) -> GenerationRequest:
        """Render and count the prompt, bound max_tokens: the labscale request (runs in a worker thread)."""
        try:
            text = backend.render(prompt)
        except LabscaleError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - chat templates raise whatever they like (e.g. role order)
            raise APIError(400, f"cannot render the messages with the chat template: {e}", param="messages") from None
        field = "messages" if isinstance(prompt, list) else "prompt"
        check_text(text, field)
        try:
            n = backend.count_tokens(text)
        except Exception as e:  # noqa: BLE001 - a tokenizer refusing the text is the request's problem
            raise APIError(400, f"cannot tokenize the {field}: {e}", param=field) from None
        if n == 0:
            raise APIError(400, f"the {field} is empty: it has no tokens to continue", param=field)
        params = req.params(max_tokens_for(req.requested_max_tokens(), n, context_length, field))
        return GenerationRequest(text, params, adapter_for(req.model))

    async def run(gen: GenerationRequest) -> GenerationResult:
        try:
            return await asyncio.wrap_future(batcher.submit(gen))
        except ShuttingDown as e:
            raise shutting_down(str(e)) from None
        except LabscaleError as e:
            raise APIError(400, str(e)) from None

    def stream(req, gen: GenerationRequest, kind: str) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        text = TextStream(decode, gen.params.stop, hold_words)
        done = object()

        def on_token(token: int) -> None:  # worker thread
            piece = text.push(token)
            if piece:
                loop.call_soon_threadsafe(queue.put_nowait, piece)

        def on_done(_f) -> None:  # worker thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except RuntimeError:  # the event loop is gone
                pass

        future = batcher.submit(gen, on_token if batcher.streams else None)
        if future.done() and isinstance(future.exception(), ShuttingDown):  # not taken: answer before streaming
            raise shutting_down(str(future.exception()))
        future.add_done_callback(on_done)
        rid, now = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        usage_field = {"usage": None} if req.include_usage else {}

        def chunk(piece: str | None, finish: str | None = None, first: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            return _sse({"id": rid, "object": obj, "created": now, "model": req.model, "system_fingerprint": None,
                         "choices": [choice], **usage_field})

        async def events():
            try:
                if kind == "chat":
                    yield chunk(None, first=True)
                while (item := await queue.get()) is not done:
                    yield chunk(item)
                try:
                    result: GenerationResult = future.result()
                except ShuttingDown as e:  # cancelled at shutdown: a final error event, then close
                    yield _sse(shutting_down(str(e)).body())
                    return
                except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
                    yield _sse(APIError(500, f"generation failed: {e}", type="server_error").body())
                    return
                rest = text.finish(result.text)
                if rest:
                    yield chunk(rest)
                yield chunk(None, finish=result.finish_reason)
                if req.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                                "created": now, "model": req.model, "system_fingerprint": None, "choices": [],
                                "usage": _usage(result)})
                yield "data: [DONE]\n\n"
            finally:
                future.cancel()  # not started yet (client gone): skip it

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        body = {"status": "ok" if shutdown.accepting else "shutting_down", "models": list(models),
                "context_length": context_length, "batch_size": batcher.batch_size,
                "pending": batcher.pending, "running": batcher.running, "stats": batcher.stats.as_dict()}
        return JSONResponse(body, status_code=200 if shutdown.accepting else 503)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        adapter_for(name)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await body(request))
        adapter_for(req.model)
        messages = req.chat_messages()
        gen = await asyncio.to_thread(prepare, req, messages)
        if req.stream:
            return stream(req, gen, "chat")
        if req.top_n is not None:
            scorer.check(gen.adapter)
        r = await run(gen)
        logprobs = None
        if req.top_n is not None:
            logprobs = await score(scorer.chat_logprobs, gen.prompt, r.text, req.top_n)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": logprobs,
                         "finish_reason": r.finish_reason}],
            "usage": _usage(r),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = parse(CompletionRequest, await body(request))
        adapter = adapter_for(req.model)
        prompts = [await asyncio.to_thread(scorer.prompt_text, p, "prompt" if len(req.prompts) == 1 else
                                           f"prompt.{i}") for i, p in enumerate(req.prompts)]
        if req.stream:
            gen = await asyncio.to_thread(prepare, req, prompts[0])
            return stream(req, gen, "completion")
        if req.logprobs is not None:
            scorer.check(adapter)
        choices = await asyncio.gather(*[completion_choice(req, i, p, t) for i, (p, t) in
                                         enumerate(zip(req.prompts, prompts))])
        usage = {"prompt_tokens": sum(c.pop("_prompt_tokens") for c in choices),
                 "completion_tokens": sum(c.pop("_completion_tokens") for c in choices)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": req.model, "system_fingerprint": None, "choices": list(choices), "usage": usage,
        }

    async def completion_choice(req: CompletionRequest, index: int, prompt: str | list[int], text: str) -> dict:
        """One prompt's choice: generated through the batcher, scored on the scoring thread where asked."""
        field = "prompt" if len(req.prompts) == 1 else f"prompt.{index}"
        echo = bool(req.echo)
        if req.logprobs is not None:
            fast = await score(scorer.echo_fast, req, prompt, text, field)
            if fast is not None:  # max_tokens 0, or one greedy token: no generation needed
                fast["index"] = index
                return fast
        if req.max_tokens == 0:  # echo without logprobs, nothing to generate
            return {"index": index, "text": text if echo else "", "logprobs": None, "finish_reason": "length",
                    "_prompt_tokens": await asyncio.to_thread(backend.count_tokens, text), "_completion_tokens": 0}
        gen = await asyncio.to_thread(prepare, req, text)
        r = await run(gen)
        logprobs = None
        if req.logprobs is not None:
            logprobs = await score(scorer.completion_logprobs, prompt, text, r.text, req.logprobs, echo, field)
        return {"index": index, "text": (text if echo else "") + r.text, "logprobs": logprobs,
                "finish_reason": r.finish_reason, "_prompt_tokens": r.prompt_tokens,
                "_completion_tokens": r.new_tokens}

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, shutdown=shutdown)
    return app
