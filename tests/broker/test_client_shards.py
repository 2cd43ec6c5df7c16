"""MeshClient over several shards (MESH_SHARDS=3): each job is written in the shard of its id and found
there by every reader of a job; the client's fleet-wide views (approvals, waits, queues) add every
shard up, and an emit reaches the steps waiting in each. The jobs run on an in-process worker of
every shard."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline
from mesh.broker import WaitTimeout, job_id_for
from mesh.broker.connection import primaries
from mesh.broker.jobs import JobNotFound, JobStore
from mesh.broker.keys import Keys
from mesh.broker.shards import Shards
from mesh.contracts import ConfigError, KeyConflict, State
from tests.conftest import TEST_SHARD, on_cluster, wait_for
from tests.pipelines.agents import app

SHARDS = 3
NOTE = {"tool": "note", "args": {"title": "t"}}
PAY = {"event": "payment.settled", "timeout": "1h"}


@pytest.fixture
def sharded(make_settings: Callable[..., Any]) -> Any:
    return make_settings(shards=SHARDS)


@pytest.fixture
def mesh(sharded: Any, rclient: Any) -> MeshClient:
    return MeshClient(sharded, client=rclient, app=app)


@pytest.fixture
def shard_workers(sharded: Any) -> Iterator[Callable[..., None]]:
    """A worker of every shard (one set of consumers per shard, ops/worker.py), serving the pipeline
    tests' app (``agents``: those built-in ones instead)."""
    from mesh.ops.worker import start_worker

    started: list[Any] = []

    def start(agents: tuple[str, ...] | None = None) -> None:
        started.append(start_worker(sharded, list(agents), 3) if agents else start_worker(sharded, None, 3, app=app))

    yield start
    for worker in started:
        worker.stop(timeout=10_000)
        for broker in getattr(worker, "brokers", [worker.broker]):  # each shard's
            broker.close()


def spread(mesh: MeshClient) -> Shards:
    """The shards ``mesh``'s settings spread the jobs over."""
    return Shards.of(mesh.settings)


def shard_of(mesh: MeshClient, key: str) -> int:
    return spread(mesh).shard_of(job_id_for(key))


def key_on(mesh: MeshClient, shard: int, stem: str) -> str:
    """A key whose job lives in ``shard``."""
    return next(f"{stem}-{n}" for n in range(1000) if shard_of(mesh, f"{stem}-{n}") == shard)


def other_shards(mesh: MeshClient) -> list[int]:
    """The shards of jobs but the first."""
    return [k.shard for k in spread(mesh).keys[1:]]


def holding(mesh: MeshClient, job_id: str) -> list[int]:
    """The shards holding a record of job ``job_id``."""
    return [k.shard for k in spread(mesh).keys if mesh.redis.exists(k.job(job_id))]


def scan(mesh: MeshClient, pattern: str) -> list[bytes]:
    return [key for node in primaries(mesh.redis) for key in node.scan_iter(match=pattern, count=1000)]


def pipeline(name: str = "pay") -> Any:
    return (Pipeline(name).step("pay", wait_for=PAY)
            .step("researcher", depends_on=["pay"], input={"goal": "input.goal"}).build())


def update_fails_for(monkeypatch: Any, job_id: str) -> Callable[[], None]:
    """``JobStore.update`` of job ``job_id`` raises ConnectionError (a writer stopped there) until the function
    returned is called; every other job's update runs."""
    real = JobStore.update

    def dies(self: JobStore, job_id_: str, *args: Any, **kwargs: Any) -> Any:
        if job_id_ == job_id:
            raise ConnectionError("the rerunner stopped here")
        return real(self, job_id_, *args, **kwargs)

    monkeypatch.setattr(JobStore, "update", dies)
    return lambda: monkeypatch.setattr(JobStore, "update", real)


