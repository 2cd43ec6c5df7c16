"""Durable waits in Redis: the index of waiting steps, their timers, and the events kept for them.

A pipeline step that waits (``sleep:``, ``wait_for:``) is parked in ``waiting`` with a
:class:`~mesh.contracts.waits.Wait` on its record (the engine does that). Every write of a job
record brings along, in the same MULTI (:func:`stage_waits`, called by the job store):

- ``{ns}:waits`` (and ``{ns}:waits.event:{event}`` for a ``wait_for``): the step added while it
  waits, removed by the write that ends its wait;
- its durable timers (:mod:`mesh.broker.timers`): ``wait`` at the sleep's end or the event's
  timeout, and for a ``wait_for`` a ``wait.check`` due at once, which looks for an event that came
  before the wait began. The member names the wait (``{job}|{step}|{seq}``), so a later wait of the
  same step gets its own.

An event's delivery is a timer too (``wait.emit``, ``wait.signal``): set before the event is kept,
removed once its emitter delivered it, so an emitter that dies on the way leaves it to a worker.
Events are kept for waits that start later (:func:`keep`): an emitted one in ``{ns}:events:{event}``
(with several shards, in every shard's: each copy but the first carries the first's stream id as its
``id``, so the event has one id in every shard),
one signalled to a job in ``{ns}:signals:{job}``, each stream capped at MESH_EVENT_KEEP entries and
MESH_EVENT_WINDOW_S of age (by the Redis clock: an entry's id is its server time). Whether an event
ends a wait is decided on the job record, in one WATCH/MULTI (:mod:`mesh.agents.pipelines.waits`):
the first event, or the timeout, wins, and an event is taken by at most one wait of a job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from mesh.contracts import TERMINAL, JobRecord, MeshError, State, StepRecord, dumps, loads
from mesh.contracts.waits import EVENT_NAME, Wait

from . import approvals, timers
from .clock import server_ms
from .connection import stage_eval
from .keys import Keys

logger = logging.getLogger(__name__)

#: Timer kinds (:mod:`mesh.broker.timers`): the wait's end (sleep, timeout), and the look for kept events.
TIMER, CHECK = "wait", "wait.check"
#: A look for kept events continued from where the last one stopped (ref ``{job}|{step}|{seq}|{cursor}``).
CHECK_MORE = "wait.check.more"
#: Timer kinds of an event's delivery: set before the event is kept and removed once its emitter (or
#: signaller) delivered it to every step waiting for it. An emitter that dies (or fails) on the way
#: leaves it to fire GRACE_MS later in a worker, which offers the event to the steps that wait.
EMIT, SIGNAL = "wait.emit", "wait.signal"
#: How long a delivery's timer waits for its emitter (ms); an emit still delivering pushes it on.
GRACE_MS = 30_000
#: Waiting steps read per page by an emit (one ZSCAN page, their records read in one pipeline).
PAGE = 500

#: Adds an entry to a stream of kept events, capped at ARGV[2] entries and trimmed to the last
#: ARGV[3] ms of the server's clock, which it expires with. KEYS[1] stream; ARGV[1] the JSON entry.
_KEEP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = redis.call('XADD', KEYS[1], 'MAXLEN', tonumber(ARGV[2]), '*', 'e', ARGV[1])
redis.call('XTRIM', KEYS[1], 'MINID', now - tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return id
"""


class WaitError(MeshError):
    """An event that could not be delivered or kept; ``exit_code``: what ``mesh`` exits with."""

    exit_code = 1
    terminal = True


class NotWaiting(WaitError):
    """The job has ended: nothing of it waits for the event any more (it is not kept)."""

    exit_code = 2


class InvalidEvent(WaitError):
    """An event name that is no name, or data that is no JSON object or is too large."""

    exit_code = 2


def check_event_name(event: Any) -> None:
    """InvalidEvent unless ``event`` is an event name (1 to 128 letters, digits and ``._:-``)."""
    import re

    if not isinstance(event, str) or not re.fullmatch(EVENT_NAME, event):  # whole: "name\n" is none
        raise InvalidEvent(f"an event name is 1 to 128 letters, digits and ._:- (starting with a letter or "
                           f"digit), not {str(event)[:60]!r}")


def ref(job_id: str, step_id: str) -> str:
    """A waiting step's member of the indexes."""
    return f"{job_id}|{step_id}"


def wait_ref(job_id: str, step_id: str, seq: int) -> str:
    """The reference of one wait's timers."""
    return f"{job_id}|{step_id}|{seq}"


def _waited(before: JobRecord, step_id: str) -> bool:
    step = before.steps.get(step_id)
    return step is not None and step.state is State.WAITING


def parked(record: JobRecord) -> bool:
    """Whether a step of ``record`` waits durably (``sleep:``, ``wait_for:``) or for a person: its
    job keeps its record and trace without a TTL, even once another branch ended it."""
    waiting, asking = State.WAITING, State.AWAITING_APPROVAL  # read once (contracts/jobs.py's _SETTLED says why)
    return any(s.state is waiting or s.state is asking for s in record.steps.values())


