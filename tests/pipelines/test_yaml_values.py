"""An expression is CEL text; YAML reads an unquoted ``true``, ``3``, ``null`` or ``2024-01-01`` as
a boolean, a number, null or a date. Such a value in ``input:`` (or a gate) is refused at its line
saying what YAML read and how to write what was meant; a dotted ``input:`` field deeper than a
file may nest is refused at its line too."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest
from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.pipelines import PipelineError, load_pipeline
from tests.pipelines.agents import app


class Tree(BaseModel):
    """A model inside itself: a dotted input field may name it however deep."""

    name: str = ""
    child: Tree | None = None


trees = App("trees")


@trees.agent
def grow(ctx: Context, tree: Tree) -> Tree:
    return tree

FLOW = """
name: flow
steps:
  - id: researcher
    gate: {gate}
  - id: coder
    depends_on: [researcher]
    input:
      diff: {value}
"""


@pytest.mark.parametrize(("gate", "value", "says"), [
    ("researcher.confidence > 0.5", "true", "steps[1].input.diff: an expression is CEL text, but YAML read true as "
                                            "a bool: quote it ('true')"),
    ("researcher.confidence > 0.5", "3", "steps[1].input.diff: an expression is CEL text, but YAML read 3 as an int: "
                                         "quote it ('3')"),
    ("researcher.confidence > 0.5", "2024-01-01", "steps[1].input.diff: an expression is CEL text, but YAML read "
     "2024-01-01 as a date (in CEL, 2024-01-01 would be a subtraction): write '\"2024-01-01\"' for the string, "
     "quoted for YAML and for CEL"),
    ("researcher.confidence > 0.5", "null", "steps[1].input.diff: an expression is CEL text, but YAML read this one "
                                            "as null: leave the key out, or write 'null' quoted"),
    ("researcher.confidence > 0.5", "2024-01-01 10:00:00", "steps[1].input.diff: an expression is CEL text, but "
     "YAML read 2024-01-01 10:00:00 as a timestamp: write '\"2024-01-01 10:00:00\"' for the string, quoted for "
     "YAML and for CEL"),
    ("true", "researcher.summary", "steps[0].gate: a condition is CEL text, but YAML read true as a bool: quote it "
                                   "('true')"),
])
def test_a_yaml_value_that_is_no_text_is_refused_saying_what_yaml_read(tmp_path: Path, gate: str, value: str,
                                                                       says: str) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(dedent(FLOW).lstrip().format(gate=gate, value=value))
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, app)
    line = 4 if gate == "true" else 8
    assert [str(e) for e in caught.value.errors] == [f"{path}:{line}: {says}"]


def test_a_dotted_input_field_deeper_than_a_file_may_nest_is_a_load_error_at_its_line(tmp_path: Path) -> None:
    deep = ".".join(["child"] * 3000) + ".name"
    path = tmp_path / "flow.yaml"
    path.write_text(f"name: flow\nsteps:\n  - id: grow\n    input:\n      ? {deep}\n      : '\"x\"'\n")
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, trees)
    assert [str(e) for e in caught.value.errors] == [
        f"{path}:4: steps[0].input: input field(s) 'child.child.child.child.child.child.chil...' nest(s) deeper "
        "than the 32 names a dotted field may have"]
    shallow = ".".join(["child"] * 31) + ".name"
    path.write_text(f"name: flow\nsteps:\n  - id: grow\n    input:\n      {shallow}: '\"x\"'\n")
    assert load_pipeline(path, trees).step("grow").input
