"""A step's pick-up written with its success when the handler ends soon, else once it has run a short while.

An attempt's checks (the job cancelled? its approval still the one given? the step finished already?)
are made on the record its fetch read together with its claim (``settle.lua``), so the step is picked
up at that moment. Writing that to the record (``running``, the attempt's token, the ``picked_up``
event, the running index) costs a fenced compare-and-set of its own; a handler that ends within
:data:`WRITE_AFTER_S` has it ride in its success's write instead, which still lands only while the
attempt holds its claim. A handler still running then has it written by this module's thread, so the
record says ``running`` within that bound (``mesh status``, stuck detection, the running index), and
a handler's tool call, its park for an approval or its failure writes it first if it is still pending.

Meanwhile the step's claim says it is picked up: a cancel leaves a step whose key is claimed to end as
a running one (:func:`mesh.agents.pipelines.jobctl.cancel`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from mesh.contracts import LeaseLost

logger = logging.getLogger(__name__)

#: How long a handler runs before its pick-up is written on its own (seconds).
WRITE_AFTER_S = 0.03


class PickUp:
    """One attempt's pick-up, decided and not yet written: written by :meth:`flush` (the bound, a tool
    call, a failure), or taken into the success's own write by :meth:`fold`, whichever comes first."""

    def __init__(self, write: Callable[[], Any]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self.written: Any = None
        self.folded = False
        self.lost: LeaseLost | None = None

    def flush(self) -> Any:
        """Write the pick-up now unless it was written or folded: what it wrote (None when folded).
        LeaseLost when the attempt's claim is not its own any more; a Redis error propagates and
        leaves it pending."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if self.written is None and not self.folded:
                try:
                    self.written = self._write()
                except LeaseLost as exc:
                    self.lost = exc
                    raise
            return self.written

    def fold(self) -> Any:
        """The success takes the pick-up into its write: None, or what was already written (the
        success is then computed from it). A pick-up whose write was refused for a lost lease raises."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if self.written is None:
                self.folded = True
            return self.written

    def unfold(self) -> None:
        """The success's write did not land (a failure follows): the pick-up is pending again."""
        with self._lock:
            self.folded = False


class PickUps:
    """The thread that writes the pick-ups of handlers still running at their bound."""

    def __init__(self, after_s: float = WRITE_AFTER_S) -> None:
        self.after_s = after_s
        self._heap: list[tuple[float, int, PickUp]] = []
        self._count = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def defer(self, pickup: PickUp) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + self.after_s, next(self._count), pickup))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mesh-pick-ups", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _due, _n, pickup = heapq.heappop(self._heap)
            if pickup.folded or pickup.written is not None:
                continue
            try:
                pickup.flush()
            except LeaseLost:
                pass  # the attempt's success (or failure) finds its lease lost too
            except (redis.RedisError, Exception) as exc:  # the success writes it with its outcome
                logger.warning("could not write a step's pick-up", extra={"error": str(exc)})
