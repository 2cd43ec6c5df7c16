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
    if spec.input_schema:
        message = _schema_problem(names, "input_schema", spec.input_schema)
        if message:
            out.append(Problem(("input_schema",), message))
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


def _schema_problem(names: dict[str, list[type[BaseModel]]], key: str, name: str) -> str | None:
    """Why ``name`` (an ``output_schema`` or ``input_schema``) names no one model of the app, None if it does."""
    models = names.get(name, [])
    if not models:
        return (f"{key} {name!r} names no model the app's agents declare; known: "
                f"{', '.join(sorted(names)) or 'none'} (the snake_case name of a model class)")
    if len(models) > 1:
        return f"{key} {name!r} is ambiguous: {', '.join(f'{m.__module__}.{m.__qualname__}' for m in models)}"
    return None


def snake(name: str) -> str:
    """``ResearchResult`` → ``research_result`` (``HTTPResult`` → ``http_result``)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def output_model(spec: PipelineSpec, app: App, step_id: str) -> type[BaseModel] | None:
    """The model a step's output satisfies: its ``output_schema``'s, else its agent's (None if unknown)."""
    step = spec.step(step_id)
    if step.waits:
        return None  # an event's data, or a sleep's {slept_s}: not typed
    if step.output_schema:
        models = schema_names(app).get(step.output_schema, [])
        if len(models) == 1:
            return models[0]
    agent = app.agents.get(step.agent_name)
    return agent.output if agent else None


def _step_problems(spec: PipelineSpec, app: App, names: dict[str, list[type[BaseModel]]],
                   up: dict[str, set[str]], i: int, step: StepSpec) -> list[Problem]:
    """The step's problems: its own keys, then what data it and its compensation are given (what it
    takes by default only when nothing else is wrong with it: its dependencies may be what is)."""
    item: list[Any] = [None]
    found = list(_step_checks(spec, app, names, up, i, step, item))
    ids = {s.id for s in spec.steps}
    sound = not found and step.id not in up[step.id] and set(step.depends_on) <= ids  # no cycle, no unknown step
    return found + list(_flow_problems(spec, app, up, i, step, item[0], default=sound))


def _step_checks(spec: PipelineSpec, app: App, names: dict[str, list[type[BaseModel]]],
                 up: dict[str, set[str]], i: int, step: StepSpec, item_type: list[Any]) -> Iterator[Problem]:
    agent = app.agents.get(step.agent_name) if not step.waits else None
    if step.wait_for is not None and step.wait_for.match is not None:
        yield from _match_problems(spec, app, up, i, step, step.wait_for.match)
    if agent is None and not step.waits:
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
    if step.output_schema:
        models = names.get(step.output_schema, [])
        message = _schema_problem(names, "output_schema", step.output_schema)
        if message:
            yield Problem(("steps", i, "output_schema"), message)
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
    item_type[0] = item


def _match_problems(spec: PipelineSpec, app: App, up: dict[str, set[str]], i: int, step: StepSpec,
                    match: Expression) -> Iterator[Problem]:
    """A ``wait_for.match``'s paths: ``event`` (the event's data, not typed), the job, upstream outputs."""
    for path in match.paths:
        if path[0] == "event":
            continue
        _, message = _path_type(spec, app, up, step, "wait_for.match", match, path)
        if message:
            yield Problem(("steps", i, "wait_for", "match"), message.replace(" it may read ", " it may read event, "))


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
        sides, numbers = [], []
        for operand in (operation.left, operation.right):
            if operand.path is not None:
                tp, message = _path_type(spec, app, up, step, field, expr, operand.path, item=item)
                kinds = None if message else _kinds(tp)
                named = str(tp).replace("typing.", "") if typing.get_origin(tp) is not None else _describe(tp)
                sides.append((kinds, f"{operand.text} ({named})"))
                numbers.append(None if message else _number(tp))
            else:
                kind = _LITERAL_KINDS.get(operand.kind or "")
                sides.append(({kind} if kind else None, f"{operand.text} ({operand.kind})"))
                numbers.append(operand.kind if operand.kind in ("int", "uint", "double") else None)
        (left, named_left), (right, named_right) = sides
        op = operation.op
        if op in ("+", "-", "*", "/", "%") and numbers[0] and numbers[1] and numbers[0] != numbers[1]:
            yield (f"step {step.id!r}: {field} {expr.source!r} computes {named_left} {op} {named_right}; CEL has no "
                   f"{op} between {_article(numbers[0])} {numbers[0]} and {_article(numbers[1])} {numbers[1]} (it "
                   f"converts neither): it would fail when the step is due; convert one, e.g. double(...)")
            continue
        if not left or not right or not all(_clash(operation.op, a, b) for a in left for b in right):
            continue
        if op in ("==", "!="):
            why = f"a {'/'.join(sorted(left))} is never equal to a {'/'.join(sorted(right))}: {op} is always " \
                  f"{'false' if op == '==' else 'true'}"
        else:
            why = (f"CEL has no {op} between a {'/'.join(sorted(left))} and a {'/'.join(sorted(right))}: it would "
                   "fail when the step is due")
        yield f"step {step.id!r}: {field} {expr.source!r} compares {named_left} {op} {named_right}; {why}"


