"""The pipelines' one expression language: CEL, compiled once at load time, evaluated many times.

Gates and ``when`` conditions are CEL (``coder.confidence >= 0.85 && input.lang == "go"``), run by
``common-expression-language`` (a Rust CEL core): side-effect free, no attribute access into Python,
never ``eval``. ``{{ path }}`` is sugar for a path, so a file may write ``"{{coder.confidence}} >= 0.85"``.
Key templates (``idempotency_key``) are literal text with ``{{ path }}`` holes; they compile to a
CEL string concatenation (``"{{key}}:coder"`` → ``string(key) + ":coder"``; ``key`` is the job's key,
``task_id`` its older name).

Each compiled expression knows the paths it reads (``("coder", "confidence")``), so the loader can
check them against the upstream steps' output models before anything runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from mesh.contracts import ConfigError, MeshError

from . import sandbox
from .evaluator_main import cel

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*$")
_HOLE = re.compile(r"\{\{(.*?)\}\}", re.S)
#: Longest expression (characters, as written and as compiled): a 180 KB chain of macros compiles
#: but overflows the evaluator's stack.
MAX_EXPR_CHARS = 4096
#: Deepest nesting of parentheses, brackets and braces in an expression.
MAX_EXPR_NESTING = 32
#: Most macro calls (``all``, ``exists``, ``exists_one``, ``map``, ``filter``) in an expression: each
#: may multiply the work and the data (34 chained ``.map(s, s + s)`` double a string 2**34 times).
MAX_MACROS = 8
#: Deepest nesting of macro calls (a macro inside a macro's body): the work grows as size**depth.
MAX_MACRO_DEPTH = 3
#: CEL words that read like identifiers but are not variables.
_WORDS = frozenset({"true", "false", "null", "in"})
#: Macros whose first argument binds a variable (``list.exists(x, x > 1)``): ``x`` is no path.
_BINDERS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_TOKEN = re.compile(r"""
    (?P<str>[rRbB]{0,2}(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'))
  | (?P<num>0[xX][0-9a-fA-F]+[uU]?|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[uU]?|\.\d+(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\S)
""", re.X)


class ExpressionError(MeshError):
    """An expression could not be evaluated against the values given (a missing field, a wrong type)."""


class ExpressionLimit(ExpressionError):
    """An expression went past a run-time limit (MESH_EXPR_TIMEOUT_MS, MESH_EXPR_MEMORY_MB,
    MESH_EXPR_MAX_RESULT_BYTES) or killed its evaluator: its step is dead-lettered, never retried."""

    terminal = True


class Expression:
    """One compiled expression: the text as written (``source``), the CEL it compiled to (``cel``),
    the compiled program and the paths it reads. Pydantic fields of this type accept the text and
    serialise back to it, so a spec's JSON (and its digest) holds what the user wrote."""

    kind: ClassVar[str] = "expression"
    __slots__ = ("cel", "names", "paths", "program", "source")

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise ValueError(_not_text(self.kind, source))
        if not source.strip():
            raise ValueError(f"{_article(self.kind)} {self.kind} must be a non-empty string")
        if len(source) > MAX_EXPR_CHARS:
            raise ValueError(f"a {self.kind} of {len(source)} characters is over the {MAX_EXPR_CHARS} allowed")
        self.source = source
        self.cel = self._to_cel(source)
        tokens = _tokens(self.cel)
        _check_shape(self.kind, source, self.cel, tokens)
        try:
            self.program = cel.compile(self.cel)
        except ValueError as exc:
            raise ValueError(f"{self.kind} {source!r} does not compile: {_first_error(exc)}") from None
        self.names = frozenset(self.program.variables())
        self.paths = _paths(tokens, set(self.names))

    def _to_cel(self, source: str) -> str:
        return _HOLE.sub(lambda m: _hole(m.group(1)), source)

    def operations(self) -> list[Operation]:
        """The binary operations (comparisons, arithmetic) whose two operands are each a path or a
        literal, as CEL parses them (``a.x >= "high"``, not the ``1 >= "high"`` of ``a.x + 1 >=
        "high"``), for the loader to check their types. Conservative: an operand that is anything
        else (a call, an index, a negation, a list) leaves its operation out."""
        return _operations(_tokens(self.cel))

    def evaluate(self, values: Mapping[str, Any]) -> Any:
        """The expression's value over ``values`` (``{"coder": {...}, "key": "...", ...}``),
        computed by this process's evaluator (:mod:`.sandbox`) from the names it reads;
        :class:`ExpressionLimit` past a run-time limit."""
        sent = {name: value for name, value in values.items() if name in self.names}
        try:
            status, value = sandbox.evaluator().evaluate(self.cel, sent)
        except sandbox.EvaluatorLimit as exc:
            raise ExpressionLimit(f"{self.kind} {_short(self.source)}: {exc.message}") from None
        if status == "error":
            raise ExpressionError(f"{self.kind} {self.source!r}: cannot evaluate: {value}")
        return value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and type(other) is type(self) and other.source == self.source

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.source))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    def __str__(self) -> str:
        return self.source

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def build(value: Any) -> Expression:
            return value if isinstance(value, cls) else cls(value)

        return core_schema.no_info_plain_validator_function(
            build, json_schema_input_schema=core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda e: e.source))


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _not_text(kind: str, value: Any) -> str:
    """Why ``value`` (what YAML made of an unquoted scalar, or a list or map) is no expression, and how
    to write what was meant."""
    import datetime

    said = f"{_article(kind)} {kind} is CEL text"
    if value is None:
        return f"{said}, but YAML read this one as null: leave the key out, or write 'null' quoted"
    if isinstance(value, bool | int | float):
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        return f"{said}, but YAML read {shown} as {_article(type(value).__name__)} {type(value).__name__}: quote it " \
               f"({shown!r})"
    if isinstance(value, datetime.datetime):
        return (f"{said}, but YAML read {value} as a timestamp: write '\"{value}\"' for the string, quoted for "
                "YAML and for CEL")
    if isinstance(value, datetime.date):
        shown = value.isoformat()
        return (f"{said}, but YAML read {shown} as a date (in CEL, {shown} would be a subtraction): write "
                f"'\"{shown}\"' for the string, quoted for YAML and for CEL")
    return f"{said}, not {_article(type(value).__name__)} {type(value).__name__}"


