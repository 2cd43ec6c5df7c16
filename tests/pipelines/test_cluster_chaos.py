"""The mesh on a real Redis Cluster (3 primaries, 3 replicas; tests/cluster.py) under real faults:
worker processes reach it through ``redis+cluster://``; one is SIGKILLed mid-DAG; a step that fails
for good goes to the DLQ and ``mesh dlq replay`` brings its job to success; ``mesh approve`` decides a
waiting step; the primary that owns the namespace's slot is SIGKILLed while a client enqueues a
stream of jobs (with and without MESH_REDIS_WAIT_REPLICAS=1), or SIGSTOPped and resumed once its
replica was promoted; the namespace's slot is moved to another primary (as ``redis-cli --cluster
reshard`` moves it) while workers serve it and a client sends; and a worker and a client run as the
ACL user of ``python -m mesh.broker.acl`` on every node.

One cluster for the module: a test that kills a primary starts the node again, one that pauses it resumes
it (either way it rejoins as the replica of the one promoted in its place), so the next test finds 3
primaries with a replica each.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker import JobNotFound, MeshSettings, NotReplicated, job_id_for
from mesh.broker.connection import acl_rules
from mesh.broker.keys import prefix
from mesh.broker.shard_readers import summed_hash
from mesh.contracts import TERMINAL, State
from tests.cluster import RedisClusterNodes
from tests.conftest import wait_for
from tests.pipelines.agents import app

pytestmark = pytest.mark.slow

APP = "tests.pipelines.agents:app"
HEARTBEAT_TIMEOUT_S = 3.0


@pytest.fixture
def settings(make_settings: Callable[..., MeshSettings], nodes: RedisClusterNodes) -> MeshSettings:
    """This test's namespace on the cluster (the workers, the CLI and the clients of the test use it)."""
    return make_settings(redis_url=nodes.url, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)


@pytest.fixture
def mesh(settings: MeshSettings) -> MeshClient:
    return MeshClient(settings, app=app)


def _env(**extra: str) -> dict[str, str]:
    return {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), **extra}


def _beating(mesh: MeshClient, since_ms: float = 0) -> list[int]:
    """Each shard's heartbeats at ``since_ms`` or later (MESH_SHARDS: a worker heartbeats in every shard)."""
    return [int(mesh.redis.zcount(k.heartbeats, since_ms, "+inf")) for k in mesh.shards.keys]


def _runs(mesh: MeshClient) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in mesh.redis.hgetall(f"{prefix(mesh.settings.namespace)}:test.runs").items()}


# research fans out to code and survey; hold (after code) waits for the test (crash tests).
FORK = (Pipeline("fork")
        .step("research", agent="researcher")
        .step("code", agent="coder", depends_on=["research"])
        .step("survey", agent="researcher", depends_on=["research"], input={"goal": "input.goal"})
        .step("hold", depends_on=["code"])
        .step("review", agent="reviewer", depends_on=["hold"])
        .step("deploy", agent="deployer", depends_on=["review"]))


def test_a_worker_sigkilled_mid_dag_on_the_cluster_reruns_no_completed_step(mesh, worker_process) -> None:
    ns = mesh.settings.namespace
    procs = [worker_process("--app", APP, "--threads", "2", **_env()) for _ in range(2)]
    refs = [mesh.run(check(FORK.build(), app), {"goal": "g"}, key=f"fork-{i}") for i in range(3)]
    holder = int(wait_for(lambda: mesh.redis.get(f"{prefix(ns)}:test.holder"), timeout_s=60))
    [victim] = [p for p in procs if p.pid == holder]
    before = {ref.id: mesh.status(ref.id) for ref in refs}
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    worker_process("--app", APP, "--threads", "2", **_env())  # a new one in its place
    mesh.redis.set(f"{prefix(ns)}:test.release", 1)
    records = [mesh.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60) for ref in refs]

    assert [r.state for r in records] == [State.SUCCEEDED] * 3, [r.error for r in records]
    runs = _runs(mesh)
    done_before = {s.key for r in before.values() for s in r.steps.values() if s.state is State.SUCCEEDED}
    assert sorted(runs) == sorted(s.key for r in records for s in r.steps.values())
    assert all(runs[k] == 1 for k in done_before), runs  # a completed step never ran again
    # what the killed worker held (its two threads: the held step, maybe another it had just taken) ran
    # once more at most; every other step once
    again = [k for k, n in runs.items() if n > 1]
    assert all(runs[k] == 2 for k in again) and 1 <= len(again) <= 2, runs
    assert any("/hold/" in k for k in again), runs
    print(f"mid-DAG kill: jobs 3 sent, 3 ended succeeded; step runs {sorted(Counter(runs.values()).items())}")