def test_sends_land_in_the_shard_of_their_job_and_every_reader_finds_them_there(mesh):
    refs = [mesh.send("executor", {"tool": "note", "args": {"title": f"t{n}"}}, key=f"note-{n}") for n in range(60)]
    per_shard = {k.shard: len(scan(mesh, k.job("*"))) for k in spread(mesh).keys}
    assert sum(per_shard.values()) == 60 and all(per_shard.values()), per_shard  # every shard has some
    for ref in refs:
        assert holding(mesh, ref.id) == [spread(mesh).shard_of(ref.id)]
        assert mesh.status(ref.id).state is State.QUEUED
    for keys in spread(mesh).keys:  # each job's message in its shard's queue
        assert mesh.redis.hlen(keys.messages("executor")) == per_shard[keys.shard]
    assert mesh.queues(["executor"]) == {"executor": {"ready": 60, "delayed": 0, "in_flight": 0}}
    lanes = mesh.queues(["executor"], lanes=True)["executor"]
    assert lanes["by_priority"] == {"high": 0, "normal": 60, "low": 0} and lanes["flows"] == 0

    again = mesh.send("executor", {"tool": "note", "args": {"title": "t7"}}, key="note-7")  # one key, one job
    assert again.id == refs[7].id and holding(mesh, again.id) == [spread(mesh).shard_of(again.id)]
    assert mesh.queues(["executor"])["executor"]["ready"] == 61
    with pytest.raises(KeyConflict) as caught:
        mesh.send("executor", NOTE, key="note-7")
    assert caught.value.job_id == refs[7].id


def test_a_jobs_trace_and_state_are_read_in_its_shard(mesh):
    shard = other_shards(mesh)[0]
    key = key_on(mesh, shard, "traced")
    ref = mesh.send("executor", NOTE, key=key)
    assert holding(mesh, ref.id) == [shard]
    events = mesh.events(key, block_ms=10)  # by its key
    assert next(events)["event"] == "enqueued"
    assert mesh.stuck(mesh.status(ref.id)) == {}
    with pytest.raises(WaitTimeout) as caught:
        mesh.wait(ref.id, timeout_s=0.05)
    assert caught.value.record.job_id == ref.id and caught.value.record.state is State.QUEUED
    with pytest.raises(JobNotFound):
        mesh.status(job_id_for("never-sent"))


def test_send_many_writes_each_shards_items_in_their_shard_and_a_conflict_names_its_key(mesh):
    items = [({"tool": "note", "args": {"title": f"m{n}"}}, f"many-{n}") for n in range(30)]
    refs = mesh.send_many("executor", items, chunk=7)
    assert [r.key for r in refs] == [k for _, k in items]  # in the items' order
    assert {spread(mesh).shard_of(r.id) for r in refs} == {k.shard for k in spread(mesh).keys}
    for ref in refs:
        assert holding(mesh, ref.id) == [spread(mesh).shard_of(ref.id)]
    assert mesh.queues(["executor"])["executor"]["ready"] == 30

    # A key bound to another payload: KeyConflict names it, and nothing of its shard's batch is written.
    bound = items[4][1]
    fresh = [({"tool": "note", "args": {"title": f"f{n}"}}, f"fresh-{n}") for n in range(12)]
    with pytest.raises(KeyConflict) as caught:
        mesh.send_many("executor", [*fresh, ({"tool": "note", "args": {"title": "other"}}, bound)])
    assert (caught.value.key, caught.value.job_id) == (bound, job_id_for(bound))
    same_shard = [k for _, k in fresh if shard_of(mesh, k) == shard_of(mesh, bound)]
    assert same_shard and not any(holding(mesh, job_id_for(k)) for k in same_shard)
    # Two items of one key and another payload in one batch: the second is the conflict.
    with pytest.raises(KeyConflict, match="twice"):
        mesh.send_many("executor", [(NOTE, "twice"), ({"tool": "note", "args": {"title": "u"}}, "twice")])
    assert not holding(mesh, job_id_for("twice"))


