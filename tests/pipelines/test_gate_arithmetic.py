"""CEL converts no number to another: ``count + 1.5`` over an int field, or ``score * 2`` over a float
one, fails when the step is due. A gate or ``when`` doing such arithmetic on typed operands is a load
error at its line; the same over operands of one number type, or of a type not known, loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.pipelines import PipelineError, load_pipeline
from mesh.agents.pipelines.expr import Condition, ExpressionError

counts = App("counts")


class Counted(BaseModel):
    count: int
    score: float
    either: int | float = 0
    anything: object = None


@counts.agent
def tally(ctx: Context, c: Counted) -> Counted:
    return c


@counts.agent
def after(ctx: Context, c: Counted) -> Counted:
    return c


FLOW = "name: flow\nsteps:\n  - id: tally\n  - id: after\n    depends_on: [tally]\n    {field}: '{cond}'\n"


@pytest.mark.parametrize(("cond", "says"), [
    ("tally.count + 1.5 > 2.0", "computes tally.count (int) + 1.5 (double); CEL has no + between an int and a double"),
    ("tally.score * 2 > 1.0", "computes tally.score (float) * 2 (int); CEL has no * between a double and an int"),
    ("tally.count - tally.score < 0.0", "computes tally.count (int) - tally.score (float); CEL has no - between an "
                                        "int and a double"),
])
def test_arithmetic_between_an_int_and_a_double_is_a_load_error(tmp_path: Path, cond: str, says: str) -> None:
    values = {"tally": {"count": 1, "score": 1.0}}
    with pytest.raises(ExpressionError):  # what it does when the step is due
        Condition(cond).test(values)
    for field in ("gate", "when"):
        path = tmp_path / "flow.yaml"
        path.write_text(FLOW.format(field=field, cond=cond))
        with pytest.raises(PipelineError) as caught:
            load_pipeline(path, counts)
        [error] = caught.value.errors
        assert error.line == 6 and says in error.message and "convert one, e.g. double(...)" in error.message


@pytest.mark.parametrize("cond", ["tally.count + 1 > 2", "tally.score * 2.0 > 1.0", "double(tally.count) + 1.5 > 2.0",
                                  "tally.either + 1 > 0", "tally.anything + 1 > 0", "tally.count > 0.5"])
def test_arithmetic_of_one_number_type_or_an_unknown_one_loads(tmp_path: Path, cond: str) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW.format(field="gate", cond=cond))
    assert load_pipeline(path, counts).step("after").gate is not None
