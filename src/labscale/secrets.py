"""Keep secrets out of everything labscale prints, stores or reports.

Some API servers echo the key they were sent in an error body ("Incorrect API key provided: sk-…"); such text
would otherwise reach `predictions.error`, the report and the one-line error on stderr. `redact(text)` replaces

* every secret value registered with `register` — the value of each model's `api_key_env` variable is
  registered when the experiment is validated and when the client is built, and `labscale serve`'s key when it
  starts — wherever it occurs, and
* anything shaped like a credential: `Bearer <token>`, `sk-…`-style keys (OpenAI, Anthropic, …), and
  `api_key=…` / `"token": "…"` assignments,

with `[REDACTED]`. Every LabscaleError is redacted when printed, and every stored error text when written.
"""

from __future__ import annotations

import os
import re
import threading

MASK = "[REDACTED]"
MIN_SECRET = 6  # shorter values (e.g. a test key "k") would mask ordinary words

_lock = threading.Lock()
_secrets: set[str] = set()

SHAPES = (
    re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{8,}\b"),
    re.compile(r"(?i)((?:api[_-]?key|access[_-]?token|token|secret|password)[\"']?\s*[:=]\s*[\"']?)"
               r"[^\s\"',;}]{6,}"),
)


def register(value: str | None) -> None:
    """Treat `value` as a secret from now on (in this process)."""
    if value and len(value) >= MIN_SECRET:
        with _lock:
            _secrets.add(value)


def register_env(var: str | None) -> None:
    """Register the value of environment variable `var`, if it is set."""
    if var:
        register(os.environ.get(var))


def redact(text: str | None) -> str | None:
    if not text:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        text = text.replace(s, MASK)
    for shape in SHAPES:
        text = shape.sub(lambda m: (m.group(1) if m.lastindex else "") + MASK, text)
    return text
