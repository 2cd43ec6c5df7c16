"""A fetch Redis refuses after its first pop (docs/design/guarantees.md, "A fetch Redis refuses halfway
strands nothing"): every key the fetch touches after the pop made of the wrong type, on real Redis with the
real settle.lua. After the refusal every message waits in exactly one list, no claim is left claimed (a
takeover's is left as it was found, its death counted once), an id the worker held before the fetch stays
held, and once the key is mended a fetch takes them all."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import orjson
import pytest
import redis

from mesh.broker import MeshClient, claims
from mesh.broker.mesh_broker import MeshBroker
from tests.broker import test_lanes

Q = test_lanes.Q
#: The lanes tests' fixtures: a client of the lanes app (its agent's messages carry a flow key), a broker.
lanes_client, broker = test_lanes.lanes_client, test_lanes.broker


def waiting(client: MeshClient, queue: str = Q) -> Counter[str]:
    """How many times each id waits in any list of ``queue`` (plain lanes, flows, whatever the rings say)."""
    r, out = client.redis, Counter[str]()
    base = client.keys.queue(queue)
    for key in r.scan_iter(match=base.replace("{", "[{]").replace("}", "[}]") + "*", count=1000):
        k = key.decode()
        if k.endswith(".wake") or r.type(k) != b"list":
            continue
        if k != base and not (k.startswith(base + ".") and (".flow:" in k or k.endswith((".high", ".low", ".DQ")))):
            continue
        for rid in r.lrange(k, 0, -1):
            out[rid.decode()] += 1
    return out


def fetch(broker: MeshBroker, n: int, nonce: str | None = None, queue: str = Q) -> list[str]:
    args: list[Any] = [n, "0"]
    if nonce:
        args += [nonce, 60_000, 3600, "1"]
    flat = broker.settle("fetch", queue, *args)
    step = 3 if nonce else 2
    return [flat[i].decode() for i in range(0, len(flat), step)]


def drain(broker: MeshBroker, nonce: str | None = None, queue: str = Q) -> list[str]:
    got: list[str] = []
    for i in range(50):
        more = fetch(broker, 100, f"{nonce}{i}" if nonce else None, queue)
        if not more:
            return got
        got += more
    return got


def claim_states(client: MeshClient, keys: list[str]) -> set[str | None]:
    return {claims.read(client.redis, client.keys.claim(k)).state for k in keys}


def send_keyed(client: MeshClient, n: int, *, tenant: str | None = None, priority: str = "normal",
               first: int = 0) -> list[str]:
    items = [({"n": first + i, "tenant": tenant or "-"}, f"key{first + i}") for i in range(n)]
    client.send_many(Q, items, priority=priority)  # type: ignore[arg-type]
    return [f"key{first + i}" for i in range(n)]


def send_exec(settings: Any, rclient: Any, n: int) -> tuple[MeshClient, list[str]]:
    """n keyed messages on the plain queue "executor" (no priority, no flow key)."""
    client = MeshClient(settings, client=rclient)
    refs = client.send_many("executor", [({"tool": "note", "args": {"title": "t"}}, f"k{i}") for i in range(n)])
    return client, [r.key for r in refs]


E = "executor"


def ids_of(client: MeshClient) -> set[str]:
    return {k.decode() for k in client.redis.hkeys(client.keys.messages(Q))}


# Each key the fetch touches after the pop, of the wrong type


@pytest.mark.parametrize("kind", ["list", "set"])
def test_a_claim_key_of_the_wrong_type_mid_batch(settings, broker, rclient, kind):
    client, keys = send_exec(settings, rclient, 3)
    k = client.keys
    before = rclient.lrange(k.queue(E), 0, -1)
    bad = k.claim(keys[1])
    if kind == "list":
        rclient.rpush(bad, "x")
    else:
        rclient.sadd(bad, "x")
    fence = rclient.hget(k.stats, "fence")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fetch(broker, 3, "n1", E)

    assert rclient.lrange(k.queue(E), 0, -1) == before  # in order, once each
    assert claims.read(rclient, k.claim(keys[0])).state is None  # the one it won, given back as found: none
    assert int(rclient.hget(k.stats, "fence") or 0) >= int(fence or 0) + 1  # moved past it
    assert not rclient.exists(k.acks(broker.broker_id, E))
    assert rclient.llen(k.wake(E)) >= 1
    rclient.delete(bad)
    got = drain(broker, "n2", E)
    assert got == [b.decode() for b in before]
    assert claim_states(client, keys) == {"claimed"}


def test_the_bodies_hash_of_the_wrong_type(settings, broker, rclient):
    client, _ = send_exec(settings, rclient, 3)
    k = client.keys
    msgs = k.messages(E)
    before = rclient.lrange(k.queue(E), 0, -1)
    rclient.rename(msgs, msgs + ".aside")
    rclient.set(msgs, "not a hash")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fetch(broker, 3, "n1", E)

    assert rclient.lrange(k.queue(E), 0, -1) == before
    rclient.delete(msgs)
    rclient.rename(msgs + ".aside", msgs)
    assert drain(broker, "n2", E) == [b.decode() for b in before]


def test_a_job_record_of_the_wrong_type_fails_nothing(lanes_client, broker, rclient, settings):
    # fetch_records reads them with MGET (nil for another type) or a pcall'd GETRANGE: no refusal at all
    client = MeshClient(settings, client=rclient)
    refs = client.send_many("executor", [({"tool": "note", "args": {"title": "t"}}, f"k{i}") for i in range(3)])
    rclient.delete(client.keys.job(refs[1].id))
    rclient.rpush(client.keys.job(refs[1].id), "x")
    flat = broker.settle("fetch", "executor", 3, "0", "n1", 60_000, 3600, "1")
    assert len(flat) == 9


@pytest.mark.parametrize("broken", ["acks", "msgs", "stats"])
def test_each_key_of_the_wrong_type_across_lanes(lanes_client, broker, rclient, broken):
    """Priorities and flows in use: whatever the refused key, each message waits in some list, once."""
    keys = send_keyed(lanes_client, 3, priority="high", tenant="A")
    keys += send_keyed(lanes_client, 3, priority="low", tenant="B", first=10)
    keys += send_keyed(lanes_client, 3, first=20)
    everyone = ids_of(lanes_client)
    k = lanes_client.keys
    bad = {"acks": k.acks(broker.broker_id, Q), "msgs": k.messages(Q), "stats": k.stats}[broken]
    if rclient.exists(bad):
        rclient.rename(bad, bad + ".aside")
    rclient.set(bad, "wrong type")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fetch(broker, 7, "n1")

    where = waiting(lanes_client)
    assert set(where) == everyone, "a message is in no list"
    rclient.delete(bad)
    if rclient.exists(bad + ".aside"):
        rclient.rename(bad + ".aside", bad)
    assert claim_states(lanes_client, keys) == {None}
    twice = sorted(r for r, n in where.items() if n > 1)
    assert twice == [], f"{len(twice)} messages wait twice after the give-back"


def test_a_flow_list_of_the_wrong_type_is_served_again_once_mended(lanes_client, broker, rclient):
    """Tenant B's flow list is a set: the fetch takes A's first messages, then B's LPOP is refused. B's flow,
    out of its ring since the fetch's ZPOPMIN, goes back in it: once the list is mended its messages are
    fetched (on the code before, they waited until B's next message put B back in the ring)."""
    send_keyed(lanes_client, 3, tenant="A")
    send_keyed(lanes_client, 3, tenant="B", first=10)
    everyone = ids_of(lanes_client)
    k = lanes_client.keys
    flow_b = k.flow(Q, "normal", "B")
    rclient.rename(flow_b, flow_b + ".aside")
    rclient.sadd(flow_b, "x")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fetch(broker, 4, "n1")

    rclient.delete(flow_b)
    rclient.rename(flow_b + ".aside", flow_b)
    where = waiting(lanes_client)
    assert set(where) == everyone and max(where.values()) == 1
    got = drain(broker, "n2")
    assert sorted(got) == sorted(everyone), f"stranded: {sorted(everyone - set(got))}"


@pytest.mark.parametrize("broken", ["msgs", "acks"])
def test_the_delay_queue(lanes_client, broker, rclient, broken):
    k = lanes_client.keys
    dq, dq_msgs = k.delayed(Q), k.delayed_messages(Q)
    for i in range(3):
        rclient.hset(dq_msgs, f"d{i}", orjson.dumps({"queue_name": Q + ".DQ", "n": i}))
        rclient.rpush(dq, f"d{i}")
    bad = dq_msgs if broken == "msgs" else k.acks(broker.broker_id, Q + ".DQ")
    if rclient.exists(bad):
        rclient.rename(bad, bad + ".aside")
    rclient.set(bad, "wrong type")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fetch(broker, 3, queue=Q + ".DQ")

    assert rclient.lrange(dq, 0, -1) == [b"d0", b"d1", b"d2"]
    rclient.delete(bad)
    if rclient.exists(bad + ".aside"):
        rclient.rename(bad + ".aside", bad)
    assert drain(broker, queue=Q + ".DQ") == ["d0", "d1", "d2"]


def test_a_stats_counter_hincrby_refuses_mid_batch(settings, broker, rclient):
    """The stats hash's "duplicates" field is not an integer: the claim of a done key refuses its
    HINCRBY after the claims before it were won (SET NX) with new tokens."""
    client, keys = send_exec(settings, rclient, 3)
    k = client.keys
    rclient.set(k.claim(keys[2]), "done|7|0||result")
    rclient.hset(k.stats, mapping={"fence": 41, "duplicates": "many"})
    before = rclient.lrange(k.queue(E), 0, -1)

    with pytest.raises(redis.ResponseError, match="not an integer"):
        fetch(broker, 3, "n1", E)

    assert rclient.lrange(k.queue(E), 0, -1) == before
    assert claim_states(client, keys[:2]) == {None}
    assert int(rclient.hget(k.stats, "fence")) == 43  # the two tokens it handed out, never handed again
    rclient.hset(k.stats, "duplicates", 0)
    flat = broker.settle("fetch", E, 3, "0", "n2", 60_000, 3600, "1")
    verdicts = [flat[i] for i in range(2, len(flat), 3)]  # {key, record, "run", token}
    assert [v[2] for v in verdicts] == [b"run", b"run", b"done"]
    assert min(int(v[3]) for v in verdicts[:2]) >= 44


# What the give-back must not do


def test_a_refused_fetch_leaves_an_id_this_worker_held_before_it_in_its_acks_set(lanes_client, broker, rclient):
    """This worker holds message X (fetched before, in its acks set, running). A second copy of X's id
    waits in the queue (a producer's push sent again after a lost answer, or a give-back's duplicate).
    The next fetch pops that copy and is refused before its SADD (a claim key of the wrong type): its
    SREM must not take X out of the acks set, or X's ack finds it no longer held (+2), leaves its body,
    and the copy put back runs X a second time (X has no key: no claim answers the duplicate)."""
    k = lanes_client.keys
    lanes_client.send_many(Q, [({"n": 0}, None)])  # X: no key
    [x] = fetch(broker, 1, "n0")
    acks = k.acks(broker.broker_id, Q)
    assert rclient.sismember(acks, x)
    data = rclient.hget(k.messages(Q), x)
    broker.settle("push", Q, x, data)  # X's id waits again (the same push sent twice)
    keys = send_keyed(lanes_client, 1, first=5)  # Y, keyed, its claim key broken
    rclient.rpush(k.claim(keys[0]), "x")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fetch(broker, 2, "n1")

    still_held = bool(rclient.sismember(acks, x))
    # What follows: X's ack finds it no longer held (+2) and leaves its body, so the copy put back runs X
    # again, where with X still in the acks set the ack would delete the body and the copy be dropped.
    rclient.delete(k.claim(keys[0]))
    ack = broker.settle("ack", Q, 3600, x, "", "", "")
    again = x in drain(broker, "n2")
    assert (still_held, ack, again) == (True, [1], False), \
        f"X held after the refusal: {still_held}; its ack: {ack}; X handed again: {again}"


def test_a_refused_fetch_that_took_over_a_dead_owners_claim_leaves_its_kill_count_to_the_next_takeover(
        settings, broker, rclient):
    """The fetch takes over a claim whose owner died (its lease run out; one more death makes the poison
    threshold), then is refused (the acks set). The claim is left as it was found, claimed with its lease
    over, and the death counted once: the next fetch takes it over and reports the kill count the refused
    takeover reached, so the poison check (idempotency.py: kills >= poison_kills) runs for that attempt.
    Let go as "free" (the first form of the give-back), the claim was taken with no kills reported."""
    client, keys = send_exec(settings, rclient, 1)
    k = client.keys
    rclient.set(k.claim(keys[0]), "claimed|5|1|dead-owner:x:1|", ex=3600)  # expired long ago
    rclient.set(k.kills(keys[0]), settings.poison_kills - 1)
    acks = k.acks(broker.broker_id, E)
    rclient.set(acks, "not a set")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fetch(broker, 1, "n1", E)
    rclient.delete(acks)
    flat = broker.settle("fetch", E, 1, "0", "n2", 60_000, 3600, "1")
    verdict = flat[2]  # {key, record, "run", token[, kills]}
    assert int(rclient.get(k.kills(keys[0]))) == settings.poison_kills
    assert len(verdict) == 5 and int(verdict[4]) >= settings.poison_kills, f"kills not reported: {verdict}"


def test_a_fetch_across_lanes_refused_by_the_stats_hash_puts_each_keyless_message_back_once(
        lanes_client, broker, rclient):
    """The stats hash refused at the end of lanes_pop (its lanes mark): each flow message goes back in its
    flow, once. (The first form of the give-back pushed it with lane_push, which failed at its HSET of the
    mark after its LPUSH had run, and pushed it again on the plain list: once the hash was mended, one fetch
    handed the same keyless message twice, with no claim to answer the copy.)"""
    lanes_client.send_many(Q, [({"n": i, "tenant": t}, None) for t in "AB" for i in range(3)])
    k = lanes_client.keys
    rclient.rename(k.stats, k.stats + ".aside")
    rclient.set(k.stats, "wrong type")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        fetch(broker, 6)
    rclient.delete(k.stats)
    rclient.rename(k.stats + ".aside", k.stats)
    got = fetch(broker, 20)
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} messages handed twice by one fetch"


