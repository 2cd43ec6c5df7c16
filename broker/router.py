"""FailureRouter: the mesh's replacement for dramatiq's ``Retries``; acts on the failure class.

    rate_limited            defer: after Retry-After (+ jitter) or full-jitter backoff; no retry budget spent
    brownout, breaker open  defer to the breaker's reopen time; no retry budget spent
    brownout                bounded retries (the breaker counts it)
    mesh_unavailable        the mesh's own Redis failed: defer, spending no retry budget; but once the
                            attempt applied an effect it is never run blindly again: a finished
                            handler's output rides on the deferred copy and is recorded, not
                            recomputed; an unfinished one is dead-lettered with its job ``unknown``
    timeout                 fail fast: dead-letter (one retry where the actor's ``timeout_retries`` says so)
    invalid_output, unknown bounded retries (MESH_MAX_RETRIES), exponential backoff with full jitter
                            (a pipeline step's ``backoff`` may make it fixed or none: :func:`retry_delay_ms`)
    everything else         dead-letter at once

Deferrals stop at MESH_MAX_DEFERS, and no wait may pass the message's deadline: such a message is
dead-lettered at once, as ``deadline`` when the deadline is what stops it. :func:`route` is the
whole policy, pure; the middleware only builds the copy or the dead letter it names.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.common import current_millis
from dramatiq.middleware import Middleware

from mesh.contracts import BreakerOpen, Brownout, FailureClass, LeaseLost, OutcomeUnrecorded, State
from mesh.contracts.deadletter import Attempt, format_traceback
from mesh.contracts.jobs import COMPENSATION_FAILED, is_compensation

from . import compat, trace
from .classify import classify
from .clock import server_now_ms
from .jobs import JobStore, fail_step
from .observe import observe_duration, running_member
from .redact import redact
from .settings import MeshSettings
from .settle import DeadLetterIt, Decision, JobWrite, RetryLater, decide, delayed_copy

logger = logging.getLogger(__name__)

#: Jitter added to a wait the dependency named (Retry-After, a breaker's reopen time), in ms.
NAMED_WAIT_JITTER_MS = 250

#: Messages an open breaker defers come back spread over this fraction of the wait (never less than
#: NAMED_WAIT_JITTER_MS, at most BREAKER_SPREAD_MAX_MS), so a closing breaker meets no herd.
BREAKER_SPREAD = 0.5
BREAKER_SPREAD_MAX_MS = 60_000

#: How long a superseded attempt's copy waits before the claim decides its fate (ms, jittered up to twice).
SUPERSEDED_WAIT_MS = 1_000

#: Classes that bounded retries may cure.
RETRIED = frozenset({FailureClass.INVALID_OUTPUT, FailureClass.UNKNOWN, FailureClass.BROWNOUT})


class Route(StrEnum):
    DEFER = "defer"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class Routing:
    route: Route
    failure_class: FailureClass
    delay_ms: int = 0
    reason: str = ""
    #: The reason, not the attempt's exception, is what ended the message (deferrals ran out, the
    #: deadline would pass): the recorded error then states it first, the exception as the last error.
    limit: bool = False

    def error(self, exc: BaseException) -> str:
        """The error as recorded: the exception's message, and why it took this route when it says."""
        text = redact(str(exc) or type(exc).__name__)
        if self.limit:
            if isinstance(exc, BreakerOpen):  # its "retry in N s" was stale by the time it ended the message
                text = f"circuit breaker for {exc.dependency} was {exc.state}"
            return f"{self.reason}; last error: {text}"
        return f"{text} ({self.reason})" if self.reason else text


def full_jitter_ms(n: int, min_ms: int, max_ms: int, rng: Callable[[], float]) -> int:
    """Exponential backoff with full jitter: uniform in [min, min(max, min * 2**n)]."""
    ceiling = max(min_ms, min(max_ms, min_ms * 2 ** min(n, 30)))
    return int(min_ms + rng() * (ceiling - min_ms))


def retry_delay_ms(backoff: str | None, n: int, min_ms: int, max_ms: int, rng: Callable[[], float]) -> int:
    """The wait before retry ``n + 1`` under a step's ``retry_policy.backoff``, always jittered:

    exponential (and None)  full jitter, uniform in [min, min(max, min * 2**n)]
    fixed                   uniform in [min, 2 * min]: the same wait every time, spread up to 100%
    none                    uniform in [0, min / 10]: no wait, only enough jitter that failures
                            which came together do not retry together
    """
    if backoff == "fixed":
        return int(min_ms + rng() * min_ms)
    if backoff == "none":
        return int(rng() * min_ms / 10)
    return full_jitter_ms(n, min_ms, max_ms, rng)


