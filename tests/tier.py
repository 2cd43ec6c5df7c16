"""The fast tier's guard: a test that starts a worker (in-process or as a process) or a
``redis-server`` must carry ``@pytest.mark.slow``; without it the test fails, whichever tier runs.

``make check`` runs ``pytest -m "not slow"``: the tests that need no worker and no server of their
own (and a test at production scale, such as the 100,000-entry DLQ drain, carries the marker by
hand). The guard is what keeps that tier honest: a new test that starts a worker cannot slip into it
unmarked, because the start itself is refused with the marker named.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import dramatiq
import pytest

# ``mesh <command>`` starts workers of its own for these commands.
WORKER_COMMANDS = frozenset({"worker", "demo", "soak", "bench"})


class NeedsSlowMarker(AssertionError):
    """Raised into a test without the ``slow`` marker that starts a worker or a redis-server."""


def what_it_starts(args: Any) -> str | None:
    """Name what a ``Popen`` argv starts when it is a worker or a redis-server, else None."""
    argv = [os.fspath(a) for a in args] if isinstance(args, Sequence) and not isinstance(args, str) else [str(args)]
    if argv and os.path.basename(argv[0]).startswith("redis-server"):
        return "a redis-server"
    for i, arg in enumerate(argv[:-1]):
        if arg == "mesh.ops.cli" or os.path.basename(arg) == "mesh":
            command = argv[i + 1]
            starts = command in WORKER_COMMANDS and "--help" not in argv
            return f"`mesh {command}`" if starts else None
    return None


@pytest.fixture(autouse=True)
def _slow_marker_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse worker and redis-server starts in a test that is not marked ``slow``."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    name = request.node.nodeid

    def refuse(what: str) -> None:
        raise NeedsSlowMarker(f"{name} starts {what}: mark it @pytest.mark.slow (the fast tier, "
                              "`make check`, runs only tests that start no worker and no redis-server)")

    real_start = dramatiq.Worker.start
    real_popen_init = subprocess.Popen.__init__

    def start(self: dramatiq.Worker, *args: Any, **kwargs: Any) -> None:
        refuse("an in-process worker")
        real_start(self, *args, **kwargs)

    def popen_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        what = what_it_starts(args)
        if what:
            refuse(what)
        real_popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(dramatiq.Worker, "start", start)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    yield
