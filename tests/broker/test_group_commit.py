"""Group commit: every caller gets its own answer, writes that arrive together share a round trip,
and a failed round trip fails each of its writes (nobody waits forever)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest
from dramatiq.middleware import TimeLimitExceeded

from mesh.broker.group_commit import GroupCommit


def test_each_caller_gets_the_answer_for_its_own_item_and_concurrent_callers_share_flushes():
    calls: list[list[int]] = []
    gate = threading.Event()

    def flush(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)  # the first round trip is slow: the others pile up behind it
        return [i * 10 for i in items]

    gc: GroupCommit[int] = GroupCommit(flush)
    answers: dict[int, int] = {}

    def call(i: int) -> None:
        answers[i] = gc.submit(i)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    while not calls:
        threading.Event().wait(0.001)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 9)]
    for t in others:
        t.start()
    while len(gc._waiting) < 8:
        threading.Event().wait(0.001)
    gate.set()
    for t in [first, *others]:
        t.join(5)
    assert answers == {i: i * 10 for i in range(9)}
    assert calls[0] == [0] and sorted(calls[1]) == list(range(1, 9)) and len(calls) == 2


def test_a_group_larger_than_max_group_goes_in_several_round_trips():
    calls: list[list[int]] = []
    gate = threading.Event()

    def flush(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)
        return list(items)

    gc: GroupCommit[int] = GroupCommit(flush, max_group=3)
    threads = [threading.Thread(target=gc.submit, args=(i,)) for i in range(8)]
    threads[0].start()
    while not calls:
        threading.Event().wait(0.001)
    for t in threads[1:]:
        t.start()
    while len(gc._waiting) < 7:
        threading.Event().wait(0.001)
    gate.set()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert [len(c) for c in calls] == [1, 3, 3, 1]
    assert sorted(i for c in calls for i in c) == list(range(8))


def test_a_failed_flush_fails_every_write_in_it_and_the_next_ones_go_through():
    fail = [True]

    def flush(items: Sequence[int]) -> list[int]:
        if fail[0]:
            raise ConnectionError("lost")
        return list(items)

    gc: GroupCommit[int] = GroupCommit(flush)
    with pytest.raises(ConnectionError):
        gc.submit(1)
    fail[0] = False
    assert gc.submit(2) == 2


def test_a_flush_answering_the_wrong_number_of_results_fails_the_group_instead_of_hanging_it():
    gc: GroupCommit[int] = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 writes"):
        gc.submit(1)
    assert gc._busy is False


class Interrupted(Exception):
    pass


def _interrupt(thread: threading.Thread) -> None:
    """Raise Interrupted in ``thread`` the way dramatiq raises time limits and shutdown into workers."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Interrupted))


def test_a_caller_interrupted_while_it_waits_leaves_the_line_and_the_others_still_get_their_answers():
    gate, calls = threading.Event(), []

    def flush(items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)
        return [i.upper() for i in items]

    gc: GroupCommit[str] = GroupCommit(flush)
    answers: dict[str, object] = {}

    def call(name: str) -> None:
        try:
            answers[name] = gc.submit(name)
        except Interrupted as exc:
            answers[name] = exc

    threads = {n: threading.Thread(target=call, args=(n,)) for n in "abc"}
    threads["a"].start()
    while not calls:
        threading.Event().wait(0.001)
    threads["b"].start()
    while len(gc._waiting) < 1:  # a's write is on the wire; b waits behind it
        threading.Event().wait(0.001)
    threads["c"].start()
    while len(gc._waiting) < 2:
        threading.Event().wait(0.001)
    _interrupt(threads["b"])  # raised as soon as b runs again: when it is handed the sender's role
    gate.set()
    for t in threads.values():
        t.join(5)
    assert not any(t.is_alive() for t in threads.values())
    assert answers["a"] == "A" and answers["c"] == "C" and isinstance(answers["b"], Interrupted)
    assert gc._busy is False and gc._waiting == []


# -- dramatiq's asynchronous interruptions (TimeLimitExceeded, Shutdown) landing in a group's commit ---

