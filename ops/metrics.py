"""Prometheus metrics, read from Redis at scrape time.

Workers keep their counters and the handler-duration histogram in Redis (broker/observe.py,
the settle and claim scripts), so every process on every host adds to the same figures and the
ops server reads them: the numbers are right with any number of worker processes, and workers
open no port. (prometheus-client's multiprocess mode would aggregate one host only, through a
shared directory; it is not needed.) Labels are limited to agent / queue, failure class, route,
reason, dependency and token direction.

With several shards (MESH_SHARDS), every figure of jobs (queue depths, counters, the DLQ, running
steps, approvals, waits) is each shard's added up, under the same names and labels as with one: a
dashboard reads the namespace whatever its shards.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from mesh.broker import MeshClient
from mesh.broker.breaker import Breakers
from mesh.broker.keys import Keys
from mesh.broker.observe import BUCKETS
from mesh.broker.shard_readers import (
    approval_counts,
    every,
    oldest_message_age,
    queue_depths,
    summed,
    summed_hash,
    zcard,
)
from mesh.dlq import DeadLetterShards

#: Counters the workers keep in ``{ns}:stats`` (broker/scripts/settle.lua and claim.lua, agents/runtime.py).
STATS = {
    "duplicates": "Deliveries of already-done keys, acked without running again.",
    "deferred_in_flight": "Duplicates of a key a live owner was running, deferred until it finishes.",
    "takeovers": "Claims taken over from an owner whose lease expired, with a higher fencing token.",
    "superseded": "Attempts whose key was taken over while they ran; their result not recorded, a copy waits.",
    "retried": "Failed attempts re-enqueued for a bounded retry.",
    "deferred": "Messages deferred by their failure class (rate limits, open breakers); no retry budget spent.",
    "deferred_flow": "Messages deferred waiting for a flow limit (mesh limits); no retry budget spent.",
    "dead_lettered": "Messages moved to the dead-letter queue after failing.",
    "poison": "Undecodable or invalid messages moved to the dead-letter queue.",
    "recovered": "Messages returned to their queue from a worker whose heartbeat stopped.",
    "reclaimed": "Messages a worker put back on its queue after a lost Redis connection.",
    "replayed": "Dead letters replayed onto their queues.",
    "dlq_drained": "Dead letters exported to a file and removed.",
    "dlq_purged": "Dead letters deleted by an operator.",
    "dlq_expired": "Dead letters removed by MESH_DLQ_RETENTION_S (each with an audit record).",
    "sweeps": "Retention sweeps run (one per MESH_SWEEP_INTERVAL_S across the fleet); the mesh's own work.",
    "swept_jobs": "Ended jobs whose record and trace expired (MESH_JOB_RETENTION_S), removed from the job index.",
    "compacted_jobs": "Ended jobs compacted by the sweep: trace moved into the record, defaults left out.",
    "swept_count": "Finished jobs removed because their agent or pipeline kept MESH_JOB_RETENTION_COUNT newer.",
    "swept_running": "Running-step index entries removed because their job record had expired.",
    "swept_notes": "Notes expired by MESH_NOTE_RETENTION_S, removed from the note index.",
    "approval_warnings": "Approvals whose warn_before was reached undecided (an approval_warning event each).",
    "approvals_approved": "Pipeline steps a person approved.",
    "approvals_denied": "Pipeline steps a person denied.",
    "approvals_expired": "Approvals nobody decided before their timeout (their on_timeout applied).",
    "waits_slept": "Pipeline steps whose sleep: ended on its timer.",
    "waits_event": "Pipeline steps a wait_for: event resumed (mesh signal, mesh emit, or one kept for it).",
    "waits_timeout": "Pipeline steps whose wait_for: timed out (their on_timeout applied).",
    "stuck": "Steps flagged stuck: holding their claim without progress for MESH_STUCK_AFTER_S.",
    # Verdicts reached on effectful tool calls (broker/ledger.py): how many effects were proven.
    "effects_verified": "Effectful calls whose verifier saw the effect.",
    "effects_unverified": "Effectful calls done by the tool's own word (no verifier, or no check for the call).",
    "effects_refuted": "Effectful calls the tool said were done and its verifier saw were not.",
    "effects_unknown": "Effectful calls whose effect could not be proven either way (their step is unknown).",
    "effects_failed": "Effectful calls that failed with nothing applied.",
    "effects_applied": "Unknown effects an operator settled as applied (mesh settle).",
    "effects_not_applied": "Unknown effects an operator settled as not applied (mesh settle).",
}

def _unwinding(stats: dict[str, str]) -> Iterator[CounterMetricFamily]:
    """Sagas and cancels (agents/pipelines/compensate.py), from the counters broker/observe.py keeps."""
    unwound = CounterMetricFamily("mesh_jobs_unwound", "Jobs that began undoing their effects, by cause: halted "
                                  "(a false gate, a denial), failed (dead-lettered under halt_pipeline), "
                                  "cancelled (mesh cancel).", labels=["cause"])
    for cause in ("halted", "failed", "cancelled"):
        unwound.add_metric([cause], float(stats.get(f"unwound:{cause}", 0)))
    yield unwound
    for name, doc in (("compensations_sent", "Compensations sent (each once, one at a time per job)."),
                      ("compensations_failed", "Compensations dead-lettered compensation_failed (their job unknown)."),
                      ("jobs_compensated", "Jobs whose every compensation ran (state compensated).")):
        counter = CounterMetricFamily(f"mesh_{name}", doc)
        counter.add_metric([], float(stats.get(name, 0)))
        yield counter


BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def _histogram_key(keys: Keys, agent: str) -> str:
    return keys.histogram(agent)


def _hash(client: MeshClient, key: Callable[[Keys], str]) -> dict[str, Any]:
    """The hash ``key(k)`` of every shard, added up (numbers)."""
    return summed_hash(client.redis, every(client.settings), key)


class MeshCollector(Collector):
    def __init__(self, client: MeshClient) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        yield from self._queues()
        yield from self._outcomes()
        yield from self._tokens()
        yield from self._routes()
        yield from self._histogram()
        yield from self._breakers()
        yield from self._limits()
        yield from self._dlq()
        yield from self._running()
        yield from self._approvals()
        yield self._waits()
        yield from self._agents()
        yield self._unknown_effects()
        stats = _hash(self.client, lambda k: k.stats)
        yield from _unwinding(stats)
        for name, doc in STATS.items():
            counter = CounterMetricFamily(f"mesh_{name}", doc)
            counter.add_metric([], float(stats.get(name, 0)))
            yield counter

    def _unknown_effects(self) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily("mesh_unknown_effects", "Effects nobody has proven now (their steps are unknown "
                                  "until mesh verify or mesh settle decides them).")
        gauge.add_metric([], float(zcard(self.client.redis, every(self.client.settings), lambda k: k.effects_unknown)))
        return gauge

    def _queues(self) -> Iterator[GaugeMetricFamily]:
        depth = {name: GaugeMetricFamily(f"mesh_queue_{name}", f"Messages {name.replace('_', ' ')}, per queue.",
                                         labels=["queue"]) for name in ("ready", "delayed", "in_flight")}
        age = GaugeMetricFamily("mesh_queue_oldest_age_seconds", "Age of the oldest ready message, per queue.",
                                labels=["queue"])
        by_priority = GaugeMetricFamily("mesh_queue_ready_by_priority", "Messages ready, per queue and priority "
                                        "(high, normal, low).", labels=["queue", "priority"])
        flows = GaugeMetricFamily("mesh_queue_flows", "Flow keys (tenants) with messages ready, per queue.",
                                  labels=["queue"])
        keys = every(self.client.settings)
        for queue, values in queue_depths(self.client, lanes=True).items():
            for name, family in depth.items():
                family.add_metric([queue], values[name])
            for priority, n in values["by_priority"].items():
                by_priority.add_metric([queue, priority], n)
            flows.add_metric([queue], values["flows"])
            age.add_metric([queue], oldest_message_age(self.client.redis, keys, queue, time.time()))
        yield from depth.values()
        yield by_priority
        yield flows
        yield age

    def _outcomes(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("mesh_messages", "Messages processed, by agent and outcome (succeeded, "
                                     "duplicate, retried, deferred, dead_lettered, poison, ...).",
                                     labels=["agent", "outcome"])
        for field, n in sorted(_hash(self.client, lambda k: k.outcomes).items()):
            agent, _, outcome = field.rpartition(":")
            family.add_metric([agent, outcome], float(n))
        yield family

    def _tokens(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("mesh_model_tokens", "Model tokens spent, by agent and direction (in: the "
                                     "prompt, out: the completion).", labels=["agent", "direction"])
        for field, n in sorted(_hash(self.client, lambda k: k.tokens).items()):
            agent, _, direction = field.rpartition(":")
            family.add_metric([agent, direction], float(n))
        yield family

    def _routes(self) -> Iterator[CounterMetricFamily]:
        failures = CounterMetricFamily("mesh_failures", "Failed attempts, by failure class and route.",
                                       labels=["failure_class", "route"])
        deferrals = CounterMetricFamily("mesh_deferrals", "Deferred messages, by reason (the failure class, "
                                        "duplicate: waiting for a key's owner, or flow: waiting for a flow "
                                        "limit).", labels=["reason"])
        for field, n in sorted(_hash(self.client, lambda k: k.routes).items()):
            failure_class, _, route = field.partition(":")
            if route == "defer":
                deferrals.add_metric([failure_class], float(n))
            if failure_class not in ("duplicate", "flow"):  # waits, not failures
                failures.add_metric([failure_class, route], float(n))
        yield failures
        yield deferrals

    def _histogram(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily("mesh_handler_duration_seconds",
                                       "How long handlers ran, per agent (successes and failures).",
                                       labels=["agent"])
        for agent in self.client.known_agents():  # built-in, the app's and published ones
            h = _hash(self.client, functools.partial(_histogram_key, agent=agent))
            if not h:
                continue
            running, buckets = 0, []
            for bound in [*map(repr, BUCKETS), "+Inf"]:
                running += int(h.get(bound, 0))
                buckets.append((bound, float(running)))
            family.add_metric([agent], buckets, float(h.get("sum", 0)))
        yield family

    def _breakers(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily("mesh_breaker_state", "Circuit breaker per dependency: 0 closed, 1 half open, "
                                  "2 open.", labels=["dependency"])
        trips = CounterMetricFamily("mesh_breaker_trips", "Times a dependency's breaker opened.",
                                    labels=["dependency"])
        for b in Breakers(self.client.settings, self.client.redis).list():
            state.add_metric([b.name], BREAKER_STATES.get(b.state, 0))
            trips.add_metric([b.name], b.trips)
        yield state
        yield trips

    def _limits(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Each flow limit, its keys summed (a key is an input's value: never a label)."""
        from mesh.broker.limits import limit_states

        in_use = GaugeMetricFamily("mesh_limit_in_use", "Concurrency slots held per flow limit (its recent keys "
                                   "summed).", labels=["limit"])
        waiting = GaugeMetricFamily("mesh_limit_waiting", "Messages waiting for a concurrency slot per flow limit.",
                                    labels=["limit"])
        factor = GaugeMetricFamily("mesh_limit_rate_factor", "What 429s left of a flow limit's rate (1: all of it; "
                                   "the lowest of its keys).", labels=["limit"])
        rejected = CounterMetricFamily("mesh_limit_rejected", "429s answered to calls a flow limit governs (its "
                                       "dependency's, or a model endpoint's for an agent's rate).", labels=["limit"])
        totals: dict[str, list[float]] = {}
        for s in limit_states(self.client.redis, self.client.keys):
            t = totals.setdefault(s.name, [0, 0, 1.0, 0])
            t[0] += s.in_flight
            t[1] += s.waiting
            t[2] = min(t[2], s.factor)
            t[3] += s.rejected
        for name, (held, waits, lowest, n) in totals.items():
            in_use.add_metric([name], held)
            waiting.add_metric([name], waits)
            factor.add_metric([name], lowest)
            rejected.add_metric([name], n)
        yield from (in_use, waiting, factor, rejected)

    def _dlq(self) -> Iterator[GaugeMetricFamily]:
        stats = DeadLetterShards.of(self.client.redis, self.client.settings).stats()
        size = GaugeMetricFamily("mesh_dlq_size", "Entries in the dead-letter queue.")
        size.add_metric([], stats["total"])
        by_agent = GaugeMetricFamily("mesh_dlq_entries_by_agent", "Dead letters per agent.", labels=["agent"])
        for agent, n in stats["by_agent"].items():
            by_agent.add_metric([agent], n)
        by_class = GaugeMetricFamily("mesh_dlq_entries_by_class", "Dead letters per failure class.",
                                     labels=["failure_class"])
        for failure_class, n in stats["by_class"].items():
            by_class.add_metric([failure_class], n)
        yield size
        yield by_agent
        yield by_class

    def _agents(self) -> Iterator[GaugeMetricFamily]:
        workers = GaugeMetricFamily("mesh_agent_workers", "Workers serving each published agent whose heartbeat "
                                    "is recent (MESH_HEARTBEAT_TIMEOUT_S).", labels=["agent"])
        for listing in self.client.registry.listing():
            workers.add_metric([listing.agent.name], sum(w.alive for w in listing.workers))
        yield workers

    def _approvals(self) -> Iterator[GaugeMetricFamily]:
        waiting, oldest = approval_counts(self.client.redis, every(self.client.settings))  # the server's clock
        pending = GaugeMetricFamily("mesh_approvals_pending", "Pipeline steps waiting for a person's approval.")
        pending.add_metric([], waiting)
        age = GaugeMetricFamily("mesh_approval_oldest_age_seconds", "How long the oldest waiting approval has "
                                "waited (0 when none waits).")
        age.add_metric([], oldest)
        yield pending
        yield age

    def _waits(self) -> GaugeMetricFamily:
        waiting = GaugeMetricFamily("mesh_waits_pending", "Pipeline steps waiting durably (sleep:, wait_for:).")
        waiting.add_metric([], zcard(self.client.redis, every(self.client.settings), lambda k: k.waits))
        return waiting

    def _running(self) -> Iterator[GaugeMetricFamily]:
        keys, now = every(self.client.settings), self.client.clock.now_s()  # progress is on the server's clock
        stuck_after = self.client.settings.stuck_after_s
        running = GaugeMetricFamily("mesh_steps_running", "Steps running now.")
        running.add_metric([], zcard(self.client.redis, keys, lambda k: k.running))
        stuck = GaugeMetricFamily("mesh_steps_stuck", "Running steps with no progress for MESH_STUCK_AFTER_S.")
        stuck.add_metric([], summed(self.client.redis, keys,
                                    lambda c, k: c.zcount(k.running, "-inf", now - stuck_after)))
        yield running
        yield stuck
