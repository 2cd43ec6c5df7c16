"""``mesh limits``: the fleet's flow limits (rates and concurrency of agents and dependencies): list
them with their use and what waits behind them; change one for the whole fleet at run time, or reset it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from mesh.contracts.flow import MAX_CONCURRENCY
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

if TYPE_CHECKING:
    from mesh.broker import MeshClient
    from mesh.broker.limits import LimitState

limits_app = typer.Typer(help="Flow limits (rates, concurrency) of agents and dependencies, fleet-wide.",
                         rich_markup_mode=MARKUP, epilog="Examples: `mesh limits`, `mesh limits --json`, "
                         "`mesh limits set dependency:api.example.com:443 --requests 50/s`, "
                         "`mesh limits reset dependency:api.example.com:443`")

#: The columns a flow key takes in the listing; ``--wide`` and ``--json`` show it whole.
KEY_SHOWN = 32


def _key_shown(flow_key: str | None, wide: bool) -> str:
    """A flow key as listed: an input's value, so its line breaks are written as escapes (they would
    start lines of their own) and a long one is cut to :data:`KEY_SHOWN` columns."""
    if flow_key is None:
        return "-"
    text = flow_key.replace("\n", "\\n").replace("\t", "\\t")
    if wide:
        return text
    shown = Text(text)
    shown.truncate(KEY_SHOWN, overflow="ellipsis")
    return shown.plain


ByOpt = Annotated[str | None, typer.Option("--by", help="Who changes it, as the audit records (default: user@host).",
                                           show_default=False)]

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
        rows.append((s.name + ("*" if s.overridden else ""), _key_shown(s.flow_key, wide), rate_shown(s),
                     f"{s.in_flight}/{s.max}" if s.max else "-", str(s.waiting), f"{s.ahead_ms / 1000:.1f}s",
                     str(s.rejected)))
    if wide:  # the token rate, how far it is booked ahead, and the messages admitted
        columns = (*columns, Column("tokens"), Column("tokens ahead", justify="right"),
                   Column("admitted", justify="right"))
        rows = [(*row, s.tokens or "-", f"{s.tokens_ahead_ms / 1000:.1f}s", str(s.admitted))
                for row, s in zip(rows, states, strict=True)]
    out.print(Listing(columns, rows, wide=wide))


def rate_shown(s: LimitState) -> str:
    """A limit's rate as listed: ``-`` without one, with what 429s left of it (``x0.50``: half)."""
    rate = s.requests or "-"
    if s.requests and s.factor < 1:
        rate = f"{rate} x{s.factor:.2f}"
    return rate


def find_limit(c: MeshClient, given: str) -> str:
    """``given``, or the one declared or overridden limit it is the start of; :class:`ValueError`
    says why not (``mesh limits set/reset`` and the console's Limits page)."""
    from mesh.broker.limits import declared_limits, overrides

    known = sorted(set(declared_limits(c.redis, c.keys)) | set(overrides(c.redis, c.keys)))
    if given in known:
        return given
    starts = [k for k in known if k.startswith(given)]
    if len(starts) == 1:
        return starts[0]
    if starts:
        raise ValueError(f"{given!r} is the start of several limits; give more of it:"
                         + "".join(f"\n  {k}" for k in starts))
    raise ValueError(f"no limit named {given!r}; `mesh limits` lists them ({', '.join(known) or 'none yet'})")


def set_limit(c: MeshClient, given: str, *, requests: str | None = None, tokens: str | None = None,
              max: int | None = None, by: str | None = None) -> tuple[str, dict[str, Any]]:
    """``mesh limits set``: (the limit, its override now), audited as done by ``by`` (default
    ``user@host``); :class:`ValueError` says why not."""
    from mesh.broker.limits import set_override

    limit = find_limit(c, given)
    return limit, set_override(c.redis, c.keys, limit, requests=requests, tokens=tokens, max=max, by=by)


def reset_limit(c: MeshClient, given: str, *, by: str | None = None) -> str:
    """``mesh limits reset``: the limit reset, audited as done by ``by`` (default ``user@host``);
    :class:`ValueError` says why not (it was not set)."""
    from mesh.broker.limits import reset_override

    limit = find_limit(c, given)
    if not reset_override(c.redis, c.keys, limit, by=by):
        raise ValueError(f"limit {limit} was not set; it is as declared")
    return limit


@limits_app.command("set")
def limits_set(name: NameArg,
               requests: Annotated[str | None, typer.Option(help="Requests per interval: 600/min, 50/s.")] = None,
               tokens: Annotated[str | None, typer.Option(help="Model tokens per interval: 90000/min.")] = None,
               max: Annotated[int | None, typer.Option("--max", help="Messages in flight at once.", min=1,
                                                       max=MAX_CONCURRENCY)] = None,
               by: ByOpt = None) -> None:
    """Change one limit for the whole fleet now: kept in Redis, winning over the declaration until
    ``mesh limits reset`` (workers read it within a second). Audited: ``{ns}:limits.audit`` says who,
    when and what."""
    try:
        limit, value = set_limit(client(), name, requests=requests, tokens=tokens, max=max, by=by)
    except ValueError as exc:
        fail(str(exc), EXIT_INPUT)
    shown = ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
    out.print(Text(f"limit {limit} set: {shown}\nuntil `mesh limits reset {limit}`"))


@limits_app.command("reset")
def limits_reset(name: NameArg, by: ByOpt = None) -> None:
    """Drop what ``mesh limits set`` changed: the declaration is in force again. Audited, as a set is."""
    try:
        limit = reset_limit(client(), name, by=by)
    except ValueError as exc:
        fail(str(exc), EXIT_INPUT)
    out.print(Text(f"limit {limit} reset to its declaration"))
