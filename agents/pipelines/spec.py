"""The pipeline spec: ONE pydantic model that YAML files and the Python builder both produce.

It holds what a pipeline is (steps, their DAG, per-step policy, expressions) and checks what can be
checked on its own: types, unknown keys, expressions that compile, duplicate ids. What needs the app
(agents, output models, fields a gate reads) and the DAG as a whole is checked by
:func:`mesh.agents.pipelines.validate.problems`.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from enum import StrEnum
from typing import Any, Literal

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mesh.contracts.approvals import parse_duration
from mesh.contracts.envelope import Priority
from mesh.contracts.flow import FlowLimits
from mesh.contracts.waits import EVENT_NAME

from ..names import NAME, name_problem
from .expr import Condition, Expression, ItemIdTemplate, KeyTemplate, ListExpr

#: Most steps a pipeline may declare.
MAX_STEPS = 1000
#: Step ids are CEL identifiers (expressions read ``coder.confidence``): no ``-``; the rule of agent
#: names too (:mod:`mesh.agents.names`).
STEP_ID = NAME
#: An ``input:`` field: a name, or a dotted path into a map an earlier field gave.
INPUT_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: Most names in a dotted ``input:`` field: as deep as a pipeline file may nest.
MAX_INPUT_DEPTH = 32


def _input_fields(v: dict[str, Expression] | None, what: str, example: str) -> dict[str, Expression] | None:
    """``v`` (an ``input:`` map, a step's or a compensation's) when every field is a name, dotted for
    a field inside another; else ValueError naming the bad ones."""
    if v is not None:
        bad = [k for k in v if not INPUT_FIELD.match(k)]
        if bad:
            raise ValueError(f"{what} {', '.join(map(repr, bad))} must be names, dotted for a field inside "
                             f"another{example}")
        deep = [k for k in v if k.count(".") >= MAX_INPUT_DEPTH]
        if deep:
            raise ValueError(f"{what} {', '.join(repr(k[:40] + '...') for k in deep)} nest(s) deeper than the "
                             f"{MAX_INPUT_DEPTH} names a dotted field may have")
    return v
#: Names expressions read besides step ids: not usable as step ids. ``key`` is the key the job was
#: submitted with; ``task_id`` is its older name, kept for the files that spell it so.
JOB_NAMES = frozenset({"key", "task_id", "job_id", "input"})
RESERVED_IDS = JOB_NAMES | {"item", "true", "false", "null", "in", "as", "break", "const", "continue", "else",
                            "for", "function", "if", "import", "let", "loop", "package", "namespace", "return",
                            "var", "void", "while"}
#: Reserved since ``key`` names the job's key: a spec registered before (a job's, a registered version)
#: keeps a step of that name, whose output its expressions read as ``key`` (a step's output is read
#: over the job's names).
STORED_IDS = frozenset({"key"})
#: The validation context of a spec read back from Redis (:func:`engine.spec_from_json`).
STORED = {"stored": True}


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _one_of(data: Any, key: str, old: str, what: str) -> Any:
    """``data`` unless it gives both ``key`` and ``old`` (the older name of the same key)."""
    if isinstance(data, dict) and key in data and old in data:
        raise ValueError(f"give {what} as `{key}:` or by its older name `{old}:`, not both")
    return data


class Backoff(StrEnum):
    EXPONENTIAL = "exponential"
    FIXED = "fixed"
    NONE = "none"


class FailureMode(StrEnum):
    """What a false gate (or a failed step) does to the job."""

    HALT_PIPELINE = "halt_pipeline"
    CONTINUE = "continue"


class RetryPolicy(_Spec):
    """How often a step is tried. ``max_attempts`` counts ALL attempts, the first included:
    ``max_attempts: 3`` is one try and at most two retries (``1`` never retries). Backoff between
    attempts is always jittered; rate limits (429) defer without spending attempts."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    backoff: Backoff = Backoff.EXPONENTIAL