def test_a_pipeline_run_lives_in_its_jobs_shard_and_its_spec_in_the_namespaces_keys(mesh):
    shard = other_shards(mesh)[-1]
    plain = Pipeline("plain").step("researcher").build()
    ref = mesh.run(plain, {"goal": "g"}, key=key_on(mesh, shard, "plain"))  # one script (the spec's call first)
    assert holding(mesh, ref.id) == [shard]
    assert mesh.redis.hlen(Keys(mesh.settings.namespace, shard).messages("researcher")) == 1
    assert mesh.pipelines.names() == ["plain"]
    assert mesh.status(ref.id).steps["researcher"].sent_at is not None
    again = mesh.run(plain, {"goal": "g"}, key=ref.key)
    assert again.id == ref.id and mesh.redis.hlen(Keys(mesh.settings.namespace, shard).messages("researcher")) == 1
    with pytest.raises(KeyConflict):
        mesh.run(plain, {"goal": "other"}, key=ref.key)

    waiting = mesh.run(pipeline(), {"goal": "g"}, key=key_on(mesh, shard, "waits"))  # a transaction
    assert holding(mesh, waiting.id) == [shard]
    assert [(w.job_id, w.step.step_id) for w in mesh.waits()] == [(waiting.id, "pay")]
    assert mesh.redis.zcard(Keys(mesh.settings.namespace, shard).waits) == 1
    assert sorted(mesh.pipelines.names()) == ["pay", "plain"]


def test_approvals_are_listed_from_every_shard_and_a_decision_is_written_in_the_jobs_shard(mesh):
    spec = Pipeline("asks").step("researcher", approval={"timeout": "1h"}).build()
    refs = {k.shard: mesh.run(spec, {"goal": "g"}, key=key_on(mesh, k.shard, "asks")) for k in spread(mesh).keys}
    listed = mesh.approvals()
    assert sorted(p.job_id for p in listed) == sorted(r.id for r in refs.values())
    assert [p.asked_at for p in listed] == sorted(p.asked_at for p in listed)  # oldest first
    shard = other_shards(mesh)[0]
    keys = Keys(mesh.settings.namespace, shard)
    record = mesh.approve(refs[shard].key, "researcher", by="ana")  # by its key
    assert record.steps["researcher"].state is State.QUEUED and record.steps["researcher"].sent_at is not None
    assert mesh.redis.hlen(keys.messages("researcher")) == 1 and mesh.redis.xlen(keys.approvals_audit) == 1
    assert sorted(p.job_id for p in mesh.approvals()) == sorted(r.id for s, r in refs.items() if s != shard)
    denied = mesh.deny(refs[spread(mesh).keys[0].shard].id, "researcher", reason="no")
    assert denied.state is State.HALTED


def test_an_emit_wakes_the_steps_waiting_in_every_shard_and_a_signal_finds_its_jobs_shard(mesh):
    first, second = other_shards(mesh)[0], spread(mesh).keys[0].shard
    a = mesh.run(pipeline(), {"goal": "g"}, key=key_on(mesh, first, "pay-a"))
    b = mesh.run(pipeline(), {"goal": "g"}, key=key_on(mesh, second, "pay-b"))
    c = mesh.run(pipeline(), {"goal": "g"}, key=key_on(mesh, first, "pay-c"))
    signalled = mesh.signal(c.key, "payment.settled", {"order": 3})  # by its key, in its shard
    assert signalled.resumed == [(c.id, "pay")]
    assert len(mesh.waits("payment.settled")) == 2

    delivered = mesh.emit("payment.settled", {"order": 1})
    assert sorted(delivered.resumed) == sorted([(a.id, "pay"), (b.id, "pay")])
    for ref in (a, b):
        record = mesh.status(ref.id)
        assert record.steps["pay"].result == {"order": 1} and record.steps["researcher"].sent_at is not None
    ns = mesh.settings.namespace
    assert mesh.redis.hlen(Keys(ns, first).messages("researcher")) == 2  # a's and c's
    assert mesh.redis.hlen(Keys(ns, second).messages("researcher")) == 1  # b's
    assert mesh.status(b.id).steps["pay"].wait.event_id == delivered.id  # the first shard's copy
    for keys in spread(mesh).keys:  # kept in every shard, for the waits that start later there
        assert mesh.redis.xlen(keys.events("payment.settled")) == 1
        assert mesh.redis.zcard(keys.timers) == 0  # each shard's delivery timer cancelled
    assert mesh.waits() == []


