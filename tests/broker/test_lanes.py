"""An agent queue's lanes (broker/lanes.py, scripts/lanes_lib.lua): priorities fetched high first
without starving the lowest, flows (tenants) served round robin, and every path that puts a message
back (requeue, reclaim, recovery, dramatiq's enqueue) keeps its lane. Real Redis, the fetch script
called as a consumer calls it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from mesh.agents.pipelines.builder import Pipeline
from mesh.broker import MeshClient, claims
from mesh.broker import lanes as queue_lanes
from mesh.broker.mesh_broker import MeshBroker
from mesh.broker.outbox import build_message, stage
from mesh.contracts import ConfigError, Envelope
from tests.apps.lanes import app

Q = "work"


@pytest.fixture
def lanes_client(settings: Any, rclient: Any) -> MeshClient:
    return MeshClient(settings, client=rclient, app=app)


@pytest.fixture
def broker(settings: Any) -> Iterator[MeshBroker]:
    b = MeshBroker(settings, middleware=[])
    yield b
    b.close()


def fetch(broker: MeshBroker, n: int, *, beat: bool = False) -> list[dict[str, Any]]:
    """What one fetch of up to ``n`` hands a consumer: each message's envelope, with its id as ``rid``."""
    flat = broker.settle("fetch", Q, n, "1" if beat else "0")
    # A normal message's envelope leaves its priority out (as before the field existed).
    return [{"priority": "normal", **orjson.loads(flat[i + 1])["args"][0], "rid": flat[i].decode()}
            for i in range(0, len(flat), 2)]


def drain(broker: MeshBroker, n: int, batch: int = 1) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < n:
        more = fetch(broker, min(batch, n - len(got)))
        if not more:
            break
        got += more
    return got


def send(client: MeshClient, count: int, *, priority: str = "normal", tenant: str = "a",
         first: int = 0) -> None:
    client.send_many("work", [({"n": first + i, "tenant": tenant}, None) for i in range(count)],
                     priority=priority)  # type: ignore[arg-type]


def lanes_hold_what_they_should(client: MeshClient) -> Counter[str]:
    """Every id waiting in a lane of the queue is a message of that lane's priority and flow key (and
    none waits twice); the count per priority."""
    r, keys, seen = client.redis, client.keys, Counter[str]()
    for level in ("high", "normal", "low"):
        lists: list[tuple[str, str | None]] = [(keys.lane(Q, level), None)]
        flows = [f.decode() for f in r.zrange(keys.flows(Q, level), 0, -1)]  # type: ignore[union-attr]
        lists += [(keys.flow(Q, level, f), f) for f in flows if f]
        for key, flow in lists:
            for rid in r.lrange(key, 0, -1):  # type: ignore[union-attr]
                env = orjson.loads(r.hget(keys.messages(Q), rid))["args"][0]  # type: ignore[arg-type]
                assert queue_lanes.of(env) == (level, flow), (key, env.get("priority"), env.get("flow_key"))
                seen[level] += 1
                seen[rid.decode()] += 1
    assert all(n == 1 for k, n in seen.items() if k not in ("high", "normal", "low")), "an id waits twice"
    return Counter({k: seen[k] for k in ("high", "normal", "low")})


def test_a_message_with_a_flow_key_or_another_priority_waits_in_its_own_lane_and_is_counted(
        lanes_client, rclient):
    keys = lanes_client.keys
    lanes_client.send_many("work", [({"n": i, "tenant": "x"}, None) for i in range(3)])
    assert rclient.llen(keys.queue(Q)) == 0 and rclient.llen(keys.flow(Q, "normal", "x")) == 3
    lanes_client.send("work", {"n": 9, "tenant": "b"}, priority="high")
    assert rclient.llen(keys.flow(Q, "high", "b")) == 1
    assert lanes_client.queues([Q], lanes=True)[Q] == {
        "ready": 4, "delayed": 0, "in_flight": 0, "by_priority": {"high": 1, "normal": 3, "low": 0}, "flows": 2}
    assert lanes_client.queues([Q])[Q] == {"ready": 4, "delayed": 0, "in_flight": 0}


def test_the_default_path_writes_and_reads_only_the_queue_list(settings, rclient, broker):
    client = MeshClient(settings, client=rclient)
    refs = client.send_many("executor", [({"tool": "note", "args": {"title": f"t{i}"}}, None) for i in range(5)])
    keys = client.keys
    assert rclient.llen(keys.queue("executor")) == 5
    flat = broker.settle("fetch", "executor", 10, "0")
    assert len(flat) == 10
    # Written as before priorities existed: an earlier release's worker reads it during a rolling deploy.
    assert b'"priority"' not in flat[1] and b'"flow_key"' not in flat[1]
    laned = [k for k in rclient.scan_iter(match=f"{keys.queue('executor')}.*") if not k.endswith((b".msgs", b".wake"))]
    assert laned == [] and len(refs) == 5


