"""``mesh bench`` on a real Redis Cluster (3 primaries, 3 replicas; tests/cluster.py): raw dramatiq's side
of its comparison keeps dramatiq's own layout under the namespace's hash tag (ops/namespaces.py
``raw_namespace``), so its scripts' keys share a slot there; with them in ``ns:...`` every fetch of raw
dramatiq was refused ("Script attempted to access a non local key in a cluster node") and the run never
drained. Its Redis figures sum every primary's, and the real steps' are also given per primary: a
namespace is one slot, so its primary carries the whole of it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis.cluster

from mesh.broker import MeshSettings
from mesh.broker.keys import prefix
from mesh.ops import bench
from tests.cluster import RedisClusterNodes

pytestmark = pytest.mark.slow

SMALL = ("--messages", "40", "--pairs", "1", "--latency-samples", "2", "--dlq-entries", "20",
         "--enqueue-messages", "20", "--chain-jobs", "1", "--kept-jobs", "20", "--floor-jobs", "64", "--prefetch", "2",
         "--processes", "1", "--threads", "2")


@pytest.fixture
def settings(make_settings: Callable[..., MeshSettings], redis_cluster_nodes: RedisClusterNodes) -> MeshSettings:
    redis_cluster_nodes.wait_ok()
    return make_settings(redis_url=redis_cluster_nodes.url)


def namespace_on(nodes: RedisClusterNodes, port: int, name: str) -> str:
    """A namespace ``name-<n>`` whose slot (``{name-<n>}``) the primary on ``port`` owns."""
    n = 0
    while nodes.primary_of(prefix(f"{name}-{n}")) != port:
        n += 1
    return f"{name}-{n}"


def test_bench_runs_on_a_cluster_in_the_namespace_given_and_reports_each_primary(
        cli: Callable[..., Any], redis_cluster_nodes: RedisClusterNodes) -> None:
    primaries = sorted(redis_cluster_nodes.primaries())
    home = primaries[-1]  # not the first node of the URL
    ns = namespace_on(redis_cluster_nodes, home, "bench-on")
    res = cli("bench", *SMALL, "--namespace", ns, "--json", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["namespace"] == ns and out["namespace_primary"] == f"127.0.0.1:{home}"
    assert sorted(out["primaries"]) == [f"127.0.0.1:{p}" for p in primaries]
    assert out["config"]["command"].endswith(f"--namespace {ns}")
    [throughput] = out["throughput"]
    assert throughput["raw_msg_s"] > 0 and throughput["mesh_msg_s"] > 0
    assert throughput["redis_commands_per_message"]["raw"] > 0
    [step] = out["step"]
    assert step["raw"]["msg_s"] > 0
    for kind in ("job", "pipeline"):
        figures = step[kind]
        by_node = {p["node"]: p for p in figures["primaries"]}
        assert sorted(by_node) == sorted(out["primaries"])
        # the totals are the primaries' sums
        assert sum(p["commands"] for p in by_node.values()) == pytest.approx(
            figures["redis_commands_per_step"] * figures["steps"])
        assert sum(p["redis_cpu_us_per_step"] for p in by_node.values()) == pytest.approx(
            figures["redis_cpu_us_per_step"])
        # one namespace is one slot: its primary carries the steps; the others only the cluster's own chatter
        mine = by_node.pop(out["namespace_primary"])
        assert mine["commands_per_step"] > 10 and mine["spread"] > 1
        assert all(mine["commands"] > 10 * other["commands"] for other in by_node.values()), figures["primaries"]
    left = {port: list(redis_cluster_nodes.node(port).scan_iter(match="bench-*", count=1000))
            + list(redis_cluster_nodes.node(port).scan_iter(match="{bench-*", count=1000))
            for port in redis_cluster_nodes.primaries()}
    assert all(not keys for keys in left.values()), left  # the throw-away namespace is gone from every primary


def test_bench_table_gives_a_row_per_primary_for_the_real_steps(cli: Callable[..., Any],
                                                                  redis_cluster_nodes: RedisClusterNodes) -> None:
    res = cli("bench", *SMALL, timeout=300, COLUMNS="200")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, res.stdout
    for port in redis_cluster_nodes.primaries():
        rows = [line for line in lines if f"on 127.0.0.1:{port} (cmd, µs/step)" in line]
        assert len(rows) == 2, res.stdout  # the one-step job's and the pipeline's
    assert "every primary's summed" in res.stdout


def test_the_stopwatch_counts_each_primary_and_leaves_out_its_polls_and_every_primary_s_info(
        redis_cluster_nodes: RedisClusterNodes) -> None:
    primaries = sorted(redis_cluster_nodes.primaries())
    ns = namespace_on(redis_cluster_nodes, primaries[0], "bench-count")
    other = namespace_on(redis_cluster_nodes, primaries[1], "bench-other")
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=primaries[0])
    try:
        client.hset(f"{prefix(ns)}:q.msgs", "m", "x")
        watch = bench._Stopwatch(client, ns)
        for i in range(5):
            client.set(f"{prefix(ns)}:k{i}", i)
        for i in range(3):
            client.set(f"{prefix(other)}:k{i}", i)
        client.hdel(f"{prefix(ns)}:q.msgs", "m")
        bench._drained(client, ns, "q", watch=watch)  # the bench's own poll, on ns's primary: left out
        run = watch.stop(n=4)
        assert run.commands == {"set": 8, "hdel": 1}
        assert {name: c for name, (c, _) in run.primaries.items()} == {
            f"127.0.0.1:{primaries[0]}": 6, f"127.0.0.1:{primaries[1]}": 3, f"127.0.0.1:{primaries[2]}": 0}
        spread = {p["node"]: round(p["spread"], 2) for p in run.by_primary()}
        assert spread == {f"127.0.0.1:{primaries[0]}": 1.0, f"127.0.0.1:{primaries[1]}": 0.0,
                          f"127.0.0.1:{primaries[2]}": -1.0}
        assert run.redis_cpu_s == pytest.approx(sum(cpu for _, cpu in run.primaries.values()))
    finally:
        client.delete(f"{prefix(ns)}:q.msgs", *(f"{prefix(ns)}:k{i}" for i in range(5)))
        client.delete(*(f"{prefix(other)}:k{i}" for i in range(3)))
        client.close()