def breaker_spread_ms(wait_ms: float, remaining_s: float = math.inf) -> float:
    """The window past an open breaker's reopen, ``wait_ms`` away, over which a message it defers is
    spread (see :func:`route`): BREAKER_SPREAD of the wait, at least NAMED_WAIT_JITTER_MS and at most
    BREAKER_SPREAD_MAX_MS, and not past the message's deadline, ``remaining_s`` away, when the reopen
    itself is within it."""
    window_ms = float(NAMED_WAIT_JITTER_MS)
    return min(max(window_ms, BREAKER_SPREAD * wait_ms), BREAKER_SPREAD_MAX_MS,
               max(window_ms, remaining_s * 1000 - wait_ms - 1))


def route(
    failure_class: FailureClass,
    retry_after_s: float | None,
    *,
    attempt: int,
    defers: int,
    remaining_s: float,
    timeout_retries: int,
    settings: MeshSettings,
    rng: Callable[[], float] = random.random,
    effect_unrecorded: bool = False,
    max_retries: int | None = None,
    backoff: str | None = None,
) -> Routing:
    """Where a failed attempt goes: the whole routing policy, without I/O or a clock.

    ``effect_unrecorded``: the attempt applied an effect and its outcome cannot be recorded.
    ``max_retries``: the agent's own retry budget (None: MESH_MAX_RETRIES).
    ``backoff``: a pipeline step's wait between retries (:func:`retry_delay_ms`); deferrals keep theirs.

    A wait the dependency named gets a uniform jitter on top. For a Retry-After that is up to
    NAMED_WAIT_JITTER_MS. For an open breaker (a brownout with a wait) it is a window of
    BREAKER_SPREAD of the wait, at least NAMED_WAIT_JITTER_MS and at most BREAKER_SPREAD_MAX_MS:
    every message deferred during a cool-down is due at the same reopen time, and a quarter second
    would bring them all back at once onto a dependency that just recovered (and onto its one
    probe). A long cool-down spreads them over seconds; the window never pushes a message past its
    deadline when the reopen time itself is within it (down to the old quarter second).
    """
    lo, hi = settings.retry_min_backoff_ms, settings.retry_max_backoff_ms
    if failure_class is FailureClass.MESH_UNAVAILABLE:
        if effect_unrecorded:
            return Routing(Route.DEAD_LETTER, failure_class,
                           reason="an effect was applied and could not be recorded: not run again blindly")
        if defers >= settings.max_defers:
            return Routing(Route.DEAD_LETTER, failure_class, reason=_defers_spent(defers, settings), limit=True)
        return _within_deadline(Routing(Route.DEFER, failure_class, full_jitter_ms(defers, lo, hi, rng)),
                                remaining_s)
    if failure_class is FailureClass.RATE_LIMITED or (failure_class is FailureClass.BROWNOUT
                                                      and retry_after_s is not None):
        if defers >= settings.max_defers:
            return Routing(Route.DEAD_LETTER, failure_class, reason=_defers_spent(defers, settings), limit=True)
        if retry_after_s is not None:
            wait_ms = retry_after_s * 1000
            window_ms = (breaker_spread_ms(wait_ms, remaining_s) if failure_class is FailureClass.BROWNOUT
                         else float(NAMED_WAIT_JITTER_MS))
            delay = int(wait_ms + rng() * window_ms)
        else:
            delay = full_jitter_ms(defers, lo, hi, rng)
        return _within_deadline(Routing(Route.DEFER, failure_class, delay), remaining_s)
    budget = timeout_retries if failure_class is FailureClass.TIMEOUT else (
        (settings.max_retries if max_retries is None else max_retries) if failure_class in RETRIED else 0)
    if attempt - 1 < budget:
        delay = retry_delay_ms(backoff, attempt - 1, lo, hi, rng)
        return _within_deadline(Routing(Route.RETRY, failure_class, delay), remaining_s)
    reason = f"retries exhausted ({attempt - 1} of {budget})" if budget else ""
    return Routing(Route.DEAD_LETTER, failure_class, reason=reason)


def _defers_spent(defers: int, settings: MeshSettings) -> str:
    return f"deferred {defers} times, the most MESH_MAX_DEFERS={settings.max_defers} allows"


