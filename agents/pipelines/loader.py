"""Load a pipeline from YAML into :class:`PipelineSpec`, reporting every error as ``FILE:LINE: message``.

The YAML is composed into nodes first (PyYAML keeps each node's line), then constructed into plain
data; pydantic's error locations and the validator's locations are mapped back to those nodes.
A key given twice in one mapping is an error (plain YAML would keep the last silently).

A pipeline file is hostile input until it loads: anchors and aliases are refused (an alias bomb
expands to billions of nodes), and so are files over :data:`MAX_FILE_BYTES`, nesting deeper than
:data:`MAX_DEPTH` and more than :data:`MAX_STEPS` steps, each as ``FILE:LINE: message``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from mesh.contracts import ConfigError

from . import validate
from .spec import MAX_STEPS, PipelineSpec

if TYPE_CHECKING:
    from mesh.agents.app import App

#: Largest pipeline file (bytes): far above any real pipeline, far below what hurts a worker.
MAX_FILE_BYTES = 1024 * 1024
#: Deepest nesting of mappings and lists in a pipeline file.
MAX_DEPTH = 32

#: The spec's field names as a file may spell them.
_ALIASES: dict[str | int, tuple[str, ...]] = {"steps": ("steps", "agents"), "on_false": ("on_false", "failure_mode")}


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
            text = _read_file(Path(source)).decode("utf-8")
        except OSError as exc:
            where = "" if Path(source).is_absolute() else (
                f" (a relative path, read from the current directory {os.getcwd()})")
            raise PipelineError([LoadError(name, 1, f"cannot read the file: {exc.strerror or exc}{where}")]) from None
        except UnicodeDecodeError as exc:
            raise PipelineError([LoadError(name, 1, f"not UTF-8: {exc.reason} at byte {exc.start}")]) from None
        except ValueError as exc:
            raise PipelineError([LoadError(name, 1, str(exc))]) from None
    else:
        name, text = "<string>", source
    return parse(text, app, name)


def _read_file(path: Path) -> bytes:
    """The bytes of the regular file at ``path``, read without blocking and never past the limit.

    Its size is checked before it is read into memory; a FIFO (whose open would wait for a writer)
    or a device such as ``/dev/zero`` (size 0, endless) is refused, as ValueError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file: a pipeline file must be a plain file")
        if info.st_size > MAX_FILE_BYTES:
            raise ValueError(_too_big(info.st_size))
        data = stream.read(MAX_FILE_BYTES + 1)  # it may have grown since fstat
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(_too_big(len(data)))
    return data


def parse(text: str, app: App, name: str = "<string>") -> PipelineSpec:
    """Like :func:`load_pipeline`, from YAML text named ``name`` in its errors."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_BYTES:
        raise PipelineError([LoadError(name, 1, _too_big(size))])
    node, data = _compose(text, name)
    _count_steps(node, data, name)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise PipelineError([LoadError(name, _line(node, e["loc"]), _message(e)) for e in exc.errors()]) from None
    found = validate.problems(spec, app)
    if found:
        raise PipelineError([LoadError(name, _line(node, p.loc), p.message) for p in found])
    return spec


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader refusing aliases and nesting deeper than :data:`MAX_DEPTH`, each at its line."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a pipeline file; "
                                              "write the value out", event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                              event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _too_big(size: int) -> str:
    return f"the file is {size} bytes, over the {MAX_FILE_BYTES} a pipeline file may have"


def _compose(text: str, name: str) -> tuple[yaml.Node, Any]:
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # a control character: the reader checks the whole text first
        line = text[:exc.position].count("\n") + 1
        raise PipelineError([LoadError(name, line, f"not valid YAML: character {exc.character:#06x} is not "
                                                   "allowed")]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise PipelineError([LoadError(name, 1, "the file is empty; a pipeline needs name: and steps:")])
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
                                       "a pipeline is a mapping (name:, version:, steps:, ...)")])
    return node, data


def _count_steps(node: yaml.Node, data: dict[Any, Any], name: str) -> None:
    """Refuse more than :data:`MAX_STEPS` steps before anything walks them."""
    for key in _ALIASES["steps"]:
        steps = data.get(key)
        if isinstance(steps, list) and len(steps) > MAX_STEPS:
            raise PipelineError([LoadError(name, _line(node, (key,)), f"{key}: {len(steps)} steps, over the "
                                                                     f"{MAX_STEPS} a pipeline may have")])


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
        field = model.model_fields.get(next((k for k, names in _ALIASES.items() if part in names), part))
        if field is None:
            return []
        model = next((t for t in validate._options(field.annotation) if isinstance(t, type)
                      and issubclass(t, BaseModel)), None) or _step_model(field.annotation)
        if model is None:
            return []
    return [("steps (or agents)" if name == "steps" else name) for name in model.model_fields]


def _step_model(annotation: Any) -> Any:
    element = validate._element(annotation)
    return element if isinstance(element, type) and issubclass(element, BaseModel) else None
