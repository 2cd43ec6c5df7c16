"""Hostile pipeline files and expressions: a YAML document of any shape (anchors and aliases,
deep nesting, long chains, junk) loads or is refused with ``FILE:LINE`` errors, never another
exception; an expression's paths are exactly the names it reads outside the macros that bind
them; and any expression that compiles, over any JSON values, gives a value or an ExpressionError,
never another exception and never the end of the process that asked."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mesh.agents.pipelines import ExpressionError, PipelineError, compile_condition
from mesh.agents.pipelines.loader import parse
from mesh.contracts import ConfigError
from tests.fuzz.strategies import SCALE, json_values, texts
from tests.pipelines.agents import app

#: Names an expression may read: step ids of the tests' app, job names and plain ones.
NAMES = ["researcher", "coder", "reviewer", "input", "task_id", "a", "b"]
MACROS = ["map", "filter", "all", "exists", "exists_one"]


@st.composite
def yaml_nodes(draw: Any, depth: int = 0) -> str:
    """A YAML value in flow style: scalars, lists and maps, anchors and aliases, sometimes deep."""
    kind = draw(st.sampled_from(["scalar", "list", "map", "alias", "anchor", "deep"] if depth < 4 else ["scalar"]))
    if kind == "scalar":
        return draw(st.sampled_from(["1", "x", "'a b'", "null", "true", "researcher", "\"{{input.x}}\""]))
    if kind == "alias":
        return f"*a{draw(st.integers(0, 3))}"
    if kind == "anchor":
        return f"&a{draw(st.integers(0, 3))} {draw(yaml_nodes(depth + 1))}"
    if kind == "deep":
        n = draw(st.integers(1, 700))
        return "[" * n + "1" + "]" * n
    items = draw(st.lists(yaml_nodes(depth + 1), max_size=4))
    if kind == "list":
        return "[" + ", ".join(items) + "]"
    return "{" + ", ".join(f"k{i}: {v}" for i, v in enumerate(items)) + "}"


@st.composite
def pipelines(draw: Any) -> str:
    """A pipeline file: valid steps, a hostile value somewhere, and sometimes a long chain."""
    lines = ["name: p", f"description: {draw(yaml_nodes())}", "agents:", "  - id: researcher"]
    for i in range(draw(st.integers(0, 3))):
        lines.append(f"  - id: s{i}\n    agent: coder\n    depends_on: [{draw(st.sampled_from(NAMES))}]")
    if draw(st.booleans()):
        lines.append(f"  - id: x\n    agent: coder\n    when: {draw(yaml_nodes())}")
    n = draw(st.sampled_from([0, 0, 5, 1200]))
    lines += [f"  - id: c{i}\n    agent: coder\n    depends_on: [c{i + 1}]" for i in range(n)]
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(texts))
    return "\n".join(lines) + "\n"


@hsettings(max_examples=150 * SCALE)
@given(pipelines())
@example("name: p\nx: &a [1, 1]\ny: &b [*a, *a]\nagents:\n  - id: researcher\n")
@example("name: p\nagents:\n  - id: " + "[" * 600 + "]" * 600 + "\n")
def test_a_hostile_pipeline_file_loads_or_is_refused_at_a_line(text: str) -> None:
    try:
        parse(text, app, "f.yaml")
    except PipelineError as exc:
        assert exc.errors and all(e.file == "f.yaml" and e.line >= 1 for e in exc.errors)


@st.composite
def scoped(draw: Any, depth: int = 0, bound: frozenset[str] = frozenset()) -> tuple[str, frozenset[str]]:
    """An expression and the names it reads outside every macro that binds them."""
    kinds = ["literal", "name", "binary", "macro", "ternary"] if depth < 3 else ["literal", "name"]
    kind = draw(st.sampled_from(kinds))
    if kind == "literal":
        return draw(st.sampled_from(["1", "true", "'b'", "[1]", "{'a': 1}"])), frozenset()
    if kind == "name":
        name = draw(st.sampled_from(NAMES))
        field = draw(st.sampled_from(["", ".x", ".y.z"]))
        return name + field, frozenset() if name in bound else frozenset({name})
    if kind == "binary":
        (left, lf), (right, rf) = draw(scoped(depth + 1, bound)), draw(scoped(depth + 1, bound))
        return f"({left} {draw(st.sampled_from(['==', '+', '&&', '<']))} {right})", lf | rf
    if kind == "ternary":
        parts = [draw(scoped(depth + 1, bound)) for _ in range(3)]
        return f"({parts[0][0]} ? {parts[1][0]} : {parts[2][0]})", parts[0][1] | parts[1][1] | parts[2][1]
    (target, tf) = draw(scoped(depth + 1, bound))
    var = draw(st.sampled_from(NAMES))
    body, bf = draw(scoped(depth + 1, bound | {var}))
    return f"{target}.{draw(st.sampled_from(MACROS))}({var}, {body})", tf | bf


@hsettings(max_examples=400 * SCALE)
@given(scoped())
@example(("[1].map(b, 1) == [1] ? b : null", frozenset({"b"})))
def test_paths_are_the_names_read_outside_their_binding_macros(case: tuple[str, frozenset[str]]) -> None:
    text, free = case
    try:
        expr = compile_condition(text)
    except ConfigError:
        return  # past a load limit, or not CEL CEL accepts (a name it reserves): nothing to check
    assert {p[0] for p in expr.paths} == set(free), text


@hsettings(max_examples=150 * SCALE)
@given(scoped(), st.dictionaries(st.sampled_from(NAMES), json_values(), max_size=4))
def test_any_expression_over_any_values_gives_a_value_or_an_expression_error(
        case: tuple[str, frozenset[str]], values: dict[str, Any]) -> None:
    try:
        expr = compile_condition(case[0])
    except ConfigError:
        return
    try:
        expr.evaluate(values)
    except ExpressionError as exc:
        assert exc.message.startswith("condition ") and len(exc.message) > len("condition "), exc.message
