"""The mesh's one exception tree and the failure taxonomy it maps onto.

    MeshError                       root; ``failure_class`` and ``terminal`` on every error
    ├── ConfigError                 bad or unknown settings              permanent
    ├── ContractError               payload fails its contract           invalid_input
    │   ├── PoisonMessage           bytes that do not even decode        invalid_input
    │   ├── KeyConflict             a key re-sent with another payload   invalid_input
    │   └── LimitExceeded           over a MESH_MAX_* size or depth      invalid_input
    ├── InvalidOutput               a model's output fails its contract  invalid_output
    ├── RateLimited                 429 / quota; carries ``retry_after_s`` rate_limited
    ├── DependencyTimeout           read timeout, 408, 504, time limit   timeout
    ├── Brownout                    500/502/503, refused/reset           brownout
    │   └── BreakerOpen             the dependency's circuit breaker is open (no call made)
    ├── PermanentFailure            400/401/403/404/422, auth, refusals  permanent
    │   ├── ToolRefused             a tool call the executor will not make
    │   ├── IllegalTransition       a job-record transition the lifecycle forbids
    │   ├── EffectUnknown           an effect that cannot be proven either way: the step is
    │   │                           ``unknown`` (never retried, never shown as done)
    │   └── EffectRefuted           a tool said ok and its verifier saw that nothing happened
    ├── DeadlineExceeded            the envelope's deadline has passed   deadline
    ├── CycleDetected               hop limit hit or an agent re-entered cycle
    ├── BudgetExceeded              the job's model-token budget is spent budget_exceeded
    ├── UnknownAgent                a message names no agent of the mesh permanent
    ├── LeaseLost                   another owner took the message key over; the attempt is
    │                               superseded (acked, not retried, not dead-lettered)
    ├── OutcomeUnrecorded           done, but the mesh's Redis refused the record mesh_unavailable
    │                               (the output is recorded on the next delivery, not recomputed)
    └── NoOutput                    a job or step read for its output did not succeed permanent
                                    (``state`` and ``error`` say why; raised to the reader)

A ``redis.RedisError`` reaching the router is the mesh's own Redis failing (``mesh_unavailable``):
dependencies' errors are raised as the classes above by the tools that call them.

Each error carries its context as attributes and says whether it is terminal
(dead-letter at once) or may be retried.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class FailureClass(StrEnum):
    """Every failure falls in exactly one class; routing reads only the class."""

    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    BROWNOUT = "brownout"
    INVALID_INPUT = "invalid_input"
    PERMANENT = "permanent"
    INVALID_OUTPUT = "invalid_output"
    DEADLINE = "deadline"
    CYCLE = "cycle"
    #: The job spent its model-token budget (``token_budget``): no further model call is made.
    BUDGET_EXCEEDED = "budget_exceeded"
    #: The mesh's own Redis failed mid-attempt: never a dependency's failure, never its budget.
    MESH_UNAVAILABLE = "mesh_unavailable"
    #: Nobody approved a pipeline step before its approval's timeout (``on_timeout: escalate``): the
    #: step's dead letter is written by the timer, never by an exception; its replay asks again.
    APPROVAL_EXPIRED = "approval_expired"
    UNKNOWN = "unknown"


class MeshError(Exception):
    """Root of every error the mesh raises."""

    failure_class: FailureClass = FailureClass.UNKNOWN
    terminal: bool = False

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return self.message


class ConfigError(MeshError):
    failure_class = FailureClass.PERMANENT
    terminal = True


class ContractError(MeshError):
    """A payload does not satisfy its contract; ``errors`` lists each bad field."""

    failure_class = FailureClass.INVALID_INPUT
    terminal = True

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.errors = errors or []

    @property
    def fields(self) -> list[str]:
        return [".".join(str(p) for p in e.get("loc", ())) or "<root>" for e in self.errors]


class PoisonMessage(ContractError):
    """Raw bytes that cannot be decoded into a message at all."""

    def __init__(self, message: str, *, raw: bytes, **context: Any) -> None:
        super().__init__(message, **context)
        self.raw = raw


class KeyConflict(ContractError):
    """An idempotency key is bound to the payload it was first sent with: a different payload under
    the same key would silently return the old job, so it is refused and nothing is enqueued."""

    def __init__(self, key: str, job_id: str, agent: str) -> None:
        super().__init__(f"key {key!r} already names job {job_id} with a different payload; use a new key "
                         "(the same payload under the same key is a harmless duplicate)",
                         key=key, job_id=job_id, agent=agent)
        self.key = key
        self.job_id = job_id


class LimitExceeded(ContractError):
    """A message is larger or deeper than a ``MESH_MAX_*`` limit allows; refused before anything is
    written. ``setting`` names the limit, ``limit`` its value, ``size`` what was found."""

    def __init__(self, message: str, *, setting: str, limit: int, size: int, **context: Any) -> None:
        super().__init__(message, setting=setting, limit=limit, size=size, **context)


class InvalidOutput(MeshError):
    failure_class = FailureClass.INVALID_OUTPUT


class RateLimited(MeshError):
    failure_class = FailureClass.RATE_LIMITED

    def __init__(self, message: str, *, retry_after_s: float | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.retry_after_s = retry_after_s


class DependencyTimeout(MeshError):
    failure_class = FailureClass.TIMEOUT
    terminal = True


class Brownout(MeshError):
    """A dependency is failing. ``retry_after_s`` is set once its circuit breaker is open: the
    message then waits for the reopen time instead of spending its retry budget."""

    failure_class = FailureClass.BROWNOUT

    def __init__(self, message: str, *, dependency: str, retry_after_s: float | None = None,
                 **context: Any) -> None:
        super().__init__(message, **context)
        self.dependency = dependency
        self.retry_after_s = retry_after_s


class BreakerOpen(Brownout):
    """No call was made: the breaker of ``dependency`` is open (or its one probe is in flight)."""

    def __init__(self, dependency: str, retry_after_s: float, state: str) -> None:
        super().__init__(f"circuit breaker for {dependency} is {state}; retry in {retry_after_s:.1f}s",
                         dependency=dependency, retry_after_s=retry_after_s, state=state)
        self.state = state


class PermanentFailure(MeshError):
    failure_class = FailureClass.PERMANENT
    terminal = True


class ToolRefused(PermanentFailure):
    pass


class IllegalTransition(PermanentFailure):
    def __init__(self, kind: str, current: str, target: str) -> None:
        super().__init__(f"{kind} cannot move from {current} to {target}", current=current, target=target)
        self.current = current
        self.target = target


class DeadlineExceeded(MeshError):
    failure_class = FailureClass.DEADLINE
    terminal = True


class CycleDetected(MeshError):
    failure_class = FailureClass.CYCLE
    terminal = True


class BudgetExceeded(MeshError):
    """The job's model tokens reached its ``token_budget``: fail closed, never a silent overspend.
    Raised before a model call once ``used >= budget``, and after one that took the job past it
    (its answer is not used)."""

    failure_class = FailureClass.BUDGET_EXCEEDED
    terminal = True

    def __init__(self, message: str, *, used: int, budget: int, **context: Any) -> None:
        super().__init__(message, used=used, budget=budget, **context)
        self.used = used
        self.budget = budget


class UnknownAgent(PermanentFailure):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no agent named {name!r}; agents are {', '.join(known)}", agent=name)
        self.agent = name


class LeaseLost(MeshError):
    """Another owner took the message key over while this attempt ran: its result is not recorded."""

    def __init__(self, key: str, token: int) -> None:
        super().__init__(f"lease on {key!r} (token {token}) was taken over by another owner", key=key, token=token)
        self.key = key
        self.token = token


class OutcomeUnrecorded(MeshError):
    """The handler finished, but the mesh's Redis refused to record its output. The output rides on
    the next delivery and is recorded then: the handler (and its effects) are not run again."""

    failure_class = FailureClass.MESH_UNAVAILABLE

    def __init__(self, message: str, output: dict[str, Any]) -> None:
        super().__init__(message)
        self.output = output


class EffectUnknown(PermanentFailure):
    """Whether an effectful call happened cannot be proven: its verifier could not decide, or the call
    went out and its outcome was never written and the tool has no verifier. The step is ``unknown``
    (never retried: an irreversible effect is not repeated blindly) until ``mesh verify`` or
    ``mesh settle`` decides it."""

    def __init__(self, message: str, *, tool: str | None = None, **context: Any) -> None:
        super().__init__(message, tool=tool, effect_unknown=True, **context)
        self.tool = tool


class EffectRefuted(PermanentFailure):
    """A tool said its effect was applied and its verifier saw that it was not: the step fails."""

    def __init__(self, message: str, *, tool: str | None = None, **context: Any) -> None:
        super().__init__(message, tool=tool, **context)
        self.tool = tool


class NoOutput(MeshError):
    """A job (``ref.result()``) or a step (``record.output(...)``) has no output to read: it did not
    succeed. ``state`` and ``error`` say what became of it; ``step_id`` is None for a whole job."""

    failure_class = FailureClass.PERMANENT
    terminal = True

    def __init__(self, job_id: str, state: str, error: str | None, *, step_id: str | None = None) -> None:
        what = f"step {step_id!r} of job {job_id}" if step_id is not None else f"job {job_id}"
        super().__init__(f"{what} has no output: it is {state}" + (f": {error}" if error else ""),
                         job_id=job_id, step_id=step_id, state=state)
        self.job_id = job_id
        self.step_id = step_id
        self.state = state
        self.error = error
