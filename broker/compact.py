"""Compaction of finished jobs: what a job keeps in Redis from its end until its retention ends.

A job's trace is a Redis stream while the job runs (broker/trace.py), and a stream costs about 4.4 KB
however few its events (a listpack node is allocated whole); its record is written in full on every
update. Neither is needed in that form once the job has ended, yet both are kept MESH_JOB_RETENTION_S.
So the write that ends a job queues it (:func:`stage_ended`: one ``ZADD`` to ``{ns}:jobs.compact``,
the only command compaction adds to a step), and the retention sweep (ops/sweeper.py) compacts the
queued jobs in batches (:class:`Compaction`), off every step's path:

- the trace's events move into the record, as its ``history`` (:func:`summarise`): the job's ids, each
  step's key and agent and the workers' names are written once, times as microsecond offsets; past
  KIND_MAX events of one kind in one step, the middle ones are counted, not kept, and past HISTORY_MAX
  events in all, the oldest; a field value longer than VALUE_MAX is cut (a string) or kept as its size
  and SHA-256 (anything else). The stream is deleted (events written after the read stay in it);
- the record is rewritten once, without the fields at their defaults (:func:`encode`). Every reader
  fills them back: pydantic (``JobRecord.model_validate``) and the Lua scripts that read a record's
  fields (retention.lua, enqueue.lua), which read only fields that are always written.

:func:`mesh.broker.trace.read` gives the same events back (:func:`expand`), followed by one
``compacted`` event saying what was summarised, so ``mesh trace``, ``mesh status`` and the DLQ
tooling read a compacted job as any other. A job made active again (a DLQ replay) keeps its history
and writes new events to a new stream; its next end queues it again, and the two are merged.

Count retention: with MESH_JOB_RETENTION_COUNT set, each compacted job joins ``{ns}:jobs.kept:{name}``
(``pipeline:`` and its pipeline, or its agent; scored by when it ended), and the sweep removes all but
the newest N of each, as the age retention would (record, trace, effect ledgers, a tombstone for
``mesh status``), except a job holding dead letters or waiting for a person, which only age takes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from mesh.contracts import TERMINAL, JobRecord, State, dumps, loads

from .claims import script_source
from .keys import Keys
from .settings import MeshSettings

COMPACT_LUA = script_source("compact.lua")

logger = logging.getLogger(__name__)

#: Jobs read per pipeline and given to one script call (fewer when their records are large: CALL_BYTES).
BATCH = 200
#: Bytes of records (as read, and as written) one script call is given, past its last record: a call
#: holds Redis while it hashes and writes them (200 records of 1 MB held it for seconds), so a batch
#: of large records is written in several calls.
CALL_BYTES = 1 << 20
#: Events of one kind kept per step: the first and the last half of this many; the rest are counted.
KIND_MAX = 20
#: Events a history keeps at most, as many as a job's stream does (broker/trace.py's TRACE_MAXLEN): past
#: it, the oldest are counted, not kept, so a job merged again and again (events after each end) stays
#: bounded.
HISTORY_MAX = 2_000
#: A field value of an event whose text (or JSON) is longer is cut to this many characters (a string)
#: or kept as its size and SHA-256 (anything else).
VALUE_MAX = 512
#: The version of the ``history`` layout.
VERSION = 1

_ENVELOPE = ("trace_id", "job_id", "key", "agent")
_TERMINAL_STATES = ",".join(sorted(str(s) for s in TERMINAL))
_HOLDS = frozenset({State.DEAD_LETTERED, State.UNKNOWN, State.AWAITING_APPROVAL})
#: A job with a step in one of these is not compacted: it waits (for a person, a timer, an event).
_PARKED = frozenset({State.AWAITING_APPROVAL, State.WAITING})


def stage_ended(pipe: Any, keys: Keys, record: JobRecord) -> None:
    """Queue ``record``'s job for compaction, in the write (``pipe``) that ends it (or rewrites it once
    ended): the one command compaction costs a job's steps."""
    pipe.execute_command("ZADD", keys.jobs_compact, record.finished_at or record.updated_at, record.job_id)


def owner(record: JobRecord) -> str:
    """What count retention counts a job under: ``pipeline:`` and its pipeline, else its (first) step's
    agent (a pipeline may bear an agent's name: they are counted apart)."""
    if record.pipeline:
        return f"pipeline:{record.pipeline}"
    return next((s.agent for s in record.steps.values()), "-")


# -- the record: defaults left out ------------------------------------------------------------------


