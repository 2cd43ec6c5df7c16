"""``mesh ops serve``: /metrics, /healthz (the process is alive) and /readyz (Redis answers and
at least one worker heartbeats; it also names the Redis in use, its address and role)."""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mesh.broker import MeshClient
from mesh.broker.clock import server_ms
from mesh.broker.connection import describe

from .metrics import MeshCollector

logger = logging.getLogger(__name__)


def make_server(client: MeshClient, host: str, port: int) -> ThreadingHTTPServer:
    registry = CollectorRegistry()
    registry.register(MeshCollector(client))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, "application/json", b'{"status":"ok"}')
            elif self.path == "/readyz":
                self._ready()
            elif self.path == "/metrics":
                try:
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                except redis.RedisError as exc:
                    self._send(503, "text/plain", f"redis unavailable: {exc}\n".encode())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _ready(self) -> None:
            timeout_s = client.settings.heartbeat_timeout_s
            # Which Redis: its address and role (for Sentinel, the master it names now), no credential.
            server = describe(client.settings, client.redis)
            if "error" in server:  # it did not answer (after the client's retries): no second wait
                self._send(503, "application/json", orjson.dumps({"status": "not ready", "redis": server}))
                return
            try:
                # Heartbeats are the Redis server's clock (settle.lua), so "recent" is judged by it too.
                live = client.redis.zcount(client.keys.heartbeats, server_ms(client.redis) - timeout_s * 1000,
                                           "+inf")
            except redis.RedisError as exc:
                server.setdefault("error", str(exc))
                self._send(503, "application/json", orjson.dumps({"status": "not ready", "redis": server}))
                return
            if not live:
                self._send(503, "application/json", orjson.dumps(
                    {"status": "not ready", "workers": 0,
                     "reason": f"no worker has heartbeated in the last {timeout_s:g}s", "redis": server}))
                return
            self._send(200, "application/json", orjson.dumps({"status": "ready", "workers": live, "redis": server}))

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug(format, *args)

    return ThreadingHTTPServer((host, port), Handler)
