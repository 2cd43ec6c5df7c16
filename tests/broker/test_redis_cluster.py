"""``MESH_REDIS_URL=redis+cluster://`` on a real Redis Cluster (3 primaries, 3 replicas; tests/cluster.py):
the client reaches it through the URL, the mesh's own ways of sending (``run_script`` and its held
connection, transactions with WAIT, WAIT after a script) go to the primary of their keys' slot, a
transaction over two slots is refused, and a primary SIGKILLed: once its replica is promoted the same
client goes on, and what was written with WAIT 1 replica before the kill is there."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.cluster

from mesh.broker import MeshSettings
from mesh.broker.connection import (
    HeldConnection,
    connect,
    describe,
    on_slot,
    replicated,
    run_script,
    transaction,
)
from tests.cluster import RedisClusterNodes, poll, redis_cluster

pytestmark = pytest.mark.slow

INCR = "return redis.call('INCR', KEYS[1])"


@pytest.fixture
def nodes(redis_cluster_nodes: RedisClusterNodes) -> RedisClusterNodes:
    # A test before may have killed a primary (its replica promoted): started again, as a replica, so every
    # test has the whole cluster, and its URL's seeds (the first two nodes) answer.
    for port, proc in redis_cluster_nodes.procs.items():
        if proc.poll() is not None:
            redis_cluster_nodes.restart(port)
    redis_cluster_nodes.wait_ok()
    return redis_cluster_nodes


def _settings(nodes: RedisClusterNodes, **overrides: Any) -> MeshSettings:
    return MeshSettings(redis_url=nodes.url, **overrides)


def _evalsha_calls(nodes: RedisClusterNodes) -> dict[int, int]:
    return {port: int(nodes.node(port).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
            for port in nodes.primaries()}


def test_the_url_makes_a_cluster_client_that_mesh_describes(nodes: RedisClusterNodes) -> None:
    settings = _settings(nodes)
    client = connect(settings)
    assert isinstance(client, redis.cluster.RedisCluster)
    client.set("{describe}k", "v")
    assert client.get("{describe}k") == b"v"  # decode_responses as the single-node client: bytes
    shown = describe(settings, client)
    assert shown["cluster"] == [f"127.0.0.1:{nodes.ports[0]}", f"127.0.0.1:{nodes.ports[1]}"]
    assert shown["role"] == "cluster"
    assert sorted(shown["address"].split(",")) == sorted(f"127.0.0.1:{p}" for p in nodes.primaries())


def test_run_script_goes_to_the_primary_of_its_keys_slot(nodes: RedisClusterNodes) -> None:
    client = connect(_settings(nodes))
    script = client.register_script(INCR)
    held = HeldConnection(client)
    per_primary = nodes.keys_per_primary("rs")
    for port, key in per_primary.items():
        before = _evalsha_calls(nodes)
        for way in (held, None):
            run_script(script, [key], [], way)
        after = _evalsha_calls(nodes)
        grew = {p for p in after if after[p] != before[p]}
        assert grew == {port}, f"{key}: EVALSHA reached {grew}, its slot is on {port}"
        assert nodes.node(port).get(key) == "2"  # both calls ran, on that primary


def test_a_transaction_in_one_slot_runs_and_waits_and_one_over_two_slots_is_refused(nodes: RedisClusterNodes) -> None:
    settings = _settings(nodes, redis_wait_replicas=1, redis_wait_timeout_ms=5000)
    client = connect(settings)
    with transaction(client, settings) as pipe:
        pipe.watch("{tx}a")
        assert pipe.get("{tx}a") is None
        pipe.multi()
        pipe.set("{tx}a", "1")
        pipe.set("{tx}b", "2")
        assert len(pipe.execute()) == 2  # (b"OK": a cluster transaction runs no response callback of SET)
    replicated(pipe, [])  # one replica confirmed, or NotReplicated
    assert pipe._execution_strategy.acked >= 1
    assert client.mget("{tx}a", "{tx}b") == [b"1", b"2"]
    with pytest.raises(redis.exceptions.RedisClusterException, match=r"same slot|different slots"), \
            transaction(client, settings) as pipe:
        pipe.set("tx-a", "1")
        pipe.set("tx-b", "2")  # another slot (keys without a hash tag)
        pipe.execute()
    assert client.exists("tx-a") == 0


def test_wait_after_a_script_goes_on_the_connection_of_its_writes(nodes: RedisClusterNodes) -> None:
    client = connect(_settings(nodes))
    script = client.register_script(INCR)

    def send(node: redis.Redis) -> Any:
        pipe = node.pipeline(transaction=False)
        script(keys=["{wait}n"], args=[], client=pipe)
        pipe.execute_command("WAIT", 1, 5000)
        return pipe.execute()

    answer, acked = on_slot(client, "{wait}n", send)
    assert (answer, acked) == (1, 1)


def test_a_pipeline_runs_on_the_cluster_with_every_key_of_its_namespace_on_one_primary(
        nodes: RedisClusterNodes) -> None:
    from mesh.broker import MeshClient
    from mesh.broker.keys import Keys
    from mesh.contracts import State
    from mesh.ops.worker import start_worker

    namespace = f"pipeline-{uuid.uuid4().hex[:8]}"
    settings = _settings(nodes, reconnect_delay_s=0.5).model_copy(update={"namespace": namespace})
    worker = start_worker(settings, ["planner", "researcher", "executor"], 4)
    try:
        client = MeshClient(settings)
        ref = client.submit("Find out how retries work and how dead letters are replayed, then write a note")
        record = client.wait(ref.id, timeout_s=30)
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
    assert (record.state, record.error) == (State.SUCCEEDED, None)
    assert [s.agent for s in record.steps.values() if s.need is None] == [
        "planner", "researcher", "researcher", "executor"]
    keys = Keys(namespace)
    owner = nodes.primary_of(keys.prefix)
    held = {p: list(nodes.node(p).scan_iter(match=keys.everything, count=1000)) for p in nodes.primaries()}
    assert nodes.node(owner).exists(keys.job(ref.id))
    assert {p for p, found in held.items() if found} == {owner}, {p: len(found) for p, found in held.items()}


@pytest.mark.parametrize("held", [True, False])
def test_a_killed_primary_s_slot_is_served_by_its_promoted_replica_with_what_was_replicated(
        nodes: RedisClusterNodes, held: bool) -> None:
    settings = _settings(nodes, redis_wait_replicas=1, redis_wait_timeout_ms=5000)
    client = connect(settings)
    key = nodes.replicated_key("failover-held" if held else "failover-pool")
    with transaction(client, settings) as pipe:
        pipe.set(key, "before")
        pipe.execute()
    replicated(pipe, [])  # a replica has it
    script = client.register_script(INCR)
    way = HeldConnection(client) if held else None
    assert run_script(script, [key + ":n"], [], way) == 1  # the held connection is one to that primary
    killed, promoted = nodes.kill_primary_of(key)
    assert promoted != killed
    # the same client, the calls right after the promotion: no error reaches the caller
    assert run_script(script, [key + ":n"], [], way) == 2
    assert client.get(key) == b"before"
    assert nodes.node(promoted).get(key + ":n") == "2"
    brief = _settings(nodes, redis_wait_replicas=1, redis_wait_timeout_ms=200)
    with transaction(client, brief) as pipe:  # WAIT on the new primary: no replica left for this slot
        pipe.set(key, "after")
        pipe.execute()
    assert pipe._execution_strategy.acked == 0


def test_calls_during_a_failover_succeed_once_the_replica_is_promoted(nodes: RedisClusterNodes) -> None:
    client = connect(_settings(nodes))
    script = client.register_script(INCR)
    held = HeldConnection(client)
    key = nodes.replicated_key("during")
    run_script(script, [key], [], held)
    nodes.kill(nodes.primary_of(key))
    failed: list[str] = []

    def call() -> Any:
        try:
            return run_script(script, [key], [], held)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            failed.append(type(exc).__name__)
            return None

    got = poll(call, 30, "a call after the primary's kill")
    assert got >= 2  # 1 before the kill, replicated or not: at least this call's own
    nodes.wait_ok()


@pytest.fixture(scope="module")
def locked() -> Iterator[RedisClusterNodes]:
    with redis_cluster(offset=6, password="cl-Pa55") as nodes:
        yield nodes


def test_a_password_protected_cluster_is_reached_with_the_password_in_the_url(locked: RedisClusterNodes) -> None:
    assert ":cl-Pa55@" in locked.url
    client = connect(MeshSettings(redis_url=locked.url))
    script = client.register_script(INCR)
    for key in locked.keys_per_primary("pw").values():
        assert run_script(script, [key], [], HeldConnection(client)) == 1
    wrong = locked.url.replace("cl-Pa55", "wrong")
    with pytest.raises(redis.ConnectionError, match=r"Redis Cluster 127\.0\.0\.1"):
        connect(MeshSettings(redis_url=wrong))


@pytest.mark.parametrize("atomic", [True, False])
def test_a_script_staged_on_a_cluster_pipeline_after_a_failover_is_loaded_on_the_promoted_primary(
        locked: RedisClusterNodes, atomic: bool) -> None:
    # SCRIPT LOAD is not replicated: the promoted replica lacks what the old primary had loaded, and a
    # cluster pipeline sends EVALSHA as it is (NOSCRIPT; in a transaction the rest of the EXEC ran).
    nodes = locked  # a cluster whose primaries no test kills: a manual failover keeps every slot replicated
    settings = MeshSettings(redis_url=nodes.url)
    client = connect(settings)
    script = client.register_script(INCR)
    key = nodes.replicated_key(f"noscript-{atomic}")
    assert script(keys=[key + ":n"]) == 1  # loaded on the primary
    _old, promoted = nodes.fail_over(key)
    assert nodes.node(promoted).script_exists(script.sha) == [False]
    pipe = client.pipeline(transaction=atomic)
    script(keys=[key + ":n"], client=pipe)
    pipe.set(key + ":also", "1")
    answers = pipe.execute()
    assert (answers[0], len(answers)) == (2, 2)
    assert nodes.node(promoted).get(key + ":n") == "2"
    with transaction(client, settings) as tx:  # the mesh's own transactions, the same
        script(keys=[key + ":n"], client=tx)
        tx.set(key + ":also", "2")
        assert tx.execute()[0] == 3


READ_ARGV = "return redis.call('GET', ARGV[1])"  # a key it does not declare: the mesh's scripts route by {ns}


def test_a_script_routed_by_its_namespace_waits_out_a_migration_of_its_slot_rather_than_run_where_its_keys_are_not(
        locked: RedisClusterNodes) -> None:
    # While a slot migrates, its source answers ASK (run it on the target) for a command whose declared keys
    # it does not hold: the bare prefix {ns} a mesh script routes by never exists, so every call was sent to
    # the target, which holds none of the keys it reads and writes (in its ARGV) until they are moved.
    nodes = locked
    client = connect(MeshSettings(redis_url=nodes.url))
    script = client.register_script(READ_ARGV)
    held = HeldConnection(client)
    ns = f"{{mig{uuid.uuid4().hex[:6]}}}"
    source = nodes.primary_of(ns)
    target = next(p for p in nodes.primaries() if p != source)
    slot = int(nodes.node(source).execute_command("CLUSTER KEYSLOT", ns))
    ids = {p: nodes.node(p).execute_command("CLUSTER MYID") for p in (source, target)}
    client.set(f"{ns}:record", "on the source")
    assert run_script(script, [ns], [f"{ns}:record"], held) == b"on the source"
    nodes.node(target).execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
    nodes.node(source).execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
    got: list[Any] = []

    def call() -> None:
        got.append(run_script(script, [ns], [f"{ns}:record"], held))

    caller = threading.Thread(target=call)
    caller.start()
    try:
        caller.join(0.5)
        assert got == [], "a script ran on the target while its keys were on the source"
    finally:  # the migration ends: the key moved, the slot given to the target on every primary
        nodes.node(source).execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "AUTH", nodes.password,
                                           "KEYS", f"{ns}:record")
        for port in nodes.primaries():
            nodes.node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
        caller.join(30)
    assert got == [b"on the source"]  # run once the slot had moved, where its keys are
    assert run_script(script, [ns], [f"{ns}:record"], held) == b"on the source"


class _Migration:
    """The slot of ``ns`` moved from its primary to another as ``redis-cli --cluster reshard`` moves it:
    entered, the target IMPORTING and the source MIGRATING; :meth:`move` MIGRATEs keys; at exit the rest
    of the slot's keys are moved and the slot given to the target on every primary. A key the target
    holds already (``BUSYKEY``) is listed in ``busy`` and moved with REPLACE, so that the slot moves."""

    def __init__(self, nodes: RedisClusterNodes, ns: str) -> None:
        self.nodes = nodes
        self.source = nodes.primary_of(ns)
        self.target = next(p for p in nodes.primaries() if p != self.source)
        self.slot = int(nodes.node(self.source).execute_command("CLUSTER KEYSLOT", ns))
        self.ids = {p: nodes.node(p).execute_command("CLUSTER MYID") for p in nodes.primaries()}
        self.busy: list[str] = []

    def __enter__(self) -> _Migration:
        self.nodes.node(self.target).execute_command("CLUSTER SETSLOT", self.slot, "IMPORTING", self.ids[self.source])
        self.nodes.node(self.source).execute_command("CLUSTER SETSLOT", self.slot, "MIGRATING", self.ids[self.target])
        return self

    def move(self, *keys: str) -> None:
        source = self.nodes.node(self.source)
        for key in keys:
            try:
                source.execute_command("MIGRATE", "127.0.0.1", self.target, key, 0, 5000)
            except redis.ResponseError as exc:
                if "BUSYKEY" not in str(exc):
                    raise
                self.busy.append(key)
                source.execute_command("MIGRATE", "127.0.0.1", self.target, key, 0, 5000, "REPLACE")

    def rejected(self) -> int:
        """The source's script calls refused so far (an ASK or a TRYAGAIN each)."""
        stats = self.nodes.node(self.source).info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("rejected_calls", 0)) for c in ("eval", "evalsha"))

    def __exit__(self, *exc: object) -> None:
        while keys := self.nodes.node(self.source).execute_command("CLUSTER GETKEYSINSLOT", self.slot, 10):
            self.move(*keys)
        for port in [self.target, self.source, *(p for p in self.ids if p not in (self.source, self.target))]:
            self.nodes.node(port).execute_command("CLUSTER SETSLOT", self.slot, "NODE", self.ids[self.target])


