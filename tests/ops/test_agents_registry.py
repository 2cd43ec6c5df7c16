"""A user's app served by real worker processes (``mesh worker --app tests.apps.greeter:app``): it is
published on start, listed by ``mesh agents``, reachable by ``mesh send`` from a process that does not
import it (checked against the published schema), covered by ``mesh queues``, ``status``, ``trace``,
``dlq`` and /metrics, and a message for another contract version is dead-lettered, never run."""

from __future__ import annotations

import json
import signal

import httpx
from conftest import flat, ops_server, wait_for
from prometheus_client.parser import text_string_to_metric_families

from mesh.broker import MeshClient
from mesh.contracts import FailureClass, State
from mesh.dlq import DeadLetterStore
from mesh.ops.worker import published
from tests.apps.greeter import Name, app, app_v2

APP = ("--app", "tests.apps.greeter:app")
EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}


def metric(base: str, name: str, **labels: str) -> float | None:
    """One sample of a /metrics scrape, or None when absent."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def serving(client: MeshClient, agent: str = "greet") -> list:
    """The live workers serving ``agent`` (its listing), once there are any."""
    listing = {x.agent.name: x for x in client.registry.listing()}.get(agent)
    return [w for w in listing.workers if w.alive] if listing else []


def test_a_worker_publishes_its_agents_on_start_and_leaves_them_on_sigterm(client, worker_process):
    proc = worker_process(*APP)
    [worker] = wait_for(lambda: serving(client), timeout_s=60)  # a process start: seconds on a loaded machine
    assert worker.label.split(":")[1] == str(proc.pid) and worker.version == 1
    listings = {x.agent.name: x for x in client.registry.listing()}
    assert set(listings) == {"greet", "shout"}
    greet, shout = listings["greet"].agent, listings["shout"].agent
    assert (greet.version, greet.queue, greet.app, greet.tools) == (1, "greet", "greeter", ())
    assert greet.input_schema == Name.model_json_schema()
    assert greet.output_schema is not None and "greeting" in greet.output_schema["properties"]
    assert shout.tools == ("upper",)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert [x.workers for x in client.registry.listing()] == [(), ()]  # the agents stay, the worker left


def test_mesh_agents_fits_80_columns_and_json_carries_the_schemas(cli, client, worker_process):
    empty = cli("agents")
    assert empty.returncode == 0 and "no agents published" in empty.stdout
    assert json.loads(cli("agents", "--json").stdout) == []

    worker_process(*APP)
    wait_for(lambda: serving(client) and serving(client, "shout"), timeout_s=60)
    res = cli("agents", COLUMNS="80")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 80, res.stdout
    greet = next(line for line in lines if " greet " in line)
    assert "1/1" in greet and "s ago" in greet
    assert "upper" in next(line for line in lines if " shout " in line)

    records = {r["name"]: r for r in json.loads(cli("agents", "--json").stdout)}
    assert records["greet"]["input_schema"] == Name.model_json_schema()
    assert records["greet"]["output_schema"]["title"] == "Greeting"
    assert (records["greet"]["workers_alive"], records["greet"]["workers_total"]) == (1, 1)
    [worker] = records["greet"]["workers"]
    assert worker["alive"] and worker["version"] == 1 and worker["heartbeat_age_s"] >= 0


def test_mesh_send_checks_a_published_agent_against_its_schema_and_a_good_message_succeeds(cli, client,
                                                                                          worker_process):
    res = cli("send", "greet", "--payload", '{"name": "ada"}')
    assert res.returncode == 2 and "unknown agent 'greet'; agents are planner, researcher, executor" in flat(
        res.stderr)

    worker_process(*APP, "--agents", "greet")
    wait_for(lambda: serving(client), timeout_s=60)
    bad = cli("send", "greet", "--payload", '{"name": "ada", "times": 7}')
    assert bad.returncode == 2
    assert "--payload: invalid greet input: times: 7 is greater than the maximum of 3 (nothing was sent)" in flat(
        bad.stderr)
    missing = cli("send", "greet", "--payload", '{"nom": "ada"}')
    assert missing.returncode == 2 and "name: Field required" in flat(missing.stderr)
    assert client.queues() == {**{a: EMPTY for a in ("planner", "researcher", "executor")}, "greet": EMPTY}
    assert client.redis.zcard(client.keys.jobs) == 0

    good = cli("send", "greet", "--payload", '{"name": "ada", "times": 2}', "--key", "hello-ada", "--json")
    assert good.returncode == 0, good.stderr
    [ref] = json.loads(good.stdout)
    record = client.wait(ref["job_id"], timeout_s=30)
    assert record.state is State.SUCCEEDED
    assert record.steps["greet"].result == {"greeting": "hello ada hello ada"}

    status = cli("status", ref["job_id"], "--json")
    assert json.loads(status.stdout)["steps"]["greet"]["state"] == "succeeded"
    events = [e["event"] for e in json.loads(cli("trace", ref["job_id"], "--json").stdout)["events"]]
    assert events[0] == "enqueued" and {"picked_up", "progress", "succeeded"} <= set(events)


def test_a_message_for_another_contract_version_is_dead_lettered_naming_both_and_never_run(
        settings, rclient, client, cli, worker_process):
    worker_process(*APP)
    wait_for(lambda: serving(client), timeout_s=60)
    v2 = MeshClient(settings, client=rclient, app=app_v2)  # a sender already on version 2
    ref = v2.send("greet", {"name": "ada"})
    record = client.wait(ref.id, timeout_s=30)
    assert record.state is State.DEAD_LETTERED
    [entry] = DeadLetterStore(client.redis, client.keys).newest()
    assert entry.agent == "greet" and entry.failure_class == FailureClass.INVALID_INPUT
    assert "contract version 2" in entry.error and "serves version 1" in entry.error
    # The handler never ran: the step was never picked up, and its progress note never written.
    events = {e["event"] for e in json.loads(cli("trace", ref.id, "--json").stdout)["events"]}
    assert not events & {"picked_up", "progress", "succeeded"}
    assert record.steps["greet"].picked_up == 0

    listed = cli("dlq", "list", "--agent", "greet", "--json")
    assert [e["entry_id"] for e in json.loads(listed.stdout)] == [entry.entry_id]


def test_mesh_queues_and_metrics_cover_the_user_agents(cli, client, worker_process):
    # Published by a worker that is gone: its queue is still counted while messages wait.
    client.registry.publish("gone", "host:gone", [published(s, "greeter") for s in app.agents.values()], app="greeter")
    client.redis.zrem(client.keys.heartbeats, "gone")  # its publish's heartbeat reaped: it is gone
    client.send("greet", {"name": "ada"})
    depths = json.loads(cli("queues", "--json").stdout)
    assert depths["greet"] == {**EMPTY, "ready": 1} and depths["shout"] == EMPTY

    with ops_server(client) as base:
        assert metric(base, "mesh_queue_ready", queue="greet") == 1
        assert metric(base, "mesh_queue_ready", queue="shout") == 0
        assert metric(base, "mesh_agent_workers", agent="greet") == 0
        worker_process(*APP)
        wait_for(lambda: metric(base, "mesh_handler_duration_seconds_count", agent="greet") == 1, timeout_s=60)
        wait_for(lambda: metric(base, "mesh_agent_workers", agent="greet") == 1, timeout_s=30)
        assert metric(base, "mesh_messages_total", agent="greet", outcome="succeeded") == 1
        assert metric(base, "mesh_queue_ready", queue="greet") == 0
