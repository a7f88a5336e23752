"""The rating app (FastAPI): the page, a rater's session, and ratings.

    GET  /                 the page (no data in it)
    POST /api/session      {"rater": id} → the rater's progress and next item (created, or resumed)
    POST /api/rate         {"rater", "code", "rating", "seconds"} → stored; the progress and the next item

An item on the wire is {"code", "position", "instruction", "input", "outputs"}: its opaque code and the texts,
never a run, model or setting name. Every body is validated (pydantic, unknown keys refused); errors are
{"error": message} with 400 (malformed), 401 (token), 404 (no such item for this rater), 409 (already rated) or
413 (body too large). With an access token, /api routes need it in the `X-Labscale-Token` header (the page
takes it from `?token=` once and keeps it for the tab). Only the chosen experiment's items exist here.
"""

from __future__ import annotations

import hmac
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from labscale.rate.items import Item
from labscale.rate.page import page
from labscale.rate.sessions import CODE_PATTERN, RATER_PATTERN, RaterSession, Slot, choices

MAX_BODY_BYTES = 64 << 10
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SessionIn(_Body):
    rater: str = Field(pattern=RATER_PATTERN)


class RateIn(_Body):
    rater: str = Field(pattern=RATER_PATTERN)
    code: str = Field(pattern=CODE_PATTERN)
    rating: str = Field(max_length=16)
    seconds: Optional[float] = Field(None, ge=0, le=86_400)


class Problem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def _validation_message(e: RequestValidationError) -> str:
    first = e.errors()[0] if e.errors() else {}
    kind = first.get("type", "")
    if kind in ("json_invalid", "model_attributes_type", "dict_type") or first.get("loc") == ("body",):
        return "the request body must be a JSON object"
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if kind == "extra_forbidden":
        return f"unknown field '{field}'"
    if kind == "missing":
        return f"missing field '{field}'"
    if field == "rater":
        return "invalid rater id: use 1–64 letters, digits, space, _ . @ - (starting with a letter or digit)"
    if field == "code":
        return "invalid item code"
    return f"invalid {field}: {first.get('msg', 'bad value')}"


def create_app(db: Path, exp_id: int, mode: str, task: str | None, items: list[Item],
               token: str | None = None) -> FastAPI:
    """The app for one experiment's `items` in `mode`; the store opens with the app (in its event-loop thread)."""
    from labscale.engine.store import Store

    state: dict = {}
    allowed = choices(mode)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["store"] = Store(db)
        state["sessions"] = {}
        try:
            yield
        finally:
            state["store"].close()

    app = FastAPI(title="labscale rate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        if token is not None and request.url.path.startswith("/api"):
            given = request.headers.get("x-labscale-token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "missing or wrong access token: open the page with ?token=<token>")
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(Problem)
    async def _problem(request: Request, e: Problem):
        return _error(e.status, e.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return _error(400, _validation_message(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    def session(rater: str) -> RaterSession:
        sessions = state["sessions"]
        if rater not in sessions:
            sessions[rater] = RaterSession(state["store"], exp_id, rater, mode, task, items)
        return sessions[rater]

    def wire(slot: Slot | None) -> dict | None:
        if slot is None:
            return None
        return {"code": slot.code, "position": slot.position + 1, "instruction": slot.item.instruction,
                "input": slot.item.input, "outputs": slot.shown_outputs()}

    def progress(s: RaterSession) -> dict:
        return {"rater": s.rater, "mode": mode, "total": len(s.slots), "done": len(s.rated()),
                "item": wire(s.next_slot())}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page(mode, allowed), headers=SECURITY_HEADERS)

    @app.post("/api/session")
    async def start(body: SessionIn):
        return progress(session(body.rater))

    @app.post("/api/rate")
    async def rate(body: RateIn):
        if body.rating not in allowed:
            raise Problem(400, f"rating '{body.rating}' is not one of {', '.join(allowed)} ({mode} mode)")
        if body.rater not in state["sessions"] and \
                state["store"].rating_session(exp_id, body.rater, mode, task or "*") is None:
            raise Problem(404, f"no item '{body.code}' for rater '{body.rater}' (no session: start one first)")
        s = session(body.rater)
        slot = s.by_code.get(body.code)
        if slot is None:
            raise Problem(404, f"no item '{body.code}' for rater '{body.rater}'")
        if not s.record(slot, body.rating, body.seconds):
            raise Problem(409, f"item '{body.code}' is already rated (the first rating is kept)")
        return progress(s)

    return app


def check_token_env(var: str | None) -> str | None:
    """The access token from $VAR (a one-line error when the variable is unset or empty)."""
    import os

    from labscale.errors import LabscaleError

    if var is None:
        return None
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
        raise LabscaleError(f"--token-env '{var}' is not an environment variable name", "e.g. --token-env RATE_TOKEN")
    value = os.environ.get(var, "")
    if not value:
        raise LabscaleError(f"--token-env {var}: that environment variable is not set",
                            "set it to the token raters will use, or drop --token-env")
    return value