def _number(tp: Any) -> str | None:
    """The CEL number type (``int`` or ``double``) a value of type ``tp`` certainly is in a job's
    record, None if it may be another (a union of both, a bool, an enum, anything not a number)."""
    found = set()
    for option in _options(tp):
        if not isinstance(option, type) or issubclass(option, bool | enum.Enum):
            return None
        if issubclass(option, int):
            found.add("int")
        elif issubclass(option, float):
            found.add("double")
        else:
            return None
    return found.pop() if len(found) == 1 else None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


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
        model = input_model(spec, app)
        if model is None:
            return Any, None  # the job's input has no declared model (input_schema): not checked
        return _walk(model, path[1:], what, f"{model.__name__} (the job's input, input_schema "
                     f"{spec.input_schema!r})", given=True)
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


def _walk(tp: Any, fields: tuple[str, ...], what: str, name: str, *, given: bool = False) -> tuple[Any, str | None]:
    """The type ``fields`` reach in a value of type ``tp``: a model's fields read by name, as a worker
    records an output, or (``given``: a run's input, as given or dumped by alias) by the keys the
    model validates (:func:`_keys`)."""
    for k, field in enumerate(fields):
        options = _options(tp)
        if Any in options:
            return Any, None
        found = []
        for option in options:
            model = option if isinstance(option, type) and issubclass(option, BaseModel) else None
            named = None if model is None else _field_name(model, field) if given else \
                field if field in model.model_fields else None
            if model is not None and named is not None:
                found.append(model.model_fields[named].annotation)
            elif typing.get_origin(option) in _MAPPINGS:
                found.append((typing.get_args(option) or (Any, Any))[-1])
        if not found:
            at = name if k == 0 else ".".join(fields[:k])
            fields_of = sorted({_keys(o, f)[0] if given else f for o in options
                                if isinstance(o, type) and issubclass(o, BaseModel) for f in o.model_fields})
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


# The data a step is given, checked against its agent's input model: the fields ``input:`` builds (an
# unknown one, a required one missing, one of a type the model does not take), else what the step
# takes by default (the run's input, its dependency's output, its dependencies' outputs by id, a
# ``for_each`` item). Only what is certainly wrong: a type not known at load (Any, an expression
# other than a path, a literal or a conversion) passes, and is checked by the model when it runs.

#: How deep a model inside a model is compared (a recursive model stops here).
_DEPTH = 8
#: What a JSON value of each kind is, as a step's output is kept in its job's record.
_SCALARS: tuple[tuple[type, str], ...] = (
    (bool, "bool"), (enum.Enum, ""), (int, "int"), (float, "float"), (str, "str"), (bytes, "str"))
#: CEL functions whose result type is known whatever their argument.
_CONVERSIONS = {"string": str, "int": int, "uint": int, "double": float, "bool": bool, "size": int}


