"""The registry of published agents (broker/registry.py) and how MeshClient routes and checks a
message with it: by the app's models, the built-in contracts, or the schema workers published."""

from __future__ import annotations

import pytest

from mesh.broker import MeshClient
from mesh.broker.registry import PublishedAgent, Registry
from mesh.contracts import ContractError, UnknownAgent, loads
from mesh.ops.worker import published
from tests.apps.greeter import Name, app, app_v2

EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}


def registry(client: MeshClient) -> Registry:
    return client.registry


def heartbeat(client: MeshClient, worker_id: str, age_ms: int = 0) -> None:
    client.redis.zadd(client.keys.heartbeats, {worker_id: registry(client).now_ms() - age_ms})


def publish_greeter(client: MeshClient, worker_id: str = "w1", **changes: object) -> PublishedAgent:
    agent = published(app.agents["greet"])
    if changes:
        agent = PublishedAgent(**{**agent.__dict__, **changes})  # type: ignore[arg-type]
    registry(client).publish(worker_id, f"host:{worker_id}", [agent], app="greeter")
    return agent


def test_publish_lists_the_agent_its_workers_and_their_heartbeats_and_unpublish_keeps_the_agent(client):
    publish_greeter(client, "w1")
    publish_greeter(client, "w2")
    heartbeat(client, "w1")
    client.redis.zrem(client.keys.heartbeats, "w2")  # as if its publish's heartbeat had been reaped
    [listing] = registry(client).listing()
    assert listing.agent.name == "greet" and listing.agent.version == 1 and listing.agent.queue == "greet"
    assert listing.agent.input_schema == Name.model_json_schema()
    by_id = {w.id: w for w in listing.workers}
    assert set(by_id) == {"w1", "w2"}
    assert by_id["w1"].alive and by_id["w1"].label == "host:w1" and by_id["w1"].version == 1
    assert not by_id["w2"].alive and by_id["w2"].heartbeat_ms is None  # no heartbeat

    registry(client).unpublish("w1")
    [listing] = registry(client).listing()
    assert [w.id for w in listing.workers] == ["w2"]
    assert client.redis.hget(client.keys.registry_workers, "w1") is None
    assert registry(client).get("greet") is not None  # the agent stays published


def test_a_publish_prunes_workers_that_stopped_heartbeating_but_keeps_live_and_new_ones(settings, rclient):
    client = MeshClient(settings.model_copy(update={"heartbeat_timeout_s": 1.0}), client=rclient)
    publish_greeter(client, "dead")
    publish_greeter(client, "live")
    old = registry(client).now_ms() - 5_000
    client.redis.zadd(client.keys.serving("greet"), {"dead": old, "live": old})
    heartbeat(client, "dead", age_ms=4_000)
    heartbeat(client, "live")
    publish_greeter(client, "new")  # not heartbeating yet, but just published: kept
    assert {w.id for w in registry(client).listing()[0].workers} == {"live", "new"}
    assert client.redis.hget(client.keys.registry_workers, "dead") is None


def test_a_worker_on_another_shard_is_seen_alive_by_its_own_heartbeats_and_a_publish_here_keeps_it(settings, rclient):
    """The registry is the namespace's (fleet-wide), a worker's heartbeats its shard's (MESH_SHARD): a listing
    or a publish's prune on one shard reads each worker's heartbeat where that worker beats."""
    shards = (settings.shard, settings.shard + 1)
    here, there = (MeshClient(settings.model_copy(update={"shard": s, "heartbeat_timeout_s": 1.0}), client=rclient)
                   for s in shards)
    publish_greeter(there, "far")
    old = registry(there).now_ms() - 5_000
    there.redis.zadd(there.keys.serving("greet"), {"far": old})  # published long ago, still heartbeating
    heartbeat(there, "far")
    assert here.redis.zscore(here.keys.heartbeats, "far") is None  # not in this shard's heartbeats
    publish_greeter(here, "near")  # prunes the workers that stopped heartbeating: not "far"
    for client in (here, there):
        by_id = {w.id: w for w in registry(client).listing()[0].workers}
        assert set(by_id) == {"far", "near"} and by_id["far"].alive and by_id["near"].alive
        assert {w.id: w.alive for w in registry(client).workers()[0]} == {"far": True, "near": True}


