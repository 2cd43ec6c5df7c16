"""The fenced code blocks of the documentation, and how their output is compared.

A block is run according to its language (``python``, ``console``, ``bash``, ...) and the marker
lines right above its fence, HTML comments a reader of the site never sees:

    <!-- docs: skip (reason) -->        not run; counted and reported with its reason
    <!-- docs: file PATH -->            the block is the whole of PATH (kept equal), and is run too
    <!-- docs: excerpt PATH -->         every line of the block is a line of PATH, in order
    <!-- docs: worker [ARGS] -->        before the block, start ``mesh worker ARGS`` for the rest of
                                        the page (text in parentheses is a comment)
    <!-- docs: pytest -->               the block is a test module: pytest runs it

A ``text`` block right after a ``python`` block is what that block prints. In a ``console``
block, ``$ `` starts a command (a line ending in ``\\`` continues it) and the lines up to the next
command are its output; ``[exit N]`` as the last of them is its exit status. Outputs are compared
after :func:`normalise` (ids, digests, times and durations vary from run to run); in an expected
output ``…`` stands for any text within a line, and a line holding only ``…`` for any lines.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

MARKER = re.compile(r"^<!-- docs: (\w+)\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```([\w+-]*)\s*$")
EXIT = re.compile(r"^\[exit (\d+)\]$")

#: Languages that are data or illustration, not code to run: parsed where a parser exists.
DATA = {"yaml", "json", "toml"}
TEXT = {"", "text"}
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell"}
CONSOLE = {"console"}


@dataclass
class Block:
    """One fenced block: where it is, its language, its text and the markers above it."""

    path: Path
    line: int
    lang: str
    text: str
    markers: list[tuple[str, str]] = field(default_factory=list)

    def marker(self, kind: str) -> str | None:
        """The argument of the first marker of ``kind`` above the block, or None."""
        return next((arg for k, arg in self.markers if k == kind), None)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order, each with its markers."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: a code block is never closed")
        blocks.append(Block(path, i + 1, match.group(1), "\n".join(lines[i + 1:end]), _markers(lines, i)))
        i = end + 1
    return blocks


def _markers(lines: list[str], fence: int) -> list[tuple[str, str]]:
    """The marker lines right above line ``fence`` (no blank line between), top first."""
    found: list[tuple[str, str]] = []
    j = fence - 1
    while j >= 0 and (m := MARKER.match(lines[j].strip())):
        found.insert(0, (m.group(1), m.group(2)))
        j -= 1
    return found


def worker_args(arg: str) -> list[str]:
    """The ``mesh worker`` arguments of a ``worker`` marker, its parenthesised comment left out."""
    return shlex.split(re.sub(r"\([^)]*\)", "", arg))


@dataclass
class Command:
    """One ``$`` command of a console block and the output the page shows for it."""

    command: str
    expected: list[str]
    status: int = 0


def console_commands(text: str) -> list[Command]:
    """The commands of a console block with their expected outputs and exit statuses."""
    commands: list[Command] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise ValueError(f"console output before any command: {lines[i]!r}")
        command = lines[i][2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command + "\n" + lines[i]
        i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        status = 0
        if output and (m := EXIT.match(output[-1].strip())):
            status = int(m.group(1))
            output.pop()
        commands.append(Command(command, output, status))
    return commands


_NORMAL = [
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "…"),  # uuids
    (re.compile(r"\bjob-[0-9a-f]{6,}\b"), "job-…"),
    (re.compile(r"\b[0-9a-f]{12,}\b"), "…"),  # trace ids, digests, keys
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?"), "…"),  # times
    (re.compile(r"\b\d+(\.\d+)?\s?(ms|µs|s)\b"), "…s"),  # durations
]


def normalise(text: str, namespace: str | None = None) -> str:
    """``text`` with what varies between runs replaced: ids, digests, times, durations."""
    if namespace:
        text = text.replace(namespace, "<ns>")
    for pattern, replacement in _NORMAL:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n"))


def matches(expected: str, actual: str) -> bool:
    """Whether ``actual`` is what ``expected`` shows, ``…`` standing for any text (a line of its own:
    any lines). Both are normalised by the caller."""
    parts = []
    for line in expected.split("\n"):
        if line.strip() == "…":
            parts.append(r"(?:[^\n]*(?:\n|$))*?")
        else:
            parts.append("[^\n]*?".join(re.escape(p) for p in line.split("…")) + r"[ \t]*(?:\n|$)")
    return re.fullmatch("".join(parts), actual + "\n" if actual else "") is not None


def _code(line: str) -> str:
    """A line without its end-of-line comment: an excerpt may annotate what it quotes."""
    return re.sub(r"\s+#\s.*$", "", line).strip()


def excerpt_missing(block: str, source: str) -> str | None:
    """The first line of ``block`` not found in ``source`` after the previous one, or None: an
    excerpt keeps the file's lines in order (blank lines, comments and ``...`` elisions aside)."""
    lines = [_code(line) for line in source.split("\n")]
    at = 0
    for line in block.split("\n"):
        if not _code(line) or _code(line) in ("...", "…"):
            continue
        found = next((k for k in range(at, len(lines)) if lines[k] == _code(line)), None)
        if found is None:
            return line
        at = found + 1
    return None
