"""A batch of new jobs makes the message ids its messages use, two each, not a fixed pool per batch."""

from __future__ import annotations

import time

from mesh.broker.outbox import NewJobs


def _batch(expected: int) -> NewJobs:
    return NewJobs(agent="executor", queue="executor", version=None, deadline=time.time() + 60, token_budget=None,
                   goal=None, now=time.time(), expected=expected)


def _add(batch: NewJobs, n: int) -> None:
    for i in range(n):
        batch.add("executor", {"i": i}, key=f"k{i}", job_id=f"job-{i}", trace_id="1" * 32, payload_hash="h",
                  checked=False)


def test_one_message_makes_two_message_ids_and_many_make_two_each_all_distinct():
    one = _batch(1)
    _add(one, 1)
    assert one.ids == []  # both ids made were used: a send() draws no pool of 256

    many = _batch(300)
    _add(many, 300)
    assert many.ids == []
    ids = [job[4] for job in many.jobs()]  # each item's redis message id
    assert len(ids) == len(set(ids)) == 300


def test_a_batch_that_gets_more_messages_than_expected_still_gives_each_its_own_ids():
    batch = _batch(1)
    _add(batch, 5)
    ids = [job[4] for job in batch.jobs()]
    assert len(ids) == len(set(ids)) == 5


def test_a_single_send_takes_ids_made_ahead_and_a_forked_child_never_takes_its_parents():
    import os

    from mesh.broker import outbox

    outbox._SPARE.clear()  # as a fresh process: earlier sends in this one may have left exactly two
    first = outbox.spare_message_ids()
    assert len(first) == len(set(first)) == 2 and len(outbox._SPARE) == 62  # the rest kept for later sends
    ahead = set(outbox._SPARE)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what it takes is its own, none of the ids its parent holds
        try:
            os.write(write, " ".join(outbox.spare_message_ids()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as got:
        child = got.read().split()
    os.waitpid(pid, 0)
    assert len(child) == 2 and not set(child) & (ahead | set(first))
    assert set(outbox.spare_message_ids()) <= ahead  # the parent goes on with its own
