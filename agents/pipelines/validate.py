"""The checks a pipeline needs its app and its whole DAG for.

Every problem comes with the location (``("steps", 2, "gate")``) of what caused it, so the YAML
loader can name the file and line. Checked: ``depends_on`` names known steps and has no cycle
(the cycle is named); every step's agent is declared; ``output_schema`` names a declared model
and matches the agent's output; ``state_input`` names an upstream output; every path an
expression reads starts at an upstream step (or the job: ``key``, ``job_id``, ``input``; ``item``
in a ``for_each`` step) and names fields that step's output model has.

An ``output_schema`` name is the snake_case name of a pydantic model one of the app's agents
declares (as output or input): ``ResearchResult`` is ``research_result``.
"""

from __future__ import annotations

import collections.abc
import enum
import heapq
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, RootModel

from mesh.contracts import ConfigError

from .expr import Expression
from .spec import JOB_NAMES, PipelineSpec, StepSpec

if TYPE_CHECKING:
    from mesh.agents.app import App

Loc = tuple[str | int, ...]
_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Set)
_MAPPINGS = (dict, collections.abc.Mapping)


@dataclass(frozen=True)
class Problem:
    """One reason a pipeline is refused, at the spec location that caused it."""

    loc: Loc
    message: str


def check(spec: PipelineSpec, app: App) -> PipelineSpec:
    """``spec`` if it holds against ``app``; :class:`ConfigError` listing every problem otherwise."""
    found = problems(spec, app)
    if found:
        lines = [f"{'.'.join(map(str, p.loc))}: {p.message}" for p in found]
        raise ConfigError(f"pipeline {spec.name!r} is invalid:\n  " + "\n  ".join(lines))
    return spec


def problems(spec: PipelineSpec, app: App) -> list[Problem]:
    """Every problem of ``spec`` against ``app``, in file order."""
    index = {s.id: i for i, s in enumerate(spec.steps)}
    out: list[Problem] = []
    for i, step in enumerate(spec.steps):
        for j, dep in enumerate(step.depends_on):
            if dep not in index:
                out.append(Problem(("steps", i, "depends_on", j),
                                   f"step {step.id!r} depends on unknown step {dep!r}; steps are "
                                   f"{', '.join(index)}"))
    for cycle in cycles(spec):
        out.append(Problem(("steps", index[cycle[0]], "depends_on"),
                           f"depends_on makes a cycle: {' → '.join([*cycle, cycle[0]])}"))
    names = schema_names(app)
    up = upstream(spec)
    for i, step in enumerate(spec.steps):
        out += _step_problems(spec, app, names, up, i, step)
    for j, sid in enumerate(spec.result or ()):
        if sid not in index:
            out.append(Problem(("result", j), f"result names unknown step {sid!r}; steps are {', '.join(index)}"))
    return out


def order(spec: PipelineSpec) -> list[str]:
    """The step ids in a DAG order (every step after its dependencies; file order breaks ties), in
    O(steps log steps + edges): the engine asks on every advance."""
    index = {s.id: i for i, s in enumerate(spec.steps)}
    waiting = {s.id: len({d for d in s.depends_on if d in index}) for s in spec.steps}
    dependents: dict[str, list[str]] = {}
    for s in spec.steps:
        for dep in set(s.depends_on):
            dependents.setdefault(dep, []).append(s.id)
    ready = [index[sid] for sid, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    done: list[str] = []
    while ready:
        sid = spec.steps[heapq.heappop(ready)].id
        done.append(sid)
        for nxt in dependents.get(sid, ()):
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, index[nxt])
    if len(done) < len(index):
        raise ConfigError(f"pipeline {spec.name!r} has a cycle")
    return done


def roots(spec: PipelineSpec) -> list[str]:
    """The steps that depend on nothing: they start together."""
    return [s.id for s in spec.steps if not s.depends_on]


def upstream(spec: PipelineSpec) -> dict[str, set[str]]:
    """Step id → every step it depends on, directly or not."""
    direct = {s.id: set(s.depends_on) for s in spec.steps}
    closure: dict[str, set[str]] = {}
    for sid in direct:
        seen: set[str] = set()
        todo = list(direct[sid])
        while todo:
            dep = todo.pop()
            if dep not in seen and dep in direct:
                seen.add(dep)
                todo += direct[dep]
        closure[sid] = seen
    return closure