def _reshapes(model: type[BaseModel]) -> bool:
    """Whether ``model`` validates its input before (or around) its fields (``model_validator(mode=
    "before")``): what it takes is then not what its fields say, and it is not checked at load."""
    return any(d.info.mode in ("before", "wrap") for d in model.__pydantic_decorators__.model_validators.values())


def _field_type(model: type[BaseModel], name: str) -> Any:
    """The type ``model``'s field ``name`` takes: its annotation, or Any when a validator of its own
    sees the value first (``mode="before"``, ``"wrap"`` or ``"plain"``, or such a validator in
    ``Annotated``), so what it takes is not what it says."""
    from pydantic.functional_validators import BeforeValidator, PlainValidator, WrapValidator

    field = model.model_fields[name]
    if any(isinstance(m, BeforeValidator | PlainValidator | WrapValidator) for m in field.metadata):
        return Any
    for d in model.__pydantic_decorators__.field_validators.values():
        if d.info.mode in ("before", "wrap", "plain") and (name in d.info.fields or "*" in d.info.fields):
            return Any
    return field.annotation


def _field_name(model: type[BaseModel], name: str) -> str | None:
    """The field of ``model`` a payload key names (see :func:`_keys`), None if none."""
    return next((n for n in model.model_fields if name in _keys(model, n)), None)