class Join(_Spec):
    """When a ``for_each`` fan-out counts as done for its dependents: ``min_success`` items
    succeeded — a count (``17``) or a fraction of the items (``0.8``)."""

    min_success: int | float

    @field_validator("min_success")
    @classmethod
    def _range(cls, v: int | float) -> int | float:
        if isinstance(v, bool):
            raise ValueError("min_success is a count or a fraction, not a boolean")
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"a fraction min_success must be in (0, 1]; got {v} (write a count as an integer)")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"a count min_success must be >= 0; got {v}")
        return v


class OnTimeout(StrEnum):
    """What an approval nobody decided in time does: ``deny`` applies the step's ``failure_mode``;
    ``escalate`` dead-letters the step ``approval_expired`` (a replay asks again)."""

    DENY = "deny"
    ESCALATE = "escalate"


class ApprovalPolicy(_Spec):
    """A step parked for a human's approval before its agent runs (``requires_human_approval: true``
    is this with its defaults). Durations are written ``30s``, ``10m``, ``24h``."""

    timeout: str = "24h"
    on_timeout: OnTimeout = OnTimeout.DENY
    #: Who may decide: advisory on the CLI, enforced where the decider is authenticated.
    approvers: tuple[str, ...] = ()
    #: A warning event (and metric) this long before the timeout; none when unset.
    warn_before: str | None = None

    @field_validator("timeout", "warn_before")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    @model_validator(mode="after")
    def _warn_within(self) -> ApprovalPolicy:
        if self.warn_before is not None and parse_duration(self.warn_before) >= self.timeout_s:
            raise ValueError(f"approval warn_before {self.warn_before} is not shorter than its timeout {self.timeout}")
        return self

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout)

    @property
    def warn_before_s(self) -> float | None:
        return None if self.warn_before is None else parse_duration(self.warn_before)

class WaitTimeout(StrEnum):
    """What a ``wait_for`` whose timeout comes before its event does: ``fail`` dead-letters the step
    (failure class ``wait_timeout``, its error says what it waited for); ``continue`` ends it
    succeeded with ``{"timed_out": true}`` as its output, for the next steps to test
    (``when: "!has(pay.timed_out)"``)."""

    FAIL = "fail"
    CONTINUE = "continue"


class WaitFor(_Spec):
    """A step that waits durably for an event (``mesh signal JOB EVENT``, ``mesh emit EVENT``):
    ``match`` is a CEL condition over ``event`` (the event's data), the run's ``input`` and the
    upstream steps' outputs, checked for an emitted event (a signal names its job, so it is not
    checked). The step's output is the event's data."""

    event: str = Field(pattern=EVENT_NAME)
    match: Condition | None = None
    timeout: str = "24h"
    on_timeout: WaitTimeout = WaitTimeout.FAIL

    @field_validator("timeout")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout)


#: What a step that waits (``sleep:``, ``wait_for:``) may have besides: it runs no agent.
WAIT_KEYS = frozenset({"id", "depends_on", "when", "gate", "on_false", "sleep", "wait_for"})


class Compensation(_Spec):
    """What undoes a step's effect when its job halts or is cancelled after the step succeeded: the
    declared agent to run (or the declared tool to call) and its input, field → CEL expression over
    ``input`` (the step's input; an item's, for a ``for_each`` step), ``output`` (its output),
    ``key`` (``task_id``) and ``job_id`` (default: ``{"input": ..., "output": ...}`` for an agent, the step's
    output for a tool). Its message key derives from the step's key, so it is idempotent; its own
    ``retry_policy`` applies before it is dead-lettered ``compensation_failed``."""

    #: The declared agent that undoes the step; or ``tool``: a declared tool, called by the step's own
    #: agent's worker with ``input`` as its args (default: the step's output). One of the two.
    agent: str | None = None
    tool: str | None = None
    input: dict[str, Expression] | None = None
    retry_policy: RetryPolicy | None = None
    timeout_ms: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> Compensation:
        if (self.agent is None) == (self.tool is None):
            raise ValueError("compensate names an agent or a tool: give exactly one of agent: and tool:")
        return self

    @field_validator("input")
    @classmethod
    def _fields(cls, v: dict[str, Expression] | None) -> dict[str, Expression] | None:
        return _input_fields(v, "compensate input field(s)", "")