def _stream(mesh: MeshClient, nodes: RedisClusterNodes, n: int, kill_at: int,
            pause: bool = False) -> tuple[list[str], int, Counter[str]]:
    """Send ``n`` one-step jobs (a note each), SIGKILLing the primary of the slot of the namespace's first
    shard of jobs (MESH_SHARDS; the namespace's own slot with one shard) once ``kill_at`` were acknowledged
    (SIGSTOP with ``pause``): (the acknowledged job ids in order, how many before the fault, refusals by
    kind). The killed node is started again, the paused one resumed, once its replica was promoted."""
    owner = nodes.primary_of(mesh.shards.home.prefix)
    acked: list[str] = []
    refused: Counter[str] = Counter()
    killed_before = -1
    deadline = time.monotonic() + 60
    i = 0
    while len(acked) < n:
        assert time.monotonic() < deadline, f"only {len(acked)} enqueues acknowledged; refused: {refused}"
        if killed_before > 0 and owner in nodes.paused and _promoted(nodes, mesh, owner):
            nodes.resume(owner)  # it runs what was sent to it meanwhile, then turns replica
        elif killed_before > 0 and nodes.procs[owner].poll() is not None and _promoted(nodes, mesh, owner):
            nodes.restart(owner)  # back as the promoted one's replica: WAIT 1 can be answered again
        key = f"stream-{i}"
        try:
            acked.append(mesh.send("executor", {"tool": "note", "args": {"title": f"n{i}", "body": key}}, key=key).id)
            i += 1
        except (redis.RedisError, redis.exceptions.RedisClusterException, NotReplicated) as exc:
            refused[type(exc).__name__] += 1  # not acknowledged: sent again with the same key
            time.sleep(0.05)
            continue
        if len(acked) == kill_at:
            nodes.pause(owner) if pause else nodes.kill(owner)
            killed_before = len(acked)
    if owner in nodes.paused:  # the stream ended before the loop saw the promotion
        wait_for(lambda: _promoted(nodes, mesh, owner), timeout_s=30)
        nodes.resume(owner)
    return acked, killed_before, refused


def _promoted(nodes: RedisClusterNodes, mesh: MeshClient, old: int) -> bool:
    try:
        return nodes.primary_of(mesh.shards.home.prefix) != old
    except (LookupError, redis.RedisError):
        return False  # the nodes do not agree yet


def _outcomes(mesh: MeshClient, acked: list[str]) -> tuple[dict[str, Any], list[str]]:
    records, lost = {}, []
    for job_id in acked:
        try:
            records[job_id] = mesh.status(job_id)
        except JobNotFound:
            lost.append(job_id)
    return records, lost