def stage_waits(pipe: Any, keys: Keys, record: JobRecord, before: JobRecord | None = None,
                ended_ttl_ms: int | None = None) -> None:
    """Stage, with a write of ``record``, the index entries and timers its waiting steps imply
    (above). ``before``: the record as the write found it; a wait already in it was staged by the
    write that began it, and only the write that ends a wait removes what it staged (without it,
    every step that ever waited is cleared again, which is harmless). A job with a step waiting keeps
    no TTL (another branch may have ended it: the wait still ends, by its timer or an event);
    ``ended_ttl_ms``: the retention such a job takes once nothing of it waits any more."""
    waiting = State.WAITING  # read once, not per step (contracts/jobs.py's _SETTLED says why)
    if any(s.state is waiting for s in record.steps.values()):
        pipe.persist(keys.job(record.job_id))
        pipe.persist(keys.trace(record.job_id))
    elif (ended_ttl_ms is not None and record.state in TERMINAL and not parked(record)
          and any(s.wait for s in record.steps.values())
          and (before is None or any(s.state is waiting for s in before.steps.values()))):
        # ended while a step waited (no TTL then): its retention starts now that nothing waits
        stage_eval(pipe, approvals.EXPIRE_IF_NONE, 2, keys.job(record.job_id), keys.trace(record.job_id), ended_ttl_ms)
    for step in record.steps.values():
        wait = step.wait
        if wait is None:
            continue
        member, timer = ref(record.job_id, step.step_id), wait_ref(record.job_id, step.step_id, wait.seq)
        if step.state is State.WAITING:
            prior = before.steps.get(step.step_id) if before is not None else None
            if prior is not None and prior.state is State.WAITING and prior.wait is not None \
                    and prior.wait.seq == wait.seq:
                continue
            started = int(wait.started_at * 1000)
            pipe.zadd(keys.waits, {member: started})
            timers.stage_schedule(pipe, keys, TIMER, timer, int(max(0.0, wait.until - time.time()) * 1000))
            if wait.event is not None:
                pipe.zadd(keys.waits_for(wait.event), {member: started})
                timers.stage_schedule(pipe, keys, CHECK, timer, 0)
            if wait.seq > 1:  # an earlier wait's timers (waited again in the same write)
                earlier = wait_ref(record.job_id, step.step_id, wait.seq - 1)
                timers.stage_cancel(pipe, keys, TIMER, earlier)
                timers.stage_cancel(pipe, keys, CHECK, earlier)
        elif before is None or _waited(before, step.step_id):
            pipe.zrem(keys.waits, member)
            if wait.event is not None:
                pipe.zrem(keys.waits_for(wait.event), member)
            timers.stage_cancel(pipe, keys, TIMER, timer)
            timers.stage_cancel(pipe, keys, CHECK, timer)


def repair(client: Any, keys: Keys, job_id: str) -> None:
    """Stage what the waiting steps of job ``job_id`` imply (:func:`stage_waits`) from its record as
    it is now, in one WATCH/MULTI: for a writer that cannot stage them with its write (the
    consumer's settle script, when a failure's join releases a waiting step). Idempotent: an index
    entry is set again, a timer keeps the due time it has."""

    def apply(pipe: Any) -> None:
        data = pipe.get(keys.job(job_id))
        if data is None:
            return
        record = JobRecord.model_validate(loads(data))
        pipe.multi()
        stage_waits(pipe, keys, record)

    client.transaction(apply, keys.job(job_id))


def keep(client: Any, stream: str, entry: dict[str, Any], keep_n: int, window_s: float) -> str:
    """Add ``entry`` to the stream of kept events ``stream`` (see :data:`_KEEP`); its id."""
    found: Any = client.eval(_KEEP, 1, stream, dumps(entry), keep_n, max(1, int(window_s * 1000)))
    return found.decode() if isinstance(found, bytes) else str(found)


@dataclass(frozen=True)
class Kept:
    """An event kept for a wait: its id (``{stream id}`` of its stream), name, data, how it came."""

    id: str
    event: str
    data: dict[str, Any]
    via: str

    @property
    def at_ms(self) -> int:
        return int(self.id.split(":")[-1].split("-")[0])


def kept(client: Any, keys: Keys, job_id: str, event: str, window_s: float, limit: int) -> list[Kept]:
    """The events a wait for ``event`` of job ``job_id`` may take, oldest first: those signalled to
    the job and those emitted, within the window by the Redis clock."""
    since = server_ms(client) - int(window_s * 1000)
    out: list[Kept] = []
    rows: Any = client.xrange(keys.signals(job_id), min=str(max(0, since)), max="+", count=limit)
    for sid, f in rows:
        entry = loads(f[b"e"])
        if entry.get("event") == event:
            out.append(Kept(f"signal:{sid.decode()}", event, entry.get("data") or {}, "signal"))
    rows = client.xrange(keys.events(event), min=str(max(0, since)), max="+", count=limit)
    for sid, f in rows:
        entry = loads(f[b"e"])
        out.append(Kept(f"emit:{event}:{entry.get('id') or sid.decode()}", event, entry.get("data") or {}, "emit"))
    return sorted(out, key=lambda k: (k.at_ms, k.id))


