"""A real OpenAI-compatible HTTP server on loopback that injects faults, for testing the API backend.

Faults are scripted in the prompt itself, so they follow an example whatever the request order:
`[[fault:429]]` (first attempt: 429 with Retry-After: 1), `[[fault:500x2]]` (first two attempts: 500),
`[[fault:hang]]` (first attempt: no reply for `hang_s`), `[[fault:malformed]]` (first attempt: 200 with a body
that is not JSON), `[[fault:400]]` (always 400), `[[fault:nousage]]` (a reply without `usage`),
`[[fault:echo400]]` / `[[fault:echo500]]` (400 / 500 whose message echoes the request's Authorization header, as
some servers do). With `echo_key=True`, a 401 for a wrong key echoes the key it was sent too.
The reply is what follows `[[answer:` … `]]` in the prompt, else "A". Usage counts whitespace-separated words of
the messages' contents (prompt) and of the reply (completion), so tests can compute costs by hand.
/v1/completions requests are refused with llama-server's 400 for `echo` ("Only no echo is supported").
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT = re.compile(r"\[\[fault:(\w+?)(?:x(\d+))?\]\]")
ANSWER = re.compile(r"\[\[answer:([^\]]*)\]\]")


def prompt_words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


class FaultServer:
    def __init__(self, key: str | None = None, hang_s: float = 3.0, echo_key: bool = False):
        self.key = key
        self.echo_key = echo_key
        self.hang_s = hang_s
        self.attempts: dict[str, list[float]] = {}  # last user message -> times of its attempts
        self.headers: list[dict] = []
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, headers: dict | None = None):
                body = {"error": {"message": message, "type": "test_error", "param": None, "code": None}}
                self._send(status, json.dumps(body).encode(), headers)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with server.lock:
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    server.bodies.append(body)
                auth = self.headers.get("Authorization", "")
                if server.key is not None and auth != f"Bearer {server.key}":
                    sent = auth.removeprefix("Bearer ")
                    return self._error(401, "Incorrect API key provided" + (f": {sent}. Header was '{auth}'"
                                                                            if server.echo_key else ""))
                if "messages" not in body:  # /v1/completions: refused as llama-server refuses echo
                    return self._error(400, "Only no echo is supported")
                messages = body["messages"]
                prompt = messages[-1]["content"]
                with server.lock:
                    times = server.attempts.setdefault(prompt, [])
                    times.append(time.monotonic())
                    attempt = len(times)
                fault = FAULT.search(prompt)
                kind, times_n = (fault.group(1), int(fault.group(2) or 1)) if fault else (None, 0)
                if kind == "400":
                    return self._error(400, "This model's maximum context length is exceeded")
                if kind in ("echo400", "echo500"):
                    return self._error(int(kind[4:]), f"bad request from client with Authorization: {auth} "
                                       f"(key {auth.removeprefix('Bearer ')})")
                if kind is not None and kind != "nousage" and attempt <= times_n:
                    if kind == "429":
                        return self._error(429, "Rate limit reached", {"Retry-After": "1"})
                    if kind == "500":
                        return self._error(500, "The server had an error")
                    if kind == "hang":
                        time.sleep(server.hang_s)
                        return None
                    if kind == "malformed":
                        return self._send(200, b'{"id": "x", "choices": [{"mess')
                m = ANSWER.search(prompt)
                reply = m.group(1) if m else "A"
                out = {
                    "id": f"chatcmpl-{attempt}", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop"}],
                }
                if kind != "nousage":
                    p, c = prompt_words(messages), len(reply.split())
                    out["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                return self._send(200, json.dumps(out).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FaultServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, marker: str) -> int:
        """Attempts made for the prompt containing `marker`."""
        with self.lock:
            return sum(len(t) for p, t in self.attempts.items() if marker in p)

    def times(self, marker: str) -> list[float]:
        with self.lock:
            return next(t for p, t in self.attempts.items() if marker in p)

    @property
    def total(self) -> int:
        with self.lock:
            return sum(len(t) for t in self.attempts.values())