@pytest.mark.parametrize(("fault", "wait_replicas"), [("kill", 1), ("kill", 0), ("pause", 1)])
def test_the_namespace_s_primary_killed_or_paused_mid_stream_loses_no_job_a_replica_confirmed(
        nodes, make_settings, worker_process, fault: str, wait_replicas: int) -> None:
    """SIGKILL, or SIGSTOP: a paused primary keeps its sockets, so clients and workers wait on it (redis-py's
    socket timeout) while its replica is promoted; resumed, it first runs what was sent to it meanwhile,
    answering as the primary it no longer is, then turns replica and drops those writes. With
    MESH_REDIS_WAIT_REPLICAS=1 such an answer is refused (no replica confirms it) and sent again."""
    settings = make_settings(redis_url=nodes.url, redis_wait_replicas=wait_replicas, redis_wait_timeout_ms=500)
    mesh = MeshClient(settings)
    for _ in range(2):
        worker_process("--agents", "executor", "--threads", "2")
    wait_for(lambda: _beating(mesh) == [2] * len(mesh.shards.keys), timeout_s=20)
    faulted = mesh.shards.home  # the slot faulted: that of the first shard of jobs (the namespace's, with one shard)
    old = nodes.primary_of(faulted.prefix)
    on_old = {k.shard for k in mesh.shards.keys if nodes.primary_of(k.prefix) == old}  # the shards it holds jobs of
    n, fault_at = 200, 80
    try:
        acked, faulted_before, refused = _stream(mesh, nodes, n, fault_at, pause=fault == "pause")
    finally:
        if old in nodes.paused:  # failed while it was paused: the module's next tests need it back
            nodes.resume(old)
    assert faulted_before == fault_at and old not in nodes.paused
    if fault == "pause":
        nodes.wait_ok()  # the resumed node is the promoted one's linked replica
        assert nodes.node(old).info("replication")["role"] == "slave"
    assert nodes.primary_of(faulted.prefix) != old

    # the workers reconnected by themselves: heartbeats on the new primary (in every shard), and they serve it
    # (heartbeats are the Redis clock's milliseconds: from a second before now, not the epoch's seconds,
    # which counted every heartbeat ever written, those replicated from the old primary too)
    beat_ms = mesh.clock.now_s() * 1000
    wait_for(lambda: min(_beating(mesh, beat_ms - 1000)) >= 2, timeout_s=20)

    def settled() -> bool:
        records, _ = _outcomes(mesh, acked)
        return all(r.state in TERMINAL for r in records.values())

    wait_for(settled, timeout_s=90, interval_s=0.2)
    # idle, the workers wait for a wake-up token with BLPOP: on the slot's new primary
    owner = nodes.node(nodes.primary_of(faulted.prefix))

    def blpops() -> int:
        return int(owner.info("commandstats").get("cmdstat_blpop", {}).get("calls", 0))

    waited = blpops()
    wait_for(lambda: blpops() >= waited + 2, timeout_s=10)
    records, lost = _outcomes(mesh, acked)
    outcomes = Counter(r.state for r in records.values())
    assert set(outcomes) <= {State.SUCCEEDED, State.DEAD_LETTERED, State.UNKNOWN}, outcomes
    assert all(r.error for r in records.values() if r.state is not State.SUCCEEDED)  # with a reason
    assert outcomes[State.SUCCEEDED] >= n - fault_at  # the workers served the new primary
    # each job's effect (its note, under its own id) once: a step run again after the rewind wrote the same
    notes = sum(int(mesh.redis.zcard(k.notes)) for k in mesh.shards.keys)  # each job's in its shard
    assert outcomes[State.SUCCEEDED] <= notes <= outcomes[State.SUCCEEDED] + outcomes[State.UNKNOWN], notes
    if wait_replicas:
        assert lost == []  # a replica had every acknowledged job: the promoted one
    else:
        # Asynchronous replication: the replica holds a prefix of the primary's writes, so what vanished is
        # the last jobs acknowledged before the kill, nothing of them left (JobNotFound): of those it held (in
        # the shards whose slots it served: every job, with one shard)
        held = [job_id for job_id in acked[:faulted_before] if mesh.keys_of(job_id).shard in on_old]
        assert lost == held[len(held) - len(lost):], lost
    print(f"{fault} (WAIT {wait_replicas}): jobs {n} acknowledged, {len(records)} ended {dict(outcomes)}, "
          f"{len(lost)} lost, {notes} notes; refused and sent again {dict(refused)}")