def cycles(spec: PipelineSpec) -> list[list[str]]:
    """Each cycle of ``depends_on`` once, as its members in dependency order from the first declared.
    A depth-first walk with its own stack: a chain of a thousand steps is no recursion limit."""
    ids = {s.id for s in spec.steps}
    deps = {s.id: [d for d in s.depends_on if d in ids] for s in spec.steps}
    found: list[list[str]] = []
    seen_sets: set[frozenset[str]] = set()
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for root in deps:
        if root in state:
            continue
        path: list[str] = [root]
        stack = [iter(deps[root])]
        state[root] = 1
        while stack:
            dep = next(stack[-1], None)
            if dep is None:
                stack.pop()
                state[path.pop()] = 2
            elif state.get(dep) == 1:
                cycle = path[path.index(dep):]
                if frozenset(cycle) not in seen_sets:
                    seen_sets.add(frozenset(cycle))
                    found.append(cycle)
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                stack.append(iter(deps[dep]))
    return found


def schema_names(app: App) -> dict[str, list[type[BaseModel]]]:
    """``output_schema`` name → the models of that name the app's agents declare."""
    names: dict[str, list[type[BaseModel]]] = {}
    for agent in app.agents.values():
        for model in (agent.output, agent.input):
            found = names.setdefault(snake(model.__name__), [])
            if model not in found:
                found.append(model)
    return names


def snake(name: str) -> str:
    """``ResearchResult`` → ``research_result`` (``HTTPResult`` → ``http_result``)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def output_model(spec: PipelineSpec, app: App, step_id: str) -> type[BaseModel] | None:
    """The model a step's output satisfies: its ``output_schema``'s, else its agent's (None if unknown)."""
    step = spec.step(step_id)
    if step.output_schema:
        models = schema_names(app).get(step.output_schema, [])
        if len(models) == 1:
            return models[0]
    agent = app.agents.get(step.agent_name)
    return agent.output if agent else None


def _step_problems(spec: PipelineSpec, app: App, names: dict[str, list[type[BaseModel]]],
                   up: dict[str, set[str]], i: int, step: StepSpec) -> Iterator[Problem]:
    agent = app.agents.get(step.agent_name)
    if agent is None:
        where = "agent" if "agent" in step.model_fields_set else "id"
        yield Problem(("steps", i, where), f"step {step.id!r} runs agent {step.agent_name!r}, which app "
                      f"{app.name!r} does not declare; its agents are {', '.join(app.agents) or 'none'}")
    undo = step.compensate
    if undo is not None and undo.agent is not None and undo.agent not in app.agents:
        yield Problem(("steps", i, "compensate", "agent"), f"step {step.id!r} is compensated by agent "
                      f"{undo.agent!r}, which app {app.name!r} does not declare; its agents are "
                      f"{', '.join(app.agents) or 'none'}")
    if undo is not None and undo.tool is not None:
        tool = app.tools.get(undo.tool)
        if tool is None:
            yield Problem(("steps", i, "compensate", "tool"), f"step {step.id!r} is compensated by tool "
                          f"{undo.tool!r}, which app {app.name!r} does not declare; its tools are "
                          f"{', '.join(app.tools) or 'none'}")
        elif undo.input is not None:
            missing = [name for name, f in tool.args.model_fields.items()
                       if f.is_required() and (f.alias or name) not in undo.input and name not in undo.input]
            if missing:
                yield Problem(("steps", i, "compensate", "input"), f"step {step.id!r}: compensate input gives tool "
                              f"{undo.tool!r} no {', '.join(map(repr, missing))}, which its args require")
    if step.output_schema:
        models = names.get(step.output_schema, [])
        if not models:
            yield Problem(("steps", i, "output_schema"), f"output_schema {step.output_schema!r} names no model the "
                          f"app's agents declare; known: {', '.join(sorted(names)) or 'none'} (the snake_case "
                          "name of a model class)")
        elif len(models) > 1:
            yield Problem(("steps", i, "output_schema"), f"output_schema {step.output_schema!r} is ambiguous: "
                          f"{', '.join(f'{m.__module__}.{m.__qualname__}' for m in models)}")
        elif agent is not None and not issubclass(agent.output, models[0]):
            yield Problem(("steps", i, "output_schema"), f"output_schema {step.output_schema!r} is "
                          f"{models[0].__name__}, but agent {agent.name!r} returns {agent.output.__name__}")
    if step.state_input:
        sources = {u for u in up[step.id]} | {spec.step(u).output_schema for u in up[step.id]}
        if step.state_input not in sources:
            yield Problem(("steps", i, "state_input"), f"state_input {step.state_input!r} is neither an upstream "
                          f"step nor an upstream output_schema of step {step.id!r}; upstream: "
                          f"{', '.join(sorted(s for s in sources if s)) or 'none'}")
    item: Any = None
    if step.for_each is not None:
        item, message = _for_each_item(spec, app, up, step)
        if message:
            yield Problem(("steps", i, "for_each"), message)
            item = Any  # reported once: what the items read is not checked against an unknown list
    checked: list[tuple[Loc, str, Expression]] = [
        (("steps", i, field), field, expr) for field in ("gate", "when", "idempotency_key", "item_id")
        if (expr := getattr(step, field)) is not None]
    checked += [(("steps", i, "input", name), f"input.{name}", expr) for name, expr in (step.input or {}).items()]
    for loc, field, expr in checked:
        wrong = False
        for path in expr.paths:
            _, message = _path_type(spec, app, up, step, field, expr, path, item=item)
            if message:
                wrong = True
                yield Problem(loc, message)
        if field in ("gate", "when") and not wrong:  # its paths are known: are their types compatible?
            for message in _operation_problems(spec, app, up, step, field, expr, item):
                yield Problem(loc, message)


