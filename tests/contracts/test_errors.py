"""The one exception tree: every error is a MeshError with the class and terminality the table says."""

from __future__ import annotations

import re

import pytest

from mesh.contracts import errors
from mesh.contracts.errors import (
    BreakerOpen,
    Brownout,
    BudgetExceeded,
    ConfigError,
    ContractError,
    CycleDetected,
    DeadlineExceeded,
    DependencyTimeout,
    EffectRefuted,
    EffectUnknown,
    FailureClass,
    IllegalTransition,
    InvalidOutput,
    KeyConflict,
    LeaseLost,
    LimitExceeded,
    MeshError,
    NoOutput,
    OutcomeUnrecorded,
    PermanentFailure,
    PoisonMessage,
    RateLimited,
    ToolRefused,
    UnknownAgent,
)

# name -> (failure class, terminal). Classes come from the module docstring's table; a row
# without a class inherits its parent's. Terminal = dead-lettered at once: everything except
# the classes bounded retries may cure (rate_limited, brownout, invalid_output, unknown).
EXPECTED: dict[str, tuple[FailureClass, bool]] = {
    "MeshError": (FailureClass.UNKNOWN, False),
    "ConfigError": (FailureClass.PERMANENT, True),
    "ContractError": (FailureClass.INVALID_INPUT, True),
    "PoisonMessage": (FailureClass.INVALID_INPUT, True),
    "KeyConflict": (FailureClass.INVALID_INPUT, True),
    "LimitExceeded": (FailureClass.INVALID_INPUT, True),
    "InvalidOutput": (FailureClass.INVALID_OUTPUT, False),
    "RateLimited": (FailureClass.RATE_LIMITED, False),
    "DependencyTimeout": (FailureClass.TIMEOUT, True),
    "Brownout": (FailureClass.BROWNOUT, False),
    "PermanentFailure": (FailureClass.PERMANENT, True),
    "ToolRefused": (FailureClass.PERMANENT, True),
    "IllegalTransition": (FailureClass.PERMANENT, True),
    "EffectUnknown": (FailureClass.PERMANENT, True),
    "EffectRefuted": (FailureClass.PERMANENT, True),
    "DeadlineExceeded": (FailureClass.DEADLINE, True),
    "OutcomeUnrecorded": (FailureClass.MESH_UNAVAILABLE, False),
    "CycleDetected": (FailureClass.CYCLE, True),
    "BudgetExceeded": (FailureClass.BUDGET_EXCEEDED, True),
    "UnknownAgent": (FailureClass.PERMANENT, True),
    "LeaseLost": (FailureClass.UNKNOWN, False),
    "NoOutput": (FailureClass.PERMANENT, True),  # raised to a reader of a job's output, never routed
    "BreakerOpen": (FailureClass.BROWNOUT, False),  # not routed by class: the router acks it as superseded
}
RETRYABLE_CLASSES = {FailureClass.RATE_LIMITED, FailureClass.BROWNOUT, FailureClass.INVALID_OUTPUT,
                     FailureClass.UNKNOWN, FailureClass.MESH_UNAVAILABLE}

INSTANCES: dict[str, MeshError] = {
    "MeshError": MeshError("m"),
    "ConfigError": ConfigError("bad setting"),
    "ContractError": ContractError("bad", errors=[{"loc": ("a", "b")}]),
    "PoisonMessage": PoisonMessage("undecodable", raw=b"\x80"),
    "KeyConflict": KeyConflict("k-1", "job-1", "planner"),
    "LimitExceeded": LimitExceeded("too big", setting="MESH_MAX_MESSAGE_BYTES", limit=1024, size=2048),
    "InvalidOutput": InvalidOutput("bad output"),
    "RateLimited": RateLimited("slow down", retry_after_s=2.0),
    "DependencyTimeout": DependencyTimeout("slow"),
    "Brownout": Brownout("down", dependency="model"),
    "PermanentFailure": PermanentFailure("no"),
    "ToolRefused": ToolRefused("refused"),
    "IllegalTransition": IllegalTransition("StepRecord", "succeeded", "running"),
    "EffectUnknown": EffectUnknown("its effect is unknown", tool="http_post"),
    "EffectRefuted": EffectRefuted("its effect is refuted", tool="http_post"),
    "DeadlineExceeded": DeadlineExceeded("late"),
    "CycleDetected": CycleDetected("loop"),
    "BudgetExceeded": BudgetExceeded("job j1 used 120 of its 100 model tokens", used=120, budget=100),
    "UnknownAgent": UnknownAgent("poet", ["executor", "planner"]),
    "LeaseLost": LeaseLost("k-1", 3),
    "OutcomeUnrecorded": OutcomeUnrecorded("no record", {"ok": True}),
    "BreakerOpen": BreakerOpen("model:443", 2.5, "open"),
    "NoOutput": NoOutput("job-1", "dead_lettered", "boom", step_id="classify"),
}