def test_a_worker_and_a_client_run_on_the_cluster_as_the_acl_user(nodes, make_settings, worker_process, cli) -> None:
    settings = make_settings(redis_url=nodes.url)
    user, password = f"mesh-{settings.namespace}", "acl-Pa55"
    for port in nodes.alive():  # ACL users are per node: every node, replicas too (one may be promoted)
        nodes.node(port).execute_command("ACL", "SETUSER", user, "on", f">{password}", *acl_rules(settings.namespace))
    url = nodes.url.replace("redis+cluster://", f"redis+cluster://{user}:{password}@")
    mesh = MeshClient(make_settings(redis_url=url))
    worker_process("--agents", "executor", "--threads", "2", MESH_REDIS_URL=url)
    ref = mesh.send("executor", {"tool": "note", "args": {"title": "acl", "body": "b"}}, key="acl-1")
    record = mesh.wait(ref.id, timeout_s=30)
    assert (record.state, record.error) == (State.SUCCEEDED, None)
    status = cli("status", "--json", MESH_REDIS_URL=url)
    assert status.returncode == 0, status.stderr
    for port in nodes.alive():
        nodes.node(port).execute_command("ACL", "DELUSER", user)


def test_a_dead_letter_on_the_cluster_is_listed_and_replayed_by_the_cli_and_its_job_succeeds(
        mesh, worker_process, cli) -> None:
    ns = mesh.settings.namespace
    worker_process("--app", APP, "--threads", "2", **_env())
    failing = "dlq-1/coder/code"  # the step key: job key / agent / step
    mesh.redis.sadd(f"{prefix(ns)}:test.fail", failing)
    ref = mesh.run(check(FORK.build(), app), {"goal": "g"}, key="dlq-1")
    mesh.redis.set(f"{prefix(ns)}:test.release", 1)  # hold never waits here
    record = mesh.wait(ref.id, timeout_s=30)
    assert record.state is State.DEAD_LETTERED and record.steps["code"].state is State.DEAD_LETTERED, record.error
    listed = wait_for(lambda: (res := cli("dlq", "list", "--json")).returncode == 0 and json.loads(res.stdout))
    assert [(e["key"], e["failure_class"]) for e in listed] == [(failing, "permanent")], listed

    mesh.redis.srem(f"{prefix(ns)}:test.fail", failing)  # the cause mended
    replayed = cli("dlq", "replay", listed[0]["entry_id"], "--yes")
    assert replayed.returncode == 0, replayed.stderr
    record = wait_for(lambda: (r := mesh.status(ref.id)).state in TERMINAL and r, timeout_s=30)
    assert (record.state, record.error) == (State.SUCCEEDED, None)
    runs = _runs(mesh)
    assert runs[failing] == 2 and all(n == 1 for k, n in runs.items() if k != failing), runs
    assert json.loads(cli("dlq", "list", "--json").stdout) == []
    print(f"dlq: 1 job sent, dead-lettered at {failing}, replayed by the CLI, ended succeeded; step runs {runs}")


def test_a_step_awaiting_approval_on_the_cluster_is_approved_by_the_cli(mesh, worker_process, cli) -> None:
    spec = check(Pipeline("approve").step("researcher")
                 .step("coder", depends_on=["researcher"], requires_human_approval=True).build(), app)
    worker_process("--app", APP, "--threads", "2", **_env())
    ref = mesh.run(spec, {"goal": "g"}, key="approve-1")
    wait_for(lambda: mesh.status(ref.id).steps["coder"].state is State.AWAITING_APPROVAL, timeout_s=30)
    listed = cli("approvals", "--json")
    assert listed.returncode == 0 and ref.id in listed.stdout, listed.stderr
    approved = cli("approve", ref.id, "coder", "--by", "ana", "--note", "ok")
    assert approved.returncode == 0, approved.stderr
    record = mesh.wait(ref.id, timeout_s=30)
    assert (record.state, record.error) == (State.SUCCEEDED, None)
    assert (record.steps["coder"].approval.decision, record.steps["coder"].approval.by) == ("approved", "ana")
    assert _runs(mesh)[record.steps["coder"].key] == 1


