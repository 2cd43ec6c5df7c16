"""Load a pipeline from YAML into :class:`PipelineSpec`, reporting every error as ``FILE:LINE: message``.

The YAML is composed into nodes first (PyYAML keeps each node's line), then constructed into plain
data; pydantic's error locations and the validator's locations are mapped back to those nodes.
A key given twice in one mapping is an error (plain YAML would keep the last silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from mesh.contracts import ConfigError

from . import validate
from .spec import PipelineSpec

if TYPE_CHECKING:
    from mesh.agents.app import App

#: The spec's field names as a file may spell them.
_ALIASES: dict[str | int, tuple[str, ...]] = {"steps": ("steps", "agents")}


@dataclass(frozen=True)
class LoadError:
    """One error in a pipeline file, at its line (1-based)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class PipelineError(ConfigError):
    """A pipeline file that does not load; ``errors`` holds each one, in line order."""

    def __init__(self, errors: list[LoadError]) -> None:
        self.errors = sorted(errors, key=lambda e: e.line)
        super().__init__("\n".join(map(str, self.errors)))


def load_pipeline(source: str | Path, app: App) -> PipelineSpec:
    """The pipeline in ``source`` checked against ``app``'s agents; :class:`PipelineError` otherwise.

    A :class:`~pathlib.Path`, or a string without a newline, is a file to read; a string with a
    newline is the YAML itself (reported as ``<string>``)."""
    if isinstance(source, Path) or "\n" not in source:
        name = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise PipelineError([LoadError(name, 1, f"cannot read the file: {exc.strerror or exc}")]) from None
    else:
        name, text = "<string>", source
    return parse(text, app, name)


def parse(text: str, app: App, name: str = "<string>") -> PipelineSpec:
    """Like :func:`load_pipeline`, from YAML text named ``name`` in its errors."""
    node, data = _compose(text, name)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise PipelineError([LoadError(name, _line(node, e["loc"]), _message(e)) for e in exc.errors()]) from None
    found = validate.problems(spec, app)
    if found:
        raise PipelineError([LoadError(name, _line(node, p.loc), p.message) for p in found])
    return spec


def _compose(text: str, name: str) -> tuple[yaml.Node, Any]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise PipelineError([LoadError(name, 1, "the file is empty; a pipeline needs name: and agents:")])
        _no_duplicate_keys(node, name)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PipelineError([LoadError(name, line, f"not valid YAML: {exc.problem or exc.context}")]) from None
    except yaml.YAMLError as exc:
        raise PipelineError([LoadError(name, 1, f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise PipelineError([LoadError(name, node.start_mark.line + 1,
                                       "a pipeline is a mapping (name:, version:, agents:, ...)")])
    return node, data


def _no_duplicate_keys(node: yaml.Node, name: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise PipelineError([LoadError(name, key.start_mark.line + 1, f"key {key.value!r} is given twice")])
                seen.add(key.value)
            _no_duplicate_keys(value, name)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item, name)


def _line(root: yaml.Node, loc: tuple[str | int, ...]) -> int:
    """The line of the deepest node ``loc`` reaches (a mapping entry's key line, a list item's line)."""
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            keys = _ALIASES.get(part, (str(part),))
            entry = next(((k, v) for k, v in node.value if k.value in keys), None)
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _message(error: Any) -> str:
    loc = tuple(error["loc"])
    where = _dotted(loc)
    if error["type"] == "extra_forbidden":
        allowed = _keys(loc[:-1])
        return f"unknown key {loc[-1]!r} in {_dotted(loc[:-1]) or 'the pipeline'}; allowed: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{where}: required key missing"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    got = f" (got {value!r})" if isinstance(value, str | int | float | bool) and error["type"] != "value_error" else ""
    return f"{where}: {message}{got}" if where else message


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "float", "str", "bool"):
            break  # pydantic names the union member it tried
        else:
            out += f".{part}" if out else str(part)
    return out


def _keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the spec model at ``loc`` takes (as a file spells them)."""
    model: Any = PipelineSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get("steps" if part == "agents" else part)
        if field is None:
            return []
        model = next((t for t in validate._options(field.annotation) if isinstance(t, type)
                      and issubclass(t, BaseModel)), None) or _step_model(field.annotation)
        if model is None:
            return []
    return [("agents|steps" if name == "steps" else name) for name in model.model_fields]


def _step_model(annotation: Any) -> Any:
    element = validate._element(annotation)
    return element if isinstance(element, type) and issubclass(element, BaseModel) else None