def test_a_cancel_is_written_in_the_jobs_shard(mesh):
    shard = other_shards(mesh)[0]
    ref = mesh.run(pipeline(), {"goal": "g"}, key=key_on(mesh, shard, "cancel"))
    record = mesh.cancel(ref.id, reason="not needed")
    assert record.state is State.CANCELLED and mesh.status(ref.id).state is State.CANCELLED
    keys = Keys(mesh.settings.namespace, shard)
    assert mesh.redis.get(keys.cancel(ref.id)) == b"not needed" and mesh.waits() == []
    assert mesh.redis.zcard(keys.waits) == 0


def _apart(mesh: MeshClient) -> str:
    """A key whose job and whose first rerun's (``KEY/rerun/1``) are in two shards."""
    return next(k for k in (f"old-{n}" for n in range(1000)) if shard_of(mesh, k) != shard_of(mesh, f"{k}/rerun/1"))


def test_a_rerun_whose_new_job_is_in_another_shard_writes_each_in_its_own(mesh):
    key = _apart(mesh)
    old = mesh.run(pipeline(), {"goal": "g"}, key=key)
    mesh.signal(old.id, "payment.settled", {"order": 1})
    ref = mesh.rerun(old.id, "researcher")
    assert ref.key == f"{key}/rerun/1" and holding(mesh, ref.id) == [shard_of(mesh, ref.key)]
    new = mesh.status(ref.id)
    assert new.rerun_of == old.id and new.steps["pay"].result == {"order": 1}  # reused
    assert new.steps["researcher"].sent_at is not None and mesh.status(old.id).reruns == [ref.id]
    new_keys = Keys(mesh.settings.namespace, shard_of(mesh, ref.key))
    assert mesh.redis.hlen(new_keys.messages("researcher")) == 1 + (shard_of(mesh, key) == new_keys.shard)
    with pytest.raises(ConfigError, match="already names"):  # the key of a rerun the old job lists
        mesh.rerun(old.id, "researcher", key=ref.key)


def test_a_rerun_stopped_between_its_two_shards_writes_is_completed_by_the_same_rerun(mesh, monkeypatch):
    key = _apart(mesh)
    old = mesh.run(pipeline(), {"goal": "g"}, key=key)
    mesh.signal(old.id, "payment.settled", {"order": 1})
    restore = update_fails_for(monkeypatch, old.id)
    with pytest.raises(ConnectionError):
        mesh.rerun(old.id, "researcher")
    new_id = job_id_for(f"{key}/rerun/1")
    assert mesh.status(new_id).rerun_of == old.id and mesh.status(old.id).reruns == []  # the new job runs, unlinked
    restore()
    ref = mesh.rerun(old.id, "researcher")  # the same rerun again: the job it made, linked
    assert ref.id == new_id and mesh.status(old.id).reruns == [new_id]
    new_keys = Keys(mesh.settings.namespace, shard_of(mesh, ref.key))
    assert mesh.redis.hlen(new_keys.messages("researcher")) == 1 + (shard_of(mesh, key) == new_keys.shard)
    second = mesh.rerun(old.id, "researcher")  # a rerun after it is another one
    assert second.key == f"{key}/rerun/2" and mesh.status(old.id).reruns == [new_id, second.id]