#: CEL's kind of a literal: int, uint and double are all numbers (compared with each other freely).
_LITERAL_KINDS = {"string": "string", "int": "number", "uint": "number", "double": "number", "bool": "bool"}
_RELATIONS = frozenset({"<", "<=", ">", ">="})


def _operation_problems(spec: PipelineSpec, app: App, up: dict[str, set[str]], step: StepSpec, field: str,
                        expr: Expression, item: Any) -> Iterator[str]:
    """Why a condition's comparison or arithmetic cannot hold whatever the run's data: both operands'
    types are known (a path typed by an output model, or a literal) and CEL has no such operation
    between them (``classify.urgency >= "high"`` over a float fails when the step is due), or they are
    never equal (``==``). Only what is certainly wrong: an operand of unknown type passes."""
    for operation in expr.operations():
        sides = []
        for operand in (operation.left, operation.right):
            if operand.path is not None:
                tp, message = _path_type(spec, app, up, step, field, expr, operand.path, item=item)
                kinds = None if message else _kinds(tp)
                named = str(tp).replace("typing.", "") if typing.get_origin(tp) is not None else _describe(tp)
                sides.append((kinds, f"{operand.text} ({named})"))
            else:
                kind = _LITERAL_KINDS.get(operand.kind or "")
                sides.append(({kind} if kind else None, f"{operand.text} ({operand.kind})"))
        (left, named_left), (right, named_right) = sides
        if not left or not right or not all(_clash(operation.op, a, b) for a in left for b in right):
            continue
        op = operation.op
        if op in ("==", "!="):
            why = f"a {'/'.join(sorted(left))} is never equal to a {'/'.join(sorted(right))}: {op} is always " \
                  f"{'false' if op == '==' else 'true'}"
        else:
            why = (f"CEL has no {op} between a {'/'.join(sorted(left))} and a {'/'.join(sorted(right))}: it would "
                   "fail when the step is due")
        yield f"step {step.id!r}: {field} {expr.source!r} compares {named_left} {op} {named_right}; {why}"


def _clash(op: str, left: str, right: str) -> bool:
    """Whether CEL has no ``left op right`` for values of these kinds (``==`` between them: never true)."""
    if left != right:
        return True
    if op in _RELATIONS:
        return left not in ("number", "string", "bool")
    if op == "+":
        return left not in ("number", "string", "list")
    return op in ("-", "*", "/", "%") and left != "number"


def _kinds(tp: Any) -> set[str] | None:
    """The CEL kinds a value of type ``tp`` may be in a job's record (number, string, bool, list,
    map), None if one of them is not known for certain (Any, a date, a decimal: JSON strings)."""
    kinds: set[str] = set()
    for option in _options(tp):
        origin = typing.get_origin(option) or option
        if origin is typing.Literal:
            found = {type(a) for a in typing.get_args(option)}
            if not found <= {str, int, float, bool} or len(found) != 1:
                return None
            origin = found.pop()
        if not isinstance(origin, type) or issubclass(origin, RootModel):  # a RootModel reads as its root
            return None
        if issubclass(origin, bool):
            kinds.add("bool")
        elif issubclass(origin, int | float) and not issubclass(origin, enum.Enum):
            kinds.add("number")
        elif issubclass(origin, str):
            kinds.add("string")
        elif issubclass(origin, _SEQUENCES) and not issubclass(origin, bytes):
            kinds.add("list")
        elif issubclass(origin, _MAPPINGS) or issubclass(origin, BaseModel):
            kinds.add("map")
        else:
            return None
    return kinds or None


#: ``PATH.filter(v, ...)``: a filter of a list keeps its element type.
_FILTER = re.compile(r"^\s*(?P<path>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*"
                     r"(?:\.\s*filter\s*\(\s*[A-Za-z_]\w*\s*,(?P<body>.*)\)\s*)?$", re.S)


