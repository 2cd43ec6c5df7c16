"""What each console page shows, read from Redis with a bounded number of commands: the indexes the
CLI reads (queues, the jobs index, the DLQ's indexes, the approvals and running-step zsets), never a
scan of every job or entry. Plain data for the templates; the actions are in :mod:`.actions`. With several
shards (MESH_SHARDS) every listing and count is of all shards (:mod:`mesh.broker.shard_readers`), and a
job's page reads the job's shard."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from rich.text import Text

from mesh.broker import MeshClient, approvals, trace
from mesh.broker.breaker import Breakers
from mesh.broker.client import job_id_for
from mesh.broker.joblist import JobQuery, list_jobs
from mesh.broker.jobs import JobStore
from mesh.broker.keys import Keys
from mesh.broker.shard_readers import (
    approval_counts,
    every,
    oldest_message_age,
    pending_approvals,
    queue_depths,
    summed,
    summed_hash,
    zcard,
)
from mesh.contracts import TERMINAL, JobRecord, State, loads
from mesh.dlq import Audit, DeadLetterShards, Filter
from mesh.ops import dag
from mesh.ops.timeline import render

#: Rows a list page shows.
PAGE_ROWS = 50

#: Keys of a keyed limit the limits page shows, the most recent first (as ``mesh limits`` does).
LIMIT_KEYS = 20

#: Jobs the jobs page reads from the index at most, newest first.
JOB_BUDGET = 500

#: Dead letters a filtered DLQ page checks at most (error text and key are checked on each entry);
#: the page links to the next stretch.
DLQ_BUDGET = 1_000

#: Audit records an entry's page looks through (newest first).
AUDIT_WINDOW = 2_000

#: Stuck steps the overview names.
STUCK_ROWS = 20

#: A job's page at most: its first STEP_ROWS steps (and DAG lines), TIMELINE_ROWS lines of its
#: timeline, each line cut at LINE_CHARS and each error at TEXT_CHARS (about 1 MB in all, however
#: large the job); `mesh status` and `mesh trace` show the rest.
STEP_ROWS = 200
TIMELINE_ROWS = 1_000
LINE_CHARS = 300
TEXT_CHARS = 500


def overview(c: MeshClient) -> dict[str, Any]:
    """Everything on the overview page (the jobs' figures of every shard, added up)."""
    keys, shards, r = c.keys, every(c.settings), c.redis
    queues = queue_depths(c)
    ages = _oldest_ages(c, list(queues))
    workers, now_ms = c.registry.workers()
    outcomes: dict[str, dict[str, int]] = {}
    for field, n in sorted(summed_hash(r, shards, lambda k: k.outcomes).items()):
        agent, _, outcome = field.rpartition(":")
        outcomes.setdefault(agent, {})[outcome] = int(n)
    failures: dict[str, int] = {}
    for field, n in summed_hash(r, shards, lambda k: k.routes).items():
        failure_class, _, _route = field.partition(":")
        if failure_class != "duplicate":
            failures[failure_class] = failures.get(failure_class, 0) + int(n)
    waiting, oldest = approval_counts(r, shards)
    now = c.clock.now_s()
    stuck = []
    for k in shards:
        stuck_ids: Any = r.zrangebyscore(k.running, "-inf", now - c.settings.stuck_after_s, start=0,
                                         num=STUCK_ROWS, withscores=True)
        for member, last in stuck_ids:
            job_id, _, step_id = member.decode().partition("/")  # broker.observe.running_member
            stuck.append({"job_id": job_id, "step_id": step_id, "idle_s": round(now - float(last))})
    stuck = sorted(stuck, key=lambda s: -s["idle_s"])[:STUCK_ROWS] if len(shards) > 1 else stuck
    return {
        "queues": [{"name": q, **v, "oldest_s": ages[q]} for q, v in queues.items()],
        "workers": [{"label": w.label, "id": w.id, "agents": ", ".join(w.agents), "alive": w.alive,
                     "heartbeat_s": None if w.heartbeat_ms is None else round((now_ms - w.heartbeat_ms) / 1000, 1)}
                    for w in workers],
        "outcomes": outcomes,
        "failures": dict(sorted(failures.items())),
        "breakers": Breakers(c.settings, r).list(),
        "limits": {"declared": int(r.hlen(keys.limits_declared)), "set": int(r.hlen(keys.limits_set))},
        "dlq": DeadLetterShards.of(r, c.settings).stats(),
        "approvals": {"waiting": waiting, "oldest_s": round(oldest)},
        "unknown_effects": zcard(r, shards, lambda k: k.effects_unknown),
        "running": zcard(r, shards, lambda k: k.running),
        "stuck_count": summed(r, shards, lambda p, k: p.zcount(k.running, "-inf", now - c.settings.stuck_after_s)),
        "stuck": stuck,
        # Data of the older key layout never migrated: what the console shows is not the namespace's work.
        "layout": c.layout_refusal(),
    }


def _oldest_ages(c: MeshClient, queues: list[str]) -> dict[str, float]:
    """Age of each queue's oldest ready message, the oldest of every shard's."""
    now = c.clock.now_s()
    shards = every(c.settings)
    return {q: round(oldest_message_age(c.redis, shards, q, now), 1) for q in queues}


@dataclass
class Search:
    """A jobs search: the job found, or the ids a prefix starts, or nothing."""

    job_id: str | None = None
    candidates: list[str] | None = None
    #: Looked for as a trace id too (``q`` has a trace id's shape).
    by_trace: bool = False
    #: When ``q`` names more than one job, read as different things: job id -> how it names it.
    readings: dict[str, str] | None = None


def find(c: MeshClient, q: str) -> Search:
    """The job ``q`` names: a job id, the key it was sent with, a trace id, or a job id's unique start
    (``job-`` may be left out). The whole id, the key and a trace id are looked up directly (one
    pipelined ``EXISTS`` each: a job's trace id is its id's hex, :func:`~mesh.broker.client.trace_id_of`);
    a start in at most PREFIX_BUDGET ids. A text that names different jobs read as different things (a
    key that is another job's id or trace id) gives each, with how it names it, never one silently."""
    q = q.strip()
    if not q:
        return Search()
    by_trace = bool(_TRACE_ID.match(q))
    readings = {q: "its id", job_id_for(q): "sent with that key",
                **({f"job-{q.lower()}": "its trace id"} if by_trace else {})}
    pipe = c.redis.pipeline(transaction=False)
    for candidate in readings:
        keys = c.keys_of(candidate)  # the shard of the job it would be
        pipe.exists(keys.job(candidate), keys.trace(candidate))
    hits = {candidate: reading for (candidate, reading), found in zip(readings.items(), pipe.execute(), strict=True)
            if found}
    if len(hits) == 1:
        return Search(job_id=next(iter(hits)), by_trace=by_trace)
    if hits:  # one text, two jobs (a key that is another job's id or trace id): both, each with its reading
        return Search(candidates=list(hits), readings=hits, by_trace=by_trace)
    if by_trace or not _ID_START.match(q):  # a whole id's hex was looked up as one
        return Search(by_trace=by_trace)
    found = _starting(c, q if q.startswith("job-") else f"job-{q}")
    if len(found) == 1:
        return Search(job_id=found[0])
    return Search(candidates=found[:10] or None)


#: A W3C trace id (the hex of a job's id, as the mesh makes them).
_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")


#: What may start a job id: ``job-`` and hex, or hex alone.
_ID_START = re.compile(r"^(job-)?[0-9a-f]{4,32}$")

#: Job ids a search by an id's start looks through at most (a ZSCAN of the jobs index).
PREFIX_BUDGET = 20_000


def _starting(c: MeshClient, prefix: str) -> list[str]:
    """Job ids starting with ``prefix``, in every shard's index (PREFIX_BUDGET ids looked at in all)."""
    found: list[str] = []
    read = 0
    for keys in every(c.settings):
        cursor = 0
        while read < PREFIX_BUDGET and len(found) <= 10:
            answer: Any = c.redis.zscan(keys.jobs, cursor, match=f"{prefix}*", count=2_000)
            cursor, rows = answer
            read += 2_000
            found += [m.decode() for m, _ in rows]
            if cursor == 0:
                break
    return sorted(set(found))


def recent_jobs(c: MeshClient, state: str | None) -> dict[str, Any]:
    query = JobQuery(state=State(state) if state else None, limit=PAGE_ROWS)
    page = list_jobs(c.redis, every(c.settings), query, budget=JOB_BUDGET)
    return {"jobs": page.jobs, "cut": page.cut_by_budget, "budget": JOB_BUDGET}


def job(c: MeshClient, job_id: str) -> dict[str, Any] | None:
    """A job's page: its record, the DAG (or its steps), the timeline, its waiting approvals."""
    keys = c.keys_of(job_id)
    record = JobStore(c.redis, keys).get(job_id)
    events = trace.read_since(c.redis, keys, job_id)
    if record is None and not events:
        return None
    nodes = dag.load(c, record) if record is not None and record.pipeline else None
    stuck = _stuck(c, keys, record) if record is not None else {}
    drawn = dag.draw(record, nodes, stuck, width=160) if record is not None and nodes is not None else []
    steps = _steps(record, stuck) if record is not None else []
    timeline = render(record, [ev for _, ev in events], nodes)
    return {
        "job_id": job_id, "record": record, "steps": steps[:STEP_ROWS], "dag": _cut_lines(drawn, STEP_ROWS),
        "stuck": stuck, "timeline": _cut_lines(timeline, TIMELINE_ROWS),
        "more_steps": max(0, len(steps) - STEP_ROWS), "more_lines": max(0, len(timeline) - TIMELINE_ROWS),
        "more_dag": max(0, len(drawn) - STEP_ROWS),
        "last_id": events[-1][0] if events else "0",
        "live": record is not None and record.state not in TERMINAL,
        "waiting": [s for s in record.steps.values() if s.state is State.AWAITING_APPROVAL and s.approval][:STEP_ROWS]
        if record is not None else [],
    }


def _stuck(c: MeshClient, keys: Keys, record: JobRecord) -> dict[str, float]:
    """:meth:`MeshClient.stuck` of a job, read in its shard."""
    if keys.prefix == c.keys.prefix:
        return c.stuck(record)
    from mesh.broker import MeshClient as Client

    return Client(c.settings.on_shard(keys.shard), client=c.redis).stuck(record)


def _cut_lines(lines: list[Text], rows: int) -> list[Text]:
    """The first ``rows`` lines, each cut at LINE_CHARS."""
    return [line[:LINE_CHARS].append("…") if len(line) > LINE_CHARS else line for line in lines[:rows]]


def cut(text: str | None, limit: int = TEXT_CHARS) -> str:
    """``text`` up to ``limit`` characters, saying how many more there are."""
    text = text or ""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def _steps(record: JobRecord, stuck: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for s in record.steps.values():
        took = f"{s.finished_at - s.started_at:.2f}s" if s.finished_at and s.started_at else ""
        state = f"stuck ({stuck[s.step_id]:.0f}s without progress)" if s.step_id in stuck else dag.shown_state(s)
        out.append({"step_id": s.step_id, "agent": s.agent, "state": state, "raw_state": str(s.state),
                    "attempt": s.attempt, "took": took, "error": s.error or "", "compensates": s.compensates,
                    "approval": dag.approval_line(s)})
    return out


def dlq(c: MeshClient, flt: Filter, offset: int = 0) -> dict[str, Any]:
    store = DeadLetterShards.of(c.redis, c.settings)  # every shard's, newest first
    entries, read, cut = store.page(flt, limit=PAGE_ROWS, budget=DLQ_BUDGET, offset=offset)
    return {"entries": entries, "read": read, "cut": cut, "budget": DLQ_BUDGET, "total": store.count(),
            "offset": offset, "next": offset + read, "agents": store.agents()}


def dlq_entry(c: MeshClient, entry_id: str) -> dict[str, Any] | None:
    """An entry's page (everything ``mesh dlq show`` has), or a replayed one's tombstone."""
    from mesh.dlq.replay import replayed

    store = DeadLetterShards.of(c.redis, c.settings).store_of(entry_id)  # the shard holding it
    stored = store.load(entry_id)
    audit = entry_audit(c, entry_id, store.keys)
    if stored is None:
        tomb = replayed(c.redis, store.keys, entry_id)
        return None if tomb is None else {"tomb": tomb, "audit": audit}
    e = stored.entry
    payload = e.envelope.get("payload") if e.envelope else None
    try:
        message = loads(stored.raw)
    except ValueError:
        message = None
    from mesh.contracts import dumps

    shown = dumps(payload).decode() if payload is not None else (
        stored.raw.decode("utf-8", "replace") if message is None else dumps(message).decode())
    return {"entry": e, "payload": shown, "audit": audit}


def entry_audit(c: MeshClient, entry_id: str, keys: Keys | None = None) -> list[dict[str, Any]]:
    """The entry's audit records among the newest AUDIT_WINDOW (a bounded read of the capped log of
    ``keys``' shard: the entry's)."""
    rows: Any = c.redis.xrevrange((keys or c.keys).dlq_audit, count=AUDIT_WINDOW)
    out = []
    for stream_id, fields in rows:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        if f.get("entry_id") == entry_id:
            out.append({"id": stream_id.decode(), "op": f["op"], "who": f["who"], "at": float(f["at"]),
                        "detail": f.get("detail", "")})
    return out


def audit_log(c: MeshClient) -> list[dict[str, Any]]:
    """The DLQ's newest audit records, of every shard's log."""
    from mesh.broker.shard_readers import newest

    shards = every(c.settings)
    if len(shards) == 1:
        return Audit(c.redis, c.keys).records(limit=PAGE_ROWS)
    return newest([Audit(c.redis, k).records(limit=PAGE_ROWS) for k in shards], lambda r: r["at"], PAGE_ROWS)


#: Audit records the Breakers and Limits pages show (the newest).
CONTROL_AUDIT_ROWS = 20


def breakers(c: MeshClient) -> dict[str, Any]:
    """Every breaker, and the newest resets by hand (who, when, the state it was in)."""
    return {"breakers": Breakers(c.settings, c.redis).list(), "audit": _control_audit(c, c.keys.breakers_audit)}


def _control_audit(c: MeshClient, stream: str) -> list[dict[str, Any]]:
    """The newest CONTROL_AUDIT_ROWS records of a control's audit stream, each with its detail in words:
    ``was open``, ``max 3``, ``was max 3, requests 5/s``."""
    from mesh.broker import control_audit

    def words(values: Any) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(values.items())) if isinstance(values, dict) else str(values)

    out = []
    for r in control_audit.records(c.redis, stream, limit=CONTROL_AUDIT_ROWS):
        d = r["detail"] if isinstance(r["detail"], dict) else {}
        r["words"] = (f"was {words(d['was'])}" if "was" in d else words(d.get("given", d)))
        out.append(r)
    return out


def pending(c: MeshClient) -> list[approvals.Pending]:
    return pending_approvals(c.redis, every(c.settings), limit=PAGE_ROWS)


def html(text: Text) -> str:
    """A rich Text as HTML: every character escaped, each styled run in a ``<span class="s-...">``."""
    from markupsafe import escape

    plain = text.plain
    cuts = sorted({0, len(plain), *(s.start for s in text.spans), *(s.end for s in text.spans)})
    out = []
    for a, b in itertools.pairwise(cuts):
        styles = [str(text.style)] if text.style else []
        styles += [str(s.style) for s in text.spans if s.start <= a and s.end >= b]
        classes = " ".join(f"s-{word}" for style in styles for word in style.split() if word.isalnum())
        chunk = str(escape(plain[a:b]))
        out.append(f'<span class="{classes}">{chunk}</span>' if classes else chunk)
    return "".join(out)


def limits(c: MeshClient) -> dict[str, Any]:
    """The rows ``mesh limits --wide`` shows (a keyed limit for its most recent keys), the first
    :data:`PAGE_ROWS`, and the limits' names for the set and reset forms."""
    from mesh.broker.limits import limit_states
    from mesh.ops.limits_cli import rate_shown

    states = limit_states(c.redis, c.keys, max_keys=LIMIT_KEYS)
    rows = [{"name": s.name, "overridden": s.overridden,
             "key": "-" if s.flow_key is None else s.flow_key.replace("\n", "\\n").replace("\t", "\\t"),
             "rate": rate_shown(s), "tokens": s.tokens or "-", "in_use": f"{s.in_flight}/{s.max}" if s.max else "-",
             "waiting": s.waiting, "ahead": f"{s.ahead_ms / 1000:.1f}s", "rejected": s.rejected,
             "admitted": s.admitted} for s in states[:PAGE_ROWS]]
    names = sorted({s.name for s in states})
    keyed = {s.name for s in states if s.flow_key is not None}
    more_keys = sum(max(0, int(c.redis.zcard(c.keys.limit_keys(n))) - LIMIT_KEYS) for n in keyed)
    return {"limits": rows, "more": max(0, len(states) - PAGE_ROWS), "more_keys": more_keys, "names": names,
            "overridden": sorted({s.name for s in states if s.overridden}),
            "audit": _control_audit(c, c.keys.limits_audit)}
