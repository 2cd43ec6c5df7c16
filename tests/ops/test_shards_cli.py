"""``mesh shards``: each shard's tag, slot and the jobs and dead letters it holds, read from the shards the
settings name (broker/shards.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

from mesh.broker import MeshClient, MeshSettings, job_id_for
from mesh.broker.shards import Shards


def test_mesh_shards_lists_each_shard_and_the_jobs_it_holds(make_settings: Callable[..., MeshSettings],
                                                            rclient: redis.Redis, cli: Callable[..., Any]) -> None:
    settings = make_settings(shards=3)
    placed = Shards.of(settings)
    client = MeshClient(settings, client=rclient)
    for n, keys in enumerate(placed.keys):  # n + 1 jobs on each shard: keys whose jobs the client puts there
        on_it = (k for k in (f"k{n}-{i}" for i in range(1000)) if placed.shard_of(job_id_for(k)) == keys.shard)
        for i, key in zip(range(n + 1), on_it, strict=False):
            client.send("planner", {"goal": f"g{n}-{i}"}, key=key)
    env = {"MESH_SHARDS": "3"}
    res = cli("shards", "--json", **env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["count"] == 3 and out["recorded"] == placed.recorded  # recorded at the client's first send
    assert [(r["shard"], r["tag"], r["jobs"], r["dead_letters"]) for r in out["shards"]] == [
        (k.shard, k.prefix, n + 1, 0) for n, k in enumerate(placed.keys)]
    assert out["fleet"]["tag"] == placed.home.fleet
    rclient.set(placed.home.shard_count, Shards(settings.namespace, settings.shard, 2).recorded)  # counted otherwise
    table = cli("shards", COLUMNS="80", **env)
    assert table.returncode == 0 and "recorded 2 shard(s)" in table.stdout
    assert all(len(line) <= 80 for line in table.stdout.splitlines())