def _for_each_item(spec: PipelineSpec, app: App, up: dict[str, set[str]], step: StepSpec) -> tuple[Any, str | None]:
    """The type of a ``for_each`` step's ``item``, or why its expression cannot be walked. Every path
    the expression reads is checked; the element type is known when it is a path to a list, or a
    ``filter`` of one (Any for other expressions: what ``item`` reads is then checked when it runs)."""
    expr = step.for_each
    assert expr is not None
    for path in expr.paths:
        _, message = _path_type(spec, app, up, step, "for_each", expr, path)
        if message:
            return None, message
    m = _FILTER.match(expr.cel)
    if m is None or (m.group("body") is not None and not _compiles(m.group("body"))):
        return Any, None
    path = tuple(m.group("path").split("."))
    kind, message = _path_type(spec, app, up, step, "for_each", expr, path)
    if message:
        return None, message
    element = _element(kind)
    if element is None:
        return None, f"for_each {expr.source!r} is {_describe(kind)}, not a list"
    return element, None


def _compiles(text: str) -> bool:
    """Whether ``text`` is one CEL expression on its own (a filter's body, not ``x).map(y, y``)."""
    from .evaluator_main import cel

    try:
        cel.compile(text)
    except ValueError:
        return False
    return True


def _path_type(spec: PipelineSpec, app: App, up: dict[str, set[str]], step: StepSpec, field: str,
               expr: Expression, path: tuple[str, ...], item: Any = None) -> tuple[Any, str | None]:
    """The type ``path`` reads in ``step``'s ``field``, or why it cannot be read."""
    what = f"step {step.id!r}: {field} {expr.source!r} reads {'.'.join(path)}"
    root = path[0]
    if root in ("key", "task_id", "job_id"):
        return (str, None) if len(path) == 1 else (None, f"{what}, but {root} is a string")
    if root == "input":
        return Any, None  # the job's input has no declared model yet: not checked
    if root == "item" and item is not None:
        return _walk(item, path[1:], what, "item")
    ids = {s.id for s in spec.steps}
    if root not in ids:
        allowed = sorted(up[step.id]) + sorted(JOB_NAMES) + (["item"] if item is not None else [])
        return None, f"{what}, but {root!r} is neither an upstream step nor the job; it may read {', '.join(allowed)}"
    if root not in up[step.id]:
        return None, f"{what}, but step {root!r} is not upstream of {step.id!r} (add it to depends_on)"
    if spec.step(root).for_each is not None and len(path) > 1:
        return None, f"{what}, but {root!r} is a for_each step: its output is the list of its items' outputs"
    model = output_model(spec, app, root)
    if model is None:
        return Any, None  # its agent is unknown: reported once, at that step
    if spec.step(root).for_each is not None:
        return list[model], None  # type: ignore[valid-type]
    return _walk(model, path[1:], what, f"{model.__name__} (the output of step {root!r})")


def _walk(tp: Any, fields: tuple[str, ...], what: str, name: str) -> tuple[Any, str | None]:
    for k, field in enumerate(fields):
        options = _options(tp)
        if Any in options:
            return Any, None
        found = []
        for option in options:
            if isinstance(option, type) and issubclass(option, BaseModel) and field in option.model_fields:
                found.append(option.model_fields[field].annotation)
            elif typing.get_origin(option) in _MAPPINGS:
                found.append((typing.get_args(option) or (Any, Any))[-1])
        if not found:
            at = name if k == 0 else ".".join(fields[:k])
            fields_of = sorted({f for o in options if isinstance(o, type) and issubclass(o, BaseModel)
                                for f in o.model_fields})
            has = f"; its fields: {', '.join(fields_of)}" if fields_of else f" ({_describe(tp)})"
            return None, f"{what}, but {at} has no field {field!r}{has}"
        tp = found[0] if len(found) == 1 else typing.Union[tuple(found)]  # noqa: UP007
    return tp, None


def _options(tp: Any) -> list[Any]:
    """The concrete types ``tp`` may be (Optional, Union and Annotated taken apart)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _options(typing.get_args(tp)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [o for a in typing.get_args(tp) if a is not type(None) for o in _options(a)]
    return [tp]


def _element(tp: Any) -> Any:
    """The element type of a list type (Any when unsaid), None if ``tp`` is no list."""
    for option in _options(tp):
        if option is Any:
            return Any
        origin = typing.get_origin(option) or option
        if isinstance(origin, type) and issubclass(origin, _SEQUENCES) and not issubclass(origin, str | bytes):
            args = typing.get_args(option)
            return args[0] if args else Any
    return None


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