def test_the_staged_script_and_the_fenced_read_run_in_a_cluster_transaction(mesh) -> None:
    """A cluster pipeline refuses ``eval()`` and ``mget()`` (redis-py blocks them there): a timer staged
    with a write (an approval's expiry, a wait's) and a lease-fenced job update (a step's result) are
    sent as commands, and run on the namespace's primary as on a single server."""
    from mesh.broker import timers
    from mesh.broker.connection import transaction
    from mesh.broker.idempotency import Idempotency, Lease
    from mesh.contracts import LeaseLost

    with transaction(mesh.redis, mesh.settings) as pipe:
        pipe.multi()
        timers.stage_schedule(pipe, mesh.keys, "test", "t1", 60_000)
        pipe.execute()
    assert timers.due_at(mesh.redis, mesh.keys, "test", "t1") is not None

    ref = mesh.send("executor", {"tool": "note", "args": {"title": "t", "body": "b"}}, key="fenced-1")
    keys, jobs = mesh.keys_of(ref.id), mesh.jobs_of(ref.id)  # the job's shard (MESH_SHARDS): its claim is there too
    claims = Idempotency(mesh.settings.on_shard(keys.shard), mesh.redis)  # as that shard's worker claims
    verdict, token, *_ = claims._call("claim", keys.claim("fenced-1"), "me")
    assert verdict == b"run"
    lease = Lease(key="fenced-1", claim_key=keys.claim("fenced-1"), owner="me", token=int(token))
    jobs.update(ref.id, lambda r: (r.model_copy(update={"error": "fenced write"}), []), fence=lease)
    assert mesh.status(ref.id).error == "fenced write"
    with pytest.raises(LeaseLost):
        jobs.update(ref.id, lambda r: (r.model_copy(update={"error": "x"}), []),
                    fence=Lease(key="fenced-1", claim_key=lease.claim_key, owner="other", token=int(token)))


def test_a_call_on_the_slot_s_node_is_retried_as_the_client_retries_while_the_slot_fails_over(mesh) -> None:
    """An enqueue with MESH_REDIS_WAIT_REPLICAS goes to the slot's node itself (the WAIT on its
    connection): while the replica is being promoted its calls fail for seconds, and they are sent
    again as often as the client's retry allows, not once (a failover is over in one more try rarely)."""
    from mesh.broker.connection import on_slot

    failed: list[int] = []

    def call(node: redis.Redis) -> str:
        if len(failed) < 4:  # the old primary, gone: its connection refused, four times over
            failed.append(1)
            raise redis.exceptions.ConnectionError("Connection refused")
        return "sent"

    assert mesh.redis.retry.get_retries() >= 5
    assert on_slot(mesh.redis, mesh.keys.namespace, call) == "sent"
    assert len(failed) == 4
    failed.clear()
    never = MeshClient(mesh.settings.model_copy(update={"redis_retries": 2}))
    with pytest.raises(redis.exceptions.ConnectionError):
        on_slot(never.redis, never.keys.namespace, call)
    assert len(failed) == 3  # the first try and its 2 retries


def test_accepting_and_forgetting_a_tool_pin_is_one_multi_on_the_cluster_too(mesh, nodes) -> None:
    """``pipeline()`` is a MULTI on a single server but none on a cluster (redis-py's default there): the
    pin's two writes are asked for as a transaction, so they land together on both."""
    from mesh.agents.tools.pins import Definition, Pins

    pins = Pins(mesh.redis, mesh.keys)
    pins.check("srv.tool", Definition("tool", "one", {"type": "object"}))
    from mesh.contracts import ToolRefused

    with pytest.raises(ToolRefused):  # drifted: presented, not pinned
        pins.check("srv.tool", Definition("tool", "two", {"type": "object"}))
    owner = nodes.node(nodes.primary_of(mesh.keys.fleet))  # pins are fleet-wide

    def multis() -> int:
        return int(owner.info("commandstats").get("cmdstat_multi", {}).get("calls", 0))

    before = multis()
    assert pins.accept("srv.tool") is not None and pins.forget("srv.tool")
    assert multis() - before == 2
    assert not mesh.redis.exists(mesh.keys.tool_pins) and not mesh.redis.exists(mesh.keys.tool_presented)


