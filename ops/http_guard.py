"""uvicorn's h11 protocol with the two guards it lacks for a server exposed to anything that connects.

uvicorn times out only idle keep-alive connections, and only once a response was sent: a client that
opens a connection and sends nothing, or half a request head, holds it (and a file descriptor) for
good. ``limit_concurrency`` answers 503 but still accepts, so it caps no descriptor. Here:

- **a request deadline**: a connection must send a whole request, head and body, within
  ``request_timeout_s`` of opening, or of its previous response; a client dripping bytes does not move
  the deadline, and one that announces a body and never sends it is closed like one that sends half a
  head (the app would wait for it for good: a login form needs no session to be sent);
- **a connection cap**: past ``max_connections`` a new connection replaces the oldest one that is not
  in the middle of a request (idle, or still sending its head or body); when every one is, the new one
  is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11(H11Protocol):
    """Set the limits by subclassing with :func:`guarded`."""

    request_timeout_s: float = 10.0
    max_connections: int = 64

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        _no_delay(transport)
        super().connection_made(transport)
        self.opened_at = self.loop.time()
        self.head_deadline: asyncio.TimerHandle | None = None
        self._await_head()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.waiting_on_client:
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    @property
    def in_request(self) -> bool:
        """A request head arrived and its response is not complete: the app is working on it."""
        return self.cycle is not None and not self.cycle.response_complete

    @property
    def waiting_on_client(self) -> bool:
        """The connection waits for the client: for a request head, or for the rest of a body."""
        return not self.in_request or bool(self.cycle.more_body)

    def _await_head(self) -> None:
        self._cancel_deadline()
        if self.waiting_on_client and not self.transport.is_closing():
            self.head_deadline = self.loop.call_later(self.request_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self.head_deadline = None
        if self.waiting_on_client and not self.transport.is_closing():
            self.transport.close()

    def _cancel_deadline(self) -> None:
        if getattr(self, "head_deadline", None) is not None:
            self.head_deadline.cancel()  # type: ignore[union-attr]
            self.head_deadline = None

    def _make_room(self) -> None:
        """Over the cap: close the oldest connection not in a request, or this one if all are."""
        if len(self.connections) <= self.max_connections:
            return
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11)
                and c.waiting_on_client and not c.transport.is_closing()]
        victim = min(idle, key=lambda c: c.opened_at) if idle else self
        victim.transport.close()
        self.connections.discard(victim)


def _no_delay(transport: asyncio.Transport) -> None:
    """Send each write at once. asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP, not on
    those accepted from ``socket.create_server`` (protocol 0); without it a response's body waits for
    the client's delayed ACK of its head, about 40 ms on Linux, on every response."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def guarded(request_timeout_s: float, max_connections: int) -> Any:
    """The protocol class to give uvicorn's ``Config(http=...)``, with these limits."""
    return type("GuardedH11", (GuardedH11,), {"request_timeout_s": request_timeout_s,
                                              "max_connections": max_connections})
