"""The trace timeline of a job: what happened to each step, in a capped Redis stream per job.

    enqueued        a message for the step was sent (by the client, or by the outbox)
    picked_up       an attempt started (once per attempt)
    progress        the handler moved on (the counter a stuck step does not move)
    tool_call       a tool called a dependency: dependency, status, duration, the fencing token
    fenced          a call was refused: the attempt's lease (its token) was lost to another owner
    model_call      a handler asked the model: model, tokens in/out, repairs, outcome, duration; in a
                    tool loop, the turn and the tools the model asked for
    tool_replayed   a tool loop's call made by an earlier attempt: its recorded result replayed
    tool_refused    a tool loop's call the model invented (no such tool, bad args): answered as an error
    loop_restarted  a tool loop's checkpoints answered another prompt: forgotten, the conversation over
    deferred        the message waits: reason and until when
    failed          an attempt failed and will be retried: failure class, error
    dead_lettered   the message went to the DLQ: failure class, error
    duplicate       a delivery of a done key was acked without running
    succeeded       the step finished
    replayed        an operator replayed the step's dead letter: the entry, who (``by``), the new message
    stuck           the step holds its claim but made no progress for MESH_STUCK_AFTER_S
    compacted       (read back only) the job was compacted once it ended: its events moved into its
                    record; ``kept``, ``summarised`` ({step: {event: count}}) and ``cut_values`` say
                    what was summarised (broker/compact.py)

Every event carries the trace id, job id, key, step, agent, attempt, worker and time. Events are
staged into the same MULTI as the job-record write that causes them where there is one, so the
timeline and the record agree.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from typing import Any

import redis

from mesh.contracts import dumps, loads

from . import compact
from .keys import Keys

#: Events kept per job (the stream is trimmed, oldest first, past about this many).
TRACE_MAXLEN = 2_000

EVENTS = ("enqueued", "picked_up", "progress", "tool_call", "fenced", "model_call", "tool_replayed", "tool_refused",
          "loop_restarted", "deferred", "failed", "dead_lettered", "duplicate", "succeeded", "stuck", "replayed")

_ENVELOPE_FIELDS = ("trace_id", "job_id", "key", "step_id", "agent", "attempt")


def worker_name() -> str:
    """How events name the worker process: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def operator() -> str:
    """``user@host`` of this process: who an operator's action (a replay, a decision, a settlement)
    is recorded as when no name is given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def fields_of(env: Any) -> dict[str, Any]:
    """What an event takes from an ``Envelope`` (its identifying fields), for :func:`event`: the
    envelope is not serialised whole for the few fields each event carries."""
    return {k: getattr(env, k) for k in _ENVELOPE_FIELDS}


def event(kind: str, envelope: dict[str, Any], *, worker: str | None = None, at: float | None = None,
          **fields: Any) -> dict[str, Any]:
    """One timeline event about the message whose envelope is ``envelope``."""
    out = {"event": kind, "at": time.time() if at is None else at,
           **{k: envelope.get(k) for k in _ENVELOPE_FIELDS}, "worker": worker}
    out.update({k: v for k, v in fields.items() if v is not None})
    return out


#: ``XADD``'s arguments after the key, as redis-py's ``xadd(..., maxlen=TRACE_MAXLEN, approximate=True)``
#: spells them, up to the event's field name (its value follows).
_XADD_ARGS = (b"MAXLEN", b"~", str(TRACE_MAXLEN), "*", "e")


def stage(pipe: Any, keys: Keys, ev: dict[str, Any]) -> None:
    """Add ``ev`` to its job's stream inside ``pipe`` (a pipeline or MULTI). Staged as the command
    itself, not through redis-py's ``xadd`` (whose argument checks cost more than the rest of it)."""
    job_id = ev.get("job_id")
    if isinstance(job_id, str):
        pipe.execute_command("XADD", keys.trace(job_id), *_XADD_ARGS, dumps(ev))


def emit(client: redis.Redis, keys: Keys, ev: dict[str, Any]) -> None:
    """Write one event on its own (a failure path or a tool call, where no transaction is at hand)."""
    job_id = ev.get("job_id")
    if isinstance(job_id, str):
        client.xadd(keys.trace(job_id), {"e": dumps(ev)}, maxlen=TRACE_MAXLEN, approximate=True)


def read(client: redis.Redis, keys: Keys, job_id: str) -> list[dict[str, Any]]:
    """The job's events, oldest first: those its record keeps once it was compacted (followed by a
    ``compacted`` event saying what was summarised: broker/compact.py), then its stream's."""
    return [ev for _, ev in read_since(client, keys, job_id)]


def read_since(client: redis.Redis, keys: Keys, job_id: str, after: str = "0") -> list[tuple[str, dict[str, Any]]]:
    """The job's events after the event id ``after`` (``0``: all), oldest first, each with its id:
    where a reader that stopped picks up again (:meth:`MeshClient.events`, the console).

    A compacted job's kept events have no stream id any more: they read as ``0-1``, ``0-2``, ...
    (before every real id, so a reader resumes from one of them like from a stream's), followed by
    what its stream holds; a reader that had passed them (a real id) reads only the stream."""
    start = "-" if after in ("0", "0-0", "") else f"({after}"
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.job(job_id))
    pipe.xrange(keys.trace(job_id), min=start)
    data, rows = pipe.execute()
    kept: list[tuple[str, dict[str, Any]]] = []
    seen = _kept_seen(after)
    if seen is not None and data is not None and b'"history":{' in data:
        kept = [(f"0-{n}", ev) for n, ev in enumerate(compact.expand(loads(data)), 1) if n > seen]
    return [*kept, *decode(rows)]


def _kept_seen(after: str) -> int | None:
    """How many of a compacted job's kept events a reader resuming after ``after`` has seen; None
    when it read past all of them (a real stream id)."""
    if after in ("0", "0-0", ""):
        return 0
    ms, _, seq = after.partition("-")
    return int(seq) if ms == "0" and seq.isdigit() else None


def decode(rows: Any) -> list[tuple[str, dict[str, Any]]]:
    """XREAD's or XRANGE's entries of a trace stream as (event id, event); an entry that is not an
    event (written by something else) reads as an ``unreadable`` event, so a reader moves past it."""
    out = []
    for stream_id, fields in rows:
        try:
            ev = loads(fields[b"e"])
            if not isinstance(ev, dict):
                raise ValueError("not an object")
        except (KeyError, ValueError) as exc:
            ev = {"event": "unreadable", "error": f"trace entry {stream_id.decode()} is not an event: {exc!r}"[:300]}
        out.append((stream_id.decode(), ev))
    return out
