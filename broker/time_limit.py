"""dramatiq's ``TimeLimit``, whose timer raises into a thread only while that thread's limit still
stands.

dramatiq's timer marks an overrun thread under its lock, lets the lock go, and only then raises
``TimeLimitExceeded`` into the thread. A handler that returns in between cancels its timer
(``after_process_message``, under that lock) and goes on, and the exception lands later wherever
its thread is by then: in the hooks around its ack, or in dramatiq's wait for the next message,
neither of which catches it. The worker thread dies there, with its message unsettled: held by a
worker that still heartbeats, so nobody reclaims it, and with one thread the worker runs nothing
more. Here the timer raises while it holds the lock, so the cancel either comes first (nothing is
raised) or waits for the raise, and the exception then lands in the thread's after-hooks, where
dramatiq fails the attempt as a time limit and settles it.
"""

from __future__ import annotations

from time import monotonic

from dramatiq.middleware import TimeLimit
from dramatiq.middleware import time_limit as timer


class _Manager(timer._CtypesTimeoutManager):
    def _handle_deadlines(self) -> None:
        now = monotonic()
        with self.mu:  # raised under the lock that cancelling takes: no raise after a cancel
            for thread_id, deadline in self.deadlines.items():
                if deadline and now >= deadline:
                    self.logger.warning("Time limit exceeded. Raising exception in worker thread %r.", thread_id)
                    self.deadlines[thread_id] = None
                    timer.raise_thread_exception(thread_id, timer.TimeLimitExceeded)


class MeshTimeLimit(TimeLimit):
    """dramatiq's ``TimeLimit`` (same options, same exception) with the timer above (not under
    gevent, whose timers are not threads)."""

    def __init__(self, *, time_limit: float = 600000, interval: int = 1000) -> None:
        super().__init__(time_limit=time_limit, interval=interval)
        if isinstance(self.manager, timer._CtypesTimeoutManager):
            self.manager = _Manager(interval, logger=self.logger)
