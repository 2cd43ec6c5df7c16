"""The Redis server's clock: every time compared across hosts (heartbeats, leases, breakers,
retention, readiness, the due times of delayed messages and deadlines) is read from it, never from
the local clock.

Scripts read ``TIME`` themselves. Python code that needs "now" often (a retry's due time, a
deadline check) asks a :class:`ServerClock`: the local clock plus the offset ``TIME`` last
measured, measured again every RESYNC_S, so a host whose clock is off by any amount computes the
same instants as the fleet at the cost of one ``TIME`` now and then. A delayed message's ``eta``
is written on the server's clock; :class:`DelayClock` turns it into the consuming host's clock as
dramatiq reads it (dramatiq compares it with the local clock), so neither the host that wrote it
nor the one that waits for it needs a correct clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.common import current_millis
from dramatiq.middleware import Middleware

logger = logging.getLogger(__name__)

#: How often a ServerClock measures the offset again (s): clocks drift and NTP steps them.
RESYNC_S = 5.0


def server_ms(client: Any) -> int:
    """The Redis server's time (``TIME``) in milliseconds."""
    secs, micros = client.time()
    return int(secs) * 1000 + int(micros) // 1000


class ServerClock:
    """The Redis server's time, read on this host: ``local()`` plus the last measured offset.

    ``local`` is this host's clock in ms (dramatiq's ``current_millis``; tests inject a skewed
    one). When Redis cannot be asked, the last offset is kept (the local clock until one was
    measured): a time is still given, never an error on a failure path."""

    def __init__(self, client: Any, *, local: Callable[[], int] = current_millis, resync_s: float = RESYNC_S) -> None:
        self.client = client
        self.local = local
        self.resync_s = resync_s
        self._offset_ms = 0
        self._synced_at = -float("inf")
        self._lock = threading.Lock()

    def offset_ms(self) -> int:
        """Server time minus this host's time (ms), measured at most ``resync_s`` ago when Redis answers."""
        if time.monotonic() - self._synced_at >= self.resync_s:
            self._sync()
        return self._offset_ms

    def now_ms(self) -> int:
        """The Redis server's time now, in ms."""
        return self.local() + self.offset_ms()

    def now_s(self) -> float:
        """The Redis server's time now, in s (the envelope's ``deadline`` is on this clock)."""
        return self.now_ms() / 1000

    def to_local_ms(self, server_time_ms: int) -> int:
        """``server_time_ms`` on this host's clock."""
        return server_time_ms - self.offset_ms()

    def _sync(self) -> None:
        # Once an offset was measured, a thread that finds another measuring it again goes on with the one it
        # has: a TIME that Redis answers slowly (a busy server) held every worker thread asking the time (a
        # deadline's check at each message's start) until it came back. Until then, each one waits for it.
        if not self._lock.acquire(blocking=self._synced_at == -float("inf")):
            return
        try:
            if time.monotonic() - self._synced_at < self.resync_s:
                return  # another thread just did
            try:
                before = self.local()
                server = server_ms(self.client)
                after = self.local()
            except Exception as exc:  # a redis error, or a client without TIME: keep the last offset
                logger.warning("could not read the Redis server's clock", extra={"error": str(exc)})
                return
            self._offset_ms = server - (before + after) // 2
            self._synced_at = time.monotonic()
        finally:
            self._lock.release()


def server_now_ms(broker: Broker) -> int:
    """The server's time on ``broker``'s clock (a MeshBroker's ServerClock; another broker: local)."""
    clock = getattr(broker, "server_clock", None)
    return clock.now_ms() if isinstance(clock, ServerClock) else current_millis()


class DelayClock(Middleware):
    """Delayed messages are due on the Redis server's clock.

    A message sent with dramatiq's ``delay`` (``actor.send_with_options(delay=...)``) gets its
    ``eta`` from the server's clock, not this host's. A delayed message fetched from a delay queue
    has its ``eta`` turned into this host's clock right before dramatiq puts it in its in-memory
    delay queue, where it waits until the local clock passes it; only the in-memory copy changes,
    the bytes in Redis keep the server's time."""

    def before_enqueue(self, broker: Broker, message: Any, delay: int | None) -> None:
        clock = getattr(broker, "server_clock", None)
        if delay is not None and isinstance(clock, ServerClock) and "eta" in message.options:
            message.options["eta"] = clock.now_ms() + int(delay)

    def before_delay_message(self, broker: Broker, message: MessageProxy) -> None:
        clock = getattr(broker, "server_clock", None)
        eta = message.options.get("eta")
        if isinstance(clock, ServerClock) and isinstance(eta, int | float) and not isinstance(eta, bool):
            message.options["eta"] = clock.to_local_ms(int(eta))