def test_a_worker_is_alive_as_it_publishes_before_its_consumers_first_beat_and_a_later_beat_stays(client):
    publish_greeter(client, "w1")  # no consumer has fetched: publishing alone says it is alive
    [worker], _ = registry(client).workers()
    assert worker.alive and worker.heartbeat_ms is not None
    later = registry(client).now_ms() + 60_000
    client.redis.zadd(client.keys.heartbeats, {"w1": later})
    publish_greeter(client, "w1")  # a re-publish never moves a later beat back
    assert int(client.redis.zscore(client.keys.heartbeats, "w1") or 0) == later


def test_published_schema_check_names_every_bad_field():
    agent = published(app.agents["greet"])
    agent.validate_input({"name": "ada", "times": 2})
    with pytest.raises(ContractError) as caught:
        agent.validate_input({"name": "", "times": 9})
    assert caught.value.fields == ["name", "times"]
    assert "invalid greet input: name:" in caught.value.message


def test_a_client_without_the_app_checks_a_published_agent_against_its_schema_and_stamps_its_version(client):
    publish_greeter(client, version=3)
    with pytest.raises(ContractError, match="invalid greet input: name"):
        client.send("greet", {"times": 1})
    assert client.queues() == {**{a: EMPTY for a in ("planner", "researcher", "executor")}, "greet": EMPTY}
    assert client.redis.zcard(client.keys.jobs) == 0

    ref = client.send("greet", {"name": "ada"}, key="k1")
    step = client.status(ref.id).steps["greet"]
    assert (step.agent, step.input) == ("greet", {"name": "ada"})
    [rid] = client.redis.lrange(client.keys.queue("greet"), 0, -1)
    envelope = loads(client.redis.hget(client.keys.messages("greet"), rid))["args"][0]
    assert envelope["contract_version"] == 3 and envelope["step_id"] == "greet"


def test_a_client_with_the_app_checks_with_its_models_and_stamps_the_declared_version(settings, rclient):
    client = MeshClient(settings, client=rclient, app=app_v2)
    with pytest.raises(ContractError, match="invalid greet input: times"):
        client.send_many("greet", [({"name": "ada", "times": 0}, None)])
    assert client.redis.zcard(client.keys.jobs) == 0
    client.send("greet", {"name": "ada"})  # nothing published: the app alone knows the agent
    [rid] = client.redis.lrange(client.keys.queue("greet"), 0, -1)
    assert loads(client.redis.hget(client.keys.messages("greet"), rid))["args"][0]["contract_version"] == 2


def test_a_message_goes_to_the_queue_the_agent_was_published_with(client):
    publish_greeter(client, queue="greetings")
    client.send("greet", {"name": "ada"})
    assert client.queues(["greet", "greetings"]) == {"greet": EMPTY, "greetings": {**EMPTY, "ready": 1}}
    assert "greetings" in client.queues()


def test_an_agent_neither_built_in_nor_published_is_refused_listing_the_known_agents(client):
    publish_greeter(client)
    with pytest.raises(UnknownAgent, match="no agent named 'nope'; agents are planner, researcher, executor, greet"):
        client.send("nope", {})
    assert client.redis.zcard(client.keys.jobs) == 0


def test_built_in_agents_are_still_checked_by_their_own_contracts_unstamped(client):
    with pytest.raises(ContractError, match="unknown tool"):
        client.send("executor", {"tool": "nope", "args": {}})
    client.send("executor", {"tool": "note", "args": {"title": "x"}})
    [rid] = client.redis.lrange(client.keys.queue("executor"), 0, -1)
    assert loads(client.redis.hget(client.keys.messages("executor"), rid))["args"][0]["contract_version"] is None