def _within_deadline(routing: Routing, remaining_s: float) -> Routing:
    if routing.delay_ms / 1000 < remaining_s:
        return routing
    return Routing(Route.DEAD_LETTER, FailureClass.DEADLINE, limit=True,
                   reason=f"waiting {routing.delay_ms / 1000:.1f}s to {routing.route} after {routing.failure_class} "
                          f"would pass the deadline ({max(remaining_s, 0):.1f}s left)")


def _step_budget(envelope: dict[str, Any] | None) -> int | None:
    """A pipeline step's own retry budget, carried on its envelope (None: the agent's applies)."""
    value = (envelope or {}).get("max_retries")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def dependency_of(exc: BaseException | None) -> str | None:
    """The dependency a failure names (``host:port``), from the mesh error or the HTTP error that
    caused it, or None: kept on the dead letter so ``mesh dlq ... --dependency`` can select by it."""
    seen = 0
    while exc is not None and seen < 5:
        name = getattr(exc, "dependency", None) or (getattr(exc, "context", None) or {}).get("dependency")
        if isinstance(name, str) and name:
            return name
        request = getattr(exc, "_request", None)  # httpx errors; their .request raises when unset
        if request is not None:
            return str(request.url.netloc.decode())
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def dead_letter_with_step(broker: Broker, message: MessageProxy, failure_class: FailureClass, error: str,
                          traceback: str | None, *, stat: str = "dead_lettered",
                          state: State = State.DEAD_LETTERED) -> DeadLetterIt:
    """Dead-letter ``message`` and, when it carries a job step, end that step with it (in the same
    settlement): a message in the DLQ never leaves its step queued or running."""
    error = redact(error)
    entry = broker.dead_letter_entry(message._message, failure_class, error, traceback,  # type: ignore[attr-defined]
                                     dependency=dependency_of(message.__dict__.get("_exception")))
    envelope = message.args[0] if message.args and isinstance(message.args[0], dict) else {}
    job_id, step_id = envelope.get("job_id"), envelope.get("step_id")
    job = None
    if isinstance(job_id, str) and isinstance(step_id, str):
        lease = message.__dict__.get("mesh_lease")
        token = lease.token if lease else None
        events = [trace.event("dead_lettered", envelope, worker=trace.worker_name(),
                              failure_class=str(failure_class), error=error[:500], route="dead_letter",
                              state=str(state))]
        undo = list(lease.undo_calls) if lease and lease.undo_calls else None
        job = JobWrite(job_id, fail_step(step_id, state, error, str(failure_class), token=token, events=events,
                                         undo_calls=undo),
                       step_id=step_id, token=token, events=events, running_member=running_member(job_id, step_id),
                       release=(lease.claim_key, lease.owner) if lease and lease.release_pending else None)
    return DeadLetterIt(entry, stat, f"{failure_class}:dead_letter", job=job)


def unroutable(broker: Broker, message: MessageProxy, error: str) -> DeadLetterIt:
    """A dead letter (``invalid_input``, with the raw bytes) for a failed message the mesh's own
    hooks could not route, and its step's record to match: never acked away, never left running."""
    exc = message.__dict__.get("_exception")
    return dead_letter_with_step(broker, message, FailureClass.INVALID_INPUT, error, format_traceback(exc),
                                 stat="poison")