def stage_consumed(pipe: Any, keys: Keys, job_id: str, event_id: str) -> None:
    """Stage the removal of a signalled event a wait took (an emitted one stays for other jobs)."""
    if event_id.startswith("signal:"):
        pipe.xdel(keys.signals(job_id), event_id.removeprefix("signal:"))


def consumed(record: JobRecord, event_id: str) -> bool:
    """Whether a wait of ``record`` already took the event ``event_id``."""
    return any(s.wait is not None and s.wait.event_id == event_id for s in record.steps.values())


@dataclass
class Waiting:
    """A step waiting durably, as ``mesh waits`` lists it."""

    job_id: str
    key: str
    pipeline: str | None
    step: StepRecord
    wait: Wait
    #: When its timer is due (s, Redis clock); None when its timer is gone (firing now).
    due_at: float | None
    #: The job's record as it was read.
    record: JobRecord | None = None

    def as_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "key": self.key, "pipeline": self.pipeline, "step_id": self.step.step_id,
                "kind": self.wait.kind.value, "event": self.wait.event, "match": self.wait.match,
                "since": self.wait.started_at, "due_at": self.due_at, "on_timeout": self.wait.on_timeout
                if self.wait.event else None, "seq": self.wait.seq}


def pending(client: redis.Redis, keys: Keys, limit: int = 1000, event: str | None = None) -> list[Waiting]:
    """The steps waiting durably (for ``event`` only, when given), oldest first. An entry whose job
    record is gone (the job ended while the step waited, and its retention passed) is removed."""
    index = keys.waits if event is None else keys.waits_for(event)
    rows: Any = client.zrange(index, 0, limit - 1)
    out: list[Waiting] = []
    for raw in rows:
        job_id, _, step_id = raw.decode().partition("|")
        data = client.get(keys.job(job_id))
        if data is None:  # its job ended while the step waited, and its record expired since
            client.zrem(index, raw)
            continue
        try:
            record = JobRecord.model_validate(loads(data))
        except ValueError:  # a record no reader can read: the others are still listed
            logger.warning("job record unreadable, not listed", extra={"job_id": job_id})
            continue
        step = record.steps.get(step_id)
        if step is None or step.state is not State.WAITING or step.wait is None:
            continue
        due = timers.due_at(client, keys, TIMER, wait_ref(job_id, step_id, step.wait.seq))
        out.append(Waiting(job_id, record.key, record.pipeline, step, step.wait, None if due is None else due / 1000,
                           record))
    return out


def waiting_pages(client: redis.Redis, keys: Keys, event: str, page: int = PAGE) -> Iterator[list[Waiting]]:
    """The steps waiting for ``event``, a page at a time (a ZSCAN page of its index and its records read
    in one pipeline), however many wait: what an emit walks. Unordered; a step may come twice (deliveries
    are idempotent). An entry whose job record is gone is removed, as :func:`pending` does."""
    index, cursor = keys.waits_for(event), 0
    while True:
        found: Any = client.zscan(index, cursor, count=page)
        cursor, rows = found
        members = [raw for raw, _ in rows]
        if members:
            parts = [m.decode().partition("|") for m in members]
            reads = client.pipeline(transaction=False)  # one round trip; each GET its own slot
            for job_id, _, _ in parts:
                reads.get(keys.job(job_id))
            datas: Any = reads.execute()
            out: list[Waiting] = []
            for raw, (job_id, _, step_id), data in zip(members, parts, datas, strict=True):
                if data is None:
                    client.zrem(index, raw)
                    continue
                try:
                    record = JobRecord.model_validate(loads(data))
                except ValueError:  # a record no reader can read: not this emit's to stop at
                    logger.warning("job record unreadable, no event delivered to it", extra={"job_id": job_id})
                    continue
                step = record.steps.get(step_id)
                if step is None or step.state is not State.WAITING or step.wait is None:
                    continue
                out.append(Waiting(job_id, record.key, record.pipeline, step, step.wait, None, record))
            yield out
        if int(cursor) == 0:
            return


def emitted_since(client: Any, keys: Keys, event: str, since_ms: int, limit: int) -> list[Kept]:
    """The events of name ``event`` emitted from ``since_ms`` on (Redis clock) and still kept, oldest first."""
    rows: Any = client.xrange(keys.events(event), min=str(max(0, since_ms)), max="+", count=limit)
    entries = [(sid.decode(), loads(f[b"e"])) for sid, f in rows]
    return [Kept(f"emit:{event}:{e.get('id') or sid}", event, e.get("data") or {}, "emit") for sid, e in entries]


@dataclass(frozen=True)
class Delivery:
    """What an event did: kept (``id`` names it), and the steps whose wait it ended."""

    event: str
    id: str
    resumed: list[tuple[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"event": self.event, "id": self.id, "kept": True,
                "resumed": [{"job_id": j, "step_id": s} for j, s in self.resumed]}
