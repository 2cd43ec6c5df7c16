"""``mesh queues`` and ``mesh stats``: what the agents' queues hold, and what the deployment has counted."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from mesh.ops.console import Column, JsonFlag, Listing, client, emit_json, out


def queues(as_json: JsonFlag = False) -> None:
    """Per agent queue: messages ready, delayed (retries) and in flight."""
    depths = client().queues()
    if as_json:
        emit_json(depths)
        return
    columns = (Column("queue", key=True), *(Column(n, justify="right") for n in ("ready", "delayed", "in flight")))
    out.print(Listing(columns, [(name, str(d["ready"]), str(d["delayed"]), str(d["in_flight"]))
                                for name, d in depths.items()]))


def stats(as_json: JsonFlag = False) -> None:
    """Counters of the deployment, and failed attempts by class and route.

    Duplicates suppressed or deferred, takeovers, retries, dead letters, poison, recoveries."""
    from mesh.ops.metrics import STATS

    c = client()
    raw = c.redis.hgetall(c.keys.stats)
    counts: dict[str, Any] = {name: int(raw.get(name.encode(), 0)) for name in STATS}
    counts["dlq_size"] = int(c.redis.zcard(c.keys.dlq))
    routes = {k.decode(): int(v) for k, v in sorted(c.redis.hgetall(c.keys.routes).items())}  # type: ignore[union-attr]
    if as_json:
        emit_json({**counts, "routes": routes})
        return
    table = Table("counter", "value", "meaning")
    for name, value in counts.items():
        table.add_row(name, str(value), STATS.get(name, "Entries in the dead-letter queue now."))
    out.print(table)
    if routes:
        by_route = Table("failure class : route", "attempts")
        for name, n in routes.items():
            by_route.add_row(Text(name), str(n))
        out.print(by_route)


def register(app: typer.Typer) -> None:
    """Add ``queues`` and ``stats`` to the ``mesh`` command."""
    app.command()(queues)
    app.command()(stats)
