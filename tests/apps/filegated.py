"""An app whose one agent waits at a gate made of files before its one effect, so a test can cut
the worker off from Redis while a handler is right before ``ctx.call`` (a gate kept in Redis could
not be passed then): ``mesh worker --app tests.apps.filegated:app`` with ``TEST_GATE_DIR`` set.

Each handler creates ``arrived-<n>`` in the folder, waits until ``open`` exists there, calls
``post_hook`` and creates ``passed-<n>`` whatever the call did (``n`` counts the handler's runs).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from mesh import App, Context
from mesh.agents.tools import host_port
from tests.apps.gated import Hook, Posted, post_hook

app = App("filegated")
app.tool(post_hook, name="post_hook", dependency=lambda args: host_port(args.url))

#: How often a handler at the gate looks whether it opened (s).
GATE_POLL_S = 0.02
_runs = itertools.count(1)


@app.agent(tools=["post_hook"])
def filegated_poster(ctx: Context, hook: Hook) -> Posted:
    """Waits at the file gate, then calls ``post_hook`` once."""
    folder, n = Path(os.environ["TEST_GATE_DIR"]), next(_runs)
    (folder / f"arrived-{n}").touch()
    while not (folder / "open").exists():
        time.sleep(GATE_POLL_S)
    try:
        receipt = ctx.call("post_hook", hook)
    finally:
        (folder / f"passed-{n}").touch()
    return Posted(status=receipt.detail["status"])
