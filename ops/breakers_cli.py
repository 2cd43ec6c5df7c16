"""``mesh breakers``: the dependencies' circuit breakers, shared by the whole fleet; list them, reset one."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from mesh.ops.console import (
    EXIT_INPUT,
    MARKUP,
    Column,
    JsonFlag,
    Listing,
    WideFlag,
    client,
    emit_json,
    fail,
    out,
    resolve,
    when,
)

breakers_app = typer.Typer(help="Circuit breakers of the dependencies, shared by the whole fleet.",
                           rich_markup_mode=MARKUP, epilog="Examples: `mesh breakers`, "
                           "`mesh breakers reset api.example.com:443`")


@breakers_app.callback(invoke_without_command=True)
def breakers_list(ctx: typer.Context, wide: WideFlag = False, as_json: JsonFlag = False) -> None:
    """List every breaker: state, failures in the window, reopen time (on Redis's clock), cool-down, trips,
    messages deferred on it, last error; an open one also shows the failures that opened it."""
    if ctx.invoked_subcommand is not None:
        return
    import dataclasses

    from mesh.broker.breaker import Breakers

    c = client()
    states = Breakers(c.settings, c.redis).list()
    if as_json:
        emit_json([dataclasses.asdict(b) for b in states])
        return
    if not states:
        out.print("no breakers yet: none of the dependencies has failed")
        return
    columns: tuple[Column, ...] = (Column("dependency", key=True), Column("state"), Column("failures", justify="right"),
               Column("reopens in"), Column("cool-down"), Column("trips", justify="right"),
               Column("deferred", justify="right"), Column("last error", wrap=True))
    rows: list[tuple[str, ...]] = []
    for b in states:
        reopen = f"{b.reopen_in_s:.1f}s" if b.reopen_in_s is not None else "-"
        rows.append((b.name, b.state, str(b.failures), reopen, f"{b.cooldown_s:g}s", str(b.trips), str(b.deferred),
                     b.last_error or "-"))
    if wide:  # when the last opening was, and by how many failures
        columns = (*columns[:-1], Column("opened"), Column("opened by", justify="right"), columns[-1])
        rows = [(*row[:-1], when(b.opened_at), str(b.opened_failures), row[-1]) for row, b in zip(rows, states,
                                                                                               strict=True)]
    out.print(Listing(columns, rows, wide=wide))
    for b in states:
        if b.opened_at is None:
            continue
        out.print(Text(f"{b.name} {b.state}: opened {when(b.opened_at)} by {b.opened_failures} failure(s); "
                       f"reopens {when(b.reopen_at)} (in {b.reopen_in_s or 0:.1f}s); "
                       f"{b.deferred} message(s) deferred on it"), soft_wrap=False)  # wrapped at the width
        for f in b.opened_by:
            out.print(Text(f"  {when(f.at)}  {f.error}"), soft_wrap=False)


@breakers_app.command("reset")
def breakers_reset(name: Annotated[str, typer.Argument(help="The dependency, as listed (host:port), or its start.",
                                                     metavar="DEPENDENCY", show_default=False)],
                   by: Annotated[str | None, typer.Option("--by", help="Who resets it, as the audit records "
                                                          "(default: user@host).", show_default=False)] = None,
                   ) -> None:
    """Close one breaker now, whatever its state. Audited: ``{ns}:breakers.audit`` says who, when and
    the state it was in."""
    from mesh.broker.breaker import Breakers

    c = client()
    name = resolve(c, c.keys.breakers, name, "breakers", zset=False)
    if not Breakers(c.settings, c.redis).reset(name, by=by):
        fail(f"no breaker named {name!r}; `mesh breakers` lists them", EXIT_INPUT)
    out.print(Text(f"breaker {name} closed"))
