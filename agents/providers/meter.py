"""Token metering of model calls, shared by every provider.

Each request's tokens (prompt in, completion out) are counted on the attempt (the lease; its step
and job get them with the attempt's outcome), per agent (``{ns}:tokens``, exported as
``mesh_model_tokens_total``) and, when the job has a ``token_budget``, per job (``{ns}:tokens:{job}``).
A request reserves its expected tokens on the step's token rates and settles what it spent; a 429
lowers the rates that govern model calls for the fleet (:func:`mesh.broker.limits.model_refused`).
The budget fails closed: a call is refused once the job has spent it, and a call that takes the
job past it raises too, so its answer is never used. Each ``complete`` (with its repairs) is one
``model_call`` trace event, with its duration; so is each turn of a tool loop, with its number and
the tools the model asked for.

Only calls made on a worker thread that holds a message's claim are metered: outside a worker
there is no job to charge, and a thread the handler starts itself is not metered either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from mesh.broker import limits, trace
from mesh.broker.idempotency import Lease, current_lease
from mesh.broker.keys import Keys
from mesh.broker.settings import MeshSettings
from mesh.contracts import BudgetExceeded, RateLimited

log = logging.getLogger(__name__)


@dataclass
class Call:
    """One ``complete``: the model asked, the tokens its requests spent, the repairs it took."""

    model: str
    tokens_in: int = 0
    tokens_out: int = 0
    repairs: int = 0
    #: A tool loop's turn (:mod:`mesh.agents.tool_loop`): its number and the tools the model asked for.
    turn: int | None = None
    tools: list[str] | None = None


class Meter:
    """Counts tokens into Redis for the message this thread is processing; without ``client`` it
    only counts on the :class:`Call` (a provider used outside a worker)."""

    def __init__(self, settings: MeshSettings | None = None, client: redis.Redis | None = None) -> None:
        self.client = client
        self.keys = Keys(settings.namespace, settings.shard) if settings else Keys("mesh")
        self.retention_s = settings.job_retention_s if settings else 0.0
        self.worker = trace.worker_name()

    def _lease(self) -> Lease | None:
        return current_lease() if self.client is not None else None

    @contextmanager
    def call(self, model: str) -> Iterator[Call]:
        """Meter one ``complete``; its ``model_call`` event is written however it ends."""
        call, outcome, started = Call(model), "ok", time.monotonic()
        try:
            yield call
        except BaseException as exc:
            outcome = str(getattr(exc, "failure_class", None) or type(exc).__name__)
            if isinstance(exc, RateLimited):  # the endpoint's 429: the fleet's model rates lowered
                limits.model_refused(exc)
            raise
        finally:
            self._trace(call, outcome, time.monotonic() - started)

    def admit(self) -> None:
        """Before a request: BudgetExceeded, and no request, once the job has spent its budget. The
        request's expected tokens are reserved on the token rates the step took (docs/guides/limits.md)."""
        limits.reserve_tokens()
        lease = self._lease()
        budget = _budget(lease)
        if lease is None or budget is None:
            return
        assert self.client is not None
        used = int(self.client.get(self.keys.job_tokens(lease.envelope["job_id"])) or 0)
        if used >= budget:
            raise _exceeded(lease, used, budget, "no further model call is made")

    def charge(self, call: Call, tokens_in: int, tokens_out: int) -> None:
        """After a request: count what it spent; BudgetExceeded when that took the job past its budget."""
        call.tokens_in += tokens_in
        call.tokens_out += tokens_out
        limits.settle_tokens(tokens_in + tokens_out)
        lease = self._lease()
        if lease is None:
            return
        assert self.client is not None
        lease.tokens_in += tokens_in
        lease.tokens_out += tokens_out
        env, budget = lease.envelope, _budget(lease)
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self.keys.tokens, f"{env.get('agent')}:in", tokens_in)
        pipe.hincrby(self.keys.tokens, f"{env.get('agent')}:out", tokens_out)
        if budget is not None:
            key = self.keys.job_tokens(env["job_id"])
            pipe.incrby(key, tokens_in + tokens_out)
            # The job can spend no token after its deadline; its records outlive that by the retention.
            pipe.pexpireat(key, int((float(env["deadline"]) + self.retention_s) * 1000))
        replies = pipe.execute()
        if budget is not None and int(replies[2]) > budget:
            raise _exceeded(lease, int(replies[2]), budget, "its answer is not used")

    def _trace(self, call: Call, outcome: str, duration_s: float) -> None:
        lease = self._lease()
        if lease is None:
            return
        assert self.client is not None
        ev = trace.event("model_call", lease.envelope, worker=self.worker, model=call.model,
                         tokens_in=call.tokens_in, tokens_out=call.tokens_out, repairs=call.repairs, outcome=outcome,
                         duration_s=round(duration_s, 4), turn=call.turn, tools=call.tools)
        try:
            trace.emit(self.client, self.keys, ev)
        except redis.RedisError as exc:
            # A trace line, not the call's outcome: it must never replace what the model answered.
            log.warning("could not trace a model call", extra={"job_id": ev.get("job_id"), "error": str(exc)})


def _budget(lease: Lease | None) -> int | None:
    budget: Any = lease.envelope.get("token_budget") if lease is not None else None
    return budget if isinstance(budget, int) and budget > 0 else None


def _exceeded(lease: Lease, used: int, budget: int, consequence: str) -> BudgetExceeded:
    job_id = lease.envelope.get("job_id")
    return BudgetExceeded(f"job {job_id} spent {used} of its {budget} model tokens: {consequence}",
                          used=used, budget=budget, job_id=job_id)
