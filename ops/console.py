"""What every ``mesh`` command shares: consoles, exit codes, settings, the client, JSON output, and
listings that never cut a value a command takes as input."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NoReturn

import orjson
import redis
import typer
from redis.cluster import RedisCluster
from redis.sentinel import MasterNotFoundError
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, JustifyMethod, RenderResult
from rich.table import Table
from rich.text import Text

from mesh.broker import MeshClient, MeshSettings
from mesh.broker.connection import masked_url, parse_url
from mesh.contracts import ConfigError
from mesh.ops.escape import CONTROL, escape, escape_json, install

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
# Data printed raw could carry ESC sequences to the operator's terminal (see ops/escape.py).
install((out, err))

#: Exit codes: 0 ok; 1 the job did not succeed; 2 bad input; 3 Redis unreachable; 4 timed out.
EXIT_FAILED, EXIT_INPUT, EXIT_REDIS, EXIT_TIMEOUT = 1, 2, 3, 4

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
WaitFlag = Annotated[bool, typer.Option("--wait", help="Wait for the job to end and print it.")]
WaitTimeoutS = Annotated[float, typer.Option("--timeout", help="How long --wait waits.", metavar="SECONDS")]

#: How every ``mesh`` Typer renders help: Markdown reflows docstrings and help texts to the terminal
#: (rich markup keeps the source's line breaks, and eats ``[...]``).
MARKUP: Literal["markdown"] = "markdown"


def plain_help() -> None:
    """Show a value's name in help (``--limit N``, ``--to FILE``) instead of Typer's Python type tag
    (``--json <bool>``, ``<list[str]>``), and nothing for a flag or an argument (its name says it).

    Typer renders the tag in ``display_type_rich`` of its parameter classes and offers no setting for
    it, so the ``mesh`` entry point replaces that one method before any help is printed."""
    from typer.core import TyperArgument, TyperOption

    typed = TyperOption.display_type_rich
    if getattr(typed, "plain_help", False):  # replaced already (the tests run many commands in one process)
        return

    def value_name(self: TyperOption | TyperArgument, ctx: Any) -> str | None:
        if isinstance(self, TyperArgument) or getattr(self, "is_flag", False):
            return None
        if self.metavar:
            return self.metavar
        label = typed(self, ctx) or ""
        label = label.strip("<>").removesuffix(" range")
        return label if "|" in label else {"int": "N", "float": "NUMBER", "str": "TEXT"}.get(label, label.upper())

    value_name.plain_help = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = value_name  # type: ignore[method-assign]
    TyperArgument.display_type_rich = value_name  # type: ignore[method-assign,assignment]


def fail(message: str, code: int) -> NoReturn:
    err.print(Text.assemble(("error: ", "red"), message), highlight=False)
    raise typer.Exit(code)


def settings() -> MeshSettings:
    try:
        return MeshSettings.from_env()
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)


def client(*, layout_warning: bool = True) -> MeshClient:
    """The configured deployment's client, its Redis reached (else exit 3). On a namespace holding
    unmigrated data of the older key layout, a warning on stderr (``layout_warning``): what a command
    reads there is not the namespace's data. The check is the round trip that proves Redis answers."""
    s = settings()
    try:
        c = MeshClient(s)  # a cluster's client asks its seeds for the cluster's layout at once
        refused = c.layout_refusal()
        if isinstance(c.redis, RedisCluster):  # no round trip was made
            c.redis.ping()
    except REDIS_TROUBLE as exc:
        fail(*redis_trouble(exc, s.redis_url))
    if refused is not None and layout_warning:
        err.print(Text.assemble(("warning: ", "yellow"), refused.replace(": stop its workers", ", not shown here: stop "
                                                                         "its workers")), highlight=False)
    return c


#: The errors of a Redis that cannot be used as MESH_REDIS_URL names it: not reached, or not answering
#: as Redis does, or without the URL's database (:func:`redis_trouble`).
REDIS_TROUBLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.InvalidResponse,
                 redis.exceptions.ResponseError)


