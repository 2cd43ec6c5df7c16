"""A clock a test moves by hand: what a :class:`~mesh.testing.TestContext`'s deadline is read
with, and what :meth:`TestMesh.advance <mesh.testing.TestMesh.advance>` moves the mesh's durable
timers by."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TestClock:
    """Seconds that pass only when :meth:`advance` says so (UNIX time, starting at ``start_s``, the
    real time when None). ``on_advance`` callbacks are told each advance (``TestMesh`` moves the
    timers in Redis with it)."""

    __test__ = False  # not a pytest test class

    def __init__(self, start_s: float | None = None) -> None:
        self._now = time.time() if start_s is None else float(start_s)
        self._lock = threading.Lock()
        self.on_advance: list[Callable[[float], None]] = []

    def now_s(self) -> float:
        """The clock's time (s)."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass (not negative: time does not go back)."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back: advance({seconds})")
        with self._lock:
            self._now += seconds
        for callback in self.on_advance:
            callback(seconds)
