"""scripts/enqueue.lua writes one job (a send()) by a path of its own, without the batch's tables:
what it writes (records, messages, lanes, trace events, index, wake-up tokens) and what it answers
must be what the batch path writes and answers for the same jobs, whatever the job's key already
names. Each case runs jobs X and Y as two one-job calls in one namespace and as one batch in another,
then compares every key of both namespaces."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from mesh.broker.client import job_id_for, payload_hash, trace_id_of
from mesh.broker.keys import prefix
from mesh.broker.outbox import NewJobs, register

PAYLOAD = {"tool": "note", "args": {"title": "t"}}
OTHER = {"tool": "note", "args": {"title": "other"}}


@pytest.fixture
def two(rclient: redis.Redis) -> Iterator[tuple[str, str]]:
    names = (f"test-single-{uuid.uuid4().hex[:8]}", f"test-batch-{uuid.uuid4().hex[:8]}")
    yield names
    for ns in names:
        keys = list(rclient.scan_iter(match=f"{prefix(ns)}:*", count=1000))
        if keys:
            rclient.delete(*keys)


def _jobs(priority: str, items: list[tuple[str, dict[str, Any], str | None, bool]]) -> NewJobs:
    """A batch of ``(key, payload, flow_key, checked)`` items for agent executor on queue q."""
    now = time.time()
    batch = NewJobs(agent="executor", queue="q", version=None, deadline=now + 60, token_budget=None, goal=None,
                    now=now, expected=len(items), priority=priority)  # type: ignore[arg-type]
    for key, payload, flow, checked in items:
        job = job_id_for(key)
        batch.add("executor", payload, key=key, job_id=job, trace_id=trace_id_of(job),
                  payload_hash=payload_hash("executor", payload), checked=checked, flow_key=flow)
    return batch


def _dump(r: redis.Redis, ns: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(r.scan_iter(match=f"{prefix(ns)}:*", count=1000)):
        kind = r.type(key).decode()
        name = key.decode()[len(prefix(ns)):]
        if kind == "string":
            value: Any = r.get(key)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "hash":
            value = sorted(r.hgetall(key).items())
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(r.smembers(key))
        else:  # a stream: its entries' fields (their ids are times)
            value = [fields for _, fields in r.xrange(key)]
        out[name] = (kind, value)
    return out


def _run(script: Any, ns: str, args: list[Any]) -> Any:
    try:
        return script(keys=[prefix(ns)], args=args)
    except redis.ResponseError as exc:
        return ("error", re.sub(r"user_script:\d+: ", "", str(exc).split(" script:")[0]))


SETUPS: dict[str, Callable[[redis.Redis, str, str], Any]] = {
    "fresh": lambda r, ns, job: None,
    "json-string": lambda r, ns, job: r.set(f"{prefix(ns)}:job:{job}", b'"text"'),
    "json-scalar": lambda r, ns, job: r.set(f"{prefix(ns)}:job:{job}", b"5"),
    "no-json": lambda r, ns, job: r.set(f"{prefix(ns)}:job:{job}", b"not json"),
    "no-hash": lambda r, ns, job: r.set(f"{prefix(ns)}:job:{job}", b'{"job_id":"x","payload_hash":null}'),
    "wrong-type": lambda r, ns, job: r.hset(f"{prefix(ns)}:job:{job}", "a", "b"),
}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("checked", [True, False], ids=["key-given", "fresh-key"])
@pytest.mark.parametrize("lane", ["normal", "high", "low", "flow", "high-flow"])
def test_one_job_and_the_batch_write_the_same(rclient: redis.Redis, two: tuple[str, str], setup: str,
                                              checked: bool, lane: str):
    script = register(rclient)
    priority = lane.split("-")[0] if lane != "flow" else "normal"
    flow = "tenant-a" if lane.endswith("flow") else None
    x, y = f"x-{setup}", f"y-{setup}"
    batch = _jobs(priority, [(x, PAYLOAD, flow, checked), (y, OTHER, None, True)])
    for ns in two:
        SETUPS[setup](rclient, ns, job_id_for(x))
    head, jobs = batch.args[:5], batch.jobs()
    answer = 0
    for job, job_flow in zip(jobs, [flow, None], strict=True):
        plain = b"1" if priority == "normal" and not job_flow else b""
        answer = _run(script, two[0], [*head[:4], plain, *job])
        if answer != 0:  # a conflict or an error: X's own call wrote nothing, as the batch must not
            break
    assert answer == _run(script, two[1], batch.args)
    assert _dump(rclient, two[0]) == _dump(rclient, two[1])


def test_the_same_key_twice_and_an_existing_same_payload(rclient: redis.Redis, two: tuple[str, str]):
    script = register(rclient)
    first = _jobs("normal", [("k", PAYLOAD, None, True), ("z", PAYLOAD, None, True)])
    for ns in two:
        assert _run(script, ns, first.args) == 0
    batch = _jobs("normal", [("k", PAYLOAD, None, True), ("k", PAYLOAD, None, True)])
    head, jobs = batch.args[:5], batch.jobs()
    assert [_run(script, two[0], [*head, *job]) for job in jobs] == [0, 0]
    assert _run(script, two[1], batch.args) == 0
    assert _dump(rclient, two[0]) == _dump(rclient, two[1])
    conflict = _jobs("normal", [("k", OTHER, None, True), ("w", PAYLOAD, None, True)])
    assert _run(script, two[0], [*conflict.args[:5], *conflict.jobs()[0]]) == 1
    assert _run(script, two[1], conflict.args) == 1
    assert _dump(rclient, two[0]) == _dump(rclient, two[1])
