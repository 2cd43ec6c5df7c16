"""Group commit: concurrent callers' writes go to Redis together, one round trip per group.

A worker's threads settle their messages one by one, and each settlement was a round trip of its
own. Here the first caller to arrive sends its write at once; callers that arrive while it is on
the wire wait and go together in the next round trip, sent by the first of them. Nobody returns
before its own write was answered, so an acked message is as settled as before, and a failed
round trip fails every write in it (each caller then retries on its own, as it would have).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Slot:
    __slots__ = ("done", "error", "item", "leader", "passed", "result", "wake")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        #: This caller holds the sender's role (``passed``: and has handed it on).
        self.leader = False
        self.passed = False
        #: Held until the caller may go on: its result is in, or it is the next to send.
        self.wake = threading.Lock()
        self.wake.acquire()

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommit(Generic[T]):
    """``submit(item)`` returns what ``flush`` answered for ``item`` (or raises what it raised);
    ``flush`` gets the items of a group in arrival order and answers one result per item.

    A caller interrupted by an exception of its own (dramatiq raises time limits and shutdown
    into worker threads) leaves the line, and hands the sender's role on if it held it: one
    interrupted caller never stops the others' writes."""

    def __init__(self, flush: Callable[[Sequence[T]], Sequence[Any]], max_group: int = 64) -> None:
        self._flush = flush
        self._max = max_group
        self._lock = threading.Lock()
        self._waiting: list[_Slot] = []
        self._busy = False

    def submit(self, item: T) -> Any:
        slot = _Slot(item)
        try:
            with self._lock:
                self._waiting.append(slot)
                if not self._busy:
                    self._busy = slot.leader = True
            if not slot.leader:
                slot.wake.acquire()
            if not slot.done:
                # This caller sends: it is first in line, and takes whoever waits behind it.
                with self._lock:
                    group, self._waiting = self._waiting[:self._max], self._waiting[self._max:]
                self._send(group)
        finally:
            self._leave(slot)
        return slot.outcome()

    def _leave(self, slot: _Slot) -> None:
        with self._lock:
            if slot in self._waiting:  # interrupted before its write was sent
                self._waiting.remove(slot)
            if slot.leader and not slot.passed:
                slot.passed = True
                if self._waiting:
                    nxt = self._waiting[0]  # the next group's sender
                    nxt.leader = True
                    nxt.wake.release()
                else:
                    self._busy = False

    def _send(self, group: list[_Slot]) -> None:
        try:
            results: Sequence[Any] = self._flush([s.item for s in group])
            error: BaseException | None = None
            if len(results) != len(group):
                raise RuntimeError(f"group commit: {len(results)} results for {len(group)} writes")
        except BaseException as exc:
            results, error = [None] * len(group), exc
        for slot, result in zip(group, results, strict=True):
            slot.result, slot.error, slot.done = result, error, True
            slot.wake.release()
