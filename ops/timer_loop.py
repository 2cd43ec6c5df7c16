"""The durable timers' loop: in every worker process, a thread that fires due timers on its own,
tight schedule (MESH_TIMER_INTERVAL_S, default 0.2 s), apart from the minute-long retention sweep.

Each tick, the worker that takes ``{ns}:timers.lock`` fires what is due by the Redis clock
(:class:`mesh.broker.timers.Timers`); the others skip. A timer therefore fires within about one
interval (plus its handler's write) after its due time, and never before it, whichever workers are
alive: the timers are in Redis, not in this thread. A holder paused mid-tick (SIGSTOP) delays them
by at most its lock (:func:`lock_ms`, 1 s by default).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from dramatiq.middleware import Middleware

from mesh.broker import trace
from mesh.broker.keys import Keys
from mesh.broker.settings import MeshSettings
from mesh.broker.timers import Handler, Timers

logger = logging.getLogger(__name__)


def lock_ms(interval_s: float) -> int:
    """How long a tick's lock holds (ms): five intervals, at least 1 s. A holder that stops mid-tick
    (SIGSTOP, a swap storm) keeps the other workers out only that long, so timers stay about on
    time; one that resumes after another took over may fire alongside it, which the handlers
    tolerate (they are idempotent: each decides or writes in a transaction that finds the work done)."""
    return max(1000, int(interval_s * 5000))


class TimerLoop(Middleware):
    """Starts the timer thread when the worker boots and stops it when the worker shuts down."""

    def __init__(self, settings: MeshSettings, client: redis.Redis, handlers: dict[str, Handler]) -> None:
        self.settings = settings
        self.timers = Timers(client, Keys(settings.namespace, settings.shard), trace.worker_name(), handlers,
                             lock_ms=lock_ms(settings.timer_interval_s))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self._thread = threading.Thread(target=self._loop, name="mesh-timers", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.timers.tick()
            except redis.RedisError as exc:
                logger.warning("timers not fired; trying again", extra={"error": str(exc)})
                self._stop.wait(1.0)
            self._stop.wait(self.settings.timer_interval_s)
