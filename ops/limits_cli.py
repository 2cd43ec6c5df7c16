"""``mesh limits``: the fleet's flow limits (rates and concurrency of agents and dependencies): list
them with their use and what waits behind them; change one for the whole fleet at run time, or reset it."""

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
)

limits_app = typer.Typer(help="Flow limits (rates, concurrency) of agents and dependencies, fleet-wide.",
                         rich_markup_mode=MARKUP, epilog="Examples: `mesh limits`, `mesh limits --json`, "
                         "`mesh limits set dependency:api.example.com:443 --requests 50/s`, "
                         "`mesh limits reset dependency:api.example.com:443`")

NameArg = Annotated[str, typer.Argument(help="The limit, as listed (agent:NAME, dependency:NAME), or its start.",
                                        metavar="LIMIT", show_default=False)]


@limits_app.callback(invoke_without_command=True)
def limits_list(ctx: typer.Context, wide: WideFlag = False, as_json: JsonFlag = False) -> None:
    """List every limit (a keyed one per key, the most recent first): its rate and what 429s left of
    it (x0.50: half), its concurrency slots in use of its max, the messages waiting for a slot, how
    far its rate is booked ahead, and the 429s its dependency answered. ``*`` marks a limit ``mesh
    limits set`` changed."""
    if ctx.invoked_subcommand is not None:
        return
    import dataclasses

    from mesh.broker.limits import limit_states

    c = client()
    states = limit_states(c.redis, c.keys)
    if as_json:
        emit_json([dataclasses.asdict(s) for s in states])
        return
    if not states:
        out.print("no limits: no worker has declared one (@app.agent(rate=...), app.dependency(...))")
        return
    columns: tuple[Column, ...] = (
        Column("limit", key=True), Column("key", key=True), Column("rate"), Column("in use", justify="right"),
        Column("waiting", justify="right"), Column("ahead", justify="right"), Column("429s", justify="right"))
    rows: list[tuple[str, ...]] = []
    for s in states:
        rate = s.requests or "-"
        if s.requests and s.factor < 1:
            rate = f"{rate} x{s.factor:.2f}"
        rows.append((s.name + ("*" if s.overridden else ""), s.flow_key or "-", rate,
                     f"{s.in_flight}/{s.max}" if s.max else "-", str(s.waiting), f"{s.ahead_ms / 1000:.1f}s",
                     str(s.rejected)))
    if wide:  # the token rate, how far it is booked ahead, and the messages admitted
        columns = (*columns, Column("tokens"), Column("tokens ahead", justify="right"),
                   Column("admitted", justify="right"))
        rows = [(*row, s.tokens or "-", f"{s.tokens_ahead_ms / 1000:.1f}s", str(s.admitted))
                for row, s in zip(rows, states, strict=True)]
    out.print(Listing(columns, rows, wide=wide))


def _name(given: str) -> str:
    """``given``, or the one declared or overridden limit it is the start of; exits 2 otherwise."""
    from mesh.broker.limits import declared_limits, overrides

    c = client()
    known = sorted(set(declared_limits(c.redis, c.keys)) | set(overrides(c.redis, c.keys)))
    if given in known:
        return given
    starts = [k for k in known if k.startswith(given)]
    if len(starts) == 1:
        return starts[0]
    if starts:
        fail(f"{given!r} is the start of several limits; give more of it:" + "".join(f"\n  {k}" for k in starts),
             EXIT_INPUT)
    fail(f"no limit named {given!r}; `mesh limits` lists them ({', '.join(known) or 'none yet'})", EXIT_INPUT)
    raise AssertionError  # fail exits


@limits_app.command("set")
def limits_set(name: NameArg,
               requests: Annotated[str | None, typer.Option(help="Requests per interval: 600/min, 50/s.")] = None,
               tokens: Annotated[str | None, typer.Option(help="Model tokens per interval: 90000/min.")] = None,
               max: Annotated[int | None, typer.Option("--max", help="Messages in flight at once.", min=1)] = None,
               ) -> None:
    """Change one limit for the whole fleet now: kept in Redis, winning over the declaration until
    ``mesh limits reset`` (workers read it within a second)."""
    from mesh.broker.limits import set_override

    c = client()
    limit = _name(name)
    try:
        value = set_override(c.redis, c.keys, limit, requests=requests, tokens=tokens, max=max)
    except ValueError as exc:
        fail(str(exc), EXIT_INPUT)
    shown = ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
    out.print(Text(f"limit {limit} set: {shown} (until mesh limits reset {limit})"))


@limits_app.command("reset")
def limits_reset(name: NameArg) -> None:
    """Drop what ``mesh limits set`` changed: the declaration is in force again."""
    from mesh.broker.limits import reset_override

    c = client()
    limit = _name(name)
    if not reset_override(c.redis, c.keys, limit):
        fail(f"limit {limit} was not set; it is as declared", EXIT_INPUT)
    out.print(Text(f"limit {limit} reset to its declaration"))
