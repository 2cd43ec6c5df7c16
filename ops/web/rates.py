"""Throughput and failure rates over the last hour, from the counters the workers already keep.

The workers count outcomes per agent (``{ns}:outcomes``) and failed attempts per class and route
(``{ns}:routes``); nothing records when. The server samples both counters once a minute (two
HGETALLs) into memory, from the first time the overview is shown; a rate is the difference between
two samples over the time between them (the Redis server's clock). No write on the workers' path,
nothing kept in Redis: a restarted server starts its hour again.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis

from mesh.broker import MeshClient

logger = logging.getLogger(__name__)

#: Seconds between samples.
INTERVAL_S = 60.0

#: Samples kept: an hour of them, and the one before.
KEEP = 61


@dataclass(frozen=True)
class Sample:
    at: float
    outcomes: dict[str, int]  # "agent:outcome" -> count
    failures: dict[str, int]  # failure class -> failed attempts


def read(client: MeshClient) -> Sample:
    """The counters now (every shard's, added up)."""
    from mesh.broker.shard_readers import every, summed_hash

    shards = every(client.settings)
    if len(shards) == 1:
        pipe = client.redis.pipeline(transaction=False)
        pipe.hgetall(client.keys.outcomes)
        pipe.hgetall(client.keys.routes)
        found = pipe.execute()
        outcomes = {k.decode(): int(v) for k, v in found[0].items()}
        routes = {k.decode(): int(v) for k, v in found[1].items()}
    else:
        outcomes = summed_hash(client.redis, shards, lambda k: k.outcomes)
        routes = summed_hash(client.redis, shards, lambda k: k.routes)
    failures: dict[str, int] = {}
    for field, n in routes.items():
        failure_class = field.partition(":")[0]
        if failure_class != "duplicate":
            failures[failure_class] = failures.get(failure_class, 0) + int(n)
    return Sample(client.clock.now_s(), outcomes, failures)


class Rates:
    """The samples of one server, taken by a thread of its own once started."""

    def __init__(self, client: MeshClient, interval_s: float = INTERVAL_S) -> None:
        self.client = client
        self.interval_s = interval_s
        self.samples: deque[Sample] = deque(maxlen=KEEP)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        with self.lock:
            if self.thread is None and not self.stopped.is_set():
                self.thread = threading.Thread(target=self._run, name="console-rates", daemon=True)
                self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(5)

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                sample = read(self.client)
            except redis.RedisError as exc:
                logger.warning("console rates: redis unavailable", extra={"error": str(exc)})
            else:
                with self.lock:
                    self.samples.append(sample)
            self.stopped.wait(self.interval_s)

    def view(self, now: Sample) -> dict[str, Any]:
        """Rates per minute between the oldest sample kept and ``now``; the per-interval series of
        messages done and failed attempts, for a chart."""
        with self.lock:
            samples = [*self.samples, now]
        first = samples[0]
        span_s = now.at - first.at
        if span_s < 1:
            return {"span_min": 0.0, "outcomes": {}, "failures": {}, "done": [], "failed": []}
        per_min = 60.0 / span_s
        outcomes: dict[str, dict[str, float]] = {}
        for field, n in now.outcomes.items():
            delta = n - first.outcomes.get(field, 0)
            if delta > 0:
                agent, _, outcome = field.rpartition(":")
                outcomes.setdefault(agent, {})[outcome] = round(delta * per_min, 2)
        failures = {k: round((n - first.failures.get(k, 0)) * per_min, 2) for k, n in sorted(now.failures.items())
                    if n > first.failures.get(k, 0)}
        done = [max(0, sum(b.outcomes.values()) - sum(a.outcomes.values())) for a, b in itertools.pairwise(samples)]
        failed = [max(0, sum(b.failures.values()) - sum(a.failures.values())) for a, b in itertools.pairwise(samples)]
        return {"span_min": round(span_s / 60, 1), "outcomes": outcomes, "failures": failures,
                "done": done, "failed": failed, "chart": chart(done, failed)}


def chart(done: list[int], failed: list[int], width: int = 360, height: int = 60) -> dict[str, Any]:
    """Two polylines (points as ``x,y`` strings) of the series on one scale, for an inline SVG."""
    top = max([*done, *failed, 1])
    n = max(len(done), 2)

    def points(series: list[int]) -> str:
        step = width / (n - 1)
        return " ".join(f"{i * step:.1f},{height - v / top * (height - 4) - 2:.1f}" for i, v in enumerate(series))

    return {"width": width, "height": height, "top": top, "done": points(done), "failed": points(failed)}
