"""``mesh bench``'s storage figures: what a finished job keeps in Redis until its retention ends.

Measured on a private redis-server started for the run (a shared Redis's ``used_memory`` moves with
every other client): ``kept_jobs`` one-step jobs of the bench's echo agent, then half as many two-step
pipelines (``bench_pair``), each run to the end by worker processes as ``mesh worker`` runs them;
``used_memory`` growth over them once they ended, and again once the sweep's compaction ran
(broker/compact.py): per job for one-step jobs, per step for pipelines. What the defaults keep in
the steady state follows: bytes per job x 10 jobs/s x MESH_JOB_RETENTION_S (claims live as long,
MESH_DEDUP_TTL_S, and are part of the figure).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from mesh.broker.clock import server_ms
from mesh.broker.compact import Compaction
from mesh.broker.connection import connect
from mesh.broker.settings import MeshSettings
from mesh.broker.shards import Shards
from mesh.ops.local_redis import PrivateRedis, redis_binary

#: The rate the steady state is given for.
RATE_JOBS_S = 10


def kept(cfg: Any, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The storage figures (``{"skipped": why}`` when no redis-server binary is at hand)."""
    binary = redis_binary()
    if binary is None:
        return {"skipped": "no redis-server binary to start a private Redis with"}
    folder = Path(tempfile.mkdtemp(prefix="mesh-bench-redis-"))
    server = PrivateRedis(binary, folder=folder)
    try:
        # no sweep during the run (the first one, at boot, takes the lock for the hour): compaction
        # runs when the figures say so
        base = MeshSettings(redis_url=server.url, sweep_interval_s=3600.0)
        client = connect(base)
        try:
            return _measure(client, base, cfg, progress)
        finally:
            client.close()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _measure(client: redis.Redis, base: MeshSettings, cfg: Any, progress: Callable[[str], None]) -> dict[str, Any]:
    from mesh.broker import MeshClient
    from mesh.ops.bench import BENCH_APP, PAIR, STEP_AGENT, _succeeded, _workers, job_keys

    ns, n = "bench-kept", cfg.kept_jobs
    settings = base.model_copy(update={"namespace": ns})
    mesh = MeshClient(settings, client=client, app=BENCH_APP)
    compact = compactor(client, settings)

    def one_step(run: str, count: int) -> list[str]:
        refs = mesh.send_many(STEP_AGENT, [({"text": f"kept {i}"}, f"kept-{run}-{i}") for i in range(count)])
        return job_keys(mesh, [r.id for r in refs])

    def pipelines(run: str, count: int) -> list[str]:
        return job_keys(mesh, [mesh.run(PAIR, {"text": f"kept {i}"}, key=f"kept-pair-{run}-{i}").id
                               for i in range(count)])

    out: dict[str, Any] = {"jobs": n, "redis_version": client.info("server")["redis_version"]}
    with _workers("step", settings, ns, cfg, cfg.prefetches[0]):
        # the keys every deployment has (counters, histograms, the registry, the indexes) come first
        _succeeded(client, one_step("warm", 1) + pipelines("warm", 1))
        compact()
        for kind, send, count, steps in (("job", one_step, n, 1), ("pipeline", pipelines, max(1, n // 2), 2)):
            progress(f"storage: {count:,} {'one-step jobs' if kind == 'job' else 'two-step pipelines'}")
            before = _used(client)
            _succeeded(client, send(kind, count))
            ended = _used(client)
            compact()
            compacted = _used(client)
            out[kind] = {"jobs": count, "steps": count * steps,
                         "ended_bytes_per_step": (ended - before) / (count * steps),
                         "kept_bytes_per_step": (compacted - before) / (count * steps)}
    per_job = out["job"]["kept_bytes_per_step"]
    out["steady_state"] = {"rate_jobs_s": RATE_JOBS_S, "retention_s": settings.job_retention_s,
                           "gb": per_job * RATE_JOBS_S * settings.job_retention_s / 1e9,
                           "gb_uncompacted": out["job"]["ended_bytes_per_step"] * RATE_JOBS_S
                           * settings.job_retention_s / 1e9}
    return out


def compactor(client: redis.Redis, settings: MeshSettings) -> Callable[[], int]:
    """A pass of compaction over every shard of ``settings``' namespace, as the workers' sweeps run it (one
    a shard, ``settings.on_shard``: with several shards (MESH_SHARDS) a Compaction of ``settings`` alone
    would read shard 0's queue only); each call compacts what the queues hold and says how many jobs."""
    shards = Shards.of(settings)
    compactions = [Compaction(client, settings.on_shard(keys.shard) if shards.many else settings)
                   for keys in shards.keys]

    def compact() -> int:
        now = _now(client)
        return sum(compaction.run(now).jobs for compaction in compactions)

    return compact


def _used(client: redis.Redis) -> int:
    client.execute_command("MEMORY PURGE")
    info: Any = client.info("memory")
    return int(info["used_memory"])


def _now(client: redis.Redis) -> float:
    return server_ms(client) / 1000
