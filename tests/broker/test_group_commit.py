"""Group commit: every caller gets its own answer, writes that arrive together share a round trip,
and a failed round trip fails each of its writes (nobody waits forever)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

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
