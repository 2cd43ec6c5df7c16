"""``mesh worker`` and ``mesh workers``: serve agents' queues, and list the workers that do."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from mesh.ops.console import Column, JsonFlag, Listing, WideFlag, app_for, client, emit_json, out, settings, when


def _agents(value: str | None, app_path: str | None) -> list[str] | None:
    """The agents to serve, checked against the app (which is loaded here, so a bad path fails early)."""
    mesh_app = app_for(app_path)
    if value is None:
        return None
    names = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in names if a not in mesh_app.agents]
    if unknown or not names:
        raise typer.BadParameter(f"unknown agent(s) {', '.join(unknown) or '(none)'}; "
                                 f"agents of app {mesh_app.name!r} are {', '.join(mesh_app.agents)}",
                                 param_hint="--agents")
    return names


def worker(
    agents: Annotated[str | None, typer.Option(help="Comma-separated agents to serve (default: all of the app's).",
                                               metavar="NAMES", show_default=False)] = None,
    app_path: Annotated[str | None, typer.Option("--app", help="The app to serve, as module[:attribute], e.g. "
                                                 "support.agents:app (default: the built-in planner, researcher "
                                                 "and executor).", metavar="MODULE:APP", show_default=False)] = None,
    processes: Annotated[int, typer.Option(min=1, metavar="N", help="Worker processes.")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, metavar="N", help="Threads per process (default: "
                                                "MESH_WORKER_THREADS); with MESH_SHARDS > 1, each shard gets "
                                                "ceil(N / shards).")] = None,
) -> None:
    """Serve agents' queues until SIGTERM or Ctrl-C.

    On the way out, messages fetched but not started go back to their queues, and the worker
    withdraws its heartbeat and its place among the agents' workers."""
    from mesh.ops.logs import setup_logging
    from mesh.ops.worker import check_served, run_worker, supervise

    names = _agents(agents, app_path)
    s = settings()
    check_served(app_for(app_path), names, s)  # once, before any process starts or connects
    setup_logging()
    n_threads = threads or s.worker_threads
    if processes > 1:
        raise typer.Exit(supervise(names, processes, n_threads, app_path))
    raise typer.Exit(run_worker(s, names, n_threads, app_path))


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def workers(wide: WideFlag = False, as_json: JsonFlag = False) -> None:
    """Workers that serve agents: label (host:pid), app, agents, since when, last heartbeat, alive.
    A worker that stopped gracefully is gone; a killed one shows as dead until pruned."""
    from mesh.broker.registry import Registry

    c = client()
    listed, now_ms = Registry(c.redis, c.keys, c.settings.heartbeat_timeout_s).workers()
    if as_json:
        emit_json([{"id": w.id, "label": w.label, "app": w.app, "agents": list(w.agents),
                    "since": w.since_ms / 1000 if w.since_ms else None,
                    "heartbeat_age_s": (now_ms - w.heartbeat_ms) / 1000 if w.heartbeat_ms is not None else None,
                    "alive": w.alive, **({"shards": list(w.shards)} if w.shards else {})} for w in listed])
        return
    if not listed:
        out.print("no workers: none has published what it serves (start one with `mesh worker`)")
        return
    rows: list[tuple[str | Text, ...]] = []
    for w in listed:
        beat = f"{_age((now_ms - w.heartbeat_ms) / 1000)} ago" if w.heartbeat_ms is not None else "none"
        rows.append((Text(w.label), Text(w.app or "-"), Text(", ".join(w.agents)),
                     when(w.since_ms / 1000) if w.since_ms else "-", beat,
                     Text("alive", "green") if w.alive else Text("dead", "red")))
    columns = [Column("worker", key=True), Column("app", key=True), Column("agents", wrap=True), Column("since"),
               Column("heartbeat"), Column("state")]
    if wide:  # the id the worker's heartbeat and published records are kept under
        columns.append(Column("id", key=True))
        rows = [(*row, Text(w.id)) for row, w in zip(rows, listed, strict=True)]
    out.print(Listing(columns, rows, wide=wide))


def register(app: typer.Typer) -> None:
    """Add ``worker`` and ``workers`` to the ``mesh`` command."""
    app.command(epilog="Examples: `mesh worker` (the built-in agents), `mesh worker --agents planner "
                "--threads 8`, `mesh worker --app support.agents:app --processes 2`")(worker)
    app.command()(workers)