def test_a_fetch_takes_high_then_normal_then_low(lanes_client, broker):
    for level in ("low", "normal", "high"):
        send(lanes_client, 3, priority=level, tenant=level)
    got = [m["priority"] for m in drain(broker, 9)]
    assert got == ["high"] * 3 + ["normal"] * 3 + ["low"] * 3


@pytest.mark.parametrize("batch", [1, 8])
def test_under_sustained_load_each_lower_level_still_gets_one_fetch_in_eight(lanes_client, broker, batch):
    for level in ("low", "normal", "high"):
        send(lanes_client, 200, priority=level, tenant="t")
    got = Counter(m["priority"] for m in drain(broker, 160, batch))
    assert got["low"] >= 16 and got["normal"] >= 16, got  # at least 10 % each
    # High first otherwise: one in eight for each level below it, give or take the one in progress.
    assert got["high"] + got["normal"] + got["low"] == 160 and 19 <= got["normal"] <= 20 and got["low"] == 20, got


def test_the_lowest_level_gets_one_fetch_in_eight_behind_a_high_backlog_alone(lanes_client, broker):
    send(lanes_client, 100, priority="high")
    send(lanes_client, 100, priority="low")
    order = [m["priority"] for m in drain(broker, 80, 5)]
    assert Counter(order)["low"] == 10
    assert order[:7] == ["high"] * 7  # the first low one after seven high


def test_a_tenants_single_job_is_fetched_next_behind_another_tenants_burst(lanes_client, broker):
    send(lanes_client, 1000, tenant="A")
    assert [m["flow_key"] for m in fetch(broker, 5)] == ["A"] * 5
    send(lanes_client, 1, tenant="B", first=5000)
    nxt = fetch(broker, 3)
    assert [m["flow_key"] for m in nxt] == ["B", "A", "A"]


def test_backlogged_tenants_are_served_round_robin(lanes_client, broker):
    send(lanes_client, 10, tenant="A")
    send(lanes_client, 10, tenant="B", first=100)
    send(lanes_client, 2, tenant="C", first=200)
    assert lanes_client.queues([Q], lanes=True)[Q]["flows"] == 3
    got = [m["flow_key"] for m in drain(broker, 5, 5)]
    assert lanes_client.queues([Q], lanes=True)[Q] == {
        "ready": 17, "delayed": 0, "in_flight": 5, "by_priority": {"high": 0, "normal": 17, "low": 0}, "flows": 3}
    got += [m["flow_key"] for m in drain(broker, 17, 4)]
    # C joined last but got its first turn within the first round; nobody waits two rounds for a turn.
    assert got[:6] == ["A", "B", "C", "A", "B", "C"]
    assert got[6:] == ["A", "B"] * 8
    assert drain(broker, 1) == []


def test_messages_without_a_flow_key_take_turns_with_the_flows(settings, rclient, lanes_client, broker):
    keys = lanes_client.keys
    pipe = rclient.pipeline(transaction=True)
    for i in range(4):
        env = Envelope(key=f"plain-{i}", job_id=f"j{i}", step_id="work", agent="work", trace_id="1" * 32,
                       deadline=2e9, payload={"n": i})
        stage(pipe, keys, build_message(env))
    pipe.execute()
    send(lanes_client, 4, tenant="A", first=10)
    got = [m.get("flow_key") or "-" for m in drain(broker, 8, 3)]
    assert Counter(got[:4]) == {"A": 2, "-": 2} and Counter(got) == {"A": 4, "-": 4}, got


def test_a_flow_key_with_quotes_backslashes_and_accents_is_one_lane_to_python_and_to_the_scripts(
        lanes_client, broker, rclient):
    tenant = 'a"b\\c é\u2028'
    send(lanes_client, 2, tenant=tenant)  # through the enqueue script: its lane found by the script
    env = Envelope(key="k", job_id="j", step_id="work", agent="work", trace_id="1" * 32, deadline=2e9,
                   payload={"n": 7, "tenant": tenant}, flow_key=tenant)
    pipe = rclient.pipeline(transaction=True)
    stage(pipe, lanes_client.keys, build_message(env))  # in a transaction: its lane found in Python
    pipe.execute()
    level, flow = queue_lanes.of(env.model_dump(mode="json"))
    assert flow is not None and rclient.llen(lanes_client.keys.flow(Q, level, flow)) == 3
    assert [m["payload"]["n"] for m in drain(broker, 3)] == [0, 1, 7]