def encode(record: JobRecord) -> bytes:
    """``record`` as JSON without the fields at their defaults (every state kept: Lua scripts read
    them); its full JSON should it not read back as the same record."""
    data = record.model_dump(mode="json", exclude_defaults=True)
    data["state"] = str(record.state)
    for step_id, step in record.steps.items():
        data["steps"][step_id]["state"] = str(step.state)
    out = dumps(data)
    return out if JobRecord.model_validate(loads(out)) == record else dumps(record)


# -- the trace: events into the record's history ---------------------------------------------------


def _bounded(value: Any) -> tuple[Any, bool]:
    """``value`` within VALUE_MAX, and whether it was cut."""
    if isinstance(value, str):
        if len(value) <= VALUE_MAX:
            return value, False
        return f"{value[:VALUE_MAX]}… ({len(value):,} characters, cut when the job was compacted)", True
    if isinstance(value, (dict, list)):
        data = dumps(value)
        if len(data) <= VALUE_MAX:
            return value, False
        return {"compacted": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, True
    return value, False


def _defaults(record: dict[str, Any], step_id: Any) -> dict[str, Any]:
    """The envelope fields an event of ``step_id`` is expected to carry (so left out when it does): a
    pipeline step not sent yet, whose key may change when it is (its ``idempotency_key`` rendered),
    has the key it had when its job was compacted (the history's ``k``)."""
    step = (record.get("steps") or {}).get(step_id) if isinstance(step_id, str) else None
    step = step if isinstance(step, dict) else {}
    history = record.get("history")
    fixed = (history.get("k") if isinstance(history, dict) else None) or {}
    key = step.get("key")
    if isinstance(fixed, dict) and isinstance(step_id, str):
        key = fixed.get(step_id, key)
    return {"trace_id": record.get("trace_id"), "job_id": record.get("job_id"), "key": key,
            "agent": step.get("agent")}


def _unsent_keys(record: dict[str, Any], step_ids: set[Any]) -> dict[str, Any]:
    """The keys of ``record``'s pipeline steps among ``step_ids`` that were not sent yet: the one part
    of an event's envelope that may still change (:func:`_defaults`)."""
    steps = record.get("steps") or {}
    if not record.get("pipeline") or not isinstance(steps, dict):
        return {}
    return {sid: step.get("key") for sid, step in steps.items()
            if sid in step_ids and isinstance(step, dict) and step.get("sent_at") is None}


def summarise(record: dict[str, Any], events: list[dict[str, Any]], now: float,
              before: dict[str, Any] | None = None, kept: int = 0) -> dict[str, Any]:
    """The history of a job whose record (as JSON) is ``record``: ``events`` (oldest first) in a
    compact layout, bounded; ``before``: the history it already had (its counts carry over), whose
    events are the first ``kept`` of ``events``: their values were bounded then, and are not cut again
    (a cut text would lose the size it says it had, and be counted twice)."""
    cut: dict[str, dict[str, int]] = {k: dict(v) for k, v in ((before or {}).get("cut") or {}).items()}
    cut_values = int((before or {}).get("cut_values") or 0)
    dropped: set[int] = set()
    if len(events) > KIND_MAX:  # else no kind has more than KIND_MAX events, nor the history HISTORY_MAX
        groups: dict[tuple[str, str], list[int]] = {}
        for i, ev in enumerate(events):
            groups.setdefault((str(ev.get("step_id") or ""), str(ev.get("event"))), []).append(i)
        for (step, kind), where in groups.items():
            if len(where) > KIND_MAX:
                middle = where[KIND_MAX // 2:len(where) - KIND_MAX // 2]
                dropped.update(middle)
                cut.setdefault(step, {})[kind] = cut.get(step, {}).get(kind, 0) + len(middle)
        left = [i for i in range(len(events)) if i not in dropped]
        for i in left[:max(0, len(left) - HISTORY_MAX)]:  # the oldest, past what a stream would keep
            dropped.add(i)
            step, kind = str(events[i].get("step_id") or ""), str(events[i].get("event"))
            cut.setdefault(step, {})[kind] = cut.get(step, {}).get(kind, 0) + 1
    t0 = min((float(e.get("at") or 0) for e in events), default=now)
    fixed = _unsent_keys(record, {events[i].get("step_id") for i in range(len(events)) if i not in dropped})
    record = {**record, "history": {"k": fixed}}  # what the events' keys are read back against
    workers: list[str] = []
    rows: list[list[Any]] = []
    defaults: dict[Any, dict[str, Any]] = {}  # a step's, worked out once for all its events
    for i, ev in enumerate(events):
        if i in dropped:
            continue
        step_id, worker = ev.get("step_id"), ev.get("worker")
        if isinstance(worker, str) and worker not in workers:
            workers.append(worker)
        keyable = isinstance(step_id, str | None)  # an id a dict can key (an event's may be anything)
        expected = defaults.get(step_id) if keyable else None
        if expected is None:
            expected = _defaults(record, step_id)
            if keyable:
                defaults[step_id] = expected
        rest: dict[str, Any] = {}
        for name, value in ev.items():
            if name in ("event", "at", "step_id", "attempt", "worker"):
                continue
            if name in expected and value == expected[name]:
                continue
            if i >= kept:
                value, was_cut = _bounded(value)
                cut_values += was_cut
            rest[name] = value
        for name in expected:  # a field the event did not carry is not filled in on the way back
            if name not in ev:
                rest[name] = None
        row = [ev.get("event"), round((float(ev.get("at") or t0) - t0) * 1e6), step_id, ev.get("attempt"),
               workers.index(worker) if isinstance(worker, str) else None]
        if rest:
            row.append(rest)
        rows.append(row)
    history: dict[str, Any] = {"v": VERSION, "w": workers, "ev": rows, "at": round((now - t0) * 1e6)}
    if t0 != record.get("created_at"):  # times count from the job's creation unless it says otherwise
        history["t0"] = t0
    if fixed:
        history["k"] = fixed
    if cut:
        history["cut"] = cut
    if cut_values:
        history["cut_values"] = cut_values
    return history


def expand(record: dict[str, Any], *, note: bool = True) -> list[dict[str, Any]]:
    """The events a record's history holds, oldest first, as :func:`mesh.broker.trace.event` wrote
    them; with ``note``, followed by a ``compacted`` event saying what was summarised."""
    history = record.get("history")
    if not isinstance(history, dict) or history.get("v") != VERSION:
        return []  # none, or a layout of a newer release
    t0 = float(history["t0"] if "t0" in history else record.get("created_at") or 0)
    workers = history.get("w") or []
    out = []
    for row in history.get("ev") or []:
        kind, us, step_id, attempt, worker = row[:5]
        ev = {"event": kind, "at": t0 + us / 1e6, **_defaults(record, step_id), "step_id": step_id,
              "attempt": attempt, "worker": workers[worker] if isinstance(worker, int) else None}
        ev.update(row[5] if len(row) > 5 else {})
        out.append(ev)
    if note:
        out.append({"event": "compacted", "at": t0 + int(history.get("at") or 0) / 1e6,
                    "trace_id": record.get("trace_id"), "job_id": record.get("job_id"), "key": record.get("key"),
                    "step_id": None, "agent": None, "attempt": None, "worker": None,
                    "kept": len(history.get("ev") or []), "summarised": history.get("cut") or {},
                    "cut_values": int(history.get("cut_values") or 0)})
    return out


def compacted(record: JobRecord, events: list[dict[str, Any]], now: float,
              raw: dict[str, Any] | None = None) -> JobRecord:
    """``record`` with ``events`` (its stream's, oldest first) merged into its history; ``raw``: the
    record's JSON as plain data, when the caller has it (the stored bytes ``record`` was validated from:
    the history reads the same fields of either, a field left out reading as its default, None)."""
    raw = record.model_dump(mode="json") if raw is None else raw
    old = expand(raw, note=False)
    history = summarise(raw, [*old, *events], now, before=record.history, kept=len(old))
    return record.model_copy(update={"history": history})


# -- the sweep's part ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compacted:
    """What one pass did: jobs compacted, and jobs removed by count."""

    jobs: int = 0
    count: int = 0


class Compaction:
    """Compacts the queued jobs and applies the count retention; safe to run concurrently with
    workers, clients and another pass (a record that changed since it was read is left for the next)."""

    def __init__(self, client: redis.Redis, settings: MeshSettings) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.namespace, settings.shard)
        self._script = client.register_script(COMPACT_LUA)

    def run(self, now: float, budget_s: float | None = None) -> Compacted:
        """One pass at ``now`` (s, the Redis server's clock); ``budget_s``: compaction stops taking new
        batches after this long (what is left waits for the next pass, so passes never overlap)."""
        jobs = self.compact(now, budget_s)
        return Compacted(jobs=jobs, count=self.by_count(now))

    def compact(self, now: float, budget_s: float | None = None) -> int:
        """Compact the jobs queued (as many as the queue held when the pass began, within ``budget_s``);
        jobs compacted."""
        done = seen = left = 0
        total = int(self.client.zcard(self.keys.jobs_compact))
        deadline = None if budget_s is None else time.monotonic() + budget_s
        while seen < total and (deadline is None or time.monotonic() < deadline):
            page: Any = self.client.zrange(self.keys.jobs_compact, left, left + BATCH - 1)
            ids = [i.decode() for i in page]
            if not ids:
                break
            out, compacted_now = self._batch(ids, now)
            done += compacted_now
            seen += len(ids)
            left += len(ids) - out  # left in the queue: changed since they were read, for the next pass
        return done

    def _batch(self, ids: list[str], now: float) -> tuple[int, int]:
        """Compact ``ids``: how many left the queue, how many were compacted."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.get(self.keys.job(job_id))
            pipe.xrange(self.keys.trace(job_id))
        read: list[Any] = pipe.execute()
        keep = "1" if self.settings.job_retention_count else "0"
        out = done = size = 0
        args: list[Any] = []
        for n, (job_id, data, rows) in enumerate(zip(ids, read[::2], read[1::2], strict=True)):
            one = self._one(job_id, data, rows, now)
            args += one
            size += len(data or b"") + len(one[2])
            if size >= CALL_BYTES or n == len(ids) - 1:
                left, compacted_now = self._script(keys=[self.keys.prefix], args=["compact", now, keep, *args])
                out, done, size, args = out + int(left), done + int(compacted_now), 0, []
        return out, done

    def _one(self, job_id: str, data: bytes | None, rows: list[Any], now: float) -> list[Any]:
        """The script's six arguments for one job: its record's SHA-1 as read ("" when it is gone) and
        the compact record, or "" to leave it as it is (the job leaves the queue only if its record is
        still the one read: one that ended again meanwhile is compacted by the next pass)."""
        sha = hashlib.sha1(data).hexdigest() if data is not None else ""
        leave = [job_id, sha, "", "", "", 0]
        try:
            raw = loads(data) if data is not None else None
            record = JobRecord.model_validate(raw) if raw is not None else None
            if record is None or record.state not in TERMINAL or any(s.state in _PARKED
                                                                      for s in record.steps.values()):
                return leave  # gone, or not ended after all: its next end queues it again
            if record.history is not None and record.history.get("v") != VERSION:
                return leave  # compacted by a newer release: its history is not ours to redo
            events = [loads(fields[b"e"]) for _, fields in rows]
            data_new = encode(compacted(record, events, now, raw if isinstance(raw, dict) else None))
        except Exception as exc:  # whatever its shape, one job never stops the sweep
            # a record or event no reader can read (an event not an object, a time out of range): left
            # as it is, never retried in a loop
            logger.warning("job record or trace unreadable, not compacted", extra={"job_id": job_id,
                                                                                   "error": repr(exc)})
            return leave
        last = rows[-1][0].decode() if rows else ""
        ended = record.finished_at or record.updated_at
        return [job_id, sha, data_new, last, owner(record), ended]

    def by_count(self, now: float) -> int:
        """Remove all but the newest MESH_JOB_RETENTION_COUNT finished jobs of each agent or pipeline
        (0: none removed, and the index is only tidied of jobs age removed)."""
        keep, removed = self.settings.job_retention_count, 0
        names: Any = self.client.smembers(self.keys.jobs_kept_names)
        for raw in names:
            name = raw.decode()
            index = self.keys.jobs_kept(name)
            if keep:
                while True:
                    excess = int(self.client.zcard(index)) - keep
                    if excess <= 0:
                        break
                    ids: list[Any] = self.client.zrange(index, 0, min(excess, BATCH) - 1)
                    while ids:  # each call stops once it has read CALL_BYTES of records: the rest next
                        n, looked = self._script(keys=[self.keys.prefix], args=[
                            "evict", now, name, keep, _TERMINAL_STATES, CALL_BYTES, *ids])
                        removed, ids = removed + int(n), ids[int(looked):]
            self._tidy(name, index, now)
        return removed

    def _tidy(self, name: str, index: str, now: float) -> None:
        """Take out of ``index`` the jobs whose record expired by age (at least MESH_JOB_RETENTION_S
        after they ended: none younger can have, but for a worker's clock ahead of the server's, whose
        jobs wait as long again)."""
        offset = 0
        while True:
            ids = self.client.zrangebyscore(index, "-inf", now - self.settings.job_retention_s, start=offset, num=BATCH)
            if not ids:
                return
            n = int(self._script(keys=[self.keys.prefix], args=["tidy", now, name, *ids]))
            offset += len(ids) - n
