"""Metrics read from Redis at scrape time, so they are right whichever process did the work."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from broker import MeshClient

#: Counters the workers keep in ``{ns}:stats`` (broker/scripts/settle.lua and claim.lua, agents/runtime.py).
STATS = {
    "duplicates": "Deliveries of already-done keys, acked without running again.",
    "deferred_in_flight": "Duplicates of a key a live owner was running, deferred until it finishes.",
    "takeovers": "Claims taken over from an owner whose lease expired, with a higher fencing token.",
    "superseded": "Attempts whose key was taken over while they ran; their result not recorded, a copy waits.",
    "retried": "Failed attempts re-enqueued for a bounded retry.",
    "deferred": "Messages deferred by their failure class (rate limits, open breakers); no retry budget spent.",
    "dead_lettered": "Messages moved to the dead-letter queue after failing.",
    "poison": "Undecodable or invalid messages moved to the dead-letter queue.",
    "recovered": "Messages returned to their queue from a worker whose heartbeat stopped.",
    "reclaimed": "Messages a worker put back on its queue after a lost Redis connection.",
    "replayed": "Dead letters replayed onto their queues.",
    "dlq_drained": "Dead letters exported to a file and removed.",
    "dlq_purged": "Dead letters deleted by an operator.",
    "dlq_expired": "Dead letters removed by MESH_DLQ_RETENTION_S.",
}


class MeshCollector(Collector):
    def __init__(self, client: MeshClient) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = {name: GaugeMetricFamily(f"mesh_queue_{name}", f"Messages {name.replace('_', ' ')}, per queue.",
                                         labels=["queue"]) for name in ("ready", "delayed", "in_flight")}
        for queue, values in self.client.queues().items():
            for name, family in depth.items():
                family.add_metric([queue], values[name])
        yield from depth.values()
        dlq = GaugeMetricFamily("mesh_dlq_size", "Entries in the dead-letter queue.")
        dlq.add_metric([], self.client.redis.zcard(self.client.keys.dlq))
        yield dlq
        stats = self.client.redis.hgetall(self.client.keys.stats)
        for name, doc in STATS.items():
            counter = CounterMetricFamily(f"mesh_{name}", doc)
            counter.add_metric([], float(stats.get(name.encode(), 0)))
            yield counter