def test_requeued_and_reclaimed_messages_go_back_to_the_head_of_their_own_lanes(lanes_client, broker):
    send(lanes_client, 3, priority="high", tenant="A")
    send(lanes_client, 3, priority="low", tenant="B", first=10)
    send(lanes_client, 3, tenant="C", first=20)
    held = fetch(broker, 9)
    assert len(held) == 9
    broker.settle("requeue", Q, *(m["rid"] for m in held[:4]))
    assert lanes_hold_what_they_should(lanes_client) == {"high": 3, "normal": 1, "low": 0}
    broker.settle("reclaim", Q, *(m["rid"] for m in held[6:]))  # keeps the last three in hand
    assert lanes_hold_what_they_should(lanes_client) == {"high": 3, "normal": 3, "low": 0}
    again = [m["rid"] for m in fetch(broker, 6)]
    assert again[:3] == [m["rid"] for m in held[:3]]  # requeued: at the head, in the order first fetched
    assert set(again) == {m["rid"] for m in held[:6]}


def test_a_dead_workers_messages_go_back_to_their_lanes(settings, lanes_client, broker, rclient):
    send(lanes_client, 4, priority="high", tenant="A")
    send(lanes_client, 4, priority="low", tenant="B", first=10)
    send(lanes_client, 4, tenant="C", first=20)
    assert len(fetch(broker, 12, beat=True)) == 12
    rclient.zadd(lanes_client.keys.heartbeats, {broker.broker_id: 1})  # it stopped beating long ago
    reaper = MeshBroker(settings, middleware=[])
    try:
        reaper.settle("heartbeat", Q)
    finally:
        reaper.close()
    assert lanes_hold_what_they_should(lanes_client) == {"high": 4, "normal": 4, "low": 4}
    assert int(rclient.hget(lanes_client.keys.stats, "recovered") or 0) == 12


def test_dramatiqs_enqueue_of_a_message_come_due_puts_it_in_its_lane(lanes_client, broker, rclient):
    env = Envelope(key="k", job_id="j", step_id="work", agent="work", trace_id="1" * 32, deadline=2e9,
                   payload={"n": 1, "tenant": "T"}, priority="low", flow_key="T")
    broker.enqueue(build_message(env))
    assert rclient.llen(lanes_client.keys.flow(Q, "low", "T")) == 1
    assert rclient.llen(lanes_client.keys.wake(Q)) == 1
    assert lanes_hold_what_they_should(lanes_client) == {"high": 0, "normal": 0, "low": 1}


def test_a_pipeline_steps_priority_wins_over_the_runs_and_the_run_gives_the_rest(lanes_client, broker):
    spec = (Pipeline("prio").step("first", agent="work", priority="low")
            .step("second", agent="work", input={"n": "1", "tenant": "'q'"}).build())
    ref = lanes_client.run(spec, {"n": 5, "tenant": "p"}, priority="high")
    assert lanes_client.status(ref.id).priority == "high"
    got = [(m["step_id"], m["priority"]) for m in fetch(broker, 5)]
    assert got == [("second", "high"), ("first", "low")]
    plain = Pipeline("x").step("a", agent="work").build()
    assert b"priority" not in plain.canonical()  # a spec without one keeps the digest it always had


def test_an_unknown_priority_is_refused_before_anything_is_sent(lanes_client, rclient):
    with pytest.raises(ConfigError, match="priority must be one of high, normal, low"):
        lanes_client.send("work", {"n": 1}, priority="urgent")  # type: ignore[arg-type]
    assert rclient.zcard(lanes_client.keys.jobs) == 0


@pytest.mark.parametrize("claims", [False, True], ids=["plain", "claiming"])
def test_high_messages_come_before_normal_ones_already_waiting_in_the_queue_list(settings, rclient, broker, claims):
    client = MeshClient(settings, client=rclient)  # the built-in executor: no flow key
    # A worker's fetch claims the keys too (and reads whether other lanes have work with the
    # fencing counter it reads for that); without claims it looks at the lanes themselves.
    claim = ("nonce", 60_000, 3600) if claims else ()
    step = 3 if claims else 2
    note = {"tool": "note", "args": {"title": "t"}}
    normal = client.send_many("executor", [(note, f"n{i}") for i in range(5)])
    client.send_many("executor", [(note, None) for _ in range(2)], priority="high")
    keys = client.keys
    flat = broker.settle("fetch", "executor", 3, "0", *claim)
    got = [orjson.loads(flat[i])["args"][0].get("priority", "normal") for i in range(1, len(flat), step)]
    assert got == ["high", "high", "normal"]
    assert not rclient.hexists(keys.stats, "lanes:executor")  # the high lane drained
    assert client.queues(["executor"])["executor"] == {"ready": 4, "delayed": 0, "in_flight": 3}
    assert rclient.llen(keys.queue("executor")) == 4
    rest = broker.settle("fetch", "executor", 10, "0", *claim)
    assert [orjson.loads(rest[i])["args"][0]["key"] for i in range(1, len(rest), step)] == [r.key for r in normal[1:]]
    if claims:  # every fetched key claimed, with fencing tokens from the one counter
        assert int(rclient.hget(keys.stats, "fence")) == 7