# What a refused fetch gives back: the claims as it found them, the lanes' turns as they were


def refused(broker: MeshBroker, rclient: Any, n: int, nonce: str, queue: str = E) -> None:
    """A fetch of ``n`` refused at its last command (this worker's acks set a string: every claim taken)."""
    acks = broker.keys.acks(broker.broker_id, queue)
    rclient.set(acks, "not a set")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        broker.settle("fetch", queue, n, "0", nonce, 60_000, 3600, "1")
    rclient.delete(acks)


def verdicts(broker: MeshBroker, n: int, nonce: str, queue: str = E) -> list[list[Any]]:
    flat = broker.settle("fetch", queue, n, "0", nonce, 60_000, 3600, "1")
    return [[x.decode() if isinstance(x, bytes) else x for x in flat[i]] for i in range(2, len(flat), 3)]


@pytest.mark.parametrize("before", [None, 0, 1, 2])  # the kill count before: none, or a count
def test_refused_takeovers_leave_the_kill_count_the_next_takeover_reports(settings, broker, rclient, before):
    """Three fetches in a row take over a dead owner's claim and are refused: each counts the death off
    again, so the next fetch's takeover reports one more death than before them, the stats' takeovers one."""
    client, keys = send_exec(settings, rclient, 1)
    k = client.keys
    rclient.set(k.claim(keys[0]), "claimed|5|1|dead-owner:x:1|", ex=100)
    if before is not None:
        rclient.set(k.kills(keys[0]), before, ex=100)
    takeovers = int(rclient.hget(k.stats, "takeovers") or 0)
    for i in range(3):
        refused(broker, rclient, 1, f"r{i}")
    assert rclient.get(k.claim(keys[0])) == b"claimed|5|1|dead-owner:x:1|"
    [v] = verdicts(broker, 1, "ok")
    assert v[2] == "run" and int(v[4]) == (before or 0) + 1
    assert int(rclient.hget(k.stats, "takeovers") or 0) - takeovers == 1


