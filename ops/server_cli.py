"""``mesh ops serve``: the health and metrics server with the console (:mod:`mesh.ops.server`,
:mod:`mesh.ops.web`); ``mesh ops user add``: a console user."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import redis
import typer
from rich.text import Text

from mesh.broker import MeshClient
from mesh.contracts import ConfigError
from mesh.ops.console import EXIT_INPUT, MARKUP, JsonFlag, app_for, emit_json, err, fail, fitted, out, settings

ops_app = typer.Typer(help="Operations: the health and metrics server, the console and its users.",
                      no_args_is_help=True, rich_markup_mode=MARKUP)
user_app = typer.Typer(help="The console's users (MESH_CONSOLE_USERS_FILE).", no_args_is_help=True,
                       rich_markup_mode=MARKUP)
ops_app.add_typer(user_app, name="user")


@ops_app.command("serve", epilog="Example: `mesh ops serve --host 0.0.0.0 --port 9464`, then "
                 "`curl localhost:9464/readyz`")
def ops_serve(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every IPv4 interface; ::: every "
                                           "interface, IPv6 and IPv4).", metavar="ADDRESS")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).", metavar="PORT")] = 9464,
    app_path: Annotated[str | None, typer.Option(
        "--app", metavar="MODULE:APP", show_default=False,
        help="The app the workers serve, as module[:attribute]: its tools verify unknown effects from the "
             "console (as `mesh verify --app`), its agents' queues show on the overview (default: the "
             "built-in planner, researcher and executor).")] = None,
) -> None:
    """Serve the console, /metrics (Prometheus), /healthz and /readyz until Ctrl-C or SIGTERM.

    The console needs a login when MESH_CONSOLE_USERS_FILE (or MESH_CONSOLE_USERS) names users;
    without users it is open on loopback only (as the local operator) and off on any other
    address. /metrics, /healthz and /readyz are always open. Guarded for an open port:
    MESH_OPS_REQUEST_TIMEOUT_S, MESH_OPS_KEEP_ALIVE_S and MESH_OPS_MAX_CONNECTIONS bound what
    slow or idle clients can hold."""
    import contextlib
    import signal
    import sys

    from mesh.ops.logs import setup_logging
    from mesh.ops.server import OpsServer

    setup_logging()
    app = app_for(app_path) if app_path is not None else None  # a bad --app is said before anything listens
    try:
        mesh_client = MeshClient(settings(), app=app)
        server = OpsServer(mesh_client, host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_INPUT)
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    with contextlib.suppress(redis.RedisError):  # Redis not answering yet: /readyz says so
        refused = mesh_client.layout_refusal()
        if refused is not None:
            err.print(Text.assemble(("warning: ", "yellow"), refused, "; /readyz answers 503 until then"))
    where = f"[{host.strip('[]')}]" if ":" in host else host  # an IPv6 address, bracketed as a URL has it
    err.print(Text(f"serving /metrics, /healthz, /readyz on http://{where}:{server.port}"))
    access = server.access
    if access.off_reason is not None:
        err.print(Text(access.off_reason))
    elif access.login_needed:
        err.print(Text(f"console on http://{where}:{server.port}/ for {len(access.users)} user(s)"))
    else:
        err.print(Text(f"console on http://{where}:{server.port}/ (loopback, no users: open as {access.local})"))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: a stop asked for exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()


@user_app.command("add", epilog="Example: `mesh ops user add ana --file /etc/mesh/console-users`")
def user_add(
    name: Annotated[str, typer.Argument(help="The user's name, as audit records and `approvers:` name them.",
                                        metavar="NAME", show_default=False)],
    file: Annotated[Path | None, typer.Option(help="The users file (default: MESH_CONSOLE_USERS_FILE).",
                                              metavar="FILE", show_default=False)] = None,
) -> None:
    """Add a console user, or set a user's new password, in the users file.

    Asks for the password twice on a terminal; otherwise reads it from the first line of standard
    input. Stores an scrypt hash (name:scrypt$...), never the password."""
    import getpass
    import sys

    from mesh.ops.web.auth import write_user

    path = file or settings().console_users_file
    if path is None:
        fail("give --file or set MESH_CONSOLE_USERS_FILE: where the console reads its users", EXIT_INPUT)
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            fail("the passwords differ; nothing was written", EXIT_INPUT)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        fail("a password needs at least 8 characters; nothing was written", EXIT_INPUT)
    try:
        new = write_user(Path(path), name, password)
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}", EXIT_INPUT)
    out.print(Text(f"{'added' if new else 'changed the password of'} {name} in {path}"))


@ops_app.command("console-bench", epilog="Example: `mesh ops console-bench --jobs 10000 --dead-letters 10000`")
def console_bench(
    jobs: Annotated[int, typer.Option(min=1, metavar="N", help="Jobs in the larger namespace.")] = 10_000,
    dead_letters: Annotated[int, typer.Option(min=1, metavar="N", help="Dead letters in the larger namespace.")
                            ] = 10_000,
    as_json: JsonFlag = False,
) -> None:
    """Time each console page and count its Redis commands, with a tenth of the data and with all.

    Each size is filled in a throw-away namespace of the configured Redis (removed afterwards);
    a page's commands must not grow with the data."""
    from mesh.ops.web.bench import run

    small = (max(1, jobs // 10), max(1, dead_letters // 10))
    result = run(settings(), [small, (jobs, dead_letters)], progress=lambda step: err.print(Text(step), style="dim"))
    if as_json:
        emit_json(result)
        return
    a, b = result["sizes"]
    out.print(Text(f"{'page':<28}{'ms':>7}{'cmds':>6}{'ms':>9}{'cmds':>6}"))
    out.print(Text(f"{'':<28}{a['jobs']:>7,} jobs{'':>2}{b['jobs']:>9,} jobs"))
    for label, small_page in a["pages"].items():
        big = b["pages"][label]
        out.print(Text(f"{label[:27]:<28}{small_page['ms']:>7.1f}{int(small_page['commands']):>6}"
                       f"{big['ms']:>9.1f}{int(big['commands']):>6}"))
    for line in fitted([f"median of {result['repeats']} fetches per page on loopback;",
                        "commands counted on the server's own Redis connections"], " "):
        out.print(Text(line))
