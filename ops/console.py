"""What every ``mesh`` command shares: consoles, exit codes, settings, the client, JSON output."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal, NoReturn

import orjson
import redis
import typer
from rich.console import Console
from rich.text import Text

from mesh.broker import MeshClient, MeshSettings
from mesh.contracts import ConfigError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

#: Exit codes: 0 ok; 1 the job did not succeed; 2 bad input; 3 Redis unreachable; 4 timed out.
EXIT_FAILED, EXIT_INPUT, EXIT_REDIS, EXIT_TIMEOUT = 1, 2, 3, 4

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]

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

    def value_name(self: TyperOption | TyperArgument, ctx: Any) -> str | None:
        if isinstance(self, TyperArgument) or getattr(self, "is_flag", False):
            return None
        if self.metavar:
            return self.metavar
        label = typed(self, ctx) or ""
        label = label.strip("<>").removesuffix(" range")
        return label if "|" in label else {"int": "N", "float": "NUMBER", "str": "TEXT"}.get(label, label.upper())

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


def client() -> MeshClient:
    s = settings()
    c = MeshClient(s)
    try:
        c.redis.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail(f"cannot reach Redis at {s.redis_url}: {exc}", EXIT_REDIS)
    return c


def emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
