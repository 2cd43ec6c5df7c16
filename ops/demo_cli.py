"""``mesh demo``: a sample job through real workers, shown as it happens (:mod:`mesh.ops.demo`)."""

from __future__ import annotations

from typing import Annotated

import typer

from mesh.ops.console import out


def demo(
    goal: Annotated[str, typer.Option(help="The goal the sample job pursues.", metavar="TEXT")] = (
        "Find out how failures are classified and how dead letters are replayed, "
        "then write a note for the on-call team"
    ),
    timeout: Annotated[float, typer.Option(help="How long to wait for the job.", metavar="SECONDS")] = 60.0,
) -> None:
    """Run a sample job through real workers and show it as it happens.

    Starts two worker processes, submits the job, prints each step's state changes and the
    result, then stops the workers. Without a reachable Redis it starts a private one for the
    run (its data goes with it)."""
    from mesh.ops.demo import run_demo

    raise typer.Exit(run_demo(goal, timeout, out))


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``mesh`` command."""
    app.command(epilog="Example: `mesh demo --timeout 120`")(demo)
