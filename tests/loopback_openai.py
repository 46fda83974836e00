"""A scripted OpenAI chat-completions server on loopback, for tests (no network needed).

Each POST /v1/chat/completions consumes the next scripted ``Reply``: its status code, its
content, tool calls (the real chat-completions tool-calling wire format), and an optional
delay before answering (to simulate slow models or hangs). A script entry may also be a
function of the request body returning a ``Reply``, for replies that depend on what the
client sent or that act on the world mid-conversation. The requests received are kept for
assertions.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union


@dataclass(frozen=True)
class Reply:
    """One scripted answer. ``status`` other than 200 sends an OpenAI-style error body."""

    content: str = ""
    status: int = 200
    delay_s: float = 0.0
    prompt_tokens: int = 100
    completion_tokens: int = 50
    send_usage: bool = True  # False: omit the usage object, as some servers do
    retry_after: str | None = None  # sent as a Retry-After header on error replies
    tool_calls: tuple[tuple[str, str], ...] = ()  # (function name, raw JSON arguments), in order
    refusal: str | None = None  # the message's ``refusal`` field, as OpenAI sends for refusals

    def message(self, index: int) -> dict[str, Any]:
        """The assistant message object of the response."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content if (self.content or not self.tool_calls) else None}
        if self.refusal is not None:
            msg["refusal"] = self.refusal
        if self.tool_calls:
            msg["tool_calls"] = [{"id": f"call_{index}_{i}", "type": "function",
                                  "function": {"name": name, "arguments": args}}
                                 for i, (name, args) in enumerate(self.tool_calls)]
        return msg


def tool_reply(*calls: tuple[str, Any], content: str = "", **kw: Any) -> Reply:
    """A reply calling tools; dict arguments are JSON-encoded, strings are sent verbatim (malformed on purpose)."""
    encoded = tuple((name, args if isinstance(args, str) else json.dumps(args)) for name, args in calls)
    return Reply(content=content, tool_calls=encoded, **kw)


Script = Union[Reply, Callable[[dict[str, Any]], Reply]]


class LoopbackOpenAI:
    """Context manager running the server in a thread on 127.0.0.1, port 0; handler threads are joined on exit."""

    def __init__(self, replies: list[Script] | None = None, default: Reply | None = None) -> None:
        self._replies = list(replies or [])
        self._default = default
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.active = 0
        self.peak_concurrency = 0  # most requests being handled at once
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                reply = server._next(body)
                with server._lock:
                    server.active += 1
                    server.peak_concurrency = max(server.peak_concurrency, server.active)
                try:
                    if reply.delay_s and server._closing.wait(reply.delay_s):
                        return  # the test is over: do not write to a client that is gone
                finally:
                    with server._lock:
                        server.active -= 1
                if reply.status != 200:
                    extra = {"Retry-After": reply.retry_after} if reply.retry_after is not None else {}
                    return self._send(reply.status, {"error": {"message": f"scripted {reply.status}", "type": "scripted"}}, extra)
                self._send(200, {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "loopback"),
                    "choices": [{"index": 0, "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                                 "message": reply.message(len(server.requests))}],
                    **({"usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                                  "total_tokens": reply.prompt_tokens + reply.completion_tokens}} if reply.send_usage else {}),
                })

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away: expected in hang tests

        self._closing = threading.Event()
        self.handler_errors: list[BaseException] = []  # e.g. a client that hung up mid-reply

        class Server(ThreadingHTTPServer):
            # Handler threads are joined on close, and errors are recorded, not printed: a
            # traceback printed from a stray thread (which parses source lines on 3.11) while
            # the main thread parses is CPython's AST race (python/cpython#106905).
            daemon_threads = False
            block_on_close = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                server.handler_errors.append(sys.exc_info()[1])

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            entry = self._replies.pop(0) if self._replies else None
        if entry is not None:
            return entry if isinstance(entry, Reply) else entry(body)
        if self._default is None:
            return Reply(status=500)
        return self._default

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "LoopbackOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()  # joins the handler threads