def redis_trouble(exc: Exception, url: str) -> tuple[str, int]:
    """The one line and the exit code of ``exc``, met on the Redis ``url`` names: 2 for a database
    the server does not have (a settings error), 3 for a server not reached or not speaking Redis.
    The URL is shown with its password masked; a response error of another kind is raised again."""
    shown = masked_url(url)
    if len(shown) > 200:
        shown = f"{shown[:200]}... ({len(shown)} characters)"
    text = " ".join(str(exc).split())  # one line, whatever the server or the resolver said
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return (f"Redis at {shown} answered something that is not Redis's protocol ({text}): is it a Redis "
                "server, and TLS (rediss://) exactly when it serves TLS?", EXIT_REDIS)
    if isinstance(exc, redis.exceptions.ResponseError):
        if "DB index is out of range" not in text:
            raise exc
        return (f"MESH_REDIS_URL {shown}: the server has no database {parse_url(url).db} (its `databases` "
                "setting counts them from 0)", EXIT_INPUT)
    if isinstance(exc, MasterNotFoundError):  # its text ends in the repr of every sentinel's client
        text = text.split(" : <", 1)[0] + " (no sentinel of the URL answered with one)"
    hint = ("; give its user and password in MESH_REDIS_URL: redis://user:password@host:port/db"
            if isinstance(exc, redis.AuthenticationError) else "")
    return f"cannot reach Redis at {shown}: {text}{hint}", EXIT_REDIS


def emit_json(value: Any) -> None:
    sys.stdout.write(escape_json(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()) + "\n")


WideFlag = Annotated[bool, typer.Option("--wide", help="Every column and every value in full (ids, digests, text), "
                                                        "in one table however wide; without it the output fits the "
                                                        "terminal (a block per row when a table would not).")]

#: A column that may wrap still gets at least this many characters; below that the rows print as blocks.
WRAP_MIN = 40


@dataclass(frozen=True)
class Column:
    """A column of a :class:`Listing`. ``key``: it holds values some command takes as input (ids, keys,
    names, failure classes), printed whole on one line so they can be pasted back. ``wrap``: free text
    (an error) that may wrap inside the table; every other column keeps its values on one line."""

    name: str
    key: bool = False
    wrap: bool = False
    justify: JustifyMethod = "left"


class Listing:
    """Rows shown as a table when it fits the width without cutting or squeezing a cell, else as one
    block of ``field: value`` lines per row; ``wide`` forces the table, however wide (lines are never
    cropped: the consoles soft-wrap)."""

    def __init__(self, columns: Sequence[Column], rows: Iterable[Sequence[str | Text]], *, wide: bool = False) -> None:
        self.columns = list(columns)
        # Escaped before layout, so widths are those of what is shown (the consoles escape again).
        self.rows = [[_cell(c) for c in row] for row in rows]
        self.wide = wide

    def natural(self) -> list[int]:
        """Each column's width with no cell wrapped: its longest line, header included."""
        return [max(_width(Text(col.name)), *(_width(row[i]) for row in self.rows))
                for i, col in enumerate(self.columns)]

    def fits(self, width: int) -> bool:
        natural = self.natural()
        needed = sum(min(n, WRAP_MIN) if col.wrap else n for col, n in zip(self.columns, natural, strict=True))
        return needed + 3 * len(self.columns) + 1 <= width  # padding 2 and a rule per column, one edge

    def table(self) -> Table:
        """The rows as a rich table whose key and plain columns never wrap (only ``wrap`` columns may)."""
        table = Table()
        for col, n in zip(self.columns, self.natural(), strict=True):
            if col.wrap:
                table.add_column(col.name, justify=col.justify, min_width=min(n, WRAP_MIN))
            else:  # "ignore" (never an ellipsis) would drop the justification, which ids do not need
                table.add_column(col.name, justify=col.justify, no_wrap=True, min_width=n,
                                 overflow="ignore" if col.key else "ellipsis")
        for row in self.rows:
            table.add_row(*row)
        return table

    def blocks(self, width: int) -> list[Text]:
        """One block per row, a blank line between blocks; free text wraps under its value, keys never do."""
        label = max(len(col.name) for col in self.columns) + 2
        lines: list[Text] = []
        for n, row in enumerate(self.rows):
            if n:
                lines.append(Text())
            for col, cell in zip(self.columns, row, strict=True):
                head = Text(f"{col.name}:".ljust(label), style="bold")
                if col.key:
                    lines.append(Text.assemble(head, cell))
                    continue
                chunks = [part for line in cell.plain.splitlines() or [""]
                          for part in wrapped(line, width - label) or [""]]
                style = cell.style
                lines.append(Text.assemble(head, Text(chunks[0], style=style)))
                lines += [Text(" " * label + chunk, style=style) for chunk in chunks[1:]]
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.rows:
            return
        if self.fits(options.max_width) or self.wide:
            table, width = self.table(), options.max_width
            if not self.fits(width):  # --wide: as wide as the table is with nothing wrapped
                width = max(width, console.measure(table, options=options.update_width(100_000)).maximum)
            yield from console.render(table, options.update_width(width))
            return
        for line in self.blocks(options.max_width):
            line.no_wrap, line.overflow = True, "ignore"
            yield line


