"""Counters and the handler-duration histogram, kept in Redis so that every worker process on every
host adds to the same figures and the ops server reads them at scrape time (no per-process
registry, no port per worker). Everything here is staged into a pipeline or MULTI the caller
already sends."""

from __future__ import annotations

import bisect
from typing import Any

from .keys import Keys

#: Upper bounds (s) of the handler-duration histogram's buckets; the last bucket is +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def bucket_of(seconds: float) -> str:
    i = bisect.bisect_left(BUCKETS, seconds)
    return "+Inf" if i == len(BUCKETS) else repr(BUCKETS[i])


def observe_duration(pipe: Any, keys: Keys, agent: str, seconds: float) -> None:
    """Count one handler run of ``seconds`` in its bucket and add it to the sum: two commands. The
    count of runs is the buckets' total (the metrics reader's cumulative ``+Inf``), not a field of its own."""
    key = keys.histogram(agent)
    pipe.hincrby(key, bucket_of(seconds), 1)
    pipe.hincrbyfloat(key, "sum", seconds)


#: ``{ns}:stats`` fields a job's control counts (ops/metrics.py), from the trace events written with it.
UNWIND_STATS = ("unwound:halted", "unwound:failed", "unwound:cancelled", "compensations_sent",
                "compensations_failed", "jobs_compensated")


def unwind_counts(events: Any) -> list[str]:
    """The ``{ns}:stats`` fields the trace events of one job write add 1 to: a job that began undoing
    its effects, by cause (``compensating``, ``cancelled``); a compensation sent; one dead-lettered
    (``compensation_failed``); a job whose compensations all ran (``compensated``)."""
    out = []
    for ev in events:
        kind, step = ev.get("event"), str(ev.get("step_id") or "")
        if kind == "compensating":
            out.append(f"unwound:{ev.get('cause')}")
        elif kind == "cancelled" and not ev.get("step_id"):
            out.append("unwound:cancelled")
        elif kind == "compensation_sent":
            out.append("compensations_sent")
        elif kind == "compensation_failed" or (kind == "dead_lettered" and step.startswith("undo:")):
            out.append("compensations_failed")
        elif kind == "compensated":
            out.append("jobs_compensated")
    return out


def count_outcome(pipe: Any, keys: Keys, agent: str, outcome: str) -> None:
    pipe.hincrby(keys.outcomes, f"{agent}:{outcome}", 1)


def running_member(job_id: str, step_id: str) -> str:
    return f"{job_id}/{step_id}"
