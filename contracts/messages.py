"""One message family per agent: what each agent takes and what it gives back."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .envelope import Frozen
from .errors import ContractError, InvalidOutput, UnknownAgent
from .tools import TOOL_ARGS

M = TypeVar("M", bound=BaseModel)

StepId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


#: Step ids the mesh records jobs under itself: the planner's step and a direct send's one step.
RESERVED_STEP_IDS = frozenset({"plan", "planner", "researcher", "executor"})


class PlannerInput(Frozen):
    goal: str = Field(min_length=1, max_length=4000)


class ResearchStep(Frozen):
    kind: Literal["research"] = "research"
    step_id: StepId
    question: str = Field(min_length=1, max_length=2000)


class ActionStep(Frozen):
    kind: Literal["action"] = "action"
    step_id: StepId
    tool: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    use_findings: bool = Field(default=False, description="attach the research findings to args['findings']")


PlanStep = Annotated[ResearchStep | ActionStep, Field(discriminator="kind")]


class Plan(Frozen):
    """The planner's output: research steps fan out, then action steps run."""

    goal: str
    steps: tuple[PlanStep, ...] = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _unique_step_ids(self) -> Plan:
        ids = [s.step_id for s in self.steps]
        if len(ids) != len(set(ids)):
            raise ValueError("step ids must be unique")
        if RESERVED_STEP_IDS & set(ids):
            raise ValueError(f"step ids {sorted(RESERVED_STEP_IDS)} are reserved for the agents' own steps")
        return self

    @property
    def research(self) -> tuple[ResearchStep, ...]:
        return tuple(s for s in self.steps if isinstance(s, ResearchStep))

    @property
    def actions(self) -> tuple[ActionStep, ...]:
        return tuple(s for s in self.steps if isinstance(s, ActionStep))


class ResearchInput(Frozen):
    question: str = Field(min_length=1, max_length=2000)


class Finding(Frozen):
    text: str = Field(min_length=1)
    source: str = Field(min_length=1, description="where the text was found: a path#section or a URL")


class Findings(Frozen):
    """The researcher's output: what it found, each piece with its source."""

    question: str
    summary: str
    findings: tuple[Finding, ...] = ()


class ToolCall(Frozen):
    """The executor's input: ``{"tool": NAME, "args": {...}}``; ``args`` must fit the tool's own contract."""

    tool: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tool")
    @classmethod
    def _known_tool(cls, tool: str) -> str:
        if tool not in TOOL_ARGS:
            raise ValueError(f"unknown tool {tool!r}; tools are {', '.join(sorted(TOOL_ARGS))}")
        return tool

    def typed_args(self) -> Frozen:
        """``args`` validated against the tool's contract; errors are located under ``args``."""
        try:
            return TOOL_ARGS[self.tool].model_validate(self.args)
        except ValidationError as exc:
            errors = [{**e, "loc": ("args", *e["loc"])} for e in exc.errors(include_url=False, include_input=False)]
            raise ContractError(f"invalid {self.tool} args: {_describe(errors)}", errors=errors) from None


class Receipt(Frozen):
    """The executor's output: proof of the effect a tool applied."""

    tool: str
    effect_id: str = Field(description="identifies the effect; the same key always yields the same id")
    detail: dict[str, Any] = Field(default_factory=dict)


CONTRACTS: dict[str, tuple[type[Frozen], type[Frozen]]] = {
    "planner": (PlannerInput, Plan),
    "researcher": (ResearchInput, Findings),
    "executor": (ToolCall, Receipt),
}


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ())) or "<root>"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _contract(agent: str) -> tuple[type[Frozen], type[Frozen]]:
    try:
        return CONTRACTS[agent]
    except KeyError:
        raise UnknownAgent(agent, sorted(CONTRACTS)) from None


def validate_model(agent: str, model: type[M], payload: Any) -> M:
    """``payload`` as ``model``, the input of ``agent`` (any agent, declared by any app), or a
    ContractError naming every invalid field."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise ContractError(
            f"invalid {agent} input: {_describe(errors)}", errors=errors, agent=agent  # type: ignore[arg-type]
        ) from None


def validate_input(agent: str, payload: Any) -> Frozen:
    """The built-in agent's typed input, or a ContractError naming every invalid field."""
    typed = validate_model(agent, _contract(agent)[0], payload)
    if isinstance(typed, ToolCall):
        try:
            typed.typed_args()
        except ContractError as exc:
            raise ContractError(f"invalid {agent} input: {exc.message.split(': ', 1)[1]}",
                                errors=exc.errors, agent=agent) from None
    return typed


def validate_output_model(agent: str, model: type[M], payload: Any) -> M:
    """``payload`` as ``model``, the output of ``agent`` (any agent, declared by any app), or
    InvalidOutput naming every invalid field (retryable: a model may do better next time)."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise InvalidOutput(f"invalid {agent} output: {_describe(errors)}", errors=errors,  # type: ignore[arg-type]
                            agent=agent) from None


def validate_output(agent: str, payload: Any) -> Frozen:
    """The built-in agent's typed output, or InvalidOutput (retryable: a model may do better next time)."""
    return validate_output_model(agent, _contract(agent)[1], payload)
