"""MESH_REDIS_WAIT_REPLICAS with a MESH_REDIS_WAIT_TIMEOUT_MS longer than the connection's read timeout
(redis-py's default: 5 s; here a client of 0.3 s, to keep the test short): the WAIT's reply is read with a
deadline of its own, so an enqueue no replica confirms fails as NotReplicated once the WAIT's timeout has
passed, not with the read's TimeoutError (after which the client's retry sent its writes again). The shared
test Redis has no replica: WAIT 1 answers 0 after its timeout."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from mesh.broker import MeshClient, NotReplicated
from mesh.broker.connection import connect, replicated, transaction

WAIT_MS = 1000
READ_TIMEOUT_S = 0.3


@pytest.fixture
def short(make_settings: Any, rclient: redis.Redis) -> tuple[Any, redis.Redis]:
    assert rclient.info("replication")["connected_slaves"] == 0
    settings = make_settings(redis_wait_replicas=1, redis_wait_timeout_ms=WAIT_MS)
    return settings, connect(settings, socket_timeout=READ_TIMEOUT_S)


@pytest.mark.no_cluster("it needs a Redis with no replica, whose WAIT 1 answers 0 after its timeout; every "
                        "primary of the test cluster has one")
@pytest.mark.parametrize("way", ["submit", "send"])
def test_an_enqueue_waits_out_its_wait_timeout_past_the_read_timeout(short: tuple[Any, redis.Redis], way: str) -> None:
    settings, client = short
    mesh = MeshClient(settings, client=client)
    started = time.monotonic()
    with pytest.raises(NotReplicated, match="0 of 1 replica") as caught:
        if way == "submit":
            mesh.submit("a goal", key="k1")
        else:
            mesh.send("planner", {"goal": "a goal"}, key="k1")
    assert time.monotonic() - started >= WAIT_MS / 1000  # the WAIT's own timeout, not the read's
    ref = caught.value.refs[0]
    assert client.exists(mesh.keys.job(ref.id)) == 1


@pytest.mark.no_cluster("it needs a Redis with no replica, whose WAIT 1 answers 0 after its timeout; every "
                        "primary of the test cluster has one")
def test_a_transaction_waits_out_its_wait_timeout_past_the_read_timeout(short: tuple[Any, redis.Redis]) -> None:
    settings, client = short
    key = f"{{{settings.namespace}}}:wait-read"
    with transaction(client, settings) as pipe:
        pipe.incr(key)
        assert pipe.execute() == [1]
    with pytest.raises(NotReplicated):
        replicated(pipe, [])
    assert client.get(key) == b"1"  # run once: not sent again
    client.delete(key)


@pytest.mark.slow
def test_a_wait_refused_by_a_node_that_is_a_replica_now_counts_no_replica(tmp_path: Any) -> None:
    # A client's connection to a primary that was demoted while it wrote (a paused primary come back as a
    # replica, which may take a write before it learns it): the write ran there alone, and WAIT is refused
    # ("WAIT cannot be used with replica instances"). A writable replica stands in for it. Not confirmed:
    # NotReplicated (send it again with the same key), not a ResponseError after the write.
    from mesh.broker import MeshSettings
    from mesh.ops.local_redis import PrivateRedis, redis_binary

    binary = redis_binary()
    assert binary is not None
    primary = PrivateRedis(binary, folder=tmp_path / "primary")
    replica = PrivateRedis(binary, folder=tmp_path / "replica", args=(
        "--replicaof", "127.0.0.1", str(primary.port), "--replica-read-only", "no"))
    try:
        settings = MeshSettings(redis_url=f"redis://127.0.0.1:{replica.port}/0", redis_wait_replicas=1,
                                redis_wait_timeout_ms=200, namespace="demoted")
        client = connect(settings)
        with transaction(client, settings) as pipe:
            pipe.incr("{demoted}:n")
            assert pipe.execute() == [1]
        with pytest.raises(NotReplicated):
            replicated(pipe, [])
        with pytest.raises(NotReplicated):
            MeshClient(settings, client=client).send("planner", {"goal": "a goal"})
    finally:
        replica.stop()
        primary.stop()
