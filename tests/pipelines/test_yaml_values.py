"""An expression is CEL text; YAML reads an unquoted ``true``, ``3``, ``null`` or ``2024-01-01`` as
a boolean, a number, null or a date. Such a value in ``input:`` (or a gate) is refused at its line
saying what YAML read and how to write what was meant."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from mesh.agents.pipelines import PipelineError, load_pipeline
from tests.pipelines.agents import app

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