class Condition(Expression):
    """A CEL condition (``gate``, ``when``): true or false over the job and the upstream outputs."""

    kind = "condition"

    def test(self, values: Mapping[str, Any]) -> bool:
        result = self.evaluate(values)
        if not isinstance(result, bool):
            raise ExpressionError(f"condition {self.source!r} gave {result!r}, not true or false")
        return result


class ListExpr(Expression):
    """What ``for_each`` walks: a CEL expression giving a list. A path (``researcher.sources`` or
    ``{{researcher.sources}}``), or any expression over the same names (``plan.steps.filter(s,
    s.kind == "research")``)."""

    kind = "for_each expression"


class KeyTemplate(Expression):
    """Text with ``{{ path }}`` holes (``"{{key}}:coder"``), rendered to a string."""

    kind = "key template"
    #: Why a template without a hole is refused.
    constant = "every job would render the same key and share one effect; use e.g. \"{{key}}:step\""

    def _to_cel(self, source: str) -> str:
        parts: list[str] = []
        at = 0
        for m in _HOLE.finditer(source):
            if m.start() > at:
                parts.append(json.dumps(source[at:m.start()]))
            parts.append(f"string({_hole(m.group(1))})")
            at = m.end()
        if not parts or all(p.startswith('"') for p in parts):
            raise ValueError(f"{self.kind} {source!r} holds no {{{{ path }}}}: {self.constant}")
        if at < len(source):
            parts.append(json.dumps(source[at:]))
        return " + ".join(parts)

    def render(self, values: Mapping[str, Any]) -> str:
        return str(self.evaluate(values))


class ItemIdTemplate(KeyTemplate):
    """A ``for_each`` item's id (``"{{item.step_id}}"``): text with ``{{ path }}`` holes over ``item``."""

    kind = "item_id template"
    constant = "every item would get the same id; use e.g. \"{{item.step_id}}\""


def compile_condition(text: str) -> Condition:
    """Compile a condition, raising :class:`ConfigError` with CEL's message on a syntax error."""
    return _compile(Condition, text)


def compile_template(text: str) -> KeyTemplate:
    """Compile a key template, raising :class:`ConfigError` if it does not compile or has no hole."""
    return _compile(KeyTemplate, text)


def evaluate(expr: Expression, values: Mapping[str, Any]) -> Any:
    """The value of a compiled expression over ``values``; :class:`ExpressionError` if it cannot be had."""
    return expr.evaluate(values)


