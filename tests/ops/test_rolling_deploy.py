"""A rolling deploy on one queue: ``greet`` goes from contract version 1 to 2. ``mesh agents`` lists
only the versions live workers serve; a message stamped with the retired version is dead-lettered
with an error naming ``--to-version``, and ``mesh dlq replay --to-version 2`` sends it to version 2
when its payload fits, refusing a version its workers do not publish."""

from __future__ import annotations

import json
import signal

import pytest
from conftest import flat, wait_for

from mesh.broker import MeshClient, trace
from mesh.contracts import State
from mesh.dlq import DeadLetterStore
from tests.apps.greeter import app

FAST = {"MESH_HEARTBEAT_TIMEOUT_S": "2"}


def alive(client: MeshClient) -> list:
    listing = {x.agent.name: x for x in client.registry.listing()}.get("greet")
    return [w for w in listing.workers if w.alive] if listing else []


@pytest.mark.slow
def test_a_retired_contract_version_drops_out_of_mesh_agents_and_its_dead_letters_replay_to_the_new_one(
        make_settings, rclient, cli, worker_process):
    settings = make_settings(heartbeat_timeout_s=2)
    client = MeshClient(settings, client=rclient)
    old = worker_process("--app", "tests.apps.greeter:app", **FAST)
    wait_for(lambda: [w.version for w in alive(client)] == [1], timeout_s=60)
    worker_process("--app", "tests.apps.greeter:app_v2", **FAST)
    wait_for(lambda: sorted(w.version for w in alive(client)) == [1, 2], timeout_s=60)
    old.send_signal(signal.SIGKILL)  # killed mid-deploy: it never unpublishes
    old.wait()
    wait_for(lambda: [w.version for w in alive(client)] == [2], timeout_s=30)

    row = next(line for line in cli("agents", COLUMNS="80", **FAST).stdout.splitlines() if " greet " in line)
    assert " 2 " in row and "1,2" not in row, row
    [listed] = [r for r in json.loads(cli("agents", "--json", **FAST).stdout) if r["name"] == "greet"]
    assert listed["versions_served"] == [2] and listed["workers_total"] == 2

    # A sender still on version 1: its message reaches the version-2 worker, which refuses it.
    v1 = MeshClient(settings, client=rclient, app=app)
    ref = v1.send("greet", {"name": "ada", "times": 2}, key="deploy-1")
    assert client.wait(ref.id, timeout_s=30).state is State.DEAD_LETTERED
    store = DeadLetterStore(client.redis, client.keys)
    [entry] = store.newest()
    assert "contract version 1" in entry.error and "--to-version 2" in entry.error

    wrong = cli("dlq", "replay", entry.entry_id, "--to-version", "3", "--yes", "--json", **FAST)
    assert wrong.returncode == 1
    assert "publish version 2" in flat(json.loads(wrong.stdout)["skipped"][entry.entry_id])
    dry = cli("dlq", "replay", entry.entry_id, "--to-version", "2", "--dry-run", "--json", **FAST)
    assert dry.returncode == 0 and json.loads(dry.stdout)["ids"] == [entry.entry_id]
    assert store.count() == 1

    res = cli("dlq", "replay", entry.entry_id, "--to-version", "2", "--yes", "--json", **FAST)
    assert res.returncode == 0, res.stderr
    record = client.wait(ref.id, timeout_s=30)
    assert record.state is State.SUCCEEDED
    assert record.steps["greet"].result == {"greeting": "hello ada hello ada"}
    [replayed] = [e for e in trace.read(client.redis, client.keys, ref.id) if e["event"] == "replayed"]
    assert replayed["to_version"] == 2 and replayed["entry_id"] == entry.entry_id


