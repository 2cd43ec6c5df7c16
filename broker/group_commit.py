"""Group commit: concurrent callers' writes go to Redis together, one round trip per group.

A worker's threads settle their messages one by one, and each settlement was a round trip of its
own. Here callers queue their writes and one sender thread sends whatever is queued as one round
trip; writes that arrive while it is on the wire go together in the next. Nobody returns before its
own write was answered, so an acked message is as settled as before, and a failed round trip fails
every write in it (each caller then retries on its own, as it would have).

The sender is a thread of its own, never a caller: dramatiq raises time limits and shutdown into
worker threads asynchronously (``PyThreadState_SetAsyncExc``), and such an exception landing in a
caller that sent the group for the others would fail their writes, leave one of them waiting for
good, or break a write Redis had already applied. No caller sends anything, and a caller's wait is
shielded: an exception raised into it while it waits is held until its write is answered, then
raised (the write went through, or failed on its own terms).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Seconds the sender waits for work before it ends (the next write starts another).
IDLE_S = 5.0


class _Slot:
    __slots__ = ("done", "error", "item", "result", "wake")

    def __init__(self, item: Any) -> None:
        self.item = item
        #: True once the write was answered (``result``) or failed (``error``); then ``wake`` is released.
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.wake = threading.Lock()
        self.wake.acquire()

    def finish(self, result: Any, error: BaseException | None) -> None:
        self.result, self.error, self.done = result, error, True
        self.wake.release()

    def wait(self) -> BaseException | None:
        """Wait for the answer, whatever is raised into this thread meanwhile; the first exception
        raised into it, to be raised once the answer is in (None: none was)."""
        interrupted: BaseException | None = None
        while not self.done:  # done is set before wake is released: once acquired, the loop ends
            try:
                self.wake.acquire()
            except BaseException as exc:  # raised into this thread: the write is still on its way
                interrupted = interrupted or exc
        return interrupted

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommit(Generic[T]):
    """``submit(item)`` returns what ``flush`` answered for ``item`` (or raises what it raised);
    ``flush`` gets the items of a group in arrival order and answers one result per item. It runs on
    the group commit's own sender thread, one group at a time.

    An exception raised into a caller while it waits (dramatiq's time limits and shutdown) never
    reaches the others' writes nor its own: it is raised from ``submit`` once that caller's write was
    answered, so the caller knows its write went through, and may settle again to be sure."""

    def __init__(self, flush: Callable[[Sequence[T]], Sequence[Any]], max_group: int = 64,
                 name: str = "mesh-group-commit") -> None:
        self._flush = flush
        self._max = max_group
        self._name = name
        self._cond = threading.Condition()
        self._waiting: list[_Slot] = []
        #: A group is on the wire.
        self._busy = False
        self._sender: threading.Thread | None = None

    def submit(self, item: T) -> Any:
        slot = _Slot(item)
        with self._cond:
            self._waiting.append(slot)
            # Not only "is None": an exception raised into a caller inside Thread.start can leave a
            # sender that never started (the sender itself clears the field, under this lock, as it ends).
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._sender.start()
            self._cond.notify()
        interrupted = slot.wait()
        if interrupted is not None:
            raise interrupted
        return slot.outcome()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._waiting:
                    self._cond.wait(IDLE_S)
                if not self._waiting:
                    self._sender = None  # idle: the next submit starts a sender again
                    return
                group, self._waiting = self._waiting[:self._max], self._waiting[self._max:]
                self._busy = True
            self._send(group)

    def _send(self, group: list[_Slot]) -> None:
        try:
            results: Sequence[Any] = self._flush([s.item for s in group])
            error: BaseException | None = None
            if len(results) != len(group):
                raise RuntimeError(f"group commit: {len(results)} results for {len(group)} writes")
        except BaseException as exc:
            results, error = [None] * len(group), exc
        with self._cond:
            self._busy = False
        for slot, result in zip(group, results, strict=True):
            slot.finish(result, error)
