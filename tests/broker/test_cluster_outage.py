"""A Redis Cluster none of whose nodes answers (every node down, or this host cut off from them all)
fails the mesh's calls as a single server that does not answer does: with ``redis.ConnectionError``,
which the mesh's handling of a lost Redis takes (a lease renewal tried again, a check before an effect
deferred, a consumer that reconnects). redis-py's cluster client raises ``RedisClusterUnreachableError``
there once a refresh of its slots has reached no node, and that is no ``RedisError``: before, it went
past every such handler (the lease renewer's thread died of it). Once the nodes answer again the same
client goes on. A real 3+3 cluster (tests/cluster.py) whose six nodes are SIGKILLed and started again."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import wait_for

from mesh.broker import MeshSettings
from mesh.broker.connection import connect, run_script
from mesh.broker.idempotency import Idempotency, Lease
from tests.cluster import RedisClusterNodes

pytestmark = pytest.mark.slow


class Outage:
    """``start()`` SIGKILLs every node of ``nodes``; ``end()`` starts them again (with their nodes
    files: the same cluster, its data gone) and returns once it is ok."""

    def __init__(self, nodes: RedisClusterNodes) -> None:
        self.nodes = nodes
        self.binary = nodes.procs[nodes.ports[0]].args[0]

    def start(self) -> None:
        for port in self.nodes.alive():
            self.nodes.kill(port)

    def end(self) -> None:
        for port in self.nodes.ports:
            if self.nodes.procs[port].poll() is not None:
                self.nodes._spawn(self.binary, port)
        self.nodes.wait_ok(60)


@pytest.fixture
def outage(redis_cluster_nodes: RedisClusterNodes) -> Iterator[Outage]:
    redis_cluster_nodes.wait_ok()
    outage = Outage(redis_cluster_nodes)
    yield outage
    outage.end()


def test_every_way_the_mesh_sends_fails_with_a_connection_error_and_goes_on_once_the_nodes_answer(
        redis_cluster_nodes: RedisClusterNodes, outage: Outage) -> None:
    client: Any = connect(MeshSettings(redis_url=redis_cluster_nodes.url, redis_retries=1))
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    assert run_script(script, ["{out}n"], []) == 1
    outage.start()
    calls: dict[str, Callable[[], Any]] = {
        "command": lambda: client.get("{out}n"),
        "script": lambda: run_script(script, ["{out}n"], []),
        "pipeline": lambda: client.pipeline(transaction=False).get("{out}n").execute(),
        "transaction": lambda: client.pipeline(transaction=True).incr("{out}n").execute(),
        "watch": lambda: client.pipeline(transaction=True).watch("{out}n"),
        "watched transaction": lambda: client.transaction(lambda pipe: pipe.incr("{out}n"), "{out}n"),
        "command again": lambda: client.get("{out}n"),
    }
    for name, call in calls.items():
        with pytest.raises(redis.ConnectionError):
            call()
            pytest.fail(f"{name}: no error")
    outage.end()
    assert run_script(script, ["{out}n"], []) == 1  # the same client, on the same cluster (empty: no persistence)
    assert client.pipeline(transaction=True).incr("{out}n").execute() == [2]


def test_the_lease_renewer_outlives_a_cluster_that_does_not_answer(
        redis_cluster_nodes: RedisClusterNodes, outage: Outage,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = MeshSettings(redis_url=redis_cluster_nodes.url, namespace="outage", lease_s=0.6, redis_retries=1)
    mw = Idempotency(settings, connect(settings))
    mw._hold(Lease(key="k", claim_key=mw.keys.claim("k"), owner="a", token=1))  # starts the renewer
    renewer = mw._renewer
    assert renewer is not None
    outage.start()
    with caplog.at_level(logging.WARNING, logger="mesh.broker.idempotency"):
        wait_for(lambda: any(r.message == "lease renewal failed; retrying" for r in caplog.records), timeout_s=60)
    assert renewer.is_alive()  # before: it died of RedisClusterUnreachableError
    mw._stop.set()
