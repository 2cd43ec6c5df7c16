"""One namespace's load spread over a Redis Cluster's primaries (MESH_SHARDS): 10,000 one-step jobs of the
bench's echo agent, sent with ``send_many`` and run by two real worker processes, each serving every shard;
every primary's ``INFO commandstats`` read before and after. With six shards (tags placed two on each
third of the slots, broker/keys.py ``shard_prefix``) each primary's commands are within 25 % of their mean;
with one shard every step's commands are on one primary. Only on a cluster (its own 3+3, tests/cluster.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mesh import MeshClient
from mesh.broker import MeshSettings
from mesh.broker.shards import Shards
from mesh.ops.bench import BENCH_APP, STEP_AGENT, _snapshot, _succeeded, job_keys
from tests.cluster import RedisClusterNodes
from tests.conftest import wait_started

pytestmark = pytest.mark.slow

JOBS, SHARDS = 10_000, 6


@pytest.fixture
def settings(make_settings: Callable[..., MeshSettings], nodes: RedisClusterNodes) -> MeshSettings:
    return make_settings(redis_url=nodes.url, shards=SHARDS)


def commands(mesh: MeshClient) -> dict[str, int]:
    """Every primary's commands so far (``INFO commandstats``: calls, scripts' own commands included)."""
    return {name: sum(calls.values()) for name, (calls, _cpu) in _snapshot(mesh.redis).items()}


def test_ten_thousand_steps_of_one_namespace_spread_over_the_primaries_within_a_quarter(
        settings: MeshSettings, nodes: RedisClusterNodes, worker_process: Callable[..., Any]) -> None:
    shards = Shards.of(settings)
    where = {keys.shard: nodes.primary_of(keys.job("x")) for keys in shards.keys}
    assert sorted(list(where.values()).count(p) for p in nodes.primaries()) == [2, 2, 2], where
    mesh = MeshClient(settings, app=BENCH_APP)
    workers = [worker_process("--app", "mesh.ops.bench:BENCH_APP", "--threads", "8") for _ in range(2)]
    for proc in workers:
        wait_started(proc)
    before = commands(mesh)
    refs = mesh.send_many(STEP_AGENT, [({"text": f"step {i}"}, f"spread-{i}") for i in range(JOBS)])
    ids = [ref.id for ref in refs]
    placed = {keys.shard: 0 for keys in shards.keys}
    for job_id in ids:
        placed[shards.of_job(job_id).shard] += 1
    assert all(abs(n / (JOBS / SHARDS) - 1) < 0.1 for n in placed.values()), placed
    _succeeded(mesh.redis, job_keys(mesh, ids), timeout_s=600, pause_s=0.5)  # one MGET a shard per poll
    after = commands(mesh)
    spent = {node: after[node] - before[node] for node in after}
    mean = sum(spent.values()) / len(spent)
    spread = {node: round(n / mean - 1, 3) for node, n in spent.items()}
    assert sum(spent.values()) > 10 * JOBS  # every step's commands counted (about 16 a one-step job)
    assert all(abs(s) <= 0.25 for s in spread.values()), (spent, spread)