def test_an_owner_paused_past_its_lease_still_finishes_after_a_refused_fetch_took_its_claim_over(
        settings, broker, rclient):
    """An owner paused past its lease; a fetch takes its claim over and is refused. The claim is written back
    as found, so the owner, woken, stores its key as done as it would have had no fetch come (on the first
    form of the give-back, the claim was left to the refused fetch's owner and the woken owner's done lost)."""
    client, keys = send_exec(settings, rclient, 2)
    k = client.keys
    for key in keys:
        rclient.set(k.claim(key), "claimed|5|1|paused-owner:x:1|", ex=3600)
    untouched = rclient.rpop(k.queue(E))  # keys[1]'s message: no fetch takes it
    refused(broker, rclient, 1, "r1")  # takes keys[0]'s claim over, refused
    after_refusal = broker.settle("ack", E, 3600, "nobody", k.claim(keys[0]), "paused-owner:x:1", "R")
    with_no_fetch = broker.settle("ack", E, 3600, untouched.decode(), k.claim(keys[1]), "paused-owner:x:1", "R")
    assert after_refusal == with_no_fetch == [3]  # stored as done (1), the message not this worker's (+2)
    assert claims.read(rclient, k.claim(keys[0])).state == "done"


def test_a_done_at_the_token_of_a_free_claim_a_refused_fetch_took_is_still_stored(settings, broker, rclient):
    """An attempt's success was recorded, then it failed (its claim free at token 7), and a second message of
    its key waits. A fetch takes the free claim and is refused: the claim goes back free at token 7, so the
    attempt's late "done" at that token is stored and the second message is answered as done, not run again
    (given back free at the refused fetch's token, the done was refused and the effect ran twice)."""
    client, keys = send_exec(settings, rclient, 1)
    k = client.keys
    rclient.set(k.claim(keys[0]), "free|7|0||", ex=3600)
    refused(broker, rclient, 1, "r1")
    assert rclient.get(k.claim(keys[0])) == b"free|7|0||"
    broker.settle("done", E, 3600, "A-rid", k.claim(keys[0]), "A:x:1", 7, "R")
    [v] = verdicts(broker, 1, "ok")
    assert v[2:4] == ["done", 7]