def _raise_into(thread: threading.Thread, exc: type[BaseException] = TimeLimitExceeded) -> None:
    """Raise ``exc`` in ``thread`` as dramatiq's TimeLimit and ShutdownNotifications do."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))


def _callers(gc: GroupCommit[str], names: str) -> tuple[dict[str, threading.Thread], dict[str, object]]:
    answers: dict[str, object] = {}

    def call(name: str) -> None:
        try:
            answers[name] = gc.submit(name)
        except BaseException as exc:  # an interruption is an answer here
            answers[name] = exc

    return {n: threading.Thread(target=call, args=(n,)) for n in names}, answers


def _line_up(gc: GroupCommit[str], threads: dict[str, threading.Thread], calls: list[list[str]]) -> None:
    """a's write goes out alone and is held on the wire; b and then c queue behind it."""
    threads["a"].start()
    while not calls:
        threading.Event().wait(0.001)
    for n, waiting in (("b", 1), ("c", 2)):
        threads[n].start()
        while len(gc._waiting) < waiting:
            threading.Event().wait(0.001)


def test_an_interruption_while_a_group_is_on_the_wire_fails_no_other_write_in_it():
    first, second, on_wire, calls = threading.Event(), threading.Event(), threading.Event(), []

    def flush(items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        if len(calls) == 1:
            first.wait(5)
        else:
            on_wire.set()
            second.wait(5)
        return [i.upper() for i in items]

    gc: GroupCommit[str] = GroupCommit(flush)
    threads, answers = _callers(gc, "abc")
    _line_up(gc, threads, calls)
    first.set()
    assert on_wire.wait(5)  # b and c's group is being sent
    _raise_into(threads["b"])
    second.set()
    for t in threads.values():
        t.join(5)
    assert not any(t.is_alive() for t in threads.values())
    assert answers["c"] == "C"  # before: c got b's TimeLimitExceeded (b sent the group)
    assert isinstance(answers["b"], TimeLimitExceeded)  # b hears of it once its write was answered
    assert calls == [["a"], ["b", "c"]] and answers["a"] == "A"


def test_an_interruption_between_taking_a_group_and_sending_it_leaves_nobody_waiting():
    gate, calls = threading.Event(), []

    def flush(items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)
        return [i.upper() for i in items]

    class Trapped(GroupCommit[str]):
        """Raises into b the moment the group holding b's write is taken off the line."""

        victim: threading.Thread | None = None

        def __setattr__(self, name: str, value: Any) -> None:
            before = self.__dict__.get("_waiting") or []
            object.__setattr__(self, name, value)
            if (name == "_waiting" and self.victim is not None and any(s.item == "b" for s in before)
                    and not any(s.item == "b" for s in value)):
                victim, self.victim = self.victim, None
                _raise_into(victim)

    gc = Trapped(flush)
    threads, answers = _callers(gc, "abc")
    _line_up(gc, threads, calls)
    gc.victim = threads["b"]
    gate.set()
    for t in threads.values():
        t.join(5)
    assert not threads["c"].is_alive()  # before: c's group was taken by b and never sent
    assert answers["c"] == "C" and isinstance(answers["b"], TimeLimitExceeded)
    assert calls == [["a"], ["b", "c"]]


def test_an_interruption_that_keeps_the_sender_from_starting_leaves_nobody_waiting(monkeypatch):
    # dramatiq's time limit lands in the first caller inside Thread.start, before the sender thread
    # was started: the group commit must not go on believing it has a sender.
    import mesh.broker.group_commit as gcm

    class Interrupted(threading.Thread):
        struck: list[bool] = []

        def start(self) -> None:
            if not self.struck:
                self.struck.append(True)
                raise TimeLimitExceeded()
            super().start()

    monkeypatch.setattr(gcm, "threading", type("T", (), {"Thread": Interrupted, "Condition": threading.Condition,
                                                     "Lock": threading.Lock}))
    gc: GroupCommit[int] = GroupCommit(lambda items: [i * 10 for i in items])
    with pytest.raises(TimeLimitExceeded):
        gc.submit(1)  # its write is queued; the caller settles again (MeshConsumer.ack)
    answers: list[int] = []
    second = threading.Thread(target=lambda: answers.append(gc.submit(2)), daemon=True)
    second.start()
    second.join(10)
    assert answers == [20]  # before: nobody ever sent it (the never-started sender was kept)