def test_replay_to_a_version_skips_a_payload_that_does_not_fit_it(client, settings):
    from mesh.dlq import Replayer
    from mesh.ops.worker import published
    from tests.apps.greeter import app_v2
    from tests.dlq.bulk import agent_of, generate, nth_id

    client.registry.publish("w", "host:1", [published(s, "greeter") for s in app_v2.agents.values()])
    client.redis.zadd(client.keys.heartbeats, {"w": client.registry.now_ms()})  # a live worker serves it
    generate(client.redis, client.keys, 1, 1_700_000_000.0)  # an http_post call: no name for greet
    store = DeadLetterStore(client.redis, client.keys)
    raw = store.raw(nth_id(0))
    assert raw is not None
    client.redis.hset(client.keys.dead_letter(nth_id(0)), "raw", raw.replace(f'"{agent_of(0)}"'.encode(), b'"greet"'))
    _relabel(client, nth_id(0), agent_of(0))
    replayer = Replayer(store, settings, to_version=2)
    report = replayer.replay(replayer.entries([nth_id(0)]))
    assert report.replayed == []
    assert "does not fit it" in report.skipped[nth_id(0)] and "name: Field required" in report.skipped[nth_id(0)]
    assert store.count() == 1


def _greet_entry(client: MeshClient) -> str:
    """A dead letter of ``greet`` (version 1's message) whose payload fits version 2 too."""
    from tests.dlq.bulk import agent_of, generate, nth_id

    generate(client.redis, client.keys, 1, 1_700_000_000.0)
    store = DeadLetterStore(client.redis, client.keys)
    body = json.loads(store.raw(nth_id(0)))  # type: ignore[arg-type]
    env = body["args"][0]
    env.update(agent="greet", payload={"name": "ada"}, contract_version=1)
    body.update(actor_name="greet", queue_name="greet")
    raw = json.dumps(body).replace(f'"{agent_of(0)}"', '"greet"')
    client.redis.hset(client.keys.dead_letter(nth_id(0)), "raw", raw)
    _relabel(client, nth_id(0), agent_of(0))
    return nth_id(0)


def _relabel(client: MeshClient, entry_id: str, agent: str) -> None:
    """Label the entry ``greet``'s, as its rewritten message is (replay refuses a mislabelled entry)."""
    key = client.keys.dead_letter(entry_id)
    entry = client.redis.hget(key, "entry")
    assert entry is not None
    client.redis.hset(key, mapping={"entry": entry.replace(f'"{agent}"'.encode(), b'"greet"'), "agent": "greet"})


def test_replay_to_a_version_only_a_dead_worker_served_is_skipped(client, settings):
    # A rollback: version 2's workers were started after version 1's and then killed (no unpublish).
    # The registry still holds what was published last (version 2), but only version 1 is served:
    # a message sent to version 2 would be refused again by every live worker.
    from mesh.dlq import Replayer
    from mesh.ops.worker import published
    from tests.apps.greeter import app_v2

    client.registry.publish("old", "host:1", [published(s, "greeter") for s in app.agents.values()])
    client.registry.publish("new", "host:2", [published(s, "greeter") for s in app_v2.agents.values()])
    client.redis.zrem(client.keys.heartbeats, "new")  # killed right after publishing: "new" never beats again
    client.redis.zadd(client.keys.heartbeats, {"old": client.registry.now_ms()})
    eid = _greet_entry(client)
    replayer = Replayer(DeadLetterStore(client.redis, client.keys), settings, to_version=2)

    dry = replayer.replay(replayer.entries([eid]), dry_run=True)
    report = replayer.replay(replayer.entries([eid]))

    assert report.replayed == [] == dry.replayed  # before: replayed to a version nobody serves
    assert "no live worker" in report.skipped[eid] and report.skipped == dry.skipped
    assert client.queues(["greet"])["greet"]["ready"] == 0


def test_replay_to_a_version_a_live_worker_serves_is_sent(client, settings):
    from mesh.dlq import Replayer
    from mesh.ops.worker import published
    from tests.apps.greeter import app_v2

    client.registry.publish("new", "host:2", [published(s, "greeter") for s in app_v2.agents.values()])
    client.redis.zadd(client.keys.heartbeats, {"new": client.registry.now_ms()})
    eid = _greet_entry(client)
    replayer = Replayer(DeadLetterStore(client.redis, client.keys), settings, to_version=2)
    report = replayer.replay(replayer.entries([eid]))
    assert report.replayed == [eid], report.skipped
    assert client.queues(["greet"])["greet"]["ready"] == 1
