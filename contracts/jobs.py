"""Job and step records, and the one function through which their state moves.

Every change of state goes through :func:`transition`, which refuses moves the
lifecycle does not allow and scrubs terminal fields (error, result, finished and
failed timestamps) whenever a record becomes active again, so a retried step can
never show the previous attempt's error or result as if it were current.

Records are read by every release running during a rolling deploy, so they tolerate what a newer
release writes (unlike messages, which stay ``extra="forbid"``): :class:`Record` and its
subclasses (:class:`JobRecord`, :class:`StepRecord`) and :class:`GateCheck` keep unknown fields and
write them back unchanged, and a :class:`State` value this release does not know is read as a
state of its own that this release never moves (:func:`known`).
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any, ClassVar, Self, TypeVar, overload

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

from .approvals import Approval
from .declared import AgentRef
from .effects import Settlement, Verdict
from .envelope import Frozen, Priority
from .errors import IllegalTransition, NoOutput
from .waits import Wait

M = TypeVar("M", bound=BaseModel)
_set = object.__setattr__
Out = TypeVar("Out", bound=BaseModel)


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    #: A pipeline step waiting durably (``sleep:``, ``wait_for:``): no message in flight, a timer in
    #: Redis and (for an event) an index entry; a job is ``waiting`` while nothing else moves.
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    UNKNOWN = "unknown"
    #: A pipeline stopped by a false gate (its step, and the job): nothing downstream runs.
    HALTED = "halted"
    #: A pipeline step not run (a false ``when``, or a false gate under ``on_false: continue``):
    #: its dependents go on.
    SKIPPED = "skipped"
    #: A pipeline step never sent because its job halted first (or a ``for_each`` step not all of whose
    #: items were sent); its error says where it halted.
    NOT_RUN = "not_run"
    #: A job undoing the effects of its succeeded steps after it halted (or was cancelled): their
    #: compensations run, one at a time, in reverse order of completion (agents/pipelines/compensate.py).
    COMPENSATING = "compensating"
    #: A job whose every compensation succeeded: its effects are undone.
    COMPENSATED = "compensated"
    #: A job cancelled by an operator (``mesh cancel``) with nothing to undo; a step the cancel stopped
    #: (never sent, withdrawn from approval, or ended after the cancel: its output is not used).
    CANCELLED = "cancelled"

    @classmethod
    def _missing_(cls, value: object) -> State | None:
        """A state a newer release wrote (e.g. ``superseded``): read as a member of its own, not in
        :data:`ALLOWED`, so this release keeps it and never moves it (see :func:`known`)."""
        if not isinstance(value, str) or not value or len(value) > 64:
            return None
        member = str.__new__(cls, value)
        member._name_, member._value_ = value.upper(), value
        return member


#: States in which work is still expected to happen.
ACTIVE = frozenset({State.QUEUED, State.RUNNING, State.AWAITING_APPROVAL, State.WAITING})
#: States a job ends in. A step in FAILED is waiting for its retry; a job never rests there
#: unless an operator or a policy fails it for good.
TERMINAL = frozenset({State.SUCCEEDED, State.DEAD_LETTERED, State.UNKNOWN, State.HALTED, State.SKIPPED,
                      State.NOT_RUN, State.COMPENSATED, State.CANCELLED})

#: Where a job may go once it has to undo its effects (halted, dead-lettered under halt_pipeline,
#: cancelled): compensating while compensations run, cancelled when there is nothing to undo.
_UNWIND = frozenset({State.COMPENSATING, State.CANCELLED})

ALLOWED: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.QUEUED, State.RUNNING, State.FAILED, State.DEAD_LETTERED, State.AWAITING_APPROVAL,
                             State.WAITING, State.HALTED, State.SKIPPED, State.NOT_RUN, *_UNWIND}),
    # NOT_RUN: a for_each step whose job halted before all its items were sent.
    State.RUNNING: frozenset({State.RUNNING, State.AWAITING_APPROVAL, State.WAITING, State.SUCCEEDED, State.FAILED,
                              State.DEAD_LETTERED, State.UNKNOWN, State.HALTED, State.SKIPPED, State.NOT_RUN,
                              *_UNWIND}),
    State.AWAITING_APPROVAL: frozenset({State.QUEUED, State.RUNNING, State.FAILED, State.DEAD_LETTERED,
                                        State.WAITING, State.HALTED, State.SKIPPED, *_UNWIND}),
    # A step: resumed (succeeded: the event's data), timed out (dead-lettered), not run (its job
    # halted) or cancelled. A job: wherever its steps take it once one moves again.
    State.WAITING: frozenset({State.QUEUED, State.RUNNING, State.SUCCEEDED, State.DEAD_LETTERED, State.HALTED,
                              State.SKIPPED, State.NOT_RUN, State.AWAITING_APPROVAL, State.UNKNOWN, *_UNWIND}),
    State.FAILED: frozenset({State.QUEUED, State.RUNNING, State.FAILED, State.DEAD_LETTERED, State.UNKNOWN,
                             *_UNWIND}),
    State.DEAD_LETTERED: frozenset({State.QUEUED, *_UNWIND}),
    # QUEUED: a replay, or an effect verified or settled applied (the step runs again and its
    # ledger returns the recorded outcome); DEAD_LETTERED: an effect refuted or settled not applied.
    State.UNKNOWN: frozenset({State.QUEUED, State.DEAD_LETTERED, *_UNWIND}),
    State.HALTED: frozenset({State.QUEUED, *_UNWIND}),
    State.NOT_RUN: frozenset({State.QUEUED}),
    # A job only: back to halted or dead-lettered when nothing turned out to need undoing.
    State.COMPENSATING: frozenset({State.COMPENSATED, State.UNKNOWN, State.HALTED, State.DEAD_LETTERED,
                                   State.CANCELLED}),
    State.SUCCEEDED: frozenset(),
    State.SKIPPED: frozenset(),
    State.COMPENSATED: frozenset(),
    State.CANCELLED: frozenset(),
}

#: Job states of a job that began undoing its effects: no step of it is sent, run or replayed again.
UNWOUND = frozenset({State.COMPENSATING, State.COMPENSATED, State.CANCELLED})


def known(state: State) -> bool:
    """Whether this release knows ``state`` (a newer release's state is kept as it is, never moved)."""
    return state in ALLOWED


def newer_state(record: JobRecord, step: StepRecord | None) -> tuple[str, State] | None:
    """``("job" | "step", state)`` when a newer release moved the job, or ``step``, into a state this
    release does not know: that release owns it, and this one runs and replays nothing of it."""
    for what, state in (("job", record.state), ("step", step.state if step else None)):
        if state is not None and not known(state):
            return what, state
    return None


def moves(state: State) -> frozenset[State]:
    """The states ``state`` may move to: none for a state this release does not know."""
    return ALLOWED.get(state, frozenset())


_SCRUBBED_WHEN_ACTIVE = {"error": None, "failure_class": None, "result": None, "finished_at": None, "failed_at": None}


class Tolerant(Frozen):
    """A record model: frozen, and an unknown field (a newer release's) is kept and written back."""

    model_config = ConfigDict(frozen=True, extra="allow")

    def replaced(self, update: dict[str, Any]) -> Self:
        """``model_copy(update=update)`` (no validation; a name that is not a field goes with the
        unknown fields, as there), without its generic copying: a step's writes copy records several
        times each, and pydantic's ``model_copy`` was a measurable part of a step's CPU."""
        cls = type(self)
        fields = cls.__pydantic_fields__
        values = self.__dict__.copy()
        extra = self.__pydantic_extra__
        extra = None if extra is None else extra.copy()
        for name, value in update.items():
            if name in fields:
                values[name] = value
            else:
                if extra is None:
                    extra = {}
                extra[name] = value
        private = self.__pydantic_private__
        new = cls.__new__(cls)
        _set(new, "__dict__", values)
        _set(new, "__pydantic_extra__", extra)
        _set(new, "__pydantic_fields_set__", self.__pydantic_fields_set__ | update.keys())
        _set(new, "__pydantic_private__", None if private is None else
             {k: v for k, v in private.items() if v is not PydanticUndefined})
        return new


class Record(Tolerant):
    """What a job record and each of its steps hold. Stored without its null fields (``dumps`` leaves
    out a field whose value is None, in the records nested in it too, not in plain data such as an input
    or a result): every such field's default is None, so the record read back is the same, and a step
    not yet run is half the bytes (a 40-step pipeline's record, written at every step, a third fewer once
    ended)."""

    #: :func:`mesh.contracts.codec.dumps` leaves out the fields (the nested models' too) whose value is None.
    stored_without_nulls: ClassVar[bool] = True

    state: State = State.QUEUED
    error: str | None = None
    failure_class: str | None = None
    result: dict[str, Any] | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    failed_at: float | None = None
    #: Model tokens spent: a step's over its attempts, a job's over its steps (prompt in, completion out).
    tokens_in: int = Field(default=0, ge=0)
    tokens_out: int = Field(default=0, ge=0)


class GateCheck(Tolerant):
    """A pipeline step's gate as it was last evaluated: the expression, the values it read (by path,
    ``{"coder.confidence": 0.6}``; a missing one is None) and whether it held."""

    expr: str
    values: dict[str, Any] = Field(default_factory=dict)
    passed: bool


class StepRecord(Record):
    step_id: str
    agent: str
    key: str
    input: dict[str, Any] = Field(default_factory=dict)
    attempt: int = 0
    picked_up: int = Field(default=0, description="how many attempts have picked this step up")
    token: int = Field(default=0, description="fencing token of the claim the current attempt holds")
    sent_at: float | None = Field(default=None, description="when its message was enqueued; None: not yet")
    #: A pipeline step's gate evaluation (None: it has no gate, or it was not evaluated yet).
    gate: GateCheck | None = None
    #: An item of a ``for_each`` step: that step's id (the item's own id is ``<step>[<index>]``,
    #: or what the step's ``item_id`` gave).
    parent: str | None = None
    #: An item's position in its ``for_each`` list (None: a record written before it was kept).
    index: int | None = None
    #: A ``for_each`` step that fanned out: how many of its items must succeed (its join).
    need: int | None = None
    #: A step that waits (or waited) for a human's approval: the call asked for and its decision.
    approval: Approval | None = None
    #: A step that waits (or waited) durably (``sleep:``, ``wait_for:``): for what, until when, how it ended.
    wait: Wait | None = None
    #: A compensation (its id ``undo:<step>``): the step, or ``for_each`` item, whose effect it undoes.
    compensates: str | None = None
    #: What undoes the calls the step made of tools declared with ``compensate=`` (``{"tool", "args"}``,
    #: in call order); None: it made none.
    undo_calls: list[dict[str, Any]] | None = None
    #: What the step's effectful tool calls came to (:func:`mesh.contracts.effects.summary`):
    #: ``verified``, or ``unverified`` (done by the tool's own word), ...; None: it made none.
    effect: Verdict | None = None
    #: An operator's decision on its unknown effect (``mesh settle``): who, when, why.
    settlement: Settlement | None = None


#: How a compensation's step id begins: ``undo:<step id>`` (no step or item id contains ``:``).
UNDO = "undo:"


def undo_id(step_id: str) -> str:
    """The id of the compensation of step (or item) ``step_id``."""
    return f"{UNDO}{step_id}"


def is_compensation(step_id: str) -> bool:
    return step_id.startswith(UNDO)


#: The payload field of a compensation that undoes a step's tool calls (tools declared with
#: ``compensate=``): ``[{"tool", "args"}, ...]``, last call first; run by the step's own agent's worker.
UNDO_CALLS = "mesh_undo_calls"


class Unwind(Tolerant):
    """Why a job undoes its effects: ``cause`` is ``halted`` (a false gate, a denial), ``failed`` (a
    step dead-lettered under ``on_false: halt_pipeline``, a join not met) or ``cancelled``
    (``mesh cancel``); ``reason`` says which step and why, or the operator's reason."""

    cause: str
    reason: str
    at: float = Field(default_factory=time.time)


class JobRecord(Record):
    job_id: str
    key: str
    trace_id: str
    goal: str | None = None
    steps: dict[str, StepRecord] = Field(default_factory=dict)
    #: What the client's key was first sent with (agent and payload, hashed): a re-send of the key
    #: with another payload is refused (KeyConflict). None: a record written before it was kept.
    payload_hash: str | None = None
    #: A declared pipeline's run: its name, the digest of the spec it started with (kept for its
    #: whole life: a newer registration does not change a running job) and the run's input.
    pipeline: str | None = None
    pipeline_digest: str | None = None
    pipeline_input: dict[str, Any] | None = None
    #: Set once the job began undoing its effects (or was cancelled): why. Never cleared; a step of
    #: such a job is never sent, run or replayed again (start a new run: ``mesh rerun``).
    unwind: Unwind | None = None
    #: A rerun (``mesh rerun JOB --from STEP``): the job it reran and the step it reran from; the old
    #: job lists its reruns' ids in ``reruns``.
    rerun_of: str | None = None
    rerun_from: str | None = None
    reruns: list[str] = Field(default_factory=list)
    #: An ended job's trace events, moved out of its stream when the job was compacted (the layout of
    #: :func:`mesh.broker.compact.summarise`; read back by :func:`mesh.broker.trace.read`). None: not
    #: compacted.
    history: dict[str, Any] | None = None
    #: The priority the job was sent with: its steps' messages carry it unless a pipeline step
    #: declares its own.
    priority: Priority = "normal"

    def with_step(self, step: StepRecord) -> JobRecord:
        return self.replaced({"steps": {**self.steps, step.step_id: step}})

    @overload
    def output(self, step: AgentRef[Any, Out], model: None = None) -> Out: ...
    @overload
    def output(self, step: str | AgentRef[Any, Any], model: type[M]) -> M: ...
    @overload
    def output(self, step: str, model: None = None) -> dict[str, Any]: ...

    def output(self, step: str | AgentRef[Any, Any], model: type[BaseModel] | None = None) -> Any:
        """The output of a succeeded step: ``record.output(classify)`` (a declared agent: its step,
        as its output model) or ``record.output("notify", Sent)`` (a step id: as ``model``, or the
        stored dict without one). A pipeline step runs an agent under its own id: an agent names
        the step of that id, else the one step that runs it. NoOutput (with the step's state and
        error) when the step did not succeed; LookupError when the job has no such step."""
        found = self.steps[self._step_id(step)]
        if found.state is not State.SUCCEEDED or found.result is None:
            raise NoOutput(self.job_id, str(found.state), found.error, step_id=found.step_id)
        model = model or (step.output if isinstance(step, AgentRef) else None)
        return found.result if model is None else model.model_validate(found.result)

    def _step_id(self, step: str | AgentRef[Any, Any]) -> str:
        name = step if isinstance(step, str) else step.name
        if name in self.steps:
            return name
        running = [] if isinstance(step, str) else [
            s.step_id for s in self.steps.values() if s.agent == name and s.parent is None and s.compensates is None]
        if len(running) == 1:
            return running[0]
        what = f"steps running agent {name!r} ({', '.join(running)}); name one by its id" if running \
            else f"step {name!r}; its steps are {', '.join(self.steps) or 'none'}"
        raise LookupError(f"job {self.job_id} has {'several' if running else 'no'} {what}")


R = TypeVar("R", bound=Record)


def add_tokens(record: R, tokens_in: int, tokens_out: int) -> R:
    """``record`` with an attempt's model tokens added to what it already counts."""
    if not (tokens_in or tokens_out):
        return record
    return record.replaced({"tokens_in": record.tokens_in + tokens_in, "tokens_out": record.tokens_out + tokens_out})


def transition(
    record: R,
    target: State,
    *,
    now: float | None = None,
    error: str | None = None,
    failure_class: str | None = None,
    result: dict[str, Any] | None = None,
    **fields: Any,
) -> R:
    """Move ``record`` to ``target``, scrubbing or stamping the fields that state implies."""
    if target not in moves(record.state):
        raise IllegalTransition(type(record).__name__, record.state, target)
    now = time.time() if now is None else now
    update: dict[str, Any] = {"state": target, "updated_at": now, **fields}
    if target in ACTIVE:
        update.update(_SCRUBBED_WHEN_ACTIVE)
        if target is State.RUNNING:
            update["started_at"] = now
    elif target is State.SUCCEEDED:
        update.update(result=result, error=None, failure_class=None, failed_at=None, finished_at=now)
    else:
        update.update(error=error, failure_class=failure_class, result=None, failed_at=now)
        if target in TERMINAL:
            update["finished_at"] = now
    return record.replaced(update)


#: Step states that end a step without its output: a replay may bring it back.
LOST = frozenset({State.DEAD_LETTERED, State.UNKNOWN})
#: The step states of a job that :func:`job_state` calls succeeded (a lost one, once it does not block).
#: A scan over a record's steps compares with sets and members read once, not with ``State.X`` per
#: step: on Python 3.11 each ``State.X`` goes through ``EnumType.__getattr__``'s slot (several times a
#: plain attribute's cost), and those reads were a fifth of a 40-step pipeline's step-write Python.
_SETTLED = frozenset({State.SUCCEEDED, State.SKIPPED}) | LOST


def items_of(record: JobRecord, step_id: str) -> list[StepRecord]:
    """The items of ``for_each`` step ``step_id``, in index order."""
    found = [s for s in record.steps.values() if s.parent == step_id]
    return sorted(found, key=lambda s: s.index if s.index is not None
                  else int(s.step_id.rsplit("[", 1)[1].rstrip("]")))


def blocking(record: JobRecord, step: StepRecord) -> bool:
    """Whether a dead-lettered (or unknown) step holds its job: always, unless it is an item of a
    ``for_each`` step whose join is resolved or can still be met by the other items."""
    if step.parent is None:
        return True
    parent = record.steps.get(step.parent)
    if parent is None or parent.need is None:
        return True
    if parent.state in (State.SUCCEEDED, State.SKIPPED):
        return False
    items = items_of(record, step.parent)
    return len(items) - sum(s.state in LOST or s.state is State.SKIPPED for s in items) < parent.need


def compensations(record: JobRecord) -> list[StepRecord]:
    """The job's compensations (``undo:<step>`` records), in the order they were recorded."""
    return [s for s in record.steps.values() if s.compensates is not None]


def unwound_state(record: JobRecord) -> State | None:
    """The state of a job that began undoing its effects (``record.unwind``): unknown once a
    compensation failed for good; compensating while one is still to run (or waits for its step to
    end); compensated when they all ended and one undid something; cancelled when a cancelled job
    had nothing to undo. None: a halt with nothing to undo, whose state its steps give as before."""
    assert record.unwind is not None
    comps = compensations(record)
    if any(c.state in LOST for c in comps):
        return State.UNKNOWN
    if any(c.state not in (State.SUCCEEDED, State.SKIPPED) for c in comps):
        return State.COMPENSATING
    if any(c.state is State.SUCCEEDED for c in comps):
        return State.COMPENSATED
    return State.CANCELLED if record.unwind.cause == "cancelled" else None


def job_state(record: JobRecord) -> State:
    """The job's state as a function of its steps: once it undoes its effects, :func:`unwound_state`;
    else halted if one halted; dead-lettered while any blocking step is (then unknown while one is);
    succeeded when every step succeeded, was skipped, or is a non-blocking lost item;
    awaiting_approval when a step waits for a person and none is in flight (waiting when a step waits
    for a timer or an event instead); otherwise active (the
    record's own queued or running)."""
    if not moves(record.state):  # a succeeded job stays so, and a newer release's state too
        return record.state
    if record.unwind is not None and (undone := unwound_state(record)) is not None:
        return undone
    steps = [s for s in record.steps.values() if s.compensates is None]
    # The members the scans below compare each step with are read once (see _SETTLED): a pipeline's
    # record is scanned at every step's write.
    halted = State.HALTED
    if any(s.state is halted for s in steps):
        return halted
    lost = [s.state for s in steps if s.state in LOST and blocking(record, s)]
    if State.DEAD_LETTERED in lost:
        return State.DEAD_LETTERED
    if lost:
        return State.UNKNOWN
    if steps and all(s.state in _SETTLED for s in steps):
        return State.SUCCEEDED
    parked = {s.state for s in steps} & {State.AWAITING_APPROVAL, State.WAITING}
    if parked and not any(_in_flight(s) for s in steps):
        # nothing moves until a person decides (first), or a timer or an event ends a wait
        return State.AWAITING_APPROVAL if State.AWAITING_APPROVAL in parked else State.WAITING
    if record.state in (State.AWAITING_APPROVAL, State.WAITING):
        return State.QUEUED  # a decision or a wait's end sent a step: queued until it is picked up
    if record.state in (State.QUEUED, State.RUNNING, State.FAILED):
        return record.state
    return State.QUEUED if State.QUEUED in moves(record.state) else State.RUNNING


def _in_flight(step: StepRecord) -> bool:
    """Whether a step is being worked on: running, waiting for its retry, or sent and not picked up."""
    return step.state in (State.RUNNING, State.FAILED) or (step.state is State.QUEUED and step.sent_at is not None)


def settle(record: JobRecord, now: float, result: dict[str, Any] | None = None) -> JobRecord:
    """``record`` moved to :func:`job_state`, through ``queued`` (and ``running``) when the lifecycle
    allows no direct move (a dead-lettered job that succeeds after a replay). ``result``: the job's
    result when it succeeds (default: each succeeded step's output, by step id)."""
    target = job_state(record)
    if record.state is target:
        if target in (State.DEAD_LETTERED, State.UNKNOWN):
            # Still failed, but maybe for another step now (one was replayed and succeeded): the
            # job's error names a step that still blocks it, never a resolved one.
            error, failure_class = _why(record, target)
            if record.error != error:
                return record.replaced({"error": error, "failure_class": failure_class, "updated_at": now})
        return record
    if target not in moves(record.state):
        if record.state is not State.QUEUED:
            record = transition(record, State.QUEUED, now=now)
        if target is not State.QUEUED and target not in moves(record.state):
            record = transition(record, State.RUNNING, now=now)
    if record.state is target:
        return record
    if target is State.SUCCEEDED:
        if result is None:
            result = {sid: s.result for sid, s in record.steps.items() if s.state is State.SUCCEEDED}
        if record.state is State.QUEUED:  # every step skipped: nothing ran
            record = transition(record, State.RUNNING, now=now)
        return transition(record, target, now=now, result=result)
    if target in (State.DEAD_LETTERED, State.UNKNOWN, State.HALTED, State.COMPENSATING, State.COMPENSATED,
                  State.CANCELLED):
        error, failure_class = _why(record, target)
        return transition(record, target, now=now, error=error, failure_class=failure_class)
    return transition(record, target, now=now)


#: A job's failure class once a compensation of it failed for good.
COMPENSATION_FAILED = "compensation_failed"


def _why(record: JobRecord, state: State) -> tuple[str, str | None]:
    """The job's error and class in ``state``: a job undoing its effects says why it does (its cause:
    ``halted``, ``failed``, ``cancelled``), or which compensation failed; any other, the step that
    blocks it (:func:`_blocked_by`)."""
    if record.unwind is not None:
        failed = [c for c in compensations(record) if c.state in LOST]
        if failed:
            return f"compensation {failed[0].step_id} failed: {failed[0].error}", COMPENSATION_FAILED
        if state in (State.COMPENSATING, State.COMPENSATED, State.CANCELLED):
            return record.unwind.reason, record.unwind.cause
    return _blocked_by(record, state)


def _blocked_by(record: JobRecord, state: State) -> tuple[str, str | None]:
    """The error and class of the first step in ``state`` that blocks the job; a step that failed on
    its own before a ``for_each`` step whose join failed, and that step (its error names the rule
    that failed) before its items. A failed join's job takes the class of its first failed item:
    the cause an operator filters on (the ``for_each`` step itself keeps ``join``)."""
    found = [s for s in record.steps.values() if s.state is state and s.compensates is None and blocking(record, s)]
    if not found:
        return record.error or str(state), record.failure_class
    joins = {s.step_id for s in found if s.failure_class == "join"}
    own = [s for s in found if s.failure_class != "join" and s.parent not in joins]
    step = own[0] if own else next((s for s in found if s.step_id in joins), found[0])
    return f"step {step.step_id}: {step.error}", _cause(record, step)


def _cause(record: JobRecord, step: StepRecord) -> str | None:
    """``step``'s failure class, or for a failed join the class of its first failed item."""
    if step.failure_class != "join":
        return step.failure_class
    items = sorted((s for s in record.steps.values() if s.parent == step.step_id and s.failure_class
                    and s.state in (State.DEAD_LETTERED, State.UNKNOWN)), key=lambda s: s.index or 0)
    return items[0].failure_class if items else step.failure_class