def _keys(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The payload keys that give ``model``'s field ``name`` as pydantic validates it: its validation
    alias (each of ``AliasChoices``; an ``AliasPath``'s first key), else its alias; its name too when
    it has neither or the model validates by name (``populate_by_name``)."""
    from pydantic import AliasChoices, AliasPath

    field, config = model.model_fields[name], model.model_config
    given = field.validation_alias if field.validation_alias is not None else field.alias
    choices = given.choices if isinstance(given, AliasChoices) else [] if given is None else [given]
    keys = [c.path[0] if isinstance(c, AliasPath) else c for c in choices]
    if config.get("validate_by_alias") is False:
        keys = []
    by_name = not keys or config.get("populate_by_name") or config.get("validate_by_name")
    return tuple(dict.fromkeys(str(k) for k in [*keys, *([name] if by_name else [])]))


def _model_of(tp: Any) -> type[BaseModel] | None:
    """The one pydantic model ``tp`` is (Optional and Annotated taken apart), None otherwise."""
    models = [o for o in _options(tp) if isinstance(o, type) and issubclass(o, BaseModel)]
    return models[0] if len(models) == 1 and len(_options(tp)) == 1 else None


def _fields_list(model: type[BaseModel]) -> str:
    return ", ".join(_keys(model, n)[0] for n in model.model_fields) or "none"


def _kind(tp: Any) -> str | None:
    """The JSON kind of a value of type ``tp`` as a job's record keeps it (``str``, ``int``, ``float``,
    ``bool``, ``list``, ``map``; a date or a decimal is a string), None if not known."""
    origin = typing.get_origin(tp) or tp
    if origin is typing.Literal:
        kinds = {_kind(type(a)) for a in typing.get_args(tp)}
        return kinds.pop() if len(kinds) == 1 else None
    if not isinstance(origin, type):
        return None
    if issubclass(origin, enum.Enum):
        kinds = {_kind(type(m.value)) for m in origin}
        return kinds.pop() if len(kinds) == 1 else None
    if issubclass(origin, RootModel):
        return None
    for base, kind in _SCALARS:
        if kind and issubclass(origin, base):
            return kind
    if issubclass(origin, BaseModel) or issubclass(origin, _MAPPINGS):
        return "map"
    if issubclass(origin, _SEQUENCES):
        return "list"
    import datetime
    import decimal
    import pathlib
    import uuid

    if issubclass(origin, datetime.date | datetime.time | datetime.timedelta | decimal.Decimal | uuid.UUID
                  | pathlib.PurePath):
        return "str"
    return None


def _takes(tp: Any) -> set[str] | None:
    """The JSON kinds a field of type ``tp`` takes (an int into a float field is fine; a float into an
    int field, a number into a string field are not), None if not known (any kind may do)."""
    import datetime
    import decimal

    origin = typing.get_origin(tp) or tp
    if isinstance(origin, type) and issubclass(origin, datetime.date | datetime.time | datetime.timedelta):
        return {"str", "int", "float"}
    if isinstance(origin, type) and issubclass(origin, decimal.Decimal):
        return {"str", "int", "float"}
    kind = _kind(tp)
    if kind is None:
        return None
    return {"int", "float"} if kind == "float" else {kind}


def _name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return _describe(tp)


def _fits(src: Any, dst: Any, depth: int = 0) -> str | None:
    """Why a value of type ``src`` certainly does not fit a field of type ``dst``, None if it may.
    A union fits when one of its members may; None (a null) is left out of an input, so not counted."""
    if src is Any or dst is Any or depth > _DEPTH:
        return None
    sources = [o for o in _options(src)]
    targets = _options(dst)
    if not sources or Any in sources or Any in targets:
        return None
    reasons = []
    for s in sources:
        why = [_fits_one(s, d, depth) for d in targets]
        if any(w is None for w in why):
            return None
        reasons.append(next(w for w in why if w))
    return reasons[0]


def _fits_one(src: Any, dst: Any, depth: int) -> str | None:
    takes, kind = _takes(dst), _kind(src)
    if takes is None or kind is None:
        return None
    if kind not in takes:
        named = _name(src)
        return f"{'an' if named[:1] in ('i', 'I') else 'a'} {named} is no {_name(dst)}"
    if kind == "list":
        s, d = _element(src), _element(dst)
        if s is not None and d is not None:
            why = _fits(s, d, depth + 1)
            return f"its elements do not fit: {why}" if why else None
    if kind == "map":
        target, source = _model_of(dst), _model_of(src)
        if target is not None and source is not None:
            found = _model_fits(source, target, depth + 1)
            return "; ".join(found) if found else None
        if target is None and source is not None and typing.get_origin(dst) in _MAPPINGS:
            value = (typing.get_args(dst) or (Any, Any))[-1]
            for name, f in source.model_fields.items():
                why = _fits(f.annotation, value, depth + 1)
                if why:
                    return f"its field {name!r} does not fit: {why}"
    return None


def _model_fits(source: type[BaseModel], target: type[BaseModel], depth: int = 0) -> list[str]:
    """Why a ``source`` model's data (every field of it, as a record keeps it) is certainly not a
    valid ``target``: see :func:`_data_fits`."""
    if issubclass(source, target) or depth > _DEPTH:
        return []
    return _data_fits(source.__name__, _fields_of(source), target, depth)


def _data_fits(source: str, given: dict[str, Any], target: type[BaseModel], depth: int = 0) -> list[str]:
    """Why data with the fields ``given`` (key → type) is certainly not a valid ``target``: a field
    the target requires that it has not, a field of a type the target's does not take, a field the
    target forbids (``extra="forbid"``)."""
    found: list[str] = []
    if _reshapes(target):
        return found
    for name, f in target.model_fields.items():
        key = next((k for k in _keys(target, name) if k in given), None)
        if key is None:
            if f.is_required():
                found.append(f"{source} has no {_keys(target, name)[0]!r}, which {target.__name__} requires")
            continue
        why = _fits(given[key], _field_type(target, name), depth)
        if why:
            found.append(f"{source}.{key} does not fit {target.__name__}.{name}: {why}")
    if target.model_config.get("extra") == "forbid":
        extra = [k for k in given if _field_name(target, k) is None]
        if extra:
            found.append(f"{source} has {', '.join(map(repr, extra))}, which {target.__name__} does not take "
                         "(it forbids extra fields)")
    return found


def _expr_type(expr: Expression, path_type: typing.Callable[[tuple[str, ...]], tuple[Any, str | None]]) -> Any:
    """The type ``expr`` yields, as far as is known at load: a path's (its model's field), a
    literal's, a conversion's (``string(...)``), a comparison's or a logical one's (bool); Any otherwise."""
    from .expr import _tokens

    text = expr.cel.strip()
    tokens = _tokens(text)
    if len(tokens) == 1:
        kind, value = tokens[0]
        if kind == "str":
            return bytes if value[:1] in "bB" else str
        if kind == "num":
            low = value.lower()
            return float if ("." in low or "e" in low) and not low.startswith("0x") else int
        if value in ("true", "false"):
            return bool
    if len(expr.paths) == 1 and text == ".".join(expr.paths[0]) and tokens[0][1] != "null":
        tp, message = path_type(expr.paths[0])
        return Any if message else tp
    if len(tokens) >= 3 and tokens[0][1] in _CONVERSIONS and tokens[1][1] == "(" and _closes_at_end(tokens, 1):
        return _CONVERSIONS[tokens[0][1]]
    depth, ternary, logical = 0, False, False
    for kind, value in tokens:
        if value in "([{" and kind == "op":
            depth += 1
        elif value in ")]}" and kind == "op":
            depth -= 1
        elif depth == 0 and value == "?":
            ternary = True
        elif depth == 0 and ((kind == "op" and value in "<>=!&|") or (kind == "ident" and value == "in")):
            logical = True
    if logical and not ternary:
        return bool
    if tokens and tokens[0][1] == "[" and _closes_at_end(tokens, 0):
        return list
    if tokens and tokens[0][1] == "{" and _closes_at_end(tokens, 0):
        return dict
    return Any


def _closes_at_end(tokens: list[tuple[str | None, str]], start: int) -> bool:
    """Whether the bracket opened at ``tokens[start]`` closes at the last token."""
    depth = 0
    for k in range(start, len(tokens)):
        kind, value = tokens[k]
        if kind == "op" and value in "([{":
            depth += 1
        elif kind == "op" and value in ")]}":
            depth -= 1
            if depth == 0:
                return k == len(tokens) - 1
    return False


def _input_problems(fields: dict[str, Expression], target: type[BaseModel], loc: Loc, who: str, whose: str,
                    type_of: typing.Callable[[Expression], Any]) -> Iterator[Problem]:
    """``input:`` fields against ``target`` (``whose``: what it is, for the messages): each names a
    field of it (a dotted one, a field of the model or map a shorter one names), gives a type that
    field takes, and no field it requires is missing."""
    typed = {name: type_of(expr) for name, expr in fields.items()}
    yield from _fields_into(typed, target, (), loc, who, f"{target.__name__} ({whose})")


def _fields_into(typed: dict[str, Any], target: Any, prefix: tuple[str, ...], loc: Loc, who: str,
                 within: str) -> Iterator[Problem]:
    here = {name: tp for name, tp in typed.items() if tuple(name.split("."))[:len(prefix)] == prefix}
    firsts: dict[str, list[str]] = {}
    for name in here:
        if name.count(".") >= len(prefix):
            firsts.setdefault(name.split(".")[len(prefix)], []).append(name)
    model = _model_of(target)
    if model is not None and _reshapes(model):
        return
    if model is None:  # a map (its values' type), or a type not followed
        options = _options(target)
        value = (typing.get_args(options[0]) or (Any, Any))[-1] if (
            len(options) == 1 and typing.get_origin(options[0]) in _MAPPINGS) else Any
        for first in firsts:
            whole = ".".join((*prefix, first))
            why = _fits(here[whole], value) if whole in here else None
            if why:
                yield Problem((*loc, whole), f"{who}: input field {whole!r} gives {_name(here[whole])}, but "
                              f"{'.'.join(prefix)} is {_name(target)}: {why}")
        return
    for first, names in firsts.items():
        whole = ".".join((*prefix, first))
        field = _field_name(model, first)
        if field is None:
            if model.model_config.get("extra") != "allow":
                yield Problem((*loc, names[0]), f"{who}: input field {whole!r} is not a field of {within}; its "
                              f"fields: {_fields_list(model)}")
            continue
        annotation = _field_type(model, field)
        if whole in here:
            why = _fits(here[whole], annotation)
            if why:
                yield Problem((*loc, whole), f"{who}: input field {whole!r} gives {_name(here[whole])}, but "
                              f"{model.__name__}.{field} is {_name(annotation)}: {why}")
        if any(n != whole for n in names):
            inner = _model_of(annotation)
            yield from _fields_into(here, annotation, (*prefix, first), loc, who,
                                    inner.__name__ if inner is not None else _name(annotation))
    given = ".".join(prefix) in typed if prefix else False  # its own expression may give the rest
    missing = [_keys(model, n)[0] for n, f in model.model_fields.items()
               if f.is_required() and not set(_keys(model, n)) & set(firsts)]
    if missing and not given:
        at = f" {'.'.join(prefix)!r}" if prefix else ""
        yield Problem((*loc, ".".join(prefix)) if prefix else loc,
                      f"{who}: input{at} gives no {', '.join(map(repr, missing))}, which {within} requires")


def _flow_problems(spec: PipelineSpec, app: App, up: dict[str, set[str]], i: int, step: StepSpec,
                   item: Any, *, default: bool = True) -> Iterator[Problem]:
    """What the step is given against its agent's input model; its compensation's input against its
    agent's (or its tool's args)."""
    agent = app.agents.get(step.agent_name) if not step.waits else None
    who = f"step {step.id!r}"
    if agent is not None:
        whose = f"the input of agent {agent.name!r}"
        if step.input is not None:
            def type_of(expr: Expression) -> Any:
                return _expr_type(expr, lambda p: _path_type(spec, app, up, step, "input", expr, p, item=item))

            yield from _input_problems(dict(step.input), agent.input, ("steps", i, "input"), who, whose, type_of)
        elif default:
            taken = _default_input(spec, app, up, step, item)
            if taken is not None:
                where, what, given = taken
                for message in _data_fits(what, given, agent.input):
                    yield Problem(("steps", i, *where), f"{who} is given {what} as its input, which is no "
                                  f"{agent.input.__name__} ({whose}): {message}")
    undo = step.compensate
    if undo is None:
        return
    target: type[BaseModel] | None = None
    if undo.agent is not None and undo.agent in app.agents:
        target, whose = app.agents[undo.agent].input, f"the input of agent {undo.agent!r}"
    elif undo.tool is not None and undo.tool in app.tools:
        target, whose = app.tools[undo.tool].args, f"the args of tool {undo.tool!r}"
    step_input = agent.input if agent is not None else Any
    step_output = output_model(spec, app, step.id) or Any

    def comp_path(expr: Expression, path: tuple[str, ...]) -> tuple[Any, str | None]:
        what = f"step {step.id!r}: compensate input {expr.source!r} reads {'.'.join(path)}"
        if path[0] in ("key", "task_id", "job_id"):
            return (str, None) if len(path) == 1 else (None, f"{what}, but {path[0]} is a string")
        if path[0] == "input":
            return _walk(step_input, path[1:], what, f"the step's input ({_name(step_input)})", given=True)
        if path[0] == "output":
            return _walk(step_output, path[1:], what, f"the step's output ({_name(step_output)})")
        return None, (f"{what}, but a compensation reads only input (the step's input), output (its output), "
                      "key and job_id")

    for name, expr in (undo.input or {}).items():
        for path in expr.paths:
            _, unread = comp_path(expr, path)
            if unread:
                yield Problem(("steps", i, "compensate", "input", name), unread)
    if target is None:
        return
    loc: Loc = ("steps", i, "compensate", "input")
    if undo.input is not None:
        yield from _input_problems(dict(undo.input), target, loc, f"step {step.id!r}: compensate", whose,
                                   lambda e: _expr_type(e, lambda p: comp_path(e, p)))
    elif undo.tool is not None and _model_of(step_output) is not None:
        for message in _model_fits(typing.cast(type[BaseModel], step_output), target):
            yield Problem(("steps", i, "compensate", "tool"), f"step {step.id!r}: compensate calls tool "
                          f"{undo.tool!r} with the step's output, which is no {target.__name__} ({whose}): {message}")
    elif undo.agent is not None:
        given = {"input": step_input, "output": step_output}
        for message in _data_fits("the step's input and output", given, target):
            yield Problem(("steps", i, "compensate", "agent"), f"step {step.id!r}: compensate gives agent "
                          f"{undo.agent!r} {{input, output}} of the step, which is no {target.__name__} ({whose}): "
                          f"{message}")


def _default_input(spec: PipelineSpec, app: App, up: dict[str, set[str]], step: StepSpec,
                   item: Any) -> tuple[Loc, str, dict[str, Any]] | None:
    """What a step without ``input:`` is given, as (where the spec says so, what it is, its fields →
    their types), None when not known at load. As the engine builds it: ``state_input``'s output;
    a ``for_each`` item (a map as is, else as ``item``); one dependency's output; several keyed by
    id; none: the run's input (typed by ``input_schema``)."""
    if step.state_input:
        for source in sorted(up[step.id]):
            if source == step.state_input or spec.step(source).output_schema == step.state_input:
                given = _output_fields(spec, app, source)
                return None if given is None else (("state_input",), _output_name(spec, app, source), given)
        return None
    if step.for_each is not None:
        if item is None or item is Any:
            return None
        model = _model_of(item)
        if model is not None:
            return ("for_each",), f"each item ({model.__name__})", _fields_of(model)
        if _kind(item) == "map":
            return None
        return ("for_each",), f"each item as {{item: {_name(item)}}}", {"item": item}
    if not step.depends_on:
        model = input_model(spec, app)
        if model is None:
            return None
        return ("id",), f"the run's input ({model.__name__}, its input_schema)", _fields_of(model, by_alias=True)
    if len(step.depends_on) == 1:
        source = step.depends_on[0]
        if source not in up[step.id]:
            return None
        given = _output_fields(spec, app, source)
        return None if given is None else (("depends_on",), _output_name(spec, app, source), given)
    outputs: dict[str, Any] = {}
    for source in step.depends_on:
        model = output_model(spec, app, source) if source in up[step.id] else None
        outputs[source] = Any if model is None else (
            _join_model(model) if spec.step(source).for_each is not None else model)
    return ("depends_on",), f"the outputs of steps {', '.join(step.depends_on)} by id", outputs


