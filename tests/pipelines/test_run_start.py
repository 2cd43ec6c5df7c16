"""``MeshClient.run`` writes a run's start (the spec's registration, the job record, its trace and
the root steps' messages) with one script call: no WATCH/MULTI, one round trip, and the same
answers as the transaction it replaced (the key's conflict, the same key's job, replace=False)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from mesh.agents.pipelines import Pipeline, load_pipeline
from mesh.broker import MeshClient, NotReplicated
from mesh.broker.client import job_id_for
from mesh.broker.connection import connect, parse_url
from mesh.broker.pipelines import PipelineConflict
from mesh.contracts import KeyConflict
from tests.conftest import close_client
from tests.pipelines.agents import app

ISSUE_FILE = Path(__file__).parent / "multi-agent-orchestration.skill.yaml"

#: (command names, requests) sent by the connections of a :class:`Counted` pool.
SENT: tuple[list[str], list[int]] = ([], [0])


def command_names(data: bytes) -> list[str]:
    """The names of the commands packed (RESP arrays of bulk strings) in ``data``."""
    names, i = [], 0
    while i < len(data):
        end = data.index(b"\r\n", i)
        count, i = int(data[i + 1:end]), end + 2
        for n in range(count):
            end = data.index(b"\r\n", i)
            size, i = int(data[i + 1:end]), end + 2
            if n == 0:
                names.append(data[i:i + size].decode().upper())
            i += size + 2
    return names


class Counted(redis.Connection):
    """A connection that notes every command and every request it sends, read from the bytes sent
    (the mesh packs some commands itself, not through ``send_command``)."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        SENT[0].extend(command_names(command if isinstance(command, bytes) else b"".join(command)))
        SENT[1][0] += 1
        super().send_packed_command(command, check_health)


def root_queue(mesh: MeshClient, job_id: str) -> tuple[str, int]:
    """The queue of the run's one root step, and how many messages are ready there."""
    record = mesh.status(job_id)
    [root] = [s for s in record.steps.values() if s.sent_at is not None]
    queue = mesh.target(root.agent).queue
    return queue, mesh.queues([queue])[queue]["ready"]


def test_a_run_is_one_script_call_in_one_round_trip(settings: Any, redis_url: str, rclient: redis.Redis) -> None:
    if parse_url(redis_url).cluster:  # every node's pool makes Counted connections
        counted = connect(settings, connection_class=Counted)
    else:
        counted = redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_url, connection_class=Counted))
    try:
        mesh = MeshClient(settings, client=counted, app=app)
        spec = load_pipeline(ISSUE_FILE, app)
        mesh.run(spec, {"goal": "warm"})  # the script loaded, the server's clock read
        for goal, key in (("a", None), ("b", "run-b"), ("b", "run-b")):
            SENT[0].clear()
            SENT[1][0] = 0
            ref = mesh.run(spec, {"goal": goal}, key=key)
            sent = [c for c in SENT[0] if c != "TIME"]  # the client's clock reads the server's now and then
            # one call, and on a shard >= 1 one more before it: the spec's registration, in the fleet's slot
            calls = 1 if mesh.keys.fleet == mesh.keys.prefix else 2
            assert sent == ["EVALSHA"] * calls, sent
            assert SENT[1][0] == calls + (len(SENT[0]) - len(sent))
            assert root_queue(mesh, ref.id)[1] >= 1  # its root step sent
    finally:
        close_client(counted)


def test_a_key_of_another_input_is_refused_and_nothing_is_written(mesh: MeshClient, rclient: redis.Redis) -> None:
    spec = load_pipeline(ISSUE_FILE, app)
    ref = mesh.run(spec, {"goal": "a"}, key="taken")
    record, events = mesh.status(ref.id), rclient.xlen(mesh.keys.trace(ref.id))
    queue, ready = root_queue(mesh, ref.id)
    with pytest.raises(KeyConflict) as caught:
        mesh.run(spec, {"goal": "b"}, key="taken")
    assert (caught.value.context["key"], caught.value.job_id) == ("taken", ref.id)
    assert caught.value.context["agent"] == next(iter(record.steps.values())).agent
    # the same key and input is the same job: nothing sent again
    again = mesh.run(spec, {"goal": "a"}, key="taken")
    assert (again.id, again.trace_id) == (ref.id, ref.trace_id)
    assert mesh.status(ref.id) == record
    assert rclient.xlen(mesh.keys.trace(ref.id)) == events
    assert root_queue(mesh, ref.id) == (queue, ready)
    assert rclient.zcard(mesh.keys.jobs) == 1