def test_refused_fetches_spend_no_flows_turn(lanes_client, broker, rclient):
    """Four tenants' flows of four messages; refused fetches of one message (a worker whose acks set is
    broken) alternate with good fetches of one. The good ones serve the flows in turn, as with no refusal
    (the first form of the give-back left a flow at the round the refused fetch gave it: BDBDBDBD)."""
    for j, t in enumerate("ABCD"):
        send_keyed(lanes_client, 4, tenant=t, first=10 * j)
    served = []
    for i in range(8):
        refused(broker, rclient, 1, f"r{i}", queue=Q)
        flat = broker.settle("fetch", Q, 1, "0", f"g{i}", 60_000, 3600, "1")
        served.append(orjson.loads(flat[1])["args"][0]["payload"]["tenant"])
    assert "".join(served) == "ABCDABCD"


def test_a_flow_whose_only_message_lost_its_body_costs_the_next_fetch_one_turn(lanes_client, broker, rclient):
    """Flow A's only message has lost its body; a refused fetch puts A back in its ring and the id on the plain
    list. The next fetch drops the bodiless id, serves B's two messages, and nothing waits twice."""
    send_keyed(lanes_client, 1, tenant="A")
    send_keyed(lanes_client, 2, tenant="B", first=10)
    k = lanes_client.keys
    a = rclient.lrange(k.flow(Q, "normal", "A"), 0, -1)[0]
    rclient.hdel(k.messages(Q), a)
    refused(broker, rclient, 3, "r1", queue=Q)
    assert len(fetch(broker, 3, "n2")) == 2


