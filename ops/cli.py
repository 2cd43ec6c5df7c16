"""The ``mesh`` command line: the app assembled from one module per command group (``worker_cli``,
``jobs_cli``, ``dlq_cli``, ...), and its entry point. Every command has ``--help``; those that print
data take ``--json``; what the commands share (consoles, exit codes, the client, the ``--json`` and
``--wide`` flags, listings) is :mod:`mesh.ops.console`."""

from __future__ import annotations

import gc
import os

import redis
import typer
from typer.core import TyperGroup

from mesh.broker.settings import DEFAULT_REDIS_URL
from mesh.contracts import MeshError
from mesh.ops import (
    approvals_cli,
    bench_cli,
    demo_cli,
    effects_cli,
    events_cli,
    jobctl_cli,
    jobs_cli,
    migrate_cli,
    shards_cli,
    stats_cli,
    tools_cli,
    worker_cli,
)
from mesh.ops.agents_cli import agents as agents_command
from mesh.ops.breakers_cli import breakers_app
from mesh.ops.console import EXIT_INPUT, MARKUP, REDIS_TROUBLE, fail, plain_help, redis_trouble
from mesh.ops.dlq_cli import dlq_app
from mesh.ops.limits_cli import limits_app
from mesh.ops.pipeline_cli import pipeline_app
from mesh.ops.server_cli import ops_app

#: The commands in the order ``mesh --help`` and the CLI reference list them, whichever module
#: declares them; a command not named here comes after these.
ORDER = ("worker", "submit", "run", "send", "status", "jobs", "workers", "trace", "queues", "agents", "stats",
         "shards", "migrate", "bench", "soak", "demo", "approvals", "approve", "deny", "waits", "signal", "emit",
         "cancel", "rerun", "verify", "settle", "tools", "breakers", "limits", "ops", "dlq", "pipeline")


class Listed(TyperGroup):
    """The ``mesh`` group: lists its commands in :data:`ORDER` rather than in the order of registration."""

    def list_commands(self, ctx: typer.Context) -> list[str]:  # type: ignore[override]
        rank = {name: n for n, name in enumerate(ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(ORDER)))


app = typer.Typer(help="The agent mesh: queue-driven agents on dramatiq and Redis.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=MARKUP, cls=Listed,
                  epilog="Exit codes: 0 ok, 1 the job did not succeed, 2 bad input, 3 Redis unreachable, "
                         "4 timed out. Settings come from MESH_* variables (MESH_REDIS_URL, MESH_NAMESPACE, ...).")


@app.callback()
def _logging() -> None:
    """Every command logs like the workers: JSON lines on stderr, readable lines on a terminal."""
    from mesh.ops.logs import setup_logging

    setup_logging("WARNING")


worker_cli.register(app)  # mesh worker, mesh workers
jobs_cli.register(app)  # mesh submit, run, send, status, jobs, trace
stats_cli.register(app)  # mesh queues, mesh stats
app.command("agents", epilog="Examples: `mesh agents`, `mesh agents --json`")(agents_command)
bench_cli.register(app)  # mesh bench, mesh soak
demo_cli.register(app)  # mesh demo
approvals_cli.register(app)  # mesh approvals, approve, deny
events_cli.register(app)  # mesh waits, signal, emit
jobctl_cli.register(app)  # mesh cancel, mesh rerun
effects_cli.register(app)  # mesh verify, mesh settle
app.add_typer(breakers_app, name="breakers")
app.add_typer(limits_app, name="limits")
tools_cli.register(app)  # mesh tools, tools diff, tools accept
app.add_typer(ops_app, name="ops")
app.add_typer(dlq_app, name="dlq")
app.add_typer(pipeline_app, name="pipeline")
migrate_cli.register(app)  # mesh migrate
shards_cli.register(app)  # mesh shards


def main() -> None:
    # The objects the imports made (modules, models, schemas) live until the process exits: moved
    # out of the collector's sight, neither the command's collections nor the interpreter's
    # teardown walk them again. A sixth of a short command's CPU time went there.
    gc.freeze()
    invoke()


def invoke(args: list[str] | None = None, prog_name: str | None = None) -> None:
    """The command line without the process's set-up: ``args`` (default ``sys.argv[1:]``) as one
    ``mesh`` command, ending in ``SystemExit`` with its exit code. :func:`main` runs it; the tests
    call it in-process (tests/conftest.py's ``cli`` fixture), where a process per command cost more
    than the command."""
    plain_help()
    try:
        app(args=args, prog_name=prog_name)
    except MeshError as exc:
        _stop(str(exc), EXIT_INPUT)
    except redis.exceptions.NoPermissionError as exc:
        # A user held by ACL rules that lack a command: say so, not a traceback.
        _stop(f"Redis refused a command to this user: {exc}. The rules a mesh user needs: "
              "`python -m mesh.broker.acl NAMESPACE` (docs/reference/acl.md)", EXIT_INPUT)
    except REDIS_TROUBLE as exc:
        # Redis not reached, or not a Redis, where a command (a worker's start-up, `mesh migrate`)
        # first used it: one line, not a traceback. The settings were read: the URL parses.
        _stop(*redis_trouble(exc, os.environ.get("MESH_REDIS_URL", DEFAULT_REDIS_URL)))


def _stop(message: str, code: int) -> None:
    """:func:`fail` outside the typer app, whose ``Exit`` nothing is left to catch."""
    try:
        fail(message, code)
    except typer.Exit as exit_:
        raise SystemExit(exit_.exit_code) from None


if __name__ == "__main__":
    main()
