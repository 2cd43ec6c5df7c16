"""A macro's variable is bound inside its macro only: the same name outside it is a step read, and
the load-time check sees it (a step read that is not upstream would otherwise read that step's
output or fail, depending on timing)."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from mesh.agents.pipelines import PipelineError, compile_condition, load_pipeline
from tests.pipelines.agents import app


def test_a_macro_variable_named_like_a_step_hides_no_read_outside_its_macro() -> None:
    assert compile_condition("[1].map(b, 1) == [1] ? b : null").paths == (("b",),)
    assert compile_condition("[1].map(b, b.x) == [1] ? b.y : null").paths == (("b", "y"),)


def test_a_macro_variable_is_no_path_inside_its_macro() -> None:
    assert compile_condition("coder.diff.exists(c, c == 'x')").paths == (("coder", "diff"),)
    assert compile_condition("[1, 2].all(n, [3].exists(m, m > n))").paths == ()


def test_a_step_read_hidden_behind_a_macro_variable_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "hidden.yaml"
    path.write_text(dedent("""
        name: p
        agents:
          - id: researcher
          - id: coder
          - id: reviewer
            depends_on: [researcher]
            when: "[1].map(coder, 1) == [1] ? coder.confidence > 0.5 : false"
        """).lstrip())
    with pytest.raises(PipelineError, match=r"hidden.yaml:7: .* reads coder.confidence, but step 'coder' is "
                                            r"not upstream of 'reviewer'"):
        load_pipeline(path, app)