def test_a_batch_of_done_busy_and_taken_over_claims_refused_three_times_is_fetched_as_before(
        settings, broker, rclient):
    """A batch of four: a key done, one held by a live owner, one whose owner died, one never claimed; three
    refused fetches of it, then a good one: the queue's order, the live owner's claim and the verdicts are
    those a first fetch would have had (the dead owner's death counted once)."""
    client, keys = send_exec(settings, rclient, 4)
    k = client.keys
    now_ms = int(time.time() * 1000)
    rclient.set(k.claim(keys[0]), "done|3|0||R0", ex=3600)
    rclient.set(k.claim(keys[1]), f"claimed|4|{now_ms + 600_000}|live:x:1|", ex=3600)
    rclient.set(k.claim(keys[2]), "claimed|5|1|dead:x:1|", ex=3600)
    before = rclient.lrange(k.queue(E), 0, -1)
    for i in range(3):
        refused(broker, rclient, 4, f"r{i}")
    assert rclient.lrange(k.queue(E), 0, -1) == before
    vs = verdicts(broker, 4, "ok")
    assert [v[2] for v in vs] == ["done", "busy", "run", "run"] and vs[2][4] == 1
    assert claims.read(rclient, k.claim(keys[1])).owner == "live:x:1"


@pytest.mark.parametrize("value", ["garbage", "", "claimed|x|y"])
def test_a_claim_value_that_does_not_read_as_a_claim_is_taken_and_given_back_as_none(settings, broker, rclient,
                                                                                       value):
    """A claim key holding a string that does not read as a claim is taken as none, as before the give-back
    (noting the claim as found must not fail the fetch on it); refused, the fetch gives it back as none."""
    client, keys = send_exec(settings, rclient, 1)
    k = client.keys
    rclient.set(k.claim(keys[0]), value, ex=3600)
    refused(broker, rclient, 1, "r1")
    assert not rclient.exists(k.claim(keys[0]))
    rclient.set(k.claim(keys[0]), value, ex=3600)
    [v] = verdicts(broker, 1, "ok")
    assert v[2] == "run"
