"""What ends a durable wait, and how events reach the steps that wait for them.

A ``sleep:`` or ``wait_for:`` step is parked in ``waiting`` by the engine
(:func:`mesh.agents.pipelines.engine.advance`); :mod:`mesh.broker.waits` keeps its index entry,
its timers and the events kept for it. A wait ends by a pure change to the job record
(:func:`end`), written in one WATCH/MULTI with what it sets in motion, so the first of several
events or the timeout wins and the others find nothing left to end:

- a sleep's timer: the step succeeds with ``{"slept_s": ...}``;
- an event: the step succeeds with the event's data as its output — one ``mesh emit`` (every step
  waiting for that name whose ``match`` holds over ``event``, the run's ``input`` and the upstream
  outputs) or ``mesh signal`` (one job: ``match`` is not checked);
- the timeout: ``on_timeout: fail`` dead-letters the step (``wait_timeout``), ``continue`` ends it
  succeeded with ``{"timed_out": true}``.

Either way its dependents go on with what the run had left of its deadline when the wait began.
An event that comes before the wait began is kept (MESH_EVENT_WINDOW_S, MESH_EVENT_KEEP) and
taken by the wait when it begins (the ``wait.check`` timer, due at once), at most once per job.
A wait of a cancelled job is withdrawn by the cancel, one of a job that starts undoing its effects
when it starts. An event is kept before it is delivered, under a delivery timer that a worker fires
if its emitter died (or could not reach a waiting job) on the way.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from mesh.broker import redact, timers
from mesh.broker import waits as store
from mesh.broker.client import MeshClient, on_job_control
from mesh.broker.clock import server_ms
from mesh.broker.jobs import JobNotFound, JobStore
from mesh.broker.keys import Keys
from mesh.broker.pipelines import PipelineStore
from mesh.contracts import TERMINAL, JobRecord, State, StepRecord, depth_exceeds, dumps, loads, transition
from mesh.contracts.approvals import show_duration
from mesh.contracts.codec import nests_deeper
from mesh.contracts.waits import WaitEnd, WaitKind, timed_out

from . import engine
from .expr import ExpressionError
from .spec import PipelineSpec

logger = logging.getLogger(__name__)

#: How long one look for kept events (a ``wait.check`` timer) goes on before it leaves the rest for later.
CHECK_BUDGET_S = 0.1

#: Trace event kinds of a wait's end.
EVENT = {WaitEnd.SLEPT: "slept", WaitEnd.EVENT: "resumed", WaitEnd.TIMEOUT: "wait_timed_out"}


def holds(spec: PipelineSpec, record: JobRecord, rec: StepRecord, data: dict[str, Any]) -> bool:
    """Whether the step's ``match`` holds for an event with ``data`` (no match: any event does). A
    match that cannot be evaluated over this event (a field missing) does not hold."""
    step = spec.step(rec.step_id)
    match = step.wait_for.match if step.wait_for is not None else None
    if match is None:
        return True
    try:
        return match.test({**engine.values(record), "event": data})
    except ExpressionError as exc:
        logger.info("an event's data does not fit a wait's match", extra={"job_id": record.job_id,
                                                                          "step_id": rec.step_id, "error": str(exc)})
        return False


def end(spec: PipelineSpec, routes: engine.Routes, step_id: str, seq: int, how: WaitEnd,
        events: list[dict[str, Any]], *, data: dict[str, Any] | None = None, event_id: str | None = None,
        via: str | None = None, match: bool = False,
        at: float | None = None) -> Callable[[JobRecord], tuple[JobRecord, list[Any]]]:
    """The change that ends wait ``seq`` of step ``step_id`` (see the module's docstring); the record
    as it is when that wait is not waiting any more (ended by an earlier event, its timeout, a
    cancel), when the event was taken by another wait of the job, or (``match``) its match fails."""

    def change(record: JobRecord) -> tuple[JobRecord, list[Any]]:
        del events[:]  # a transaction retried after a conflict starts over
        now = time.time() if at is None else at
        rec = record.steps.get(step_id)
        if rec is None or rec.state is not State.WAITING or rec.wait is None or rec.wait.seq != seq:
            return record, []
        if event_id is not None and store.consumed(record, event_id):
            return record, []
        if how is WaitEnd.EVENT and (rec.wait.kind is not WaitKind.EVENT or (match and not holds(
                spec, record, rec, data or {}))):
            return record, []
        wait = rec.wait.model_copy(update={"ended": how, "ended_at": now, "event_id": event_id, "via": via})
        if record.unwind is not None:  # undoing its effects: nothing of it goes on
            rec = transition(rec, State.CANCELLED, now=now, error="withdrawn from its wait: the job is "
                             f"{record.state.value}", failure_class="cancelled", wait=wait)
            return engine.after_loss(spec, record.with_step(rec), routes, events, now=now)
        run = engine.Run(trace_id=record.trace_id, deadline=now + (wait.deadline_left_s or 600.0),
                         token_budget=wait.token_budget)
        detail = {"name": wait.event, "event_id": event_id, "via": via} if how is WaitEnd.EVENT else {}
        if how is WaitEnd.TIMEOUT and wait.on_timeout != "continue":
            why = (f"no {wait.describe()} came within {show_duration(wait.duration_s)} (on_timeout: "
                   f"{wait.on_timeout})")
            rec = transition(rec, State.DEAD_LETTERED, now=now, error=why, failure_class="wait_timeout", wait=wait)
            record = record.with_step(rec)
            events.append(engine._event(EVENT[how], record, rec, reason=why, on_timeout=wait.on_timeout))
            return engine.after_loss(spec, record, routes, events, now=now)
        result = ({"slept_s": wait.duration_s} if how is WaitEnd.SLEPT else timed_out() if how is WaitEnd.TIMEOUT
                  else dict(data or {}))
        rec = transition(rec, State.SUCCEEDED, now=now, result=result, wait=wait)
        record = record.with_step(rec)
        events.append(engine._event(EVENT[how], record, rec, **detail,
                                    **engine.traced(spec, "output", result)))
        return engine.advance(spec, record, run, routes, events, now=now)

    return change


class Waits:
    """Ends waits for one process: its job store, the specs, and how it routes the steps a wait's end
    sends (a worker's routes, or a client's)."""

    def __init__(self, jobs: JobStore, pipelines: PipelineStore, routes: engine.Routes, settings: Any,
                 clock: Any) -> None:
        self.jobs, self.pipelines, self.routes, self.settings, self.clock = jobs, pipelines, routes, settings, clock

    def deliver(self, job_id: str, step_id: str, seq: int, how: WaitEnd, *, data: dict[str, Any] | None = None,
                event_id: str | None = None, via: str | None = None, match: bool = False,
                at: float | None = None) -> bool:
        """End the wait (:func:`end`) in one transaction; whether this call ended it."""
        events: list[dict[str, Any]] = []
        ended = False

        def change(record: JobRecord) -> tuple[JobRecord, list[Any]]:
            nonlocal ended
            spec = engine.load_spec(self.pipelines, record.pipeline or "", record.pipeline_digest or "")
            after, messages = end(spec, self.routes, step_id, seq, how, events, data=data, event_id=event_id,
                                  via=via, match=match, at=at)(record)
            ended = after is not record
            return after, messages

        def also(pipe: Any, _record: JobRecord) -> None:
            if ended and event_id is not None:
                store.stage_consumed(pipe, self.jobs.keys, job_id, event_id)
            if ended:
                pipe.hincrby(self.jobs.keys.stats, f"waits_{how.value}", 1)

        try:
            self.jobs.update(job_id, change, events=events, also=also)
        except JobNotFound:
            return False
        return ended

    def check(self, job_id: str, step_id: str, seq: int, start: tuple[int, str] | None = None) -> bool:
        """Offer the events kept for the wait (signalled to its job, or emitted), oldest first (from
        ``start``, an event's ``(at_ms, id)``, on when given), until one ends it; whether one did.
        Past CHECK_BUDGET_S of looking, the rest is left to a ``wait.check.more`` timer due now: a wait
        that starts behind thousands of kept events that do not match holds the timers' loop (every
        other sleep, timeout and approval expiry behind it) no longer than that at a time."""
        record = self.jobs.get(job_id)
        rec = record.steps.get(step_id) if record is not None else None
        if rec is None or rec.state is not State.WAITING or rec.wait is None or rec.wait.seq != seq \
                or rec.wait.event is None:
            return False
        assert record is not None
        spec = engine.load_spec(self.pipelines, record.pipeline or "", record.pipeline_digest or "")
        stop = time.monotonic() + CHECK_BUDGET_S
        for k in store.kept(self.jobs.client, self.jobs.keys, job_id, rec.wait.event, self.settings.event_window_s,
                            self.settings.event_keep):
            if start is not None and (k.at_ms, k.id) < start:
                continue  # looked at by the look this one continues
            if time.monotonic() > stop:  # the rest later, after the timers due meanwhile
                timers.stage_schedule(self.jobs.client, self.jobs.keys, store.CHECK_MORE,
                                      f"{job_id}|{step_id}|{seq}|{k.at_ms} {k.id}", 0)
                return False
            if store.consumed(record, k.id) or (k.via == "emit" and not holds(spec, record, rec, k.data)):
                continue  # looked at again in the transaction only when it may end the wait
            if self.deliver(job_id, step_id, seq, WaitEnd.EVENT, data=k.data, event_id=k.id, via=k.via,
                            match=k.via == "emit"):
                return True
        return False

    def timer_handlers(self) -> dict[str, Callable[[Any], bool]]:
        """What fires the waits' durable timers in a worker (:class:`mesh.broker.timers.Timers`):
        ``wait`` ends a sleep or times a ``wait_for`` out; ``wait.check`` offers the kept events.
        Both are idempotent: a wait ended meanwhile is left alone."""

        def fire(due: Any) -> bool:
            job_id, step_id, seq = due.ref.rsplit("|", 2)
            record = self.jobs.get(job_id)
            rec = record.steps.get(step_id) if record is not None else None
            if rec is None or rec.wait is None:
                return True
            how = WaitEnd.SLEPT if rec.wait.kind is WaitKind.SLEEP else WaitEnd.TIMEOUT
            # when it fired, on the Redis clock: never before its due time (the timer was read with TIME)
            self.deliver(job_id, step_id, int(seq), how, at=max(self.clock.now_s(), due.now_ms / 1000))
            return True

        def look(due: Any) -> bool:
            job_id, step_id, seq = due.ref.rsplit("|", 2)
            self.check(job_id, step_id, int(seq))
            return True

        def more(due: Any) -> bool:
            job_id, step_id, seq, cursor = due.ref.split("|", 3)
            at_ms, _, first = cursor.partition(" ")  # the event the last look stopped at, not looked at yet
            self.check(job_id, step_id, int(seq), start=(int(at_ms), first))
            return True

        def emitted(due: Any) -> bool:
            event, since, _ = due.ref.split("|", 2)
            self.offer(event, int(since))
            return True

        def signalled(due: Any) -> bool:
            job_id, _, _ = due.ref.rsplit("|", 2)
            record = self.jobs.get(job_id)
            for rec in record.steps.values() if record is not None else ():
                if rec.state is State.WAITING and rec.wait is not None and rec.wait.event is not None:
                    self.check(job_id, rec.step_id, rec.wait.seq)
            return True

        return {store.TIMER: fire, store.CHECK: look, store.CHECK_MORE: more, store.EMIT: emitted,
                store.SIGNAL: signalled}

    def offer(self, event: str, since_ms: int) -> list[tuple[str, str]]:
        """Offer the events of name ``event`` emitted from ``since_ms`` on, oldest first, to every step
        waiting for that name (what an emit that died on the way did not deliver); the steps resumed.
        A step that cannot be offered them (its spec unreadable) does not stop the others: the first
        such error is raised at the end, and the timer that called this tries again later."""
        window = server_ms(self.jobs.client) - int(self.settings.event_window_s * 1000)  # none kept past it
        kept = store.emitted_since(self.jobs.client, self.jobs.keys, event, max(since_ms, window),
                                   self.settings.event_keep)
        resumed: list[tuple[str, str]] = []
        failed: Exception | None = None
        if not kept:
            return resumed
        for page in store.waiting_pages(self.jobs.client, self.jobs.keys, event):
            for waiting in page:
                try:
                    for k in kept:
                        if waiting.record is not None and store.consumed(waiting.record, k.id):
                            continue
                        if self.deliver(waiting.job_id, waiting.step.step_id, waiting.wait.seq, WaitEnd.EVENT,
                                        data=k.data, event_id=k.id, via="emit", match=True):
                            resumed.append((waiting.job_id, waiting.step.step_id))
                            break
                except Exception as exc:
                    failed = failed or exc
                    logger.warning("an event could not be offered to a waiting step", extra={
                        "job_id": waiting.job_id, "step_id": waiting.step.step_id, "event": event, "error": str(exc)})
        if failed is not None:
            raise failed
        return resumed


def _event_data(client: MeshClient, event: str, data: Any) -> dict[str, Any]:
    """``data`` as JSON (as it is kept) when ``event`` is a name and ``data`` a JSON object within the step
    output limits."""
    store.check_event_name(event)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise store.InvalidEvent(f"an event's data is a JSON object (it becomes the step's output), not "
                                 f"{type(data).__name__}")
    if nests_deeper(data, client.settings.max_json_depth):  # before encoding: orjson stops at 255 levels
        raise store.InvalidEvent(f"an event's data nests deeper than MESH_MAX_JSON_DEPTH "
                                 f"({client.settings.max_json_depth})")
    try:  # checked as it was given: masking (below) turns some values that are no JSON into text
        given = dumps(data)
    except TypeError as exc:  # orjson's: bytes, an object, a key that is no string, a 65-bit integer
        raise store.InvalidEvent(f"an event's data is no JSON: {exc}") from None
    if not _finite(data):
        raise store.InvalidEvent("an event's data is no JSON: it holds NaN or an infinity (JSON has neither)")
    # Masked as JSON (a model in it as its fields, not its text: masking writes what is no plain data as
    # its str, and does so only while a secret is registered in the process), before anything keeps it,
    # as an agent's output is.
    data = redact.redact_value(loads(given))
    encoded = dumps(data)
    size = len(encoded)
    if depth_exceeds(encoded, data, client.settings.max_json_depth):
        raise store.InvalidEvent(f"an event's data nests deeper than MESH_MAX_JSON_DEPTH "
                                 f"({client.settings.max_json_depth})")
    if size > client.settings.max_output_bytes:
        raise store.InvalidEvent(f"an event's data of {size} bytes is over MESH_MAX_OUTPUT_BYTES "
                                 f"({client.settings.max_output_bytes})")
    # As JSON, what is kept and what a worker delivering the kept copy reads: a value that is no plain
    # data (a model, a tuple) became its JSON above, not in the job record, which is stored without its
    # null fields (a model's None field would be left out there) and whose output is traced as JSON.
    return data


def _finite(data: Any) -> bool:
    """Whether no float in ``data`` is NaN or infinite (orjson writes them as null: the data changed)."""
    import math

    todo = [data]
    while todo:
        value = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, list | tuple | set | frozenset):
            todo.extend(value)
    return True


def _client_waits(client: MeshClient, jobs: JobStore | None = None) -> Waits:
    """The client's :class:`Waits` on the shard of ``jobs`` (a job store of the client's; default its own)."""
    from .jobctl import _routes

    return Waits(jobs or client.jobs, client.pipelines, _routes(client), client.settings, client.clock)


def _waiting_for(record: JobRecord, event: str) -> list[StepRecord]:
    """The steps of ``record`` waiting for ``event``, the one waiting longest first."""
    return sorted((s for s in record.steps.values() if s.state is State.WAITING and s.wait is not None
                   and s.wait.event == event), key=lambda s: s.wait.started_at if s.wait else 0)


def signal(client: MeshClient, job_id: str, event: str, data: dict[str, Any] | None = None) -> store.Delivery:
    """Deliver ``event`` to job ``job_id`` (an id, or the key it was sent with): it ends the wait of
    the job's step waiting longest for that name (``match`` is not checked: the job is named); with
    none waiting, it is kept for a wait of the job that starts within MESH_EVENT_WINDOW_S. Raises
    JobNotFound, :class:`~mesh.broker.waits.NotWaiting` (the job ended) or InvalidEvent."""
    data = _event_data(client, event, data)
    job_id = client.named(job_id)  # or the job of the key it was sent with
    record = client.status(job_id)
    steps = _waiting_for(record, event)
    if record.state in TERMINAL and not steps:  # ended (a step may still wait while another branch ended it)
        raise store.NotWaiting(f"job {job_id} is {record.state.value}: nothing of it waits for {event} any more",
                               job_id=job_id, state=record.state.value)
    settings, keys, r, jobs = client.settings, client.keys_of(job_id), client.redis, client.jobs_of(job_id)
    # its delivery's timer first: a signaller that dies once the signal is kept leaves it to a worker,
    # which offers the job's kept events to its waiting steps (store.SIGNAL)
    timer = f"{job_id}|{server_ms(r)}|{uuid.uuid4().hex[:12]}"
    timers.stage_schedule(r, keys, store.SIGNAL, timer, store.GRACE_MS)
    sid = store.keep(r, keys.signals(job_id), {"event": event, "data": data}, settings.event_keep,
                     settings.event_window_s)
    event_id = f"signal:{sid}"
    # the steps waiting now that it is kept: one whose wait began after the read above and looked for
    # kept events before the keep (its wait.check) is among them
    now = jobs.get(job_id)
    steps = _waiting_for(now, event) if now is not None else []
    waits = _client_waits(client, jobs)
    resumed: list[tuple[str, str]] = []
    for step in steps:  # the one waiting longest takes it
        if step.wait is not None and waits.deliver(job_id, step.step_id, step.wait.seq, WaitEnd.EVENT, data=data,
                                                   event_id=event_id, via="signal"):
            resumed.append((job_id, step.step_id))
            break
    if not resumed:  # a wait that began meanwhile may have taken it (its check)
        after = jobs.get(job_id)
        taken = [s.step_id for s in (after.steps.values() if after else ()) if s.wait and s.wait.event_id == event_id]
        resumed = [(job_id, taken[0])] if taken else []
    timers.stage_cancel(r, keys, store.SIGNAL, timer)
    return store.Delivery(event, event_id, resumed)


def emit(client: MeshClient, event: str, data: dict[str, Any] | None = None) -> store.Delivery:
    """Deliver ``event`` to every step waiting for that name whose ``match`` holds, and keep it for
    waits that start within MESH_EVENT_WINDOW_S (each job takes it at most once).

    With several shards (MESH_SHARDS), each shard keeps the event and indexes its own waiting steps:
    the event is kept in every shard (its delivery's timer set in each first, then the event kept in
    each, then delivered shard by shard), so an emitter that dies on the way leaves each shard that
    kept it to its timer; one that stops before it kept it in every shard returned no Delivery, and
    emitting again keeps a second event (a wait that starts later may take either, one only). Every
    shard's copy has the first's id (the Delivery's ``id``); ``resumed`` lists every shard's steps."""
    data = _event_data(client, event, data)
    settings, r = client.settings, client.redis
    every = client.shards.keys if client.shards.many else (client.keys,)
    # its delivery's timer first: an emitter that dies (or fails) once the event is kept leaves it to a
    # worker, which offers the events emitted since to the steps waiting (store.EMIT)
    timer = f"{event}|{server_ms(r)}|{uuid.uuid4().hex[:12]}"
    for keys in every:
        timers.stage_schedule(r, keys, store.EMIT, timer, store.GRACE_MS)
    sid = store.keep(r, every[0].events(event), {"data": data}, settings.event_keep, settings.event_window_s)
    for keys in every[1:]:  # the other shards' copies carry the first's id: one event, one id
        store.keep(r, keys.events(event), {"data": data, "id": sid}, settings.event_keep, settings.event_window_s)
    event_id = f"emit:{event}:{sid}"
    resumed: list[tuple[str, str]] = []
    for keys in every:
        resumed += _emit_in(client, keys, event, event_id, data, timer)
    return store.Delivery(event, event_id, resumed)


def _emit_in(client: MeshClient, keys: Keys, event: str, event_id: str, data: dict[str, Any], timer: str
             ) -> list[tuple[str, str]]:
    """:func:`emit`'s delivery of ``event`` (kept as ``event_id``) to the steps waiting for it in the shard
    of ``keys``, then its timer there cancelled (pushed on while it delivers; left when a delivery
    failed, for a worker to try again): the steps it resumed."""
    r = client.redis
    waits = _client_waits(client, client.jobs_on(keys))
    resumed: list[tuple[str, str]] = []
    failed = False
    for page in store.waiting_pages(r, keys, event):
        for waiting in page:
            try:
                record = waiting.record
                if record is not None and record.pipeline and record.pipeline_digest and not holds(
                        engine.load_spec(client.pipelines, record.pipeline, record.pipeline_digest), record,
                        waiting.step, data):
                    continue  # looked at again in the transaction only when it holds now
                if waits.deliver(waiting.job_id, waiting.step.step_id, waiting.wait.seq, WaitEnd.EVENT, data=data,
                                 event_id=event_id, via="emit", match=True):
                    resumed.append((waiting.job_id, waiting.step.step_id))
            except JobNotFound:
                continue
            except redis.RedisError:
                raise  # the timer delivers it
            except Exception as exc:
                failed = True
                logger.warning("an event could not be delivered to a waiting step; a worker tries again",
                               extra={"job_id": waiting.job_id, "step_id": waiting.step.step_id, "event": event,
                                      "error": str(exc)})
        r.zadd(keys.timers, {timers.member(store.EMIT, timer): server_ms(r) + store.GRACE_MS}, xx=True)
    if not failed:
        timers.stage_cancel(r, keys, store.EMIT, timer)
    return resumed


on_job_control(signal=signal, emit=emit)