def test_a_run_that_must_not_replace_writes_nothing_not_even_its_record(mesh: MeshClient,
                                                                        rclient: redis.Redis) -> None:
    first = load_pipeline(ISSUE_FILE, app)
    second = load_pipeline(ISSUE_FILE.read_text().replace("ttl_minutes: 60", "ttl_minutes: 90") + "\n", app)
    mesh.run(first, {"goal": "a"})
    with pytest.raises(PipelineConflict):
        mesh.run(second, {"goal": "b"}, key="refused", replace=False)
    assert rclient.get(mesh.keys.job(job_id_for("refused"))) is None
    assert not rclient.exists(mesh.keys.trace(job_id_for("refused")))
    assert rclient.zcard(mesh.keys.jobs) == 1
    assert mesh.pipelines.versions(first.name)[0] == first.digest()
    # a key conflict is found first, as the transaction did (on a shard >= 1 too, where the spec's
    # registration is a call of its own made first: broker/pipelines.py StartRun)
    ref = mesh.run(first, {"goal": "d"}, key="held")
    with pytest.raises(KeyConflict):
        mesh.run(second, {"goal": "e"}, key="held", replace=False)
    assert mesh.status(ref.id).pipeline_input == {"goal": "d"}



def test_a_run_whose_root_waits_finds_a_key_conflict_before_a_replace_conflict(mesh: MeshClient) -> None:
    """A root that waits (sleep:) is started by a transaction, not the one script call: the same order of
    conflicts, on a shard >= 1 too, where the spec's registration is a transaction of its own made first."""
    first = Pipeline("napping").step("nap", sleep="10m").build()
    second = Pipeline("napping").step("nap", sleep="20m").build()
    ref = mesh.run(first, {"goal": "a"}, key="napped")
    with pytest.raises(KeyConflict):
        mesh.run(second, {"goal": "b"}, key="napped", replace=False)
    with pytest.raises(PipelineConflict):
        mesh.run(second, {"goal": "b"}, key="fresh", replace=False)
    assert mesh.status(ref.id).pipeline_input == {"goal": "a"}
    assert mesh.pipelines.versions("napping")[0] == first.digest()


@pytest.mark.no_cluster("it needs a Redis with no replica, whose WAIT 1 answers 0 after its timeout; every "
                        "primary of the test cluster has one")
def test_a_run_no_replica_confirmed_raises_not_replicated_and_its_key_run_again_is_the_same_job(
        make_settings: Any, rclient: redis.Redis) -> None:
    """The shared test Redis has no replica: WAIT 1 answers 0 after its timeout (MESH_REDIS_WAIT_REPLICAS)."""
    assert rclient.info("replication")["connected_slaves"] == 0
    mesh = MeshClient(make_settings(redis_wait_replicas=1, redis_wait_timeout_ms=20), client=rclient, app=app)
    spec = load_pipeline(ISSUE_FILE, app)
    with pytest.raises(NotReplicated, match="0 of 1 replica") as caught:
        mesh.run(spec, {"goal": "a"}, key="unconfirmed")
    ref = caught.value.refs[0]
    assert ref.id == job_id_for("unconfirmed")
    queue, ready = root_queue(mesh, ref.id)
    with pytest.raises(NotReplicated):
        mesh.run(spec, {"goal": "a"}, key="unconfirmed")
    assert root_queue(mesh, ref.id) == (queue, ready) and rclient.zcard(mesh.keys.jobs) == 1
