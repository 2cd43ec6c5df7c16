"""``mesh bench`` on a real Redis Cluster (3 primaries, 3 replicas; tests/cluster.py): raw dramatiq's side
of its comparison keeps dramatiq's own layout under the namespace's hash tag (ops/namespaces.py
``raw_namespace``), so its scripts' keys share a slot there; with them in ``ns:...`` every fetch of raw
dramatiq was refused ("Script attempted to access a non local key in a cluster node") and the run never
drained."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from mesh.broker import MeshSettings
from tests.cluster import RedisClusterNodes

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(make_settings: Callable[..., MeshSettings], redis_cluster_nodes: RedisClusterNodes) -> MeshSettings:
    redis_cluster_nodes.wait_ok()
    return make_settings(redis_url=redis_cluster_nodes.url)


def test_bench_runs_on_a_cluster_and_leaves_no_key(cli: Callable[..., Any], redis_cluster_nodes: RedisClusterNodes
                                                   ) -> None:
    res = cli("bench", "--messages", "40", "--pairs", "1", "--latency-samples", "2", "--dlq-entries", "20",
              "--enqueue-messages", "20", "--chain-jobs", "1", "--kept-jobs", "20", "--prefetch", "2",
              "--processes", "1", "--threads", "2", "--json", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    [throughput] = out["throughput"]
    assert throughput["raw_msg_s"] > 0 and throughput["mesh_msg_s"] > 0
    assert throughput["redis_commands_per_message"]["raw"] > 0
    [step] = out["step"]
    assert step["raw"]["msg_s"] > 0
    left = {port: list(redis_cluster_nodes.node(port).scan_iter(match="bench-*", count=1000))
            + list(redis_cluster_nodes.node(port).scan_iter(match="{bench-*", count=1000))
            for port in redis_cluster_nodes.primaries()}
    assert all(not keys for keys in left.values()), left  # the throw-away namespace is gone from every primary
