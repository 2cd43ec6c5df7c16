"""A real loopback HTTP server speaking the OpenAI chat-completions API, for provider tests.

    with FakeOpenAI() as api:
        settings = MeshSettings(model_provider="openai", model_url=api.url)
        ...
        api.requests[0]["json"]["model"]

``responder`` maps a request body to ``(status, body, headers)``; a dict body is sent as JSON,
a str body as-is. The default answers a plan when the system prompt asks for one, else findings.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

Reply = tuple[int, dict[str, Any] | str, dict[str, str]]
Responder = Callable[[dict[str, Any]], Reply]


def completion(content: str, *, model: str = "fake-model", usage: tuple[int, int] | None = None) -> dict[str, Any]:
    """A chat-completions response body whose single choice carries ``content``; ``usage`` is
    (prompt tokens, completion tokens)."""
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
        ],
    }
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": usage[0] + usage[1]}
    return body


def _messages(request: dict[str, Any]) -> tuple[str, str]:
    msgs = request.get("messages") or []
    system = next((m.get("content", "") for m in msgs if m.get("role") == "system"), "")
    user = next((m.get("content", "") for m in msgs if m.get("role") == "user"), "")
    return system, user


def default_responder(request: dict[str, Any]) -> Reply:
    """A valid plan when the system prompt asks for a plan, valid findings otherwise."""
    system, user = _messages(request)
    if "planner" in system:
        answer: dict[str, Any] = {
            "goal": user,
            "steps": [
                {"kind": "research", "step_id": "r1", "question": f"what is known about {user}?"},
                {"kind": "action", "step_id": "a1", "tool": "note", "args": {"title": user},
                 "use_findings": True},
            ],
        }
    else:
        answer = {
            "question": user,
            "summary": "one thing was found",
            "findings": [{"text": "the answer", "source": "docs/guide.md#answer"}],
        }
    return 200, completion(json.dumps(answer), model=request.get("model", "fake-model")), {}


class FakeOpenAI:
    """A ThreadingHTTPServer on 127.0.0.1 (any free port) answering ``POST /v1/chat/completions``."""

    def __init__(self, responder: Responder = default_responder) -> None:
        self.responder: Responder = responder
        self.requests: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-openai", daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL of the API, ending in ``/v1``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                    return
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON"}}, {})
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.requests.append({"json": body, "headers": headers})
                status, reply, reply_headers = fake.responder(body)
                self._send(status, reply, reply_headers)

            def _send(self, status: int, reply: dict[str, Any] | str, headers: dict[str, str]) -> None:
                is_json = not isinstance(reply, str)
                data = (json.dumps(reply) if is_json else str(reply)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json" if is_json else "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (e.g. it timed out) before the answer was ready

        return Handler


def tool_calls(*calls: tuple[str, dict[str, Any] | str], model: str = "fake-model",
               usage: tuple[int, int] | None = None, turn: int = 1) -> dict[str, Any]:
    """A chat-completions response body asking for tool calls, each ``(name, args)`` (a str is sent as
    the arguments' text as it is: a model's broken JSON)."""
    asked = [{"id": f"call_{turn}_{n}", "type": "function",
              "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
             for n, (name, args) in enumerate(calls, 1)]
    body = completion("", model=model, usage=usage)
    body["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": asked}
    body["choices"][0]["finish_reason"] = "tool_calls"
    return body


def turns(script: list[dict[str, Any]]) -> Responder:
    """A responder playing ``script``: the answer to turn N is ``script[N-1]`` (the turn counted from the
    assistant messages the request carries), so a resumed conversation gets the turn it is at."""

    def respond(request: dict[str, Any]) -> Reply:
        n = sum(1 for m in request.get("messages") or [] if m.get("role") == "assistant")
        if n >= len(script):
            return 500, {"error": {"message": f"the script has no turn {n + 1}"}}, {}
        return 200, script[n], {}

    return respond
