"""``mesh queues`` and ``mesh stats``: what the agents' queues hold, and what the deployment has counted."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from mesh.ops.console import Column, JsonFlag, Listing, WideFlag, client, emit_json, out

LanesFlag = Annotated[bool, typer.Option("--lanes", help="Also the ready messages per priority and the flow keys "
                                          "(tenants) with ready work.")]


def queues(wide: WideFlag = False, as_json: JsonFlag = False, lanes: LanesFlag = False) -> None:
    """Per agent queue: messages ready, delayed (retries) and in flight (of every shard, added up)."""
    from mesh.broker.shard_readers import queue_depths

    depths = queue_depths(client(), lanes=lanes)
    if as_json:
        emit_json(depths)
        return
    names = ("ready", "delayed", "in flight", *(("high", "normal", "low", "flows") if lanes else ()))
    columns = (Column("queue", key=True), *(Column(n, justify="right") for n in names))
    rows = []
    for name, d in depths.items():
        row = [name, str(d["ready"]), str(d["delayed"]), str(d["in_flight"])]
        if lanes:
            row += [*(str(n) for n in d["by_priority"].values()), str(d["flows"])]
        rows.append(tuple(row))
    out.print(Listing(columns, rows, wide=wide))


def stats(wide: WideFlag = False, as_json: JsonFlag = False) -> None:
    """Counters of the deployment, and failed attempts by class and route.

    Duplicates suppressed or deferred, takeovers, retries, dead letters, poison, recoveries."""
    from mesh.broker.shard_readers import every, summed_hash, zcard
    from mesh.ops.metrics import STATS

    c = client()
    keys = every(c.settings)  # each shard counts its own jobs' work: added up
    raw = summed_hash(c.redis, keys, lambda k: k.stats)
    counts: dict[str, Any] = {name: raw.get(name, 0) for name in STATS}
    counts["dlq_size"] = zcard(c.redis, keys, lambda k: k.dlq)
    routes = dict(sorted(summed_hash(c.redis, keys, lambda k: k.routes).items()))
    if as_json:
        emit_json({**counts, "routes": routes})
        return
    columns = (Column("counter", key=True), Column("value", justify="right"), Column("meaning", wrap=True))
    out.print(Listing(columns, [(name, str(value), STATS.get(name, "Entries in the dead-letter queue now."))
                                for name, value in counts.items()], wide=wide))
    if routes:
        by_route = (Column("failure class : route", key=True), Column("attempts", justify="right"))
        out.print(Listing(by_route, [(Text(name), str(n)) for name, n in routes.items()], wide=wide))


def register(app: typer.Typer) -> None:
    """Add ``queues`` and ``stats`` to the ``mesh`` command."""
    app.command()(queues)
    app.command()(stats)
