"""FailureRouter: the mesh's replacement for dramatiq's ``Retries``; acts on the failure class."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.common import current_millis
from dramatiq.middleware import Middleware

from contracts import FailureClass, LeaseLost, State
from dlq.entry import Attempt, format_traceback

from .classify import classify
from .jobs import JobStore, fail_step
from .settings import MeshSettings
from .settle import DeadLetterIt, Decision, RetryLater, Superseded, decide, delayed_copy

logger = logging.getLogger(__name__)

#: Classes that bounded retries may cure. Everything else is dead-lettered at once.
RETRYABLE = frozenset({FailureClass.INVALID_OUTPUT, FailureClass.UNKNOWN, FailureClass.BROWNOUT,
                       FailureClass.RATE_LIMITED})


def full_jitter_ms(retries_used: int, min_ms: int, max_ms: int, rng: Callable[[], float]) -> int:
    """Exponential backoff with full jitter: uniform in [min, min(max, min * 2**n)]."""
    ceiling = min(max_ms, min_ms * 2 ** min(retries_used, 30))
    return int(min_ms + rng() * (ceiling - min_ms))


class FailureRouter(Middleware):
    def __init__(
        self, settings: MeshSettings, jobs: JobStore | None = None, rng: Callable[[], float] = random.random
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.rng = rng

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
        envelope = message.args[0] if message.args and isinstance(message.args[0], dict) else {}
        if isinstance(exception, LeaseLost):
            # Another owner took the key over and carries the work on; this copy only goes away.
            decide(message, Superseded())
            logger.warning("attempt superseded", extra={"agent": message.actor_name, "key": envelope.get("key"),
                                                         "trace_id": envelope.get("trace_id")})
            return
        failure_class, retry_after_s = classify(exception)
        attempt = envelope.get("attempt", 1) if isinstance(envelope.get("attempt"), int) else 1
        # The decision is made before any I/O: whatever happens next, the message is settled by it.
        decision = self._decide(broker, message, envelope, attempt, failure_class, retry_after_s, exception)
        decide(message, decision)
        logger.warning(
            "message failed",
            extra={"agent": message.actor_name, "trace_id": envelope.get("trace_id"),
                   "key": envelope.get("key"), "failure_class": str(failure_class),
                   "route": "retry" if isinstance(decision, RetryLater) else "dead_letter",
                   "attempt": attempt, "error": str(exception)},
        )
        lease = message.__dict__.get("mesh_lease")
        self._record(envelope, decision, failure_class, exception, lease.token if lease else None)

    def _decide(
        self,
        broker: Broker,
        message: MessageProxy,
        envelope: dict[str, Any],
        attempt: int,
        failure_class: FailureClass,
        retry_after_s: float | None,
        exception: BaseException,
    ) -> Decision:
        if failure_class in RETRYABLE and attempt - 1 < self.settings.max_retries and envelope:
            if retry_after_s is not None:
                delay_ms = int(retry_after_s * 1000 + self.rng() * 250)
            else:
                delay_ms = full_jitter_ms(attempt - 1, self.settings.retry_min_backoff_ms,
                                          self.settings.retry_max_backoff_ms, self.rng)
            history = [*message.options.get("mesh_attempts", []), Attempt(
                attempt=attempt, outcome="retried", failure_class=failure_class, error=str(exception),
                at=current_millis() / 1000, worker=getattr(broker, "worker_label", None),
            ).model_dump(mode="json")]
            retry = delayed_copy(message._message, delay_ms, args=({**envelope, "attempt": attempt + 1},),
                                 mesh_attempts=history)
            return RetryLater(retry, delay_ms)
        entry = broker.dead_letter_entry(  # type: ignore[attr-defined]
            message._message, failure_class, str(exception) or type(exception).__name__,
            format_traceback(exception),
        )
        return DeadLetterIt(entry, "poison" if failure_class is FailureClass.INVALID_INPUT else "dead_lettered")

    def _record(
        self, envelope: dict[str, Any], decision: Decision, failure_class: FailureClass, exc: BaseException,
        token: int | None,
    ) -> None:
        job_id, step_id = envelope.get("job_id"), envelope.get("step_id")
        if self.jobs is None or not isinstance(job_id, str) or not isinstance(step_id, str):
            return
        if isinstance(decision, RetryLater):
            state = State.FAILED
        elif getattr(exc, "context", {}).get("effect_unknown"):
            state = State.UNKNOWN
        else:
            state = State.DEAD_LETTERED
        try:
            self.jobs.update(job_id, fail_step(step_id, state, str(exc), str(failure_class), token=token))
        except Exception:
            logger.exception("could not record the failure on the job", extra={"job_id": job_id})
