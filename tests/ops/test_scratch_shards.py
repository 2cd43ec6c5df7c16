"""The throw-away namespaces' own writes with MESH_SHARDS=3 (``mesh soak``'s poison, ``mesh ops console-bench``'s
dead letters): written into a shard the workers consume and the readers read (from 1 with several: shard 0,
``{ns}``, holds only the fleet-wide keys), not the client's own keys (``client.keys``, shard 0's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from mesh.broker import MeshClient
from mesh.broker.keys import Keys
from mesh.broker.settings import MeshSettings
from mesh.broker.shards import Shards
from mesh.dlq import DeadLetterShards

SHARDS = 3


def test_soak_poison_goes_onto_a_queue_its_workers_consume(make_settings: Callable[..., MeshSettings],
                                                           rclient: redis.Redis) -> None:
    from mesh.ops.soak import push_raw, queued

    client = MeshClient(make_settings(shards=SHARDS), client=rclient)
    rid = push_raw(client, "executor", b"\xffnot a message")
    served = Shards.of(client.settings).keys  # what a worker consumes (ops/worker.py): shards 1..3
    assert [k.shard for k in served] == [1, 2, 3]
    assert sum(bool(rclient.hexists(k.messages("executor"), rid)) for k in served) == 1
    assert not rclient.exists(Keys(client.settings.namespace, 0).messages("executor"))  # none left unserved
    assert queued(client) == 1  # the soak's own count of what is left on the queues sees it


def test_console_bench_dead_letters_are_in_a_shard_the_console_reads(make_settings: Callable[..., MeshSettings],
                                                                     rclient: redis.Redis) -> None:
    from mesh.ops.web import bench, views

    client = MeshClient(make_settings(shards=SHARDS), client=rclient)
    job_id, _, entry_id = bench.fill(client, 3, 4)
    dlq = DeadLetterShards.of(rclient, client.settings)
    assert dlq.count() == 4  # what the console's DLQ pages read
    shown: Any = views.dlq_entry(client, entry_id)  # the page the bench measures as /dlq/ENTRY
    assert shown is not None and shown["entry"].entry_id == entry_id
    assert views.job(client, job_id) is not None


def test_bench_storage_compacts_the_jobs_of_every_shard(make_settings: Callable[..., MeshSettings],
                                                        rclient: redis.Redis, monkeypatch: Any) -> None:
    """``mesh bench``'s storage figures (ops/bench_kept.py): its jobs spread over the shards, so its compaction
    pass runs in each (Compaction built from the settings as each shard sees them, ``on_shard``), not in
    shard 0 only, where with MESH_SHARDS above 1 no job is: "compacted" would be "ended" again."""
    import contextlib

    from mesh.broker.keys import prefix
    from mesh.ops import bench, bench_kept
    from mesh.ops.bench import BenchConfig
    from tests.conftest import delete_keys

    passes: list[int] = []

    class Counted(bench_kept.Compaction):
        def run(self, now: float, budget_s: float | None = None) -> Any:
            passes.append(self.keys.shard)
            return super().run(now, budget_s)

    monkeypatch.setattr(bench_kept, "Compaction", Counted)
    monkeypatch.setattr(bench, "_workers", lambda *a, **k: contextlib.nullcontext([]))  # the jobs need not run
    monkeypatch.setattr(bench, "_succeeded", lambda *a, **k: [])
    monkeypatch.setattr(bench_kept, "_used", lambda client: 0)
    settings = make_settings(shards=SHARDS)
    try:
        bench_kept._measure(rclient, settings, BenchConfig(kept_jobs=10), lambda s: None)
    finally:
        for pattern in (*Keys("bench-kept").patterns, f"{prefix('bench-kept')}raw:*"):
            delete_keys(rclient, pattern)
    assert sorted(set(passes)) == [k.shard for k in Shards.of(settings).keys] == [1, 2, 3]
    assert len(passes) == 3 * SHARDS  # the warm-up's pass and one after each kind of job, in every shard