class StepSpec(_Spec):
    """One step: which declared agent runs, when, with which policy and contract."""

    id: str
    #: The declared agent that runs the step; default: the step's id.
    agent: str | None = None
    #: Passed to the provider (the model the agent's calls use); default: the worker's.
    model: str | None = None
    #: The step's time limit (ms), always cut to the job's deadline; default: the agent's.
    timeout_ms: int | None = Field(default=None, gt=0)
    retry_policy: RetryPolicy | None = None
    #: What a false ``gate`` (per item for a ``for_each`` step), a denied or timed-out approval and an
    #: unmet ``join`` do: halt the job, or skip the step and go on. ``failure_mode`` is its older name.
    on_false: FailureMode = Field(default=FailureMode.HALT_PIPELINE,
                                  validation_alias=AliasChoices("on_false", "failure_mode"))
    #: A declared output contract (the snake_case name of a model the app's agents declare).
    output_schema: str | None = None
    depends_on: tuple[str, ...] = ()
    #: A re-run under the same key is harmless: a timed-out attempt may be retried.
    idempotent: bool = False
    #: The step's messages' priority in its agent's queue (high, normal, low); default: the job's
    #: (``priority=`` of the run, normal by default).
    priority: Priority | None = None
    idempotency_key: KeyTemplate | None = None
    #: Which upstream output (step id or output_schema name) is the input; default: the dependencies'.
    state_input: str | None = None
    #: Checked before the step runs; false → ``on_false`` decides (halt, or skip and go on).
    gate: Condition | None = None
    #: Checked before the step runs; false → the step is ``skipped`` (no failure mode applies).
    when: Condition | None = None
    #: Parked in ``awaiting_approval`` before its agent runs (``approval`` gives the policy; this
    #: alone takes the policy's defaults).
    requires_human_approval: bool = False
    approval: ApprovalPolicy | None = None
    #: A CEL expression giving a list (a path to a list in an upstream output, or e.g. a ``filter``
    #: of one): one message per item (``item`` in expressions).
    for_each: ListExpr | None = None
    max_parallel: int | None = Field(default=None, ge=1)
    join: Join | None = None
    #: A ``for_each`` item's id, a template over ``item`` (default: ``<step>[<index>]``).
    item_id: ItemIdTemplate | None = None
    #: The step's input built field by field: field → CEL expression over the job, the upstream
    #: outputs and ``item``. A dotted field (``args.findings``) is set inside the map an earlier,
    #: shorter field gave (made if absent); a field whose expression gives null is left out.
    input: dict[str, Expression] | None = None
    #: What undoes the step's effect if its job halts or is cancelled after it succeeded (a saga).
    compensate: Compensation | None = None
    #: A step that runs no agent and waits this long (``10m``), holding no worker; its output is
    #: ``{"slept_s": seconds}``.
    sleep: str | None = None
    #: A step that runs no agent and waits for an event (:class:`WaitFor`); its output is the event's data.
    wait_for: WaitFor | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_on_false(cls, data: Any) -> Any:
        return _one_of(data, "on_false", "failure_mode", "what a false gate does")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str, info: ValidationInfo) -> str:
        problem = name_problem("step id", v)
        if problem:
            raise ValueError(problem)
        if v in RESERVED_IDS and not (v in STORED_IDS and (info.context or {}).get("stored")):
            raise ValueError(f"step id {v!r} is reserved (expressions read it as {v!r} of the job or CEL)")
        return v

    @field_validator("depends_on")
    @classmethod
    def _deps(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        twice = sorted({d for d in v if v.count(d) > 1})
        if twice:
            raise ValueError(f"depends_on names {', '.join(twice)} twice")
        return v

    @field_validator("sleep")
    @classmethod
    def _sleep(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    @model_validator(mode="after")
    def _defaults(self) -> StepSpec:
        if self.sleep is not None or self.wait_for is not None:
            return self._waits()
        if self.agent is None:
            object.__setattr__(self, "agent", self.id)
        if self.approval is not None:
            object.__setattr__(self, "requires_human_approval", True)
        if self.for_each is None and (self.max_parallel is not None or self.join is not None):
            raise ValueError("max_parallel and join apply to a for_each step only")
        if self.for_each is None and self.item_id is not None:
            raise ValueError("item_id applies to a for_each step only")
        if self.item_id is not None and not any(p[0] == "item" for p in self.item_id.paths):
            raise ValueError(f"item_id {self.item_id.source!r} reads no item field: every item would get the "
                             "same id")
        if self.input is not None and self.state_input is not None:
            raise ValueError("give the step's input as state_input or as input, not both")
        return self

    def _waits(self) -> StepSpec:
        """A waiting step: ``sleep`` or ``wait_for``, with none of an agent step's keys."""
        if self.sleep is not None and self.wait_for is not None:
            raise ValueError("give a step sleep: or wait_for:, not both")
        kind = "sleep" if self.sleep is not None else "wait_for"
        given = {k for k, f in type(self).model_fields.items()
                 if k not in WAIT_KEYS and getattr(self, k) != f.get_default(call_default_factory=True)}
        if given:
            raise ValueError(f"a {kind} step runs no agent: {', '.join(sorted(given))} do(es) not apply to it "
                             f"(it takes {', '.join(sorted(WAIT_KEYS - {'id'}))})")
        return self

    @property
    def waits(self) -> bool:
        """Whether the step waits (``sleep:``, ``wait_for:``) instead of running an agent."""
        return self.sleep is not None or self.wait_for is not None

    @property
    def sleep_s(self) -> float | None:
        return None if self.sleep is None else parse_duration(self.sleep)

    @field_validator("input")
    @classmethod
    def _fields(cls, v: dict[str, Expression] | None) -> dict[str, Expression] | None:
        return _input_fields(v, "input field(s)", " (args.findings)")

    @property
    def failure_mode(self) -> FailureMode:
        """:attr:`on_false` by its older name."""
        return self.on_false

    @property
    def agent_name(self) -> str:
        return self.agent or self.id

    @property
    def approval_policy(self) -> ApprovalPolicy | None:
        """The approval the step waits for (its defaults for ``requires_human_approval: true``); None: none."""
        if self.approval is not None:
            return self.approval
        return ApprovalPolicy() if self.requires_human_approval else None


class TracingSpec(_Spec):
    """What the job's trace keeps. Without ``log_inputs`` / ``log_outputs`` a step's input and output
    are kept as size and hash only. ``provider`` names an exporter (e.g. ``langfuse``): with
    MESH_OTLP_ENDPOINT and the ``otlp`` extra, step spans are exported over OTLP (:mod:`.export`);
    otherwise it is accepted and nothing is exported. The trace stays in Redis (``mesh trace``)."""

    enabled: bool = True
    provider: str | None = None
    log_inputs: bool = False
    log_outputs: bool = False


class CheckpointingSpec(_Spec):
    """Completed steps' outputs kept with the job, so it resumes from the last completed step.
    ``ttl_minutes`` bounds how long a finished job's checkpoints stay (never below its longest wait);
    default: the job retention (MESH_JOB_RETENTION_S)."""

    enabled: bool = True
    store: Literal["redis"] = "redis"
    ttl_minutes: int | None = Field(default=None, gt=0)


class LimitsSpec(_Spec):
    """A pipeline file's ``limits:``: fleet-wide rate and concurrency limits of the agents its steps
    name and of dependencies their tools reach, the same limits ``@app.agent(rate=...)`` and
    ``app.dependency(...)`` declare (docs/guides/limits.md)."""

    agents: dict[str, FlowLimits] = {}
    dependencies: dict[str, FlowLimits] = {}


class PipelineSpec(_Spec):
    """A pipeline: a DAG of steps over declared agents. Built from YAML (``steps:``, or ``agents:``,
    its older name) or in Python; :meth:`digest` identifies a version by content."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    version: str = "1"
    description: str = ""
    steps: tuple[StepSpec, ...] = Field(validation_alias=AliasChoices("steps", "agents"))
    tracing: TracingSpec = TracingSpec()
    checkpointing: CheckpointingSpec = CheckpointingSpec()
    #: The steps whose outputs make the job's result, by step id (a ``for_each`` step's: each
    #: succeeded item's output, by item id); default: every step's output.
    result: tuple[str, ...] | None = None
    #: The run's input contract (the snake_case name of a model the app's agents declare): paths
    #: under ``input.`` are checked against it at load, and a run's input is checked before it starts.
    input_schema: str | None = None
    #: Limits of the agents its steps name and of their dependencies: the app's once registered.
    limits: LimitsSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_list(cls, data: Any) -> Any:
        return _one_of(data, "steps", "agents", "the steps")

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        # `version: 2` or `version: 1.5` in YAML are numbers; a version is text.
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @field_validator("steps")
    @classmethod
    def _unique(cls, v: tuple[StepSpec, ...]) -> tuple[StepSpec, ...]:
        if not v:
            raise ValueError("a pipeline needs at least one step")
        if len(v) > MAX_STEPS:
            raise ValueError(f"{len(v)} steps, over the {MAX_STEPS} a pipeline may have")
        twice = sorted(i for i, n in Counter(s.id for s in v).items() if n > 1)
        if twice:
            raise ValueError(f"step id(s) {', '.join(twice)} declared twice")
        return v

    def step(self, step_id: str) -> StepSpec:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def canonical(self) -> bytes:
        """The spec as canonical JSON (sorted keys, every field): what :meth:`digest` hashes."""
        data = self.model_dump(mode="json")
        if data.get("input_schema", ...) is None:  # nor does a spec without an input_schema
            del data["input_schema"]
        if data.get("limits", ...) is None:  # nor one without limits
            del data["limits"]
        for step in data["steps"]:
            for key in ("approval", "sleep", "wait_for", "priority"):
                if step.get(key, ...) is None:  # a spec without one keeps the digest it always had
                    del step[key]
            # Stored under the name it was first stored by: a spec keeps its digest, and a worker that
            # knows only that name still reads what a newer client registered.
            step["failure_mode"] = step.pop("on_false")
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


    def start(self, record: Any, *, trace_id: str, deadline: float, token_budget: int | None,
              queue: Any, version: Any, now: float, max_fan_out: int | None = None, settings: Any = None,
              flow_key: Any = None) -> Any:
        """A new run's record, messages and trace events (:func:`engine.begin`): what the client writes
        at once (one script call). The client calls this on the spec it is given, so the broker layer needs
        no import of the engine. ``settings`` (MeshSettings) bound what the engine builds and how
        expressions run."""
        from . import engine

        routes = engine.Routes(queue=queue, version=version, max_fan_out=max_fan_out,
                               **({} if flow_key is None else {"flow_key": flow_key}))
        if settings is not None:
            routes = engine.Routes.from_settings(settings, queue=queue, version=version, flow_key=flow_key)
        return engine.begin(self, record, engine.Run(trace_id=trace_id, deadline=deadline, token_budget=token_budget),
                            routes, now=now)
    def check_input(self, input: Any, app: Any) -> None:
        """ContractError naming each field of ``input`` (a run's input) that does not fit the model
        ``input_schema`` names in ``app`` (nothing to check without one)."""
        from mesh.contracts.messages import validate_model

        from .validate import input_model

        model = input_model(self, app)
        if model is not None:
            validate_model(f"pipeline {self.name!r}", model, input)

    def digest(self) -> str:
        """sha256 (hex) of :meth:`canonical`: the version a job keeps; equal specs, equal digests."""
        return hashlib.sha256(self.canonical()).hexdigest()
