"""``mesh ops serve``: /metrics, /healthz (the process is alive) and /readyz (Redis answers and
at least one worker heartbeats; it also names the Redis in use, its address and role), and the
console (:mod:`mesh.ops.web`) beside them, behind its own access rule; these three stay open.

A Starlette app served by uvicorn, guarded for a port anything may connect to (http_guard.py): a
request head must arrive within MESH_OPS_REQUEST_TIMEOUT_S, idle keep-alive connections close after
MESH_OPS_KEEP_ALIVE_S, and at most MESH_OPS_MAX_CONNECTIONS are held (within the process's
descriptor limit), so slow or idle clients cannot starve /healthz. The endpoints that read Redis run
on a small thread pool; /healthz runs on the event loop and reads nothing.
"""

from __future__ import annotations

import logging
import resource
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import orjson
import redis
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mesh.broker import MeshClient
from mesh.broker.clock import server_ms
from mesh.broker.connection import describe
from mesh.broker.shards import Shards
from mesh.broker.trace import operator

from .http_guard import guarded
from .metrics import MeshCollector
from .web.app import Console
from .web.auth import Access

logger = logging.getLogger(__name__)

#: Descriptors kept free of connections: the listening socket, Redis connections, logs, the loop's own.
RESERVED_FDS = 32

#: Connections accepted in one go before any is checked against the cap (asyncio accepts up to the
#: listen backlog per wake-up), and the listen backlog itself: an ops server needs no long queue.
ACCEPT_BATCH = 8

#: Batches of accepts that may be under way before the first is checked against the cap (each
#: connection's setup, and an evicted one's close, take a turn of the event loop or two).
BATCHES_IN_FLIGHT = 4

#: Requests reading Redis at once (each may hold a Redis connection).
REDIS_THREADS = 8

#: How long a stop waits for open responses (a browser's event stream never ends by itself).
GRACEFUL_S = 3

#: The largest request head read (h11 buffers no more of an incomplete one).
MAX_HEAD_BYTES = 16 * 1024


def make_app(client: MeshClient, access: Access | None = None, console: Console | None = None) -> Starlette:
    """The ops endpoints as an ASGI app, with the console (:mod:`mesh.ops.web`) under ``access``
    (default: bound to loopback, open to the local operator unless users are configured)."""
    console = console or Console(client, access or Access.of(client.settings, "127.0.0.1", operator()))
    registry = CollectorRegistry()
    registry.register(MeshCollector(client))

    async def healthz(_: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    def readyz(_: Request) -> Response:
        status, body = ready(client)
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    def metrics(_: Request) -> Response:
        try:
            return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
        except redis.RedisError as exc:
            return Response(f"redis unavailable: {exc}\n", status_code=503, media_type="text/plain")

    async def not_found(_: Request, __: Exception) -> Response:
        return Response(b"not found\n", status_code=404, media_type="text/plain")

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = REDIS_THREADS
        try:
            yield
        finally:
            console.stop()

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
                             *console.routes()],
                     exception_handlers={404: not_found}, lifespan=lifespan)


def ready(client: MeshClient) -> tuple[int, dict[str, Any]]:
    """/readyz's status and body: Redis answers and a worker heartbeated within the timeout."""
    timeout_s = client.settings.heartbeat_timeout_s
    # Which Redis: its address and role (for Sentinel, the master it names now), no credential.
    server = describe(client.settings, client.redis)
    if "error" in server:  # it did not answer (after the client's retries): no second wait
        return 503, {"status": "not ready", "redis": server}
    try:
        # Unmigrated data of the older key layout: its workers (which this release's refuse to be) are
        # not counted, and the work kept there is not served: not ready, and why (one EXISTS, until it
        # is migrated; then none).
        refused = client.layout_refusal()
        # Heartbeats are the Redis server's clock (settle.lua), so "recent" is judged by it too.
        # Every worker heartbeats in the first shard (each shard's consumers in their own, under one id).
        beats = Shards.of(client.settings).home.heartbeats
        live = client.redis.zcount(beats, server_ms(client.redis) - timeout_s * 1000, "+inf")
    except redis.RedisError as exc:
        server.setdefault("error", str(exc))
        return 503, {"status": "not ready", "redis": server}
    if refused is not None:
        return 503, {"status": "not ready", "workers": live, "reason": refused, "redis": server}
    if not live:
        return 503, {"status": "not ready", "workers": 0,
                     "reason": f"no worker has heartbeated in the last {timeout_s:g}s", "redis": server}
    return 200, {"status": "ready", "workers": live, "redis": server}


def connection_cap(wanted: int) -> int:
    """``wanted`` connections, or fewer if the descriptor limit leaves less room after the reserve and
    one batch of accepts."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(2, min(wanted, soft - RESERVED_FDS - BATCHES_IN_FLIGHT * ACCEPT_BATCH))


class OpsServer:
    """The app on a bound socket: :meth:`run` serves until SIGINT/SIGTERM (from the main thread) or
    :meth:`stop`; ``port`` is known as soon as it is made (port 0 picks a free one)."""

    def __init__(self, client: MeshClient, host: str, port: int, access: Access | None = None) -> None:
        s = client.settings
        cap = connection_cap(s.ops_max_connections)
        self.access = access or Access.of(s, host, operator())
        self.socket = _bind(host, port, backlog=ACCEPT_BATCH)
        self.port: int = self.socket.getsockname()[1]
        self.console = Console(client, self.access)
        config = uvicorn.Config(make_app(client, self.access, self.console), http=guarded(s.ops_request_timeout_s, cap),
                                lifespan="on", timeout_graceful_shutdown=GRACEFUL_S,
                                timeout_keep_alive=s.ops_keep_alive_s, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                                backlog=ACCEPT_BATCH, log_config=None, access_log=False, server_header=False)
        self.server = uvicorn.Server(config)

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self) -> threading.Thread:
        """Serve from a thread; returns once the server accepts connections."""
        thread = threading.Thread(target=self.run, name="ops-server", daemon=True)
        thread.start()
        while not self.server.started and thread.is_alive():
            threading.Event().wait(0.01)
        return thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.console.stop()  # browsers' event streams end now, not at the graceful timeout


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket. ``::`` (every IPv6 interface) takes IPv4 connections too where the
    system can (IPV6_V6ONLY off), as ``0.0.0.0`` does for IPv4: a probe to ``127.0.0.1`` or an
    IPv4 address of the machine gets an answer (``create_server`` alone would listen on IPv6 only)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    dual = family == socket.AF_INET6 and _unspecified(host) and socket.has_dualstack_ipv6()
    return socket.create_server((host, port), family=family, backlog=backlog, dualstack_ipv6=dual)


def _unspecified(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:  # a name, not an address
        return False
