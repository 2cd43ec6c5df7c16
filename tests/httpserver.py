"""A real loopback HTTP server that records every POST, for tests of tools that call out.

    with RecordingServer(lambda n, request: (500, {})) as server:
        settings = make_settings(http_allow=server.host_port)
        ...
        server.requests[0]["headers"]["idempotency-key"]

``responder`` gets the 1-based number of the request and the request itself and returns
``(status, json_body)`` or ``(status, json_body, headers)``. Each recorded request has ``at``
(``time.monotonic()`` on arrival) and, once answered, ``status``. ``hold`` makes every answer
wait until the server is stopped (or ``release()`` is called), so a client with a short timeout
gives up first; no sleeps.

``get`` answers GET requests the same way (recorded apart, in ``gets``; without it a GET gets 501);
``port`` binds a given port (a server started again where a stopped one was).
"""

from __future__ import annotations

import collections
import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

Responder = Callable[[int, dict[str, Any]], tuple[Any, ...]]


def ok(_n: int, _request: dict[str, Any]) -> tuple[int, Any]:
    return 200, {"ok": True}


class RecordingServer:
    def __init__(self, responder: Responder = ok, *, hold: bool = False, get: Responder | None = None,
                 port: int = 0) -> None:
        self.responder = responder
        self.get = get
        self.requests: list[dict[str, Any]] = []
        self.gets: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        if not hold:
            self._released.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def host_port(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host_port}{path}"

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                request = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                           "at": time.monotonic()}
                with server._lock:
                    server.gets.append(request)
                    n = len(server.gets)
                status, reply, *extra = server.get(n, request) if server.get else (501, {})
                request["status"] = status
                self._answer(status, reply, extra[0] if extra else {})

            def _answer(self, status: int, reply: Any, headers: dict[str, str]) -> None:
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                           "json": json.loads(raw) if raw else None, "at": time.monotonic()}
                with server._lock:
                    server.requests.append(request)
                    n = len(server.requests)
                status, reply, *extra = server.responder(n, request)
                request["status"] = status
                server._released.wait(30)
                self._answer(status, reply, extra[0] if extra else {})

        return Handler


class SlidingWindow:
    """A responder for :class:`RecordingServer` answering at most ``rate`` requests in any second;
    beyond, 429 with Retry-After and the ``x-ratelimit-*`` headers a model API sends (``refused``: its
    body). An accepted request gets :meth:`accept`'s answer."""

    refused: Any = {"error": "rate limited"}

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.accepted: collections.deque[float] = collections.deque()
        self.lock = threading.Lock()

    def __call__(self, n: int, request: dict[str, Any]) -> tuple[Any, ...]:
        with self.lock:
            now = request["at"]
            while self.accepted and self.accepted[0] <= now - 1.0:
                self.accepted.popleft()
            if len(self.accepted) >= self.rate:
                reset_ms = max(1, int((self.accepted[0] + 1.0 - now) * 1000))
                return 429, self.refused, {
                    "Retry-After": str(math.ceil(reset_ms / 1000)), "x-ratelimit-limit-requests": str(self.rate),
                    "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{reset_ms}ms"}
            self.accepted.append(now)
            return self.accept(len(self.accepted))

    def accept(self, in_window: int) -> tuple[Any, ...]:
        """The answer to an accepted request, ``in_window`` accepted in the last second with it."""
        return 200, {"ok": True}, {"x-ratelimit-remaining-requests": str(self.rate - in_window)}