def _output_name(spec: PipelineSpec, app: App, source: str) -> str:
    model = output_model(spec, app, source)
    name = model.__name__ if model is not None else "?"
    if spec.step(source).for_each is not None:
        return f"the join of step {source!r} ({{items: [{name}], failed, skipped}})"
    return f"{name} (the output of step {source!r})"


def _fields_of(model: type[BaseModel], *, by_alias: bool = False) -> dict[str, Any]:
    """A model's data as a job's record keeps it, key → type: an output by field name (a worker
    dumps it so), a run's input (``by_alias``) by the keys its model validates."""
    return {(_keys(model, n)[0] if by_alias else n): f.annotation for n, f in model.model_fields.items()}


def _output_fields(spec: PipelineSpec, app: App, source: str) -> dict[str, Any] | None:
    """A step's output as the step after it is given it, field → type (a ``for_each`` step's: its join)."""
    model = output_model(spec, app, source)
    if model is None:
        return None
    if spec.step(source).for_each is not None:
        return _fields_of(_join_model(model))
    return _fields_of(model)


_JOINS: dict[type[BaseModel], type[BaseModel]] = {}


def _join_model(model: type[BaseModel]) -> type[BaseModel]:
    """A ``for_each`` step's output as a model: its items' outputs, the failed ones' errors, the skipped."""
    from pydantic import create_model

    if model not in _JOINS:
        _JOINS[model] = create_model(f"{model.__name__}Join", items=(list[model], ...),  # type: ignore[valid-type]
                                     failed=(dict[str, str], ...), skipped=(list[str], []))
    return _JOINS[model]


def input_model(spec: PipelineSpec, app: App) -> type[BaseModel] | None:
    """The model a run's input satisfies: its ``input_schema``'s (None without one, or if unknown)."""
    name = getattr(spec, "input_schema", None)
    if not name:
        return None
    models = schema_names(app).get(name, [])
    return models[0] if len(models) == 1 else None