class FailureRouter(Middleware):
    """Decides each failed message's fate by its class, before any I/O; the consumer applies it."""

    def __init__(
        self, settings: MeshSettings, jobs: JobStore | None = None, rng: Callable[[], float] = random.random
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.rng = rng

    @property
    def actor_options(self) -> set[str]:
        # ``throws``: exceptions dramatiq's worker logs as expected (no traceback); the router logs the route.
        return {"timeout_retries", "max_retries", "throws"}

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        try:
            self._route(broker, message, exception)
        except Exception as exc:
            # dramatiq would log a hook's error and ack the message away: it is dead-lettered instead.
            logger.exception("the failure could not be routed", extra={"agent": message.actor_name})
            decide(message, unroutable(broker, message, f"the mesh could not route this message's failure "
                                       f"({type(exc).__name__}: {exc}); it failed with "
                                       f"{type(exception).__name__}: {exception}"))

    def _route(self, broker: Broker, message: MessageProxy, exception: BaseException) -> None:
        envelope = message.args[0] if message.args and isinstance(message.args[0], dict) else {}
        log = {"agent": message.actor_name, "trace_id": envelope.get("trace_id"), "key": envelope.get("key"),
               "job_id": envelope.get("job_id")}
        lease = message.__dict__.get("mesh_lease")
        if lease is not None and lease.settled:
            # Raised after the success's write recorded the step and settled the message (a time limit
            # held while the write was on the wire): the run is counted, and nothing is left to decide.
            return
        # Due times and the deadline are on the Redis server's clock: this host's may be off.
        now_ms = server_now_ms(broker)
        if isinstance(exception, LeaseLost) or message.__dict__.get("mesh_superseded"):
            # Another owner took the key over and carries the work on. This copy is not dropped: it
            # comes back shortly, and the claim absorbs it (done: acked; still held: waits).
            delay_ms = full_jitter_ms(1, SUPERSEDED_WAIT_MS, 2 * SUPERSEDED_WAIT_MS, self.rng)
            decide(message, RetryLater(delayed_copy(message._message, delay_ms, now_ms=now_ms), delay_ms,
                                       "superseded", "duplicate:defer"))
            logger.warning("attempt superseded", extra={**log, "delay_ms": delay_ms})
            return
        failure_class, retry_after_s = classify(exception)
        if compat.thrown(exception, self._option(broker, message, "throws", kind=object)):
            failure_class, retry_after_s = FailureClass.PERMANENT, None  # dramatiq's "never retry this"
        attempt = envelope.get("attempt", 1) if isinstance(envelope.get("attempt"), int) else 1
        deadline = envelope.get("deadline")
        step_budget = _step_budget(envelope)
        routing = route(
            failure_class, retry_after_s, attempt=attempt, defers=int(message.options.get("mesh_defers", 0)),
            remaining_s=deadline - now_ms / 1000 if isinstance(deadline, int | float) else math.inf,
            timeout_retries=self._timeout_retries(broker, message, envelope, step_budget) if envelope else 0,
            max_retries=step_budget if step_budget is not None else self._option(broker, message, "max_retries"),
            settings=self.settings, rng=self.rng, backoff=_str_or_none(envelope.get("backoff")),
            effect_unrecorded=bool(lease and lease.effects) and not isinstance(exception, OutcomeUnrecorded),
        )
        if not envelope and routing.route is not Route.DEAD_LETTER:
            routing = Routing(Route.DEAD_LETTER, failure_class, reason="no envelope to retry with")
        # The decision is made before any I/O: whatever happens next, the message is settled by it,
        # and the job record's change goes with the settlement (retried with it until Redis answers).
        decision = self._decide(broker, message, envelope, attempt, routing, exception, now_ms)
        job = self._job_write(envelope, decision, routing, exception, lease)
        decide(message, dataclasses.replace(decision, job=job))
        logger.warning("message failed", extra={
            **log, "failure_class": str(failure_class), "route": str(routing.route), "delay_ms": routing.delay_ms,
            "attempt": attempt, "error": redact(str(exception)), "reason": routing.reason or None})
        if lease is not None and self.jobs is not None:
            self._observe(message.actor_name, time.monotonic() - lease.started)
        if (isinstance(decision, RetryLater) and routing.route is Route.DEFER and isinstance(exception, Brownout)
                and exception.retry_after_s is not None):
            self._note_deferred(exception.dependency, decision.message, now_ms)

    def _option(self, broker: Broker, message: MessageProxy, name: str, kind: type = int) -> Any:
        """The actor's option ``name`` when it is a ``kind`` (default int), else None."""
        try:
            value = broker.get_actor(message.actor_name).options.get(name)
        except Exception:  # an unknown actor
            return None
        return value if isinstance(value, kind) else None

    def _timeout_retries(self, broker: Broker, message: MessageProxy, envelope: dict[str, Any],
                         step_budget: int | None) -> int:
        """The agent's ``timeout_retries``; an idempotent step's timeouts share its retry budget."""
        if envelope.get("idempotent") is True:
            if step_budget is not None:
                return step_budget
            own = self._option(broker, message, "max_retries")
            return self.settings.max_retries if own is None else own
        try:
            return int(broker.get_actor(message.actor_name).options.get("timeout_retries", 0))
        except Exception:  # an unknown actor: nothing to retry with
            return 0

    def _decide(self, broker: Broker, message: MessageProxy, envelope: dict[str, Any], attempt: int,
                routing: Routing, exception: BaseException, now_ms: int) -> Decision:
        error = redact(str(exception) or type(exception).__name__)
        counter = f"{routing.failure_class}:{routing.route}"
        if routing.route is Route.DEAD_LETTER:
            entry = broker.dead_letter_entry(  # type: ignore[attr-defined]
                message._message, routing.failure_class, routing.error(exception), format_traceback(exception),
                dependency=dependency_of(exception))
            stat = "poison" if routing.failure_class is FailureClass.INVALID_INPUT else "dead_lettered"
            if is_compensation(str(envelope.get("step_id") or "")):
                # A compensation that failed for good: filed under its own class (mesh dlq --class).
                entry = entry.model_copy(update={"failure_class": COMPENSATION_FAILED,
                                                 "error": f"{routing.failure_class}: {entry.error}"})
            return DeadLetterIt(entry, stat, counter)
        deferred = routing.route is Route.DEFER
        history = [*message.options.get("mesh_attempts", []), Attempt(
            attempt=attempt, outcome="deferred" if deferred else "retried", failure_class=routing.failure_class,
            error=error, at=current_millis() / 1000, worker=getattr(broker, "worker_label", None),
        ).model_dump(mode="json")]
        if deferred:  # same attempt: a deferral spends no retry budget
            extra: dict[str, Any] = (
                {"mesh_output": exception.output} if isinstance(exception, OutcomeUnrecorded) else {})
            copy = delayed_copy(message._message, routing.delay_ms, now_ms=now_ms, mesh_attempts=history,
                                mesh_defers=int(message.options.get("mesh_defers", 0)) + 1, **extra)
            return RetryLater(copy, routing.delay_ms, "deferred", counter)
        copy = delayed_copy(message._message, routing.delay_ms, now_ms=now_ms,
                            args=({**envelope, "attempt": attempt + 1},), mesh_attempts=history)
        return RetryLater(copy, routing.delay_ms, "retried", counter)

    def _job_write(self, envelope: dict[str, Any], decision: Decision, routing: Routing, exc: BaseException,
                   lease: Any) -> JobWrite | None:
        """The failure's change to the job record and its trace event, settled with the message."""
        job_id, step_id = envelope.get("job_id"), envelope.get("step_id")
        if self.jobs is None or not isinstance(job_id, str) or not isinstance(step_id, str):
            return None
        if isinstance(decision, RetryLater):
            state = State.FAILED
        elif (getattr(exc, "context", {}).get("effect_unknown") or isinstance(exc, OutcomeUnrecorded)
              or (lease is not None and lease.effects and routing.failure_class is FailureClass.MESH_UNAVAILABLE)):
            # An effect happened (or may have) and its outcome is not on the record: never shown as
            # a plain failure, and a replay must not run it blindly.
            state = State.UNKNOWN
        else:
            state = State.DEAD_LETTERED
        error = routing.error(exc)
        kind = {Route.DEFER: "deferred", Route.RETRY: "failed", Route.DEAD_LETTER: "dead_lettered"}[routing.route]
        # ``until``: the copy's due time, on the Redis server's clock like the copy's eta.
        until = decision.message.options["eta"] / 1000 if isinstance(decision, RetryLater) else None
        ev = trace.event(kind, envelope, worker=trace.worker_name(), failure_class=str(routing.failure_class),
                         error=error[:500], route=str(routing.route), state=str(state), until=until)
        release = (lease.claim_key, lease.owner) if lease is not None and lease.release_pending else None
        token = lease.token if lease else None
        tokens = (lease.tokens_in, lease.tokens_out) if lease else (0, 0)
        events = [ev]  # and what the change sets off (a join's decision), written with it
        undo = list(lease.undo_calls) if lease is not None and lease.undo_calls else None
        return JobWrite(job_id, fail_step(step_id, state, error, str(routing.failure_class), token=token,
                                          tokens=tokens, events=events, undo_calls=undo),
                        step_id=step_id, token=token, events=events, running_member=running_member(job_id, step_id),
                        release=release)

    def _note_deferred(self, dependency: str, copy: Any, now_ms: int) -> None:
        """Count the message as waiting on the open breaker (``mesh breakers``): a figure, never worth
        failing the settlement for."""
        if self.jobs is None:
            return
        from .breaker import Breakers

        try:
            Breakers(self.settings, self.jobs.client).note_deferred(dependency, copy.message_id,
                                                                    int(copy.options.get("eta", now_ms)), now_ms=now_ms)
        except Exception as exc:
            logger.warning("could not count the message deferred on its breaker", extra={"error": str(exc)})

    def _observe(self, agent: str, duration: float) -> None:
        """The attempt's duration, for the histogram: a figure, never worth failing the settlement for."""
        assert self.jobs is not None
        pipe = self.jobs.client.pipeline(transaction=False)
        observe_duration(pipe, self.jobs.keys, agent, duration)
        try:
            pipe.execute()
        except Exception as exc:
            logger.warning("could not record the attempt's duration", extra={"error": str(exc)})
