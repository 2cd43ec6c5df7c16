"""``mesh ops serve``: /metrics, /healthz (the process is alive) and /readyz (Redis answers)."""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from broker import MeshClient

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
            try:
                client.redis.ping()
                workers = client.redis.zcard(client.keys.heartbeats)
                self._send(200, "application/json", orjson.dumps({"status": "ready", "workers": workers}))
            except redis.RedisError as exc:
                self._send(503, "application/json", orjson.dumps({"status": "not ready", "redis": str(exc)}))

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug(format, *args)

    return ThreadingHTTPServer((host, port), Handler)
