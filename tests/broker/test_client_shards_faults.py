"""MeshClient over several shards (MESH_SHARDS=3) when a write is cut between two shards, or two senders
race: what is left written, what the caller is told, and that doing it again completes it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from mesh import MeshClient
from mesh.broker import job_id_for
from mesh.broker.client import payload_hash
from mesh.broker.keys import Keys
from mesh.broker.shards import Shards, check_shards
from mesh.contracts import ConfigError, KeyConflict
from tests.broker.test_client_shards import SHARDS, key_on, pipeline, shard_of, spread, update_fails_for
from tests.pipelines.agents import app


@pytest.fixture
def mesh(make_settings: Callable[..., Any], rclient: Any) -> MeshClient:
    return MeshClient(make_settings(shards=SHARDS), client=rclient, app=app)


def written(mesh: MeshClient, key: str) -> bool:
    return bool(mesh.redis.exists(mesh.keys_of(job_id_for(key)).job(job_id_for(key))))


def note(title: str) -> dict[str, Any]:
    return {"tool": "note", "args": {"title": title}}


def test_a_one_shard_client_is_refused_by_a_namespace_its_workers_recorded_with_several(make_settings, rclient):
    """The likeliest mistake: a sender left at the default MESH_SHARDS=1 while the workers spread the
    namespace over three. Its jobs would go to a shard no worker serves; it is refused, on a Cluster too."""
    check_shards(rclient, Shards.of(make_settings(shards=SHARDS)))  # a worker's start records them
    one = MeshClient(make_settings(shards=1), client=rclient, app=app)
    with pytest.raises(ConfigError, match=r"over 3 shard\(s\).*MESH_SHARDS=1"):
        one.send("executor", note("t"), key="stranded")
    assert not rclient.exists(one.keys.job(job_id_for("stranded")))


def test_send_many_of_ten_thousand_stops_at_a_conflict_in_its_chunk_leaving_earlier_shards_written(mesh):
    items = [(note(f"m{n}"), f"ten-{n}") for n in range(10_000)]
    # the conflicting item: in chunk 5, whose items go to every shard; its shard's batch is not the chunk's first
    chunk = items[5000:6000]
    order = list(dict.fromkeys(shard_of(mesh, k) for _, k in chunk))  # the order the chunk's batches are written
    bad = next(n for n in range(5000, 6000) if shard_of(mesh, items[n][1]) == order[1])
    mesh.send("executor", note("bound elsewhere"), key=items[bad][1])
    with pytest.raises(KeyConflict) as caught:
        mesh.send_many("executor", items)
    assert (caught.value.key, caught.value.job_id) == (items[bad][1], job_id_for(items[bad][1]))
    for n in range(0, 5000, 97):  # the chunks before it: written
        assert written(mesh, items[n][1])
    for _, key in chunk:  # its chunk: the batch of the shard written before the conflict's, and only it
        assert written(mesh, key) == (shard_of(mesh, key) == order[0] or key == items[bad][1]), key
    for n in range(6000, 10_000, 97):  # the chunks after it: not
        assert not written(mesh, items[n][1])
    # Sent again without the conflicting item: every other item once
    again = mesh.send_many("executor", items[:bad] + items[bad + 1:])
    assert len({r.id for r in again}) == 9_999
    assert mesh.queues(["executor"])["executor"]["ready"] >= 10_000


def test_one_key_sent_from_two_threads_at_once_is_one_job_and_a_conflict_is_refused(mesh):
    barrier, out, errors = threading.Barrier(2), [], []

    def send(title: str) -> None:
        barrier.wait()
        try:
            out.append(mesh.send("executor", note(title), key="raced"))
        except KeyConflict as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 1 and len(errors) == 1  # another payload: one wins
    record = mesh.status(job_id_for("raced"))
    assert record.payload_hash in (payload_hash("executor", note("a")), payload_hash("executor", note("b")))
    assert len([k for k in spread(mesh).keys if mesh.redis.exists(k.job(job_id_for("raced")))]) == 1
    assert mesh.queues(["executor"])["executor"]["ready"] == 1


def test_an_emit_cut_after_its_first_shards_delivery_leaves_the_others_to_their_timers(mesh, monkeypatch):
    from mesh.agents.pipelines import waits as engine

    keys = spread(mesh).keys
    refs = {k.shard: mesh.run(pipeline(), {"goal": "g"}, key=key_on(mesh, k.shard, "e")) for k in keys}
    real, calls = engine._emit_in, []

    def cut(client: Any, shard_keys: Keys, *args: Any) -> Any:
        calls.append(shard_keys.shard)
        if len(calls) == 2:
            raise ConnectionError("the emitter stopped here")
        return real(client, shard_keys, *args)

    monkeypatch.setattr(engine, "_emit_in", cut)
    with pytest.raises(ConnectionError):
        mesh.emit("payment.settled", {"order": 1})
    first = keys[0].shard
    assert mesh.status(refs[first].id).steps["pay"].result == {"order": 1}
    for k in keys:
        assert mesh.redis.xlen(k.events("payment.settled")) == 1  # kept in every shard
        # the first shard's timer cancelled once delivered, the others' left for a worker
        emits = [m for m in mesh.redis.zrange(k.timers, 0, -1) if m.startswith(b"wait.emit|")]
        assert len(emits) == (0 if k.shard == first else 1), k.shard
    assert sorted(w.job_id for w in mesh.waits("payment.settled")) == sorted(
        refs[k.shard].id for k in keys[1:])
    # What a worker of each shard does when the timer is due: the event offered there, under its one id
    for k in keys[1:]:
        (member,) = [m for m in mesh.redis.zrange(k.timers, 0, -1) if m.startswith(b"wait.emit|")]
        handlers = engine._client_waits(mesh, mesh.jobs_on(k)).timer_handlers()
        handlers["wait.emit"](SimpleNamespace(ref=member.decode().removeprefix("wait.emit|")))
    ids = {mesh.status(r.id).steps["pay"].wait.event_id for r in refs.values()}
    assert len(ids) == 1 and mesh.waits("payment.settled") == []
    assert all(mesh.status(r.id).steps["pay"].result == {"order": 1} for r in refs.values())


def test_a_rerun_of_a_rerun_across_shards_cut_before_its_link_is_completed_by_the_same_rerun(mesh, monkeypatch):
    key = next(f"rr-{n}" for n in range(1000)
               if len({shard_of(mesh, f"rr-{n}"), shard_of(mesh, f"rr-{n}/rerun/1"),
                       shard_of(mesh, f"rr-{n}/rerun/1/rerun/1")}) == 3)
    old = mesh.run(pipeline(), {"goal": "g"}, key=key)
    mesh.signal(old.id, "payment.settled", {"order": 1})
    first = mesh.rerun(old.id, "researcher")
    restore = update_fails_for(monkeypatch, first.id)
    with pytest.raises(ConnectionError):
        mesh.rerun(first.id, "researcher")
    second_id = job_id_for(f"{first.key}/rerun/1")
    assert mesh.status(second_id).rerun_of == first.id and mesh.status(first.id).reruns == []
    restore()
    again = mesh.rerun(first.id, "researcher")
    assert again.id == second_id and mesh.status(first.id).reruns == [second_id]
    assert mesh.status(old.id).reruns == [first.id]
    assert mesh.status(second_id).steps["pay"].result == {"order": 1}
    second_keys = mesh.keys_of(second_id)
    assert mesh.redis.hlen(second_keys.messages("researcher")) == 1


def test_mesh_status_takes_a_prefix_of_a_job_on_any_shard_and_refuses_one_naming_several(mesh, make_settings):
    import json

    from tests.conftest import run_cli

    refs = [mesh.send("executor", note(f"p{n}"), key=f"pre-{n}") for n in range(40)]
    assert len({spread(mesh).shard_of(r.id) for r in refs}) == SHARDS
    settings = mesh.settings
    for ref in refs[:12]:
        prefix = next(ref.id[:n] for n in range(8, 40)
                      if sum(r.id.startswith(ref.id[:n]) for r in refs) == 1)
        done = run_cli(settings, "status", prefix, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["job_id"] == ref.id
        bare = prefix.removeprefix("job-")
        done = run_cli(settings, "status", bare, "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["job_id"] == ref.id, done.stderr
    done = run_cli(settings, "status", "job-", "--json")
    assert done.returncode == 2 and "several" in done.stderr, (done.stdout, done.stderr)


@pytest.mark.parametrize("count", [1, SHARDS])
def test_queues_named_twice_count_each_queue_once_and_in_its_own_row(make_settings, rclient, count):
    mesh = MeshClient(make_settings(shards=count), client=rclient, app=app)
    for n in range(5):
        mesh.send("executor", note(f"q{n}"), key=f"q-{n}")
    expected = {"executor": {"ready": 5, "delayed": 0, "in_flight": 0},
                "researcher": {"ready": 0, "delayed": 0, "in_flight": 0}}
    assert mesh.queues(["executor", "researcher"]) == expected
    assert mesh.queues(["executor", "executor", "researcher"]) == expected  # `mesh queues executor executor ...`


def test_waits_timing_out_while_an_emit_is_between_shards_are_not_reported_resumed(mesh, monkeypatch):
    """An emit has kept its event everywhere and delivered in its first shard; the waits of the second
    time out before it reaches them: they end timed out, once, and the Delivery lists only the others."""
    from mesh.agents.pipelines import waits as engine

    refs = [mesh.run(pipeline(), {"goal": "g"}, key=f"race-{n}") for n in range(12)]
    keys = spread(mesh).keys
    assert {mesh.keys_of(r.id).shard for r in refs} == {k.shard for k in keys}
    late = [r for r in refs if mesh.keys_of(r.id).shard == keys[1].shard]
    real = engine._emit_in

    def timeouts_first(client: Any, shard_keys: Keys, *args: Any) -> Any:
        if shard_keys.shard == keys[1].shard:
            for ref in late:  # the worker's timer fires each wait's timeout now
                seq = mesh.status(ref.id).steps["pay"].wait.seq
                handlers = engine._client_waits(mesh, mesh.jobs_of(ref.id)).timer_handlers()
                handlers["wait"](SimpleNamespace(ref=f"{ref.id}|pay|{seq}", now_ms=0))
        return real(client, shard_keys, *args)

    monkeypatch.setattr(engine, "_emit_in", timeouts_first)
    delivered = mesh.emit("payment.settled", {"order": 9})
    resumed = {job for job, _ in delivered.resumed}
    assert resumed == {r.id for r in refs if r not in late}
    for ref in refs:
        wait = mesh.status(ref.id).steps["pay"].wait
        assert wait is not None and wait.ended is not None, ref.id
        assert (wait.ended.value == "event") == (ref not in late), (ref.id, wait.ended)
        assert (wait.event_id == delivered.id) == (ref not in late)
    assert mesh.waits() == []


def test_send_many_cut_at_a_later_shards_batch_leaves_the_earlier_ones_and_sending_again_completes_it(mesh,
                                                                                                     monkeypatch):
    from mesh.broker.outbox import NewJobs

    items = [(note(f"c{n}"), f"cut-{n}") for n in range(300)]
    order = list(dict.fromkeys(shard_of(mesh, k) for _, k in items))
    real, calls = NewJobs.write, []

    def cut(self: NewJobs, script: Any, keys: Keys, client: Any = None) -> Any:
        calls.append(keys.shard)
        if len(calls) == 2:
            raise ConnectionError("the sender stopped here")
        return real(self, script, keys, client)

    monkeypatch.setattr(NewJobs, "write", cut)
    with pytest.raises(ConnectionError):
        mesh.send_many("executor", items)
    assert calls == order[:2]
    for _, key in items:  # the first shard's batch written whole, the others not at all
        assert written(mesh, key) == (shard_of(mesh, key) == order[0]), key
    monkeypatch.setattr(NewJobs, "write", real)
    refs = mesh.send_many("executor", items)  # the same keyed items again: each job once
    assert len({r.id for r in refs}) == 300 and all(written(mesh, k) for _, k in items)
    assert mesh.queues(["executor"])["executor"]["ready"] == 300 + sum(shard_of(mesh, k) == order[0] for _, k in items)


@pytest.mark.slow
def test_mesh_settle_finds_the_ledger_and_the_record_of_a_job_in_its_shard(make_settings, rclient):
    """``mesh settle`` (agents/verify.py) read the step's ledger and wrote the job's record with the
    client's own keys, shard 0's with several shards, where neither is: "no open effect"."""
    from mesh.broker.ledger import Ledger
    from mesh.contracts import State
    from mesh.ops.worker import start_worker
    from tests.apps.effects import app as effects
    from tests.conftest import run_cli
    from tests.httpserver import RecordingServer

    with RecordingServer() as server:
        settings = make_settings(shards=SHARDS, http_allow=f"{server.host_port},127.0.0.1:1")
        mesh = MeshClient(settings, client=rclient, app=effects)
        worker = start_worker(settings, None, 3, app=effects)
        try:
            key = next(f"settle-{n}" for n in range(100) if shard_of(mesh, f"settle-{n}") != spread(mesh).keys[0].shard)
            ref = mesh.run("posted", {"url": server.url("/orders"), "verify_url": "http://127.0.0.1:1/orders/7"},
                           key=key)
            assert mesh.wait(ref.id, timeout_s=30).steps["post"].state is State.UNKNOWN
            done = run_cli(settings, "settle", ref.id, "post", "--as", "applied", "--reason", "seen upstream",
                           "--json")
            assert done.returncode == 0, done.stderr + done.stdout
            record = mesh.wait(ref.id, timeout_s=30)
        finally:
            worker.stop(timeout=10_000)
            for broker in getattr(worker, "brokers", [worker.broker]):
                broker.close()
    assert record.state is State.SUCCEEDED and record.steps["post"].settlement is not None
    [entry] = Ledger(rclient, mesh.keys_of(ref.id), ref.id, "post", 60).entries()
    assert entry.by is not None and not entry.open
