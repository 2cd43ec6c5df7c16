"""``mesh agents``: what is deployed, as the workers published it when they started."""

from __future__ import annotations

from typing import Any

from mesh.broker.registry import AgentListing, ServingWorker
from mesh.ops import console as base


def agents(wide: base.WideFlag = False, as_json: base.JsonFlag = False) -> None:
    """Published agents, their queues and the workers serving them.

    Per agent: queue, the contract versions live workers serve ("-": none alive), tools, workers
    alive / total and the latest heartbeat; --json adds the input and output JSON Schemas and every
    worker ("version" is the one published last)."""
    c = base.client()
    listings = c.registry.listing()
    if as_json:
        base.emit_json([record(listing) for listing in listings])
        return
    if not listings:
        base.out.print("no agents published: start a worker (mesh worker --app module:app)")
        return
    base.out.print(table(listings, wide=wide))


def table(listings: list[AgentListing], *, wide: bool = False) -> base.Listing:
    """One row per agent; names are inputs (mesh send NAME), so they are printed whole."""
    columns: tuple[base.Column, ...] = (
        base.Column("agent", key=True), base.Column("queue", key=True), base.Column("version"),
        base.Column("tools", wrap=True), base.Column("workers"), base.Column("heartbeat"))
    rows: list[tuple[str, ...]] = []
    for listing in listings:
        a, workers = listing.agent, listing.workers
        alive = sum(w.alive for w in workers)
        rows.append((a.name, a.queue, ",".join(map(str, served(listing))) or "-", ", ".join(a.tools) or "-",
                     f"{alive}/{len(workers)}", _age(_latest(workers), listing.now_ms)))
    if wide:  # the app that declared it (mesh worker --app) and what it does
        columns = (*columns, base.Column("app", key=True), base.Column("description", wrap=True))
        rows = [(*row, x.agent.app or "-", x.agent.description or "-") for row, x in zip(rows, listings, strict=True)]
    return base.Listing(columns, rows, wide=wide)


def record(listing: AgentListing) -> dict[str, Any]:
    """The full published record of one agent, with its workers, for ``--json``."""
    a, now = listing.agent, listing.now_ms
    return {
        "name": a.name, "queue": a.queue, "version": a.version, "app": a.app, "description": a.description,
        "tools": list(a.tools), "input_schema": a.input_schema, "output_schema": a.output_schema,
        "versions_served": served(listing),
        "workers_alive": sum(w.alive for w in listing.workers), "workers_total": len(listing.workers),
        "workers": [{"id": w.id, "label": w.label, "version": w.version, "alive": w.alive,
                     "published_at": w.published_ms / 1000,
                     "last_heartbeat": None if w.heartbeat_ms is None else w.heartbeat_ms / 1000,
                     "heartbeat_age_s": None if w.heartbeat_ms is None else round((now - w.heartbeat_ms) / 1000, 3)}
                    for w in listing.workers],
    }


def served(listing: AgentListing) -> list[int]:
    """The contract versions live workers serve: after a rolling deploy, a retired version drops out
    once no live worker serves it (a stopped or dead worker's version is not listed)."""
    return sorted({w.version for w in listing.workers if w.alive and w.version is not None})


def _latest(workers: tuple[ServingWorker, ...]) -> int | None:
    beats = [w.heartbeat_ms for w in workers if w.heartbeat_ms is not None]
    return max(beats) if beats else None


def _age(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    seconds = max(0.0, (now_ms - ms) / 1000)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"