def test_a_script_staged_in_a_transaction_runs_on_the_promoted_replica_which_never_loaded_it(nodes) -> None:
    """Redis does not replicate its script cache: a replica promoted holds no script. A cluster pipeline
    loads what it calls where it runs (a single server's pipeline does), so a MULTI staging one (a step's
    release, a run's timers, a limit's) neither fails NOSCRIPT nor runs without it."""
    from mesh.broker.connection import connect, run_script, transaction

    settings = MeshSettings(redis_url=nodes.url)
    client = connect(settings)
    script = client.register_script("redis.call('INCR', KEYS[1]); return redis.call('INCR', KEYS[1])")
    key = nodes.replicated_key("noscript")
    assert run_script(script, [key], []) == 2  # loaded on the primary
    killed, promoted = nodes.kill_primary_of(key)
    try:
        assert nodes.node(promoted).script_exists(script.sha) == [False]
        with transaction(client, settings) as pipe:
            pipe.multi()
            pipe.set(key + ":before", "1")
            script(keys=[key], args=[], client=pipe)
            assert pipe.execute() == [b"OK", 4]
        pipe = client.pipeline(transaction=False)
        script(keys=[key], args=[], client=pipe)
        assert pipe.execute() == [6]
    finally:
        nodes.restart(killed)


# One step (researcher) a job: the reshard test's stream.
ONE = check(Pipeline("one").step("research", agent="researcher").build(), app)
#: Keys per MIGRATE, as ``redis-cli --cluster reshard``'s default ``--cluster-pipeline``.
BATCH = 10
#: Keys of the namespace's slot besides the jobs' (a namespace with a history: its moving takes seconds).
FILLER = 30_000


def _calls(node: Any, *commands: str) -> dict[str, int]:
    stats = node.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands}


def _refused(node: Any) -> int:
    stats = node.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("rejected_calls", 0)) for c in ("eval", "evalsha"))


class Reshard(threading.Thread):
    """The slot of ``key`` moved from its primary to ``target`` as ``redis-cli --cluster reshard`` moves
    it, in a thread: ``began``/``ended`` (monotonic) the IMPORTING and the last SETSLOT NODE."""

    def __init__(self, nodes: RedisClusterNodes, key: str, target: int) -> None:
        super().__init__(daemon=True)
        self.nodes, self.target = nodes, target
        self.source = nodes.primary_of(key)
        self.slot = int(nodes.node(self.source).execute_command("CLUSTER KEYSLOT", key))
        self.moved = self.batches = 0
        self.began = self.ended = 0.0
        self.error: BaseException | None = None
        self.on_target: dict[str, int] = {}
        #: The script calls the source turned back (ASK, TRYAGAIN) while the slot migrated.
        self.refused = 0

    def run(self) -> None:
        try:
            self._move()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _move(self) -> None:
        source, target = self.nodes.node(self.source, 10), self.nodes.node(self.target, 10)
        ids = {p: self.nodes.node(p).execute_command("CLUSTER MYID") for p in self.nodes.primaries()}
        before = _calls(target, "eval", "evalsha", "blpop", "asking")
        refused = _refused(source)
        self.began = time.monotonic()
        target.execute_command("CLUSTER SETSLOT", self.slot, "IMPORTING", ids[self.source])
        source.execute_command("CLUSTER SETSLOT", self.slot, "MIGRATING", ids[self.target])
        while keys := source.execute_command("CLUSTER GETKEYSINSLOT", self.slot, BATCH):
            source.execute_command("MIGRATE", "127.0.0.1", self.target, "", 0, 5000, "KEYS", *keys)
            self.moved += len(keys)
            self.batches += 1
        after = _calls(target, "eval", "evalsha", "blpop", "asking")
        self.on_target = {c: after[c] - before[c] for c in after}
        self.refused = _refused(source) - refused
        # as redis-cli: the target first, then the source, then the other primaries
        for port in [self.target, self.source, *(p for p in ids if p not in (self.source, self.target))]:
            self.nodes.node(port).execute_command("CLUSTER SETSLOT", self.slot, "NODE", ids[self.target])
        self.ended = time.monotonic()