def docstring_table() -> dict[str, FailureClass]:
    """Parse the tree in the module docstring; rows without a class inherit their parent's."""
    values = {c.value for c in FailureClass}
    table: dict[str, FailureClass] = {}
    parents: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^[\s│├└─]*(\w+)\s+(.*)$", line)
        if not match or not isinstance(getattr(errors, match.group(1), None), type):
            continue
        depth, name, rest = match.start(1), match.group(1), match.group(2).split()
        while parents and parents[-1][0] >= depth:
            parents.pop()
        if rest and rest[-1] in values:
            table[name] = FailureClass(rest[-1])
        elif parents:
            table[name] = table[parents[-1][1]]
        else:
            table[name] = MeshError.failure_class
        parents.append((depth, name))
    return table


def test_docstring_table_lists_every_error_with_the_expected_class() -> None:
    assert docstring_table() == {name: cls for name, (cls, _) in EXPECTED.items()}


def test_every_error_class_of_the_module_is_covered() -> None:
    defined = {name for name, obj in vars(errors).items()
               if isinstance(obj, type) and issubclass(obj, BaseException)}
    assert defined == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_error_subclasses_mesh_error(name: str) -> None:
    assert issubclass(getattr(errors, name), MeshError)
    assert isinstance(INSTANCES[name], MeshError)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_failure_class_and_terminal_match_table(name: str) -> None:
    failure_class, terminal = EXPECTED[name]
    exc = INSTANCES[name]
    assert exc.failure_class is failure_class
    assert exc.terminal is terminal
    assert type(exc).failure_class is failure_class


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_terminal_exactly_when_class_is_not_retryable(name: str) -> None:
    exc = INSTANCES[name]
    assert exc.terminal is (exc.failure_class not in RETRYABLE_CLASSES)


def test_subclass_structure_matches_tree() -> None:
    assert issubclass(PoisonMessage, ContractError)
    assert issubclass(KeyConflict, ContractError)
    assert issubclass(ToolRefused, PermanentFailure)
    assert issubclass(IllegalTransition, PermanentFailure)


def test_errors_carry_their_context() -> None:
    exc = MeshError("went wrong", job_id="j1", attempt=2)
    assert str(exc) == "went wrong"
    assert exc.context == {"job_id": "j1", "attempt": 2}
    assert INSTANCES["RateLimited"].retry_after_s == 2.0  # type: ignore[attr-defined]
    assert INSTANCES["Brownout"].dependency == "model"  # type: ignore[attr-defined]
    assert INSTANCES["PoisonMessage"].raw == b"\x80"  # type: ignore[attr-defined]
    assert INSTANCES["ContractError"].fields == ["a.b"]  # type: ignore[attr-defined]
    assert ContractError("x", errors=[{"loc": ()}]).fields == ["<root>"]
    unknown = INSTANCES["UnknownAgent"]
    assert unknown.agent == "poet"  # type: ignore[attr-defined]
    assert unknown.context == {"agent": "poet"}
    budget = INSTANCES["BudgetExceeded"]
    assert (budget.used, budget.budget) == (120, 100)  # type: ignore[attr-defined]
    assert budget.context == {"used": 120, "budget": 100}
    conflict = INSTANCES["KeyConflict"]
    assert (conflict.key, conflict.job_id) == ("k-1", "job-1")  # type: ignore[attr-defined]
    assert "k-1" in str(conflict) and "job-1" in str(conflict)
    illegal = INSTANCES["IllegalTransition"]
    assert str(illegal) == "StepRecord cannot move from succeeded to running"