def test_a_client_refuses_a_namespace_recorded_with_other_shards_naming_both(mesh, make_settings, rclient):
    rclient.set(spread(mesh).home.shard_count, f"{TEST_SHARD}+1")
    with pytest.raises(ConfigError, match=r"over 1 shard\(s\).*MESH_SHARDS=3") as caught:
        mesh.send("executor", NOTE)
    assert caught.value.context["recorded"] == f"{TEST_SHARD}+1"
    assert not any(scan(mesh, k.job("*")) for k in spread(mesh).keys)  # nothing written
    rclient.set(spread(mesh).home.shard_count, f"{TEST_SHARD}+3")
    assert mesh.send("executor", NOTE).id

    one = MeshClient(make_settings(), client=rclient)
    if spread(one).many:
        return
    with pytest.raises(ConfigError, match=r"over 3 shard\(s\).*MESH_SHARDS=1"):
        one.send("executor", NOTE)


@pytest.mark.slow
def test_sixty_jobs_are_run_by_each_shards_worker_and_each_is_found_by_wait(mesh, shard_workers):
    refs = [mesh.send("executor", {"tool": "note", "args": {"title": f"w{n}"}}, key=f"run-{n}") for n in range(60)]
    assert len({spread(mesh).shard_of(r.id) for r in refs}) == SHARDS
    shard_workers(("executor",))
    for ref in refs:
        record = mesh.wait(ref.id, timeout_s=60)
        assert record.state is State.SUCCEEDED, (record.state, record.error)
        assert record.output("executor")["effect_id"]
    assert mesh.queues(["executor"])["executor"] == {"ready": 0, "delayed": 0, "in_flight": 0}


@pytest.mark.slow
def test_approved_emitted_and_rerun_pipelines_run_to_the_end_in_their_shards(mesh, shard_workers):
    shard_workers()
    asks = Pipeline("asks").step("researcher", approval={"timeout": "1h"}).build()
    ref = mesh.run(asks, {"goal": "g"}, key=key_on(mesh, other_shards(mesh)[0], "asks"))
    wait_for(lambda: mesh.approvals())
    mesh.approve(ref.id, "researcher", by="ana")
    assert mesh.wait(ref.id, timeout_s=60).state is State.SUCCEEDED

    key = _apart(mesh)
    old = mesh.run(pipeline(), {"goal": "g"}, key=key)
    wait_for(lambda: mesh.waits("payment.settled"))
    assert mesh.emit("payment.settled", {"order": 1}).resumed == [(old.id, "pay")]
    assert mesh.wait(old.id, timeout_s=60).state is State.SUCCEEDED
    rerun = mesh.rerun(old.id, "researcher")
    record = mesh.wait(rerun.id, timeout_s=60)
    assert record.state is State.SUCCEEDED and record.steps["pay"].result == {"order": 1}
    assert spread(mesh).shard_of(rerun.id) != spread(mesh).shard_of(old.id)


