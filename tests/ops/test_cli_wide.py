"""``--wide`` on every listing: without it the output fits 80 columns (a table, or a block per row);
with it, one table however wide, every value whole and the columns left out by default."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.agents.builtin import app as builtin
from mesh.broker import MeshClient
from mesh.broker.breaker import Breakers
from mesh.contracts import Brownout, JobRecord, State
from mesh.ops.worker import published
from tests.ops.test_cli_tables import TWINS, put, raising

#: More than any default column shows of a text: a step's result summary, a dead letter's error.
LONG = "the findings: " + " ".join(f"point {n} is sourced and checked" for n in range(12))


def fits_80(res: Any) -> list[str]:
    """The command's lines, checked to end within 80 columns."""
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines and max(map(len, lines)) <= 80, res.stdout
    return lines


def wide(cli: Any, *args: str) -> list[str]:
    """``mesh ARGS --wide`` at 80 columns: a table (no ``field:`` blocks) wider than the terminal."""
    res = cli(*args, "--wide", COLUMNS="80")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith(("┏", "╭", "+", "┌")) for line in lines), res.stdout
    return lines


def header(lines: list[str]) -> list[str]:
    """The column names of the first table in ``lines``."""
    row = next(line for line in lines if line.startswith("┃"))
    return [cell.strip() for cell in row.strip("┃").split("┃")]


def test_jobs_wide_adds_agents_updated_and_error_and_the_default_fits_80_columns(cli, client: MeshClient) -> None:
    ref = client.send("executor", {"tool": "note", "args": {"title": "wide"}}, key="wide-job-1")
    default = fits_80(cli("jobs", COLUMNS="80"))
    assert not any(line.startswith("agents") for line in default)
    lines = wide(cli, "jobs")
    assert header(lines) == ["job", "state", "created", "key", "steps", "agents", "updated", "error"]
    [row] = [line for line in lines if ref.id in line]
    assert "wide-job-1" in row and "executor" in row


def test_status_wide_shows_a_steps_whole_result_summary_cut_at_90_characters_by_default(cli, client) -> None:
    ref = client.send("executor", {"tool": "note", "args": {"title": "long"}}, key="wide-status-1")

    def succeeded(record: JobRecord) -> Any:
        [step] = record.steps.values()
        done = step.model_copy(update={"state": State.SUCCEEDED, "result": {"summary": LONG}})
        return record.model_copy(update={"state": State.SUCCEEDED, "steps": {step.step_id: done}}), []

    client.jobs.update(ref.id, succeeded)
    default = " ".join(fits_80(cli("status", ref.id, COLUMNS="80")))
    assert LONG[:60] in " ".join(default.split()) and LONG[-30:] not in default
    shown = " ".join(" ".join(line.strip("│┃ ") for line in wide(cli, "status", ref.id)).split())
    assert LONG[-30:] in shown


def test_workers_wide_adds_the_worker_id(cli, client: MeshClient) -> None:
    worker_id = "0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f"
    client.registry.publish(worker_id, "host-a:4242", [published(builtin.agents["executor"], "mesh")], app="mesh")
    fits_80(cli("workers", COLUMNS="80"))
    assert worker_id not in cli("workers", COLUMNS="200").stdout
    lines = wide(cli, "workers")
    assert header(lines)[-1] == "id"
    assert any(worker_id in line and "host-a:4242" in line for line in lines)


def test_agents_wide_adds_the_app_and_description(cli, client: MeshClient) -> None:
    client.registry.publish("w-1", "host-a:1", [published(builtin.agents["planner"], "mesh")], app="mesh")
    fits_80(cli("agents", COLUMNS="80"))
    lines = wide(cli, "agents")
    assert header(lines)[-2:] == ["app", "description"]
    [row] = [line for line in lines if "│ planner" in line]
    assert "│ mesh" in row and "Turns a goal" in row


def test_breakers_wide_adds_when_and_by_how_many_failures_it_opened(cli, settings, rclient) -> None:
    breakers = Breakers(settings, rclient)
    for _ in range(settings.breaker_failures):
        with pytest.raises(Brownout):
            breakers.call("orders.internal.example:8443", raising(Brownout("503", dependency="x")))
    fits_80(cli("breakers", COLUMNS="80"))
    lines = wide(cli, "breakers")
    assert header(lines)[-3:] == ["opened", "opened by", "last error"]
    [row] = [line for line in lines if line.startswith("│ orders.internal.example:8443")]
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[-3:-1] == [cells[-3], str(settings.breaker_failures)] and cells[-3].count(":") == 2


def test_dlq_list_wide_adds_the_job_and_trace_and_dlq_stats_takes_wide(cli, client: MeshClient) -> None:
    entry = put(client, TWINS[0], "order-wide", "permanent", "400 Bad Request")
    fits_80(cli("dlq", "list", COLUMNS="80"))
    lines = wide(cli, "dlq", "list")
    assert header(lines) == ["id", "dead-lettered", "agent", "class", "key", "attempts", "job", "trace", "error"]
    [row] = [line for line in lines if TWINS[0] in line]
    assert entry.job_id in row and entry.trace_id in row
    fits_80(cli("dlq", "stats", COLUMNS="80"))
    assert any("permanent" in line for line in wide(cli, "dlq", "stats"))


def test_pipeline_list_wide_shows_the_whole_digest_the_default_its_start(cli, client: MeshClient) -> None:
    from mesh.agents.builtin import PIPELINE

    digest = client.register(PIPELINE)
    default = "\n".join(fits_80(cli("pipeline", "list", COLUMNS="80")))
    assert digest[:12] in default and digest not in default
    assert any(digest in line for line in wide(cli, "pipeline", "list"))


def test_queues_and_stats_take_wide_and_fit_80_columns_without_it(cli, client: MeshClient) -> None:
    client.send("executor", {"tool": "note", "args": {"title": "queued"}}, key="wide-queue-1")
    fits_80(cli("queues", COLUMNS="80"))
    assert header(wide(cli, "queues")) == ["queue", "ready", "delayed", "in flight"]
    client.redis.hincrby(client.keys.routes, "brownout:defer", 3)
    fits_80(cli("stats", COLUMNS="80"))
    lines = wide(cli, "stats")
    assert header(lines) == ["counter", "value", "meaning"]
    assert any("brownout:defer" in line and "3" in line for line in lines)
