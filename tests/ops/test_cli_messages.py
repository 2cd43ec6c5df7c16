"""Messages an operator acts on say what is true: the real ``mesh`` command as a subprocess (and real
workers, a real open breaker, real Redis) for each message that used to mislead, and help that reads
at 80 columns."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from conftest import flat, mesh_env, ops_server, wait_for

from mesh.broker import MeshClient, job_id_for
from mesh.broker.registry import PublishedAgent, Registry
from mesh.broker.router import Route, Routing, route
from mesh.broker.settings import MeshSettings
from mesh.contracts import BreakerOpen, FailureClass, KeyConflict, State
from mesh.dlq import DeadLetterStore, Filter
from tests.httpserver import RecordingServer
from tests.ops.test_dlq_cli import put


def _commands() -> list[list[str]]:
    """Every command path of ``mesh``, found from the app itself (so new commands are covered too)."""
    from mesh.ops.cli import app

    found: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        found.append(path)
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = _commands()


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "mesh")
def test_help_fits_80_columns_without_type_tags_and_every_parameter_has_text(path: list[str], cli: Any) -> None:
    res = cli(*path, "--help", COLUMNS="80")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert not re.search(r"<(bool|str|int|float|list\[|path|Path)", res.stdout), res.stdout
    from mesh.ops.cli import app

    cmd: Any = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    assert (cmd.help or "").strip(), f"{path} has no help"
    for param in cmd.params:
        assert (getattr(param, "help", None) or "").strip(), f"{path}: {param.name} has no help"


def test_mesh_help_lists_every_command_in_the_order_the_assembly_names_whichever_module_declares_it(cli: Any) -> None:
    """The commands come from one module per group, registered in any order: ``mesh --help`` lists them
    as ``ops/cli.py``'s ORDER says, and ORDER names every one (a new command gets its place on purpose)."""
    from mesh.ops.cli import ORDER, app

    registered = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert set(ORDER) == registered
    listed = [line.split()[1] for line in cli("--help", COLUMNS="100").stdout.splitlines()
              if line.startswith("│ ") and len(line.split()) > 2 and line.split()[1] in registered]
    assert listed == list(ORDER)
    assert listed[:3] == ["worker", "submit", "run"] and listed[-5:] == ["breakers", "limits", "ops", "dlq", "pipeline"]


def test_submit_wait_without_a_live_worker_says_no_worker_serves_the_agent(cli: Any) -> None:
    res = cli("submit", "write a note", "--wait", "--timeout", "0.5")
    assert res.returncode == 4
    assert "no live worker serves planner" in flat(res.stderr)


def test_run_wait_without_a_live_worker_names_the_worker_command_that_serves_the_app(cli: Any) -> None:
    args = ("--input", '{"topic": "otters"}', "--wait", "--timeout", "0.5")
    res = cli("run", "article", "--app", "examples.quickstart.app", *args)
    assert res.returncode == 4
    assert "no live worker serves writer (start one: mesh worker --app examples.quickstart.app;" in flat(res.stderr)
    from mesh.ops.jobs_cli import _worker_command

    # Without --app (a pipeline run by name): a bare `mesh worker` serves the built-in agents only.
    assert _worker_command(["writer"], None) == "mesh worker --app MODULE:APP"
    assert _worker_command(["planner", "executor"], None) == "mesh worker"


def test_same_key_with_another_goal_is_refused_and_nothing_more_is_enqueued(cli: Any, client: MeshClient) -> None:
    first = cli("submit", "write a note", "--key", "k-1")
    again = cli("submit", "write a note", "--key", "k-1")
    assert first.returncode == again.returncode == 0 and first.stdout == again.stdout
    queued = client.queues(["planner"])["planner"]["ready"]
    other = cli("submit", "delete everything", "--key", "k-1")
    assert other.returncode == 2
    assert f"key 'k-1' already names job {first.stdout.strip()}" in flat(other.stderr)
    assert client.queues(["planner"])["planner"]["ready"] == queued
    assert client.status(first.stdout.strip()).goal == "write a note"
    with pytest.raises(KeyConflict):
        client.send("researcher", {"question": "q"}, key="k-1")  # another agent is another payload too
    with pytest.raises(KeyConflict):  # within one batch as well, and nothing of it is sent
        client.send_many("researcher", [({"question": "a"}, "k-2"), ({"question": "b"}, "k-2")])
    assert client.jobs.get(job_id_for("k-2")) is None
    assert client.queues(["researcher"])["researcher"]["ready"] == 0


