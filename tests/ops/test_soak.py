"""``mesh soak --json`` runs a short soak end to end: mixed traffic, a worker SIGKILLed and replaced,
every job ended and every poison message in the DLQ (nothing lost), memory sampled, namespace gone."""

from __future__ import annotations

import json

import pytest
import redis

pytestmark = pytest.mark.slow  # every test here starts a worker or a redis-server


def test_a_short_soak_with_a_killed_worker_loses_nothing_reports_memory_and_cleans_up(cli, settings, redis_url):
    res = cli("soak", "--seconds", "15", "--interval", "5", "--kill-every", "6", "--rate", "4", "--json",
              timeout=420)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert {"config", "duration_s", "sent", "jobs", "dead_letters", "poison_dead_lettered", "lost", "not_ended",
            "workers", "worker_rss_mb", "redis_used_memory_mb", "namespace_memory_mb", "samples"} <= set(out)
    assert out["lost"] == 0 and out["not_ended"] == []
    assert out["sent"]["jobs"] > 0 and out["jobs"]["succeeded"] > 0
    assert out["poison_dead_lettered"] == out["sent"]["poison"]
    assert sum(out["jobs"]["by_state"].values()) == out["sent"]["jobs"]
    assert out["workers"]["killed"] >= 1 and out["workers"]["started"] == 2 + out["workers"]["killed"]
    assert len(out["samples"]) >= 3 and all(len(s["rss_mb"]) == 2 for s in out["samples"])
    for figure in ("worker_rss_mb", "redis_used_memory_mb", "namespace_memory_mb"):
        assert out[figure]["max"] > 0 and out[figure]["max"] >= out[figure]["end"]
    assert "worker RSS" in res.stderr  # the sample table, on stderr with --json
    assert all(len(line) <= 80 for line in res.stderr.splitlines() if "worker RSS" in line)
    client = redis.Redis.from_url(redis_url)
    assert not list(client.scan_iter(match=f"{settings.namespace}-soak-*", count=1000))
