"""The expression language: CEL compiled once, ``{{ path }}`` as sugar, key templates, no eval."""

from __future__ import annotations

import pytest

from mesh.agents.pipelines import ExpressionError, compile_condition, compile_template
from mesh.contracts import ConfigError


def test_braces_are_sugar_for_a_path_in_a_condition() -> None:
    gate = compile_condition("{{coder.confidence}} >= 0.85")
    assert gate.cel == "coder.confidence >= 0.85"
    assert gate.paths == (("coder", "confidence"),)
    assert compile_condition("{{ reviewer.approved }} == true").cel == "reviewer.approved == true"


def test_a_compiled_condition_evaluates_many_times() -> None:
    gate = compile_condition("{{coder.confidence}} >= 0.85")
    assert gate.test({"coder": {"confidence": 0.9}}) is True
    assert gate.test({"coder": {"confidence": 0.6}}) is False


def test_a_key_template_renders_its_paths_into_a_string() -> None:
    key = compile_template("{{task_id}}:coder")
    assert key.cel == 'string(task_id) + ":coder"'
    assert key.render({"task_id": "order-7"}) == "order-7:coder"
    nested = compile_template("{{ input.user.id }}/{{job_id}}")
    assert nested.paths == (("input", "user", "id"), ("job_id",))
    assert nested.render({"input": {"user": {"id": 3}}, "job_id": "j1"}) == "3/j1"


def test_a_key_template_without_a_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="share one effect"):
        compile_template("coder")


def test_a_syntax_error_is_a_compile_error_with_cel_position() -> None:
    with pytest.raises(ConfigError, match=r"does not compile: at 1:\d+"):
        compile_condition("coder.confidence >=")


def test_braces_hold_a_path_only() -> None:
    with pytest.raises(ConfigError, match="must hold a path"):
        compile_condition("{{ a + b }} > 1")


def test_paths_skip_strings_functions_and_macro_variables() -> None:
    expr = compile_condition('researcher.sources.exists(s, s.score > 0.5) && has(coder.diff) '
                             '&& size(reviewer.comments) > 0 && "coder.nothing" != input.lang')
    assert expr.paths == (("researcher", "sources"), ("coder", "diff"), ("reviewer", "comments"), ("input", "lang"))


def test_python_is_not_reachable_from_an_expression() -> None:
    # CEL has no attribute access into Python objects and no eval: a dunder is just a missing key.
    expr = compile_condition("coder.__class__ == 1")
    with pytest.raises(ExpressionError):
        expr.evaluate({"coder": {"confidence": 1.0}})


def test_a_condition_must_give_a_boolean() -> None:
    with pytest.raises(ExpressionError, match="not true or false"):
        compile_condition("coder.confidence").test({"coder": {"confidence": 1.0}})


def test_a_missing_value_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="cannot evaluate"):
        compile_condition("coder.confidence > 0.5").test({"coder": {}})