def test_dlq_unknown_agent_is_an_error_naming_the_known_ones_and_replay_says_class(
        cli: Any, client: MeshClient) -> None:
    store = DeadLetterStore(client.redis, client.keys)
    put(store, "t1", "triage", "unknown", 1_700_000_000.0)
    res = cli("dlq", "list", "--agent", "plannr")
    assert res.returncode == 2
    assert "unknown agent 'plannr'; agents are planner, researcher, executor, triage" in flat(res.stderr)
    assert cli("dlq", "list", "--agent", "triage").returncode == 0  # known by its dead letters
    res = cli("dlq", "replay", "--agent", "triage", "--yes")  # but no worker ever served it: no queue to trust
    assert res.returncode == 1 and "its message is for agent 'triage', which this deployment does not know" \
        in flat(res.stderr)
    Registry(client.redis, client.keys, 15).publish("w-triage", "host:1", [PublishedAgent(
        name="triage", queue="triage", version=1, input_schema=None, output_schema=None)])
    res = cli("dlq", "replay", "--agent", "triage", "--dry-run")
    assert "does not know" not in flat(res.stderr)  # published: its queue is the agent's own


def _readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_readyz_turns_not_ready_as_soon_as_gracefully_stopped_workers_exit(
        client: MeshClient, worker_process: Any) -> None:
    procs = [worker_process("--agents", "planner", "--threads", "1") for _ in range(2)]
    with ops_server(client) as url:
        wait_for(lambda: (r := _readyz(url))[0] == 200 and r[1]["status"] == "ready" and r[1]["workers"] == 2,
                 timeout_s=30)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0
        # Not a heartbeat timeout (15 s) later: the workers removed their heartbeats on the way out.
        assert client.settings.heartbeat_timeout_s >= 15
        _, body = wait_for(lambda: (r := _readyz(url))[0] == 503 and r, timeout_s=2)
        assert body["workers"] == 0
    assert client.redis.zcard(client.keys.heartbeats) == 0


def test_a_dead_letter_ended_by_max_defers_on_an_open_breaker_states_that_cause_first(
        client: MeshClient, make_settings: Any, start_worker: Any) -> None:
    with RecordingServer(lambda n, _: (503, {"down": True})) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=5, max_defers=2, breaker_failures=1,
                                 breaker_cooldown_s=0.2, breaker_max_cooldown_s=0.4)
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url(), "json": {}}})
        start_worker(settings, ("executor",))
        record = wait_for(lambda: (r := client.status(ref.id)).state is State.DEAD_LETTERED and r, timeout_s=30)
    [entry] = DeadLetterStore(client.redis, client.keys).entries(Filter())
    assert entry.error.startswith("deferred 2 times, the most MESH_MAX_DEFERS=2 allows; last error: ")
    assert "retry in" not in entry.error
    assert record.steps["executor"].error == entry.error
    deferred = [a for a in entry.attempts if a.outcome == "deferred"]
    # Each attempt keeps its own error: the history is in the attempts, the cause that ended it up front.
    assert len(deferred) == 2 and all(a.error and not a.error.startswith("deferred") for a in deferred)
    assert entry.attempts[-1].outcome == "dead_lettered"


def test_a_dead_letter_ended_by_the_deadline_states_it_first_with_the_last_error() -> None:
    settings = MeshSettings()
    got = route(FailureClass.BROWNOUT, 80.0, attempt=1, defers=3, remaining_s=12.0, timeout_retries=0,
                settings=settings, rng=lambda: 0.0)
    assert (got.route, got.failure_class) == (Route.DEAD_LETTER, FailureClass.DEADLINE)
    error = got.error(BreakerOpen("api:443", 79.8, "open"))
    assert error == ("waiting 80.0s to defer after brownout would pass the deadline (12.0s left); "
                     "last error: circuit breaker for api:443 was open")
    assert Routing(Route.DEAD_LETTER, FailureClass.UNKNOWN, reason="retries exhausted (2 of 2)").error(
        ValueError("boom")) == "boom (retries exhausted (2 of 2))"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_demo_without_a_reachable_redis_prints_an_honest_hint_and_keeps_files_under_cwd(
        settings: MeshSettings, tmp_path: Path) -> None:
    env = mesh_env(settings, MESH_REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0", COLUMNS="80")
    res = subprocess.run([sys.executable, "-m", "mesh.ops.cli", "demo", "--timeout", "60"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert max(map(len, res.stdout.splitlines())) <= 80, res.stdout
    out = flat(res.stdout)
    assert "Inspect it again with" not in out
    assert "the job cannot be inspected afterwards" in out
    assert (tmp_path / ".mesh" / "redis").is_dir()


@pytest.mark.slow
def test_demo_hint_names_a_mesh_the_shell_finds_when_the_venv_is_not_on_path(settings: MeshSettings) -> None:
    # As `make demo` runs it: .venv/bin/mesh, from a shell whose PATH lacks .venv/bin.
    env = {**mesh_env(settings), "PATH": "/usr/bin:/bin", "COLUMNS": "80"}
    res = subprocess.run([sys.executable, "-m", "mesh.ops.cli", "demo", "--timeout", "60"], env=env,
                         capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert max(map(len, res.stdout.splitlines())) <= 80, res.stdout
    # the command to paste: the lines after the hint, continued with backslashes
    hint = res.stdout.split("Inspect it again with:\n", 1)[1].strip()
    shown = subprocess.run(["/bin/sh", "-c", hint], env=env,
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert shown.returncode == 0, shown.stderr
    assert "succeeded" in shown.stdout