def test_the_cli_finds_and_changes_jobs_in_every_shard(mesh, sharded):
    """``mesh status/trace/approvals/approve/signal/emit/waits/cancel/rerun`` go through MeshClient: each
    finds a job of any shard by its id or its key."""
    import json

    from tests.conftest import run_cli

    def cli(*args: str) -> Any:
        done = run_cli(sharded, *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return json.loads(done.stdout) if "--json" in args else done.stdout

    shard = other_shards(mesh)[-1]
    note = mesh.send("executor", NOTE, key=key_on(mesh, shard, "cli-note"))
    assert cli("status", note.key, "--json")["job_id"] == note.id
    assert cli("status", note.id, "--json")["state"] == "queued"
    assert "enqueued" in cli("trace", note.id)
    asks = mesh.run(Pipeline("asks").step("researcher", approval={"timeout": "1h"}).build(), {"goal": "g"},
                    key=key_on(mesh, shard, "cli-asks"))
    assert [a["job_id"] for a in cli("approvals", "--json")] == [asks.id]
    cli("approve", asks.key, "researcher", "--by", "ana")
    assert mesh.status(asks.id).steps["researcher"].sent_at is not None
    paid = mesh.run(pipeline(), {"goal": "g"}, key=key_on(mesh, shard, "cli-paid"))
    waiting = mesh.run(pipeline(), {"goal": "g"}, key=key_on(mesh, other_shards(mesh)[0], "cli-wait"))
    assert sorted(w["job_id"] for w in cli("waits", "--json")) == sorted([paid.id, waiting.id])
    cli("signal", paid.key, "payment.settled", "--data", '{"order": 2}')
    assert mesh.status(paid.id).steps["pay"].result == {"order": 2}
    emitted = cli("emit", "payment.settled", "--data", '{"order": 3}', "--json")
    assert [r["job_id"] for r in emitted["resumed"]] == [waiting.id]
    rerun = cli("rerun", paid.key, "--from", "researcher", "--json")
    assert mesh.status(rerun["job_id"]).rerun_of == paid.id
    cancelled = cli("cancel", rerun["job_id"], "--json")
    assert cancelled["cancelled"] is True and mesh.status(rerun["job_id"]).state is State.CANCELLED


def test_on_a_cluster_sends_keep_a_connection_of_each_shards_node(mesh):
    """Each shard's sends keep a connection of its own node's pool: one kept connection for them all went
    back to a pool and came out of another at every send that went to another node."""
    from mesh.broker.connection import node_client

    if not on_cluster():
        pytest.skip("one pool on a single Redis: the kept connection serves every shard")
    pools = {k.shard: node_client(mesh.redis, k.prefix).connection_pool for k in spread(mesh).keys}
    assert len({id(p) for p in pools.values()}) > 1  # the shards on more than one primary
    for n in range(30):
        mesh.send("executor", NOTE, key=f"kept-{n}")
    assert all(len(pool._in_use_connections) >= 1 for pool in pools.values())


def test_a_clients_first_send_records_its_shards_so_a_worker_counting_otherwise_refuses(mesh, make_settings,
                                                                                      rclient):
    """A client sending before any worker started recorded nothing: a worker with another count then
    recorded its own, the client's jobs lay where that count never looks (``mesh status`` said no job),
    and a second send of one key, placed by the worker's count, ran the job again."""
    from mesh.broker.shards import check_shards

    placed = spread(mesh)
    rclient.delete(placed.home.shard_count)
    mesh.send("executor", NOTE, key="first-send")
    assert rclient.get(placed.home.shard_count) == placed.recorded.encode()
    other = Shards(placed.namespace, placed.first, placed.count + 1)
    with pytest.raises(ConfigError, match=r"over 3 shard\(s\).*MESH_SHARDS=4"):
        check_shards(rclient, other, record=True)


def test_a_clients_first_send_refuses_a_namespace_whose_shard_0_holds_jobs_nothing_recorded(mesh, rclient):
    """As a worker's start does (ops/worker.py): a namespace a mesh before MESH_SHARDS served holds jobs in
    shard 0, which several shards never read. A client recording its count first would let the workers of
    several shards start around them: the send is refused, and nothing is recorded or sent."""
    placed = spread(mesh)
    if placed.start == placed.first:
        pytest.skip("the shards include the first one (MESH_SHARD >= 1): nothing is left out")
    rclient.delete(placed.home.shard_count)
    old = Keys(placed.namespace, placed.first)
    rclient.zadd(old.jobs, {"job-from-before": 1})
    with pytest.raises(ConfigError, match=r"holds 1 job\(s\) in shard 0"):
        mesh.send("executor", NOTE, key="after-upgrade")
    assert rclient.get(placed.home.shard_count) is None
    assert all(rclient.zcard(keys.jobs) == 0 for keys in placed.keys)