def _compile(kind: type[Any], text: str) -> Any:
    try:
        return kind(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _short(source: str) -> str:
    """An expression as it is named in an error: cut to 120 characters (a refused one may be long)."""
    return repr(source if len(source) <= 120 else source[:117] + "...")


def _hole(inner: str) -> str:
    path = inner.strip()
    if not _PATH.match(path):
        raise ValueError(f"{{{{{inner}}}}} must hold a path (step.field); write other expressions as plain CEL")
    return path


def _first_error(exc: ValueError) -> str:
    message = str(exc)
    m = re.search(r"ERROR: <input>:(\d+:\d+): (.*)", message)
    return f"at {m.group(1)}: {m.group(2)}" if m else message.splitlines()[0]


Token = tuple[str | None, str]


def _tokens(text: str) -> list[Token]:
    return [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text)]


def _check_shape(kind: str, source: str, text: str, tokens: list[Token]) -> None:
    """ValueError for an expression past the load-time limits: length (of its CEL too), nesting,
    macro calls and their nesting."""
    what = f"{kind} {_short(source)}"
    if len(text) > MAX_EXPR_CHARS:
        raise ValueError(f"{what} compiles to {len(text)} characters, over the {MAX_EXPR_CHARS} allowed")
    depth = deepest = macros = 0
    open_macros: list[int] = []  # the nesting depth each open macro call's "(" is at
    for i, (kind_, value) in enumerate(tokens):
        if value in "([{" and kind_ == "op":
            depth += 1
            deepest = max(deepest, depth)
            if value == "(" and i >= 2 and tokens[i - 2][1] == "." and tokens[i - 1][1] in _BINDERS:
                macros += 1
                open_macros.append(depth)
                if len(open_macros) > MAX_MACRO_DEPTH:
                    raise ValueError(f"{what} nests macros {len(open_macros)} deep, over the {MAX_MACRO_DEPTH} "
                                     "allowed")
        elif value in ")]}" and kind_ == "op":
            if open_macros and open_macros[-1] == depth:
                open_macros.pop()
            depth -= 1
    if deepest > MAX_EXPR_NESTING:
        raise ValueError(f"{what} nests {deepest} levels deep, over the {MAX_EXPR_NESTING} allowed")
    if macros > MAX_MACROS:
        raise ValueError(f"{what} calls {macros} macros (map, filter, all, exists, exists_one), over the "
                         f"{MAX_MACROS} allowed")


def _paths(tokens: list[Token], variables: set[str]) -> tuple[tuple[str, ...], ...]:
    """The member paths a CEL text reads, e.g. ``("coder", "confidence")``, from a lexical scan
    (strings and numbers skipped; function and method names dropped). A macro's variable
    (``list.map(x, ...)``) is bound only inside that macro's parentheses: the same name outside
    them is a path like any other. Every variable CEL itself reports is covered even if the scan
    missed its path (except names the scan saw bound only)."""
    bound = _bound(tokens)
    found: list[tuple[str, ...]] = []
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind != "ident" or value in _WORDS or (i > 0 and tokens[i - 1][1] == "."):
            i += 1
            continue
        path = [value]
        j = i + 1
        while j + 1 < len(tokens) and tokens[j][1] == "." and tokens[j + 1][0] == "ident":
            path.append(tokens[j + 1][1])
            j += 2
        if j < len(tokens) and tokens[j][1] == "(":
            path.pop()  # a function or method call: its name is no field
        if path and value not in bound.get(i, ()):
            found.append(tuple(path))
        i = j
    roots = {p[0] for p in found}
    only_bound = {name for names in bound.values() for name in names} - roots
    found += [(v,) for v in sorted(variables - roots - only_bound)]
    return tuple(dict.fromkeys(found))


def _bound(tokens: list[Token]) -> dict[int, frozenset[str]]:
    """Token index → the macro variables in scope there: ``.map(x, ...)`` binds ``x`` from the
    variable to the macro's closing parenthesis."""
    scopes: dict[int, set[str]] = {}
    opened: list[tuple[int, str | None]] = []  # (index of "(", the variable it binds)
    for i, (_, value) in enumerate(tokens):
        if value == "(":
            binds = (i >= 2 and tokens[i - 2][1] == "." and tokens[i - 1][1] in _BINDERS
                     and i + 2 < len(tokens) and tokens[i + 1][0] == "ident" and tokens[i + 2][1] == ",")
            opened.append((i, tokens[i + 1][1] if binds else None))
        elif value == ")" and opened:
            start, name = opened.pop()
            if name is not None:
                for k in range(start + 1, i):
                    scopes.setdefault(k, set()).add(name)
    return {k: frozenset(v) for k, v in scopes.items()}


