"""``mesh ops serve``: the health and metrics server (:mod:`mesh.ops.server`)."""

from __future__ import annotations

from typing import Annotated

import typer

from mesh.broker import MeshClient
from mesh.ops.console import EXIT_INPUT, MARKUP, err, fail, settings

ops_app = typer.Typer(help="Operations: the health and metrics server.", no_args_is_help=True,
                      rich_markup_mode=MARKUP)


@ops_app.command("serve", epilog="Example: `mesh ops serve --host 0.0.0.0 --port 9464`, then "
                 "`curl localhost:9464/readyz`")
def ops_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.", metavar="ADDRESS")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).", metavar="PORT")] = 9464,
) -> None:
    """Serve /metrics (Prometheus), /healthz and /readyz until Ctrl-C or SIGTERM.

    Guarded for an open port: MESH_OPS_REQUEST_TIMEOUT_S, MESH_OPS_KEEP_ALIVE_S and
    MESH_OPS_MAX_CONNECTIONS bound what slow or idle clients can hold."""
    import contextlib
    import signal
    import sys

    from mesh.ops.logs import setup_logging
    from mesh.ops.server import OpsServer

    setup_logging()
    try:
        server = OpsServer(MeshClient(settings()), host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_INPUT)
    err.print(f"serving /metrics, /healthz, /readyz on http://{host}:{server.port}")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: a stop asked for exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