def _cell(value: str | Text) -> Text:
    """A cell as shown: its control characters escaped (a styled cell keeps its spans when it has none)."""
    if not isinstance(value, Text):
        return Text(escape(value))
    return value if not CONTROL.search(value.plain) else Text(escape(value.plain), style=value.style)


def _width(cell: Text) -> int:
    return max((cell_len(line) for line in cell.plain.splitlines()), default=0)


def resolve(c: MeshClient, key: str | Sequence[str], given: str, what: str, *, zset: bool = True,
            alias: str = "") -> str:
    """``given`` as a whole id, or the one id of the set ``key`` (or of the keys, one per shard) it is
    the start of (git-style); exits 2
    listing the candidates when it starts several. An id that matches nothing comes back as given, for
    the command's own "no such" error."""
    from mesh.ops.prefixes import AmbiguousPrefix
    from mesh.ops.prefixes import resolve as unique

    try:
        return unique(c.redis, key, given, zset=zset, alias=alias)
    except AmbiguousPrefix as exc:
        listed = "".join(f"\n  {candidate}" for candidate in exc.candidates)
        more = "\n  ... and more" if exc.more else ""
        fail(f"{given!r} is the start of several {what}; give more of it:{listed}{more}", EXIT_INPUT)


def fitted(parts: Sequence[str], sep: str = "  ", width: int | None = None, indent: str = "") -> list[str]:
    """``parts`` joined by ``sep`` on as few lines as fit ``width`` columns (the terminal's): a part that
    would run past it starts a line of its own, after ``indent``. A part is never cut, so a value in it
    stays whole."""
    width = out.size.width if width is None else width
    lines: list[str] = []
    for part in parts:
        if lines and cell_len(lines[-1]) + cell_len(sep) + cell_len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(indent + part if lines else part)
    return lines


def wrapped(text: str, width: int | None = None, indent: str = "", first: str = "") -> list[str]:
    """``text`` in lines of ``width`` columns (the terminal's; 20 at the least), broken between words: a
    word longer than a line is kept whole, never cut nor split at its hyphens, so a value stays whole.
    ``first`` starts the first line, ``indent`` the others."""
    width = out.size.width if width is None else width
    return textwrap.wrap(text, max(20, width), initial_indent=first, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


def shell_lines(command: str, width: int = 78) -> str:
    """``command`` in lines of at most ``width`` columns, continued with a backslash (pastes as one; a
    word longer than a line is kept whole on a line of its own)."""
    lines, line = [], ""
    for word in command.split():
        if line and len(line) + 1 + len(word) > width - 2:
            lines.append(line + " \\")
            line = "  " + word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def when(ts: float | None) -> str:
    """A moment as operators read it, in local time to the second; ``-`` when there is none."""
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def app_for(path: str | None) -> Any:
    """The app a command's ``--app module[:attribute]`` names, found from the current directory (as
    ``celery -A`` and ``dramatiq`` find theirs); the built-in app without one. A path that does not
    load is a bad ``--app`` (exit 2, saying why)."""
    from mesh.agents.app import load_app
    from mesh.contracts import ConfigError

    if path is None:
        from mesh.agents.builtin import app as builtin

        return builtin
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return load_app(path)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--app") from None
    except Exception as exc:  # the module itself fails (a bug, a setting it reads at import)
        raise typer.BadParameter(f"importing app module {path.partition(':')[0]!r} failed: {type(exc).__name__}: "
                                 f"{exc}", param_hint="--app") from None