@dataclass(frozen=True)
class Operand:
    """One side of an :class:`Operation`: a path read (``("coder", "confidence")``), or a literal
    as written with its CEL type (``"high"``, ``string``)."""

    text: str
    path: tuple[str, ...] | None = None
    kind: str | None = None  # a literal's: string, int, uint, double, bool, null


@dataclass(frozen=True)
class Operation:
    """``left op right``, an operator applied to two operands an expression reads."""

    op: str
    left: Operand
    right: Operand


#: Binary operators by precedence (higher binds tighter); the ones whose operand types are checked.
_PRECEDENCE = {"||": 1, "&&": 2, "<": 3, "<=": 3, ">": 3, ">=": 3, "==": 3, "!=": 3, "in": 3,
               "+": 4, "-": 4, "*": 5, "/": 5, "%": 5}
_CHECKED = frozenset({"<", "<=", ">", ">=", "==", "!=", "+", "-", "*", "/", "%"})
_TWO = frozenset({"<=", ">=", "==", "!=", "&&", "||"})
#: What may stand right before an operand, or right after one, without binding it elsewhere.
_BEFORE = frozenset({"(", "[", "{", ",", "?", ":"})
_AFTER = frozenset({")", "]", "}", ",", "?", ":"})


def _operations(tokens: list[Token]) -> list[Operation]:
    """The operations of :meth:`Expression.operations`: the text cut into units (a path, a literal,
    an operator, other), then each operator between two operands that its neighbours do not bind."""
    bound = _bound(tokens)
    units: list[tuple[str, Any]] = []  # ("operand", Operand) | ("op", "<=") | ("punct", "(") | ("other", text)
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "ident" and value in ("true", "false", "null"):
            units.append(("operand", Operand(value, kind="null" if value == "null" else "bool")))
        elif kind == "ident" and value == "in":
            units.append(("op", "in"))
        elif kind == "ident" and not (i > 0 and tokens[i - 1][1] == "."):
            j = i + 1
            while j + 1 < len(tokens) and tokens[j][1] == "." and tokens[j + 1][0] == "ident":
                j += 2
            path = tuple(v for k, v in tokens[i:j] if k == "ident")
            called = j < len(tokens) and tokens[j][1] in ("(", "[", ".")
            plain = not called and value not in bound.get(i, ())
            units.append(("operand", Operand(".".join(path), path=path)) if plain else ("other", value))
            i = j
            continue
        elif kind == "str":
            text = re.match(r"[rR]?[\"']", value) is not None  # b"..." is bytes: not checked
            units.append(("operand", Operand(value, kind="string")) if text else ("other", value))
        elif kind == "num":
            low = value.lower()
            units.append(("operand", Operand(value, kind="uint" if low.endswith("u") else
                                             "double" if ("." in low or "e" in low) and not low.startswith("0x")
                                             else "int")))
        elif kind == "op" and i + 1 < len(tokens) and value + tokens[i + 1][1] in _TWO:
            units.append(("op", value + tokens[i + 1][1]))
            i += 2
            continue
        elif kind == "op" and value in _PRECEDENCE:
            units.append(("op", value))
        elif kind == "op" and (value in _BEFORE or value in _AFTER):
            units.append(("punct", value))
        else:
            units.append(("other", value))
        i += 1
    found: list[Operation] = []
    for k in range(1, len(units) - 1):
        (tag, op), (ltag, left), (rtag, right) = units[k], units[k - 1], units[k + 1]
        if tag != "op" or op not in _CHECKED or ltag != "operand" or rtag != "operand":
            continue
        before = units[k - 2] if k >= 2 else ("punct", "(")
        after = units[k + 2] if k + 2 < len(units) else ("punct", ")")
        free_before = (before[0] == "punct" and before[1] in _BEFORE) or (
            before[0] == "op" and before[1] not in ("-", "!") and _PRECEDENCE[before[1]] < _PRECEDENCE[op])
        free_after = (after[0] == "punct" and after[1] in _AFTER) or (
            after[0] == "op" and after[1] != "!" and _PRECEDENCE.get(after[1], 99) <= _PRECEDENCE[op])
        if free_before and free_after:
            found.append(Operation(op, left, right))
    return found