def test_a_namespace_s_slot_moved_live_mid_stream_ends_every_job_once_on_its_new_primary(
        nodes: RedisClusterNodes, settings: MeshSettings, worker_process: Any) -> None:
    """200 one-step jobs sent while two workers (2 threads each) serve them; after 80 are acknowledged the
    namespace's slot is moved to another primary (with 30,000 more keys of the namespace: the move takes
    1 to 2 s), and a step running across it (``hold``, released once the slot has moved) renews its
    lease (MESH_LEASE_S=3: every second) meanwhile. Every job ends succeeded, every step ran once, the step
    counters count every step, no script ran on the target before the slot was its own, and the workers
    serve the new primary (their heartbeats, their idle wait, 20 more jobs)."""
    mesh = MeshClient(settings, app=app)
    ns = settings.namespace
    moved = mesh.keys_of(job_id_for("held"))  # the slot moved: the held job's shard's (the namespace's, one shard)
    source = nodes.primary_of(moved.prefix)
    # a primary holding neither the slot moved nor the namespace's others (the fleet-wide keys', on a shard other
    # than 0; with MESH_SHARDS the other shards'), so that every script it runs before the slot is its own ran
    # where its keys were not: with several shards (4 slots, 3 primaries) every primary may hold one, moved
    # away from it first (no worker yet, the namespace's slots empty)
    others = [mesh.keys.fleet, *(k.prefix for k in mesh.shards.keys if k != moved)]
    target = min((p for p in nodes.primaries() if p != source),
                 key=lambda p: sum(nodes.primary_of(other) == p for other in others))
    cleared = [other for other in others if nodes.primary_of(other) == target]
    for other in cleared:
        away = Reshard(nodes, other, source)
        away.run()
        assert away.error is None, away.error
    wait_for(lambda: all(nodes._owner(other) not in (None, target) for other in others), timeout_s=10)
    workers = [worker_process("--app", APP, "--threads", "2", MESH_LEASE_S="3", MESH_COUNTER_FLUSH_S="0.5")
               for _ in range(2)]
    wait_for(lambda: _beating(mesh) == [2] * len(mesh.shards.keys), timeout_s=20)
    fill = mesh.redis.pipeline(transaction=False)
    for i in range(FILLER):
        fill.set(f"{moved.prefix}:test.filler:{i}", "x" * 100)
    fill.execute()
    held = mesh.send("hold", {"diff": "d", "confidence": 0.9}, key="held")
    assert mesh.keys_of(held.id) == moved
    wait_for(lambda: mesh.redis.get(f"{prefix(ns)}:test.holder"), timeout_s=20)  # running, its lease renewed
    reshard = Reshard(nodes, moved.prefix, target)

    n, move_at = 200, 80
    acked: list[str] = []
    sent_at: list[tuple[float, float]] = []  # each send's start and end (monotonic)
    for i in range(n):
        began = time.monotonic()
        acked.append(mesh.run(ONE, {"goal": f"g{i}"}, key=f"mig-{i}").id)
        sent_at.append((began, time.monotonic()))
        if i + 1 == move_at:
            reshard.start()
    reshard.join(60)
    assert not reshard.is_alive() and reshard.error is None, reshard.error
    assert nodes.primary_of(moved.prefix) == target
    assert not nodes.node(source).execute_command("CLUSTER COUNTKEYSINSLOT", reshard.slot)
    mesh.redis.set(f"{prefix(ns)}:test.release", 1)

    def settled() -> bool:
        return all(mesh.status(job_id).state in TERMINAL for job_id in [*acked, held.id])

    wait_for(settled, timeout_s=90, interval_s=0.2)
    records = [mesh.status(job_id) for job_id in [*acked, held.id]]
    outcomes = Counter(r.state for r in records)
    during = [e - b for b, e in sent_at if e >= reshard.began and b <= reshard.ended]

    # the workers follow the slot: fresh heartbeats (in every shard), and their idle wait (BLPOP), on the new
    # primary (heartbeats are the Redis clock's milliseconds: from a second before now, not the epoch's
    # seconds, which counted every heartbeat ever written, those the move brought from the source too)
    beat_ms = mesh.clock.now_s() * 1000
    wait_for(lambda: min(_beating(mesh, beat_ms - 1000)) >= 2, timeout_s=20)
    waited = _calls(nodes.node(target), "blpop")["blpop"]
    wait_for(lambda: _calls(nodes.node(target), "blpop")["blpop"] >= waited + 2, timeout_s=10)
    # every worker thread serves still: a second stream, after the move, ends as the first
    after = [mesh.run(ONE, {"goal": f"a{i}"}, key=f"after-{i}").id for i in range(20)]
    ends = [mesh.wait(job_id, timeout_s=30).state for job_id in after]
    runs = {k.decode(): int(v) for k, v in mesh.redis.hgetall(f"{prefix(ns)}:test.runs").items()}

    def counted() -> int:  # every shard's step counters, added up
        return int(summed_hash(mesh.redis, mesh.shards.keys, lambda k: k.outcomes).get("researcher:succeeded", 0))

    wait_for(lambda: counted() >= n + 20, timeout_s=10)  # the workers' step counters, written every 0.5 s
    logs = {w.pid: w.log_path.read_text() for w in workers}
    print(f"reshard of slot {reshard.slot} ({source} -> {target}) with 2 workers and a client sending: "
          f"{reshard.moved} keys in {reshard.batches} batches of {BATCH}, "
          f"{reshard.ended - reshard.began:.2f} s from IMPORTING to the last SETSLOT NODE; "
          f"{len(during)} sends overlapped it, taking {', '.join(f'{d:.2f}' for d in during)} s (the longest send "
          f"otherwise {max(e - b for b, e in sent_at if e < reshard.began or b > reshard.ended):.2f} s); "
          f"script calls the source turned back {reshard.refused}; on the target while it imported: "
          f"{reshard.on_target}; jobs {n} + 1 held across the move, ended {dict(outcomes)}; "
          f"step runs {sorted(Counter(runs.values()).items())}; counted succeeded {counted()}; "
          f"after the move 20 more ended {dict(Counter(ends))}; the namespace's other slots moved off the target "
          f"first: {len(cleared)}")
    for pid, log in logs.items():
        noted = [line for line in log.splitlines() if "Traceback" in line or "ERROR" in line or "WARNING" in line]
        print(f"worker {pid}: {len(noted)} warnings/errors" + "".join(f"\n  {line}" for line in noted[:20]))

    assert outcomes == Counter({State.SUCCEEDED: n + 1}), [(r.job_id, r.state, r.error) for r in records
                                                          if r.state is not State.SUCCEEDED]
    assert len(runs) == n + 21 and all(v == 1 for v in runs.values()), runs  # every step ran once
    assert counted() == n + 20
    assert reshard.on_target["eval"] == reshard.on_target["evalsha"] == 0  # no script where its keys were not
    assert ends == [State.SUCCEEDED] * 20
    assert all(w.poll() is None for w in workers)
    assert all("Traceback" not in log for log in logs.values())