def test_thousands_of_tenants_are_counted_without_walking_them_and_each_gets_a_turn(lanes_client, broker, rclient):
    lanes_client.send_many("work", [({"n": i, "tenant": f"t{i:05d}"}, None) for i in range(3000)])
    send(lanes_client, 50, tenant="big", first=10_000)
    depth = lanes_client.queues([Q], lanes=True)[Q]
    assert (depth["ready"], depth["flows"]) == (3050, 3001)
    got = drain(broker, 3050, 100)
    assert len(got) == 3050 and len({m["rid"] for m in got}) == 3050
    # The big tenant's backlog does not go first: one of its messages per round of the others.
    assert sum(1 for m in got[:3000] if m["flow_key"] == "big") <= 2
    assert lanes_client.queues([Q], lanes=True)[Q]["ready"] == 0


def claims_of(client: MeshClient, keys: list[str]) -> list[str | None]:
    return [claims.read(client.redis, client.keys.claim(k)).state for k in keys]


@pytest.mark.parametrize("broken", ["acks", "stats"])
def test_a_fetch_refused_after_it_took_its_messages_puts_them_back_in_order_and_gives_back_its_claims(
        settings, rclient, broker, broken):
    """A command of the fetch Redis refuses after its first pop (a key of the wrong type: the worker's
    acks set, refused by the SADD at the fetch's end, or the stats hash, refused by the read of the
    fencing counter right after the pop) fails the fetch, and Redis keeps what ran before it. The
    messages it took go back to the head of the queue in the order they were taken, the claims it won
    are given back as it found them (none), and the fetch fails with the refusal; once the key is
    mended, a fetch takes them all. On the code before, they were popped into no list."""
    client = MeshClient(settings, client=rclient)
    note = {"tool": "note", "args": {"title": "t"}}
    refs = client.send_many("executor", [(note, f"k{i}") for i in range(5)])
    keys = client.keys
    waiting = rclient.lrange(keys.queue("executor"), 0, -1)
    bad = keys.acks(broker.broker_id, "executor") if broken == "acks" else keys.stats
    rclient.delete(bad)
    rclient.set(bad, "not a set or a hash")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        broker.settle("fetch", "executor", 3, "0", "nonce", 60_000, 3600, "1")

    assert rclient.lrange(keys.queue("executor"), 0, -1) == waiting
    assert set(claims_of(client, [r.key for r in refs])) == {None}  # given back as found: none
    assert rclient.llen(keys.wake("executor")) >= 1
    rclient.delete(bad)
    flat = broker.settle("fetch", "executor", 10, "0", "nonce2", 60_000, 3600, "1")
    assert [flat[i] for i in range(0, len(flat), 3)] == waiting
    assert [flat[i][2].decode() for i in range(2, len(flat), 3)] == ["run"] * 5  # {key, record, "run", token}
    assert claims_of(client, [r.key for r in refs]) == ["claimed"] * 5
    assert client.queues(["executor"])["executor"] == {"ready": 0, "delayed": 0, "in_flight": 5}


def test_a_fetch_across_lanes_refused_at_its_end_puts_each_message_back_in_its_own_lane(lanes_client, broker, rclient):
    """The same across lanes (priorities, tenants' flows): what the refused fetch took goes back to the
    head of each message's own lane and none waits twice; once the acks set is mended, a fetch takes
    every one of them."""
    send(lanes_client, 3, priority="high", tenant="A")
    send(lanes_client, 3, priority="low", tenant="B", first=10)
    send(lanes_client, 3, tenant="C", first=20)
    acks = lanes_client.keys.acks(broker.broker_id, Q)
    rclient.set(acks, "not a set")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fetch(broker, 7)

    assert lanes_hold_what_they_should(lanes_client) == {"high": 3, "normal": 3, "low": 3}
    rclient.delete(acks)
    assert sorted(m["payload"]["n"] for m in fetch(broker, 9)) == [0, 1, 2, 10, 11, 12, 20, 21, 22]
    assert lanes_hold_what_they_should(lanes_client) == {"high": 0, "normal": 0, "low": 0}
