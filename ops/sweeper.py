"""Retention sweeps: the mesh's own work, on their own schedule, in every worker process.

Each worker runs a daemon thread that, every MESH_SWEEP_INTERVAL_S, tries to take ``{ns}:sweep.lock``
(``SET NX PX interval``): the worker that gets it sweeps, the others skip, so the fleet runs one
sweep per interval whether or not anything fails. With several shards (MESH_SHARDS) each shard has
its own lock, sweep and counters (a worker runs a sweeper per shard it serves): one sweep per shard
per interval, ``sweeps`` counted in each shard's stats. A sweep compacts the jobs that ended since the last
one and keeps the newest MESH_JOB_RETENTION_COUNT of each agent or pipeline (broker/compact.py), tidies
the job and note indexes (broker/retention.py) and applies the DLQ retention (dlq/retention.py). It
enqueues nothing and is counted apart from workload: ``sweeps``, ``compacted_jobs``, ``swept_*`` and
``dlq_expired`` in ``{ns}:stats``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from typing import Any

import redis
from dramatiq.middleware import Middleware

from mesh.broker import trace
from mesh.broker.clock import server_ms
from mesh.broker.compact import Compaction
from mesh.broker.keys import Keys
from mesh.broker.retention import Retention
from mesh.broker.settings import MeshSettings
from mesh.dlq.audit import Audit
from mesh.dlq.retention import expire_dead_letters
from mesh.dlq.store import DeadLetterStore

logger = logging.getLogger(__name__)


class Sweeper(Middleware):
    """Starts the sweep thread when the worker boots and stops it when the worker shuts down."""

    def __init__(self, settings: MeshSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.namespace, settings.shard)
        self.owner = trace.worker_name()
        self.retention = Retention(client, settings)
        self.compaction = Compaction(client, settings)
        self.dlq = DeadLetterStore(client, self.keys)
        self.audit = Audit(client, self.keys, who=f"retention@{self.owner}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self._thread = threading.Thread(target=self._loop, name="mesh-retention-sweep", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except redis.RedisError as exc:
                logger.warning("retention sweep failed; trying again next interval", extra={"error": str(exc)})
            except Exception:  # a bug or a record of a shape no one foresaw: the thread must live on
                logger.exception("retention sweep failed; trying again next interval")
            self._stop.wait(self.settings.sweep_interval_s)

    def sweep(self) -> dict[str, int] | None:
        """Run this interval's sweep if no other worker has; None when one has."""
        interval_ms = max(1, int(self.settings.sweep_interval_s * 1000))
        if not self.client.set(self.keys.sweep_lock, self.owner, nx=True, px=interval_ms):
            return None
        now = server_ms(self.client) / 1000
        # before the age sweep, so a job it removes is tombstoned now; within half the interval, so the
        # next sweep (maybe another worker's) never starts while this one still compacts
        compacted = self.compaction.run(now, budget_s=self.settings.sweep_interval_s / 2)
        done = {f"swept_{name}": n for name, n in asdict(self.retention.sweep(now)).items()}
        done["compacted_jobs"], done["swept_count"] = compacted.jobs, compacted.count
        done["dlq_expired"] = expire_dead_letters(self.dlq, self.audit, self.settings.dlq_retention_s, now)
        self.client.hincrby(self.keys.stats, "sweeps", 1)
        if any(done.values()):
            logger.info("retention sweep", extra=done)
        return done