def test_a_script_called_through_the_cluster_client_waits_out_a_migration_rather_than_follow_its_ask(
        nodes: RedisClusterNodes) -> None:
    """As :func:`run_script` (the test above), a script called the cluster client's way (``script(keys=...)``:
    a compaction's, a retention sweep's, the timer loop's): redis-py followed the source's ASK and ran it on
    the target, which did not hold the key it reads yet."""
    client = connect(_settings(nodes))
    script = client.register_script(READ_ARGV)
    ns = f"{{mig{uuid.uuid4().hex[:6]}}}"
    client.set(f"{ns}:record", "on the source")
    got: list[Any] = []
    caller = threading.Thread(target=lambda: got.append(script(keys=[ns], args=[f"{ns}:record"])))
    with _Migration(nodes, ns) as migration:
        refused = migration.rejected()
        caller.start()
        poll(lambda: got or migration.rejected() >= refused + 2, 10, "the call answered, or refused twice")
        assert got == [], "the script ran on the target while its keys were on the source"
    caller.join(30)
    assert got == [b"on the source"]
    assert client.eval(READ_ARGV, 1, ns, f"{ns}:record") == b"on the source"


def test_step_counters_flushed_while_their_namespace_s_slot_migrates_land_once_and_the_slot_moves(
        nodes: RedisClusterNodes) -> None:
    """The counters' script declared only the process's batch key and wrote the counters (keys it does not
    declare): with that key still on the source and ``{ns}:outcomes`` moved, the source ran it, refused its
    write of the counter it no longer held (a script's access to such a key is an error there, which the
    script logs and leaves out), and kept its batch number: the batch's counts were lost (2 of 5)."""
    from mesh.broker.keys import Keys
    from mesh.broker.observe import Counters

    client = connect(_settings(nodes))
    keys = Keys(f"mig{uuid.uuid4().hex[:6]}")
    counters = Counters(client, keys, 60)
    counters.hincrby(keys.outcomes, "a:succeeded", 2)
    counters.flush()  # the counters and the process's batch key, on the source
    counters.hincrby(keys.outcomes, "a:succeeded", 3)
    flusher = threading.Thread(target=counters.flush)
    with _Migration(nodes, keys.prefix) as migration:
        migration.move(keys.outcomes)  # moved first; the batch key is still on the source
        refused = migration.rejected()
        flusher.start()
        poll(lambda: not flusher.is_alive() or migration.rejected() >= refused + 2, 10,
             "the flush done, or refused twice")
    flusher.join(30)
    assert not flusher.is_alive()
    assert migration.busy == []
    assert client.hget(keys.outcomes, "a:succeeded") == b"5"
    counters.close()
