"""``mesh signal``, ``mesh emit``, ``mesh waits``: events for the pipeline steps that wait for them
(``wait_for:``), and the steps waiting durably (``sleep:``, ``wait_for:``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from mesh.broker import JobNotFound
from mesh.broker.waits import Delivery, WaitError, Waiting
from mesh.contracts.approvals import show_duration
from mesh.ops import console as base

#: Steps ``mesh waits`` lists at most (the oldest; MeshClient.waits' default).
LIMIT = 1000

JobArg = Annotated[str, typer.Argument(help="The job id or its start, or the key it was sent with.",
                                       metavar="JOB_ID|KEY", show_default=False)]
EventArg = Annotated[str, typer.Argument(help="The event name (payment.settled).", metavar="EVENT",
                                         show_default=False)]
DataOpt = Annotated[str, typer.Option("--data", help="The event's data: a JSON object, or @FILE holding one. It "
                                      "is the waiting step's output.", metavar="JSON|@FILE")]


def _data(given: str) -> dict[str, Any]:
    from mesh.ops.jobs_cli import _json

    if given.startswith("@"):
        path = Path(given[1:])
        if path.is_dir():
            base.fail(f"--data {given}: a directory, not a file", base.EXIT_INPUT)
        if not path.exists():
            base.fail(f"--data {given}: no such file", base.EXIT_INPUT)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            base.fail(f"--data {given}: cannot be read: {exc.strerror or exc}", base.EXIT_INPUT)
        if not raw.strip():
            base.fail(f"--data {given}: the file is empty (give a JSON object)", base.EXIT_INPUT)
        data = _json(raw, str(path))
    else:
        data = _json(given, "--data")
    if not isinstance(data, dict):
        base.fail("--data must be a JSON object", base.EXIT_INPUT)
    return data


def signal(job_id: JobArg, event: EventArg, data: DataOpt = "{}", as_json: base.JsonFlag = False) -> None:
    """Send an event to one job (to its step waiting longest for it).

    The data is the step's output; its match: is not checked (the job is named). With no step
    waiting yet, the event is kept for a wait of the job that starts within MESH_EVENT_WINDOW_S.

    Exit codes: 2 no such job, the job has ended, or the data is no JSON object."""
    from mesh.ops.jobs_cli import _job_candidates

    payload = _data(data)
    c = base.client()
    for job in _job_candidates(c, job_id):
        try:
            delivery = c.signal(job, event, payload)
        except JobNotFound:
            continue
        except WaitError as exc:
            _refused(exc, as_json)
        _said(delivery, as_json, kept_for=f"job {job}")
        return
    base.fail(f"no job {job_id}", base.EXIT_INPUT)


def emit(event: EventArg, data: DataOpt = "{}", as_json: base.JsonFlag = False) -> None:
    """Send an event to every step waiting for it whose match: holds.

    The data is each step's output. The event is also kept for MESH_EVENT_WINDOW_S (at most
    MESH_EVENT_KEEP per name) for waits that start later; a job takes one event once.

    Exit codes: 2 the name or the data is invalid."""
    payload = _data(data)
    try:
        delivery = base.client().emit(event, payload)
    except WaitError as exc:
        _refused(exc, as_json)
    _said(delivery, as_json, kept_for="waits that start later")


def _refused(exc: WaitError, as_json: bool) -> None:
    if as_json:
        base.emit_json({"delivered": False, "error": exc.message, "code": exc.exit_code})
        raise typer.Exit(exc.exit_code)
    base.fail(exc.message, exc.exit_code)


def _said(delivery: Delivery, as_json: bool, *, kept_for: str) -> None:
    if as_json:
        base.emit_json(delivery.as_json())
        return
    if not delivery.resumed:
        base.out.print(Text(f"{delivery.event}: no step waits for it now; kept for {kept_for}"))
        return
    base.out.print(Text(f"{delivery.event}: resumed {len(delivery.resumed)} step(s)"))
    for job, step in delivery.resumed:
        base.out.print(Text(f"  {job} {step}"))


def waits(event: Annotated[str | None, typer.Option("--event", help="Only the steps waiting for this event.",
                                                    metavar="EVENT")] = None,
          wide: base.WideFlag = False, as_json: base.JsonFlag = False) -> None:
    """Pipeline steps waiting durably (sleep:, wait_for:), oldest first.

    Per step: the job, the step, what it waits for (a timer, or an event and its match), since when,
    and when its timer ends the wait (a sleep's end, or a wait_for's timeout and what it does then).

    Exit codes: 2 the event name is invalid."""
    from mesh.broker.shard_readers import every, pending_waits, zcard
    from mesh.broker.waits import check_event_name

    c = base.client()
    keys = every(c.settings)  # every shard's waits, oldest first
    try:
        if event is not None:
            check_event_name(event)
        found = pending_waits(c.redis, keys, limit=LIMIT, event=event)
    except WaitError as exc:
        if as_json:
            base.emit_json({"error": exc.message, "code": exc.exit_code})
            raise typer.Exit(exc.exit_code) from None
        base.fail(exc.message, exc.exit_code)
    if as_json:
        base.emit_json([w.as_json() for w in found])
        return
    if not found:
        base.out.print("nothing waits")
        return
    base.out.print(table(found, wide=wide))
    indexed = zcard(c.redis, keys, lambda k: k.waits if event is None else k.waits_for(event))
    if indexed > LIMIT:  # the listing reads the oldest LIMIT only
        base.err.print(Text(f"the oldest {LIMIT} of about {indexed} waiting steps are listed (--event NAME narrows)"))


def table(found: list[Waiting], *, wide: bool = False) -> base.Listing:
    """One row per waiting step; the job id and step are inputs (mesh signal JOB EVENT), printed whole."""
    now = time.time()
    columns = (base.Column("job", key=True), base.Column("step", key=True), base.Column("since"),
               base.Column("ends"), base.Column("waits for", wrap=True))
    rows = []
    for w in found:
        then = "" if w.wait.event is None else f" ({w.wait.on_timeout})"
        ends = "now" if w.due_at is None else f"in {show_duration(max(0.0, w.due_at - now))}{then}"
        rows.append((w.job_id, w.step.step_id, f"{show_duration(now - w.wait.started_at)} ago", ends,
                     w.wait.describe()))
    return base.Listing(columns, rows, wide=wide)


def register(app: typer.Typer) -> None:
    """Add the commands to the ``mesh`` app."""
    app.command("signal", epilog="Example: `mesh signal order-7 payment.settled --data '{\"order\": 7}'`")(signal)
    app.command("emit", epilog="Example: `mesh emit payment.settled --data '{\"order\": 7}'`")(emit)
    app.command("waits", epilog="Examples: `mesh waits`, `mesh waits --event payment.settled --json`")(waits)
