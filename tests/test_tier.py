"""The fast tier's guard refuses an unmarked test that starts a worker or a redis-server, and lets
a marked one, or one that only asks a command for ``--help``, through."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT
from tests.tier import what_it_starts

pytest_plugins = ["pytester"]

PY = sys.executable


@pytest.mark.parametrize(("argv", "starts"), [
    ([PY, "-m", "mesh.ops.cli", "worker", "--agents", "executor"], "`mesh worker`"),
    (["/usr/bin/mesh", "demo"], "`mesh demo`"),
    ([PY, "-m", "mesh.ops.cli", "soak", "--minutes", "1"], "`mesh soak`"),
    (["/opt/redis/bin/redis-server", "--port", "7000"], "a redis-server"),
    ([PY, "-m", "mesh.ops.cli", "worker", "--help"], None),
    ([PY, "-m", "mesh.ops.cli", "status", "job-1"], None),
    ([PY, "-m", "mesh.ops.cli", "dlq", "replay", "--all"], None),
    ("redis-cli ping", None),
])
def test_what_a_command_line_starts_is_named(argv, starts):
    assert what_it_starts(argv) == starts


def test_an_unmarked_test_that_starts_a_worker_or_a_server_fails_and_a_marked_one_passes(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the probe session imports tests.tier from here
    pytester.makeconftest("from tests.tier import _slow_marker_guard  # noqa: F401\n")
    pytester.makepyfile(test_probe=f"""
import subprocess
import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

def test_unmarked_in_process_worker():
    dramatiq.Worker(StubBroker()).start()

def test_unmarked_redis_server():
    subprocess.run(["redis-server", "--version"])

def test_unmarked_mesh_worker():
    subprocess.run([{PY!r}, "-m", "mesh.ops.cli", "worker"])

@pytest.mark.slow
def test_marked_worker():
    worker = dramatiq.Worker(StubBroker(), worker_threads=1)
    worker.start()
    worker.stop()

def test_unmarked_help_is_fine():
    subprocess.run([{PY!r}, "-c", "pass", "mesh.ops.cli", "worker", "--help"])
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "markers=slow: x")
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines(["*test_unmarked_in_process_worker starts an in-process worker: mark it*",
                                 "*test_unmarked_redis_server starts a redis-server: mark it*",
                                 "*test_unmarked_mesh_worker starts `mesh worker`: mark it*"])
