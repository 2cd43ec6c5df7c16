"""``mesh bench --json`` runs end to end with a small N and reports every figure (no timing asserts)."""

from __future__ import annotations

import json

import redis


def test_bench_json_reports_every_figure_with_positive_counts_and_cleans_up(cli, redis_url):
    res = cli("bench", "--messages", "200", "--pairs", "1", "--latency-samples", "3", "--dlq-entries", "100",
              "--json", timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert set(out) == {"config", "throughput", "redis_commands_per_message", "enqueue", "pickup_latency", "dlq",
                        "duplicates"}
    t = out["throughput"]
    assert t["mesh_msg_s"] > 0 and t["raw_msg_s"] > 0 and t["ratio"] > 0 and len(t["pairs"]) == 1
    c = out["redis_commands_per_message"]
    assert c["mesh"] > 0 and c["raw"] > 0 and c["mesh_by_command"]["evalsha"] > 0
    assert out["enqueue"]["send_many_msg_s"] > 0 and out["enqueue"]["send_loop_msg_s"] > 0
    for side in ("mesh", "raw"):
        assert out["pickup_latency"][side]["samples"] == 3 and out["pickup_latency"][side]["p50_ms"] > 0
    d = out["dlq"]
    assert d["entries"] == 100 and d["replay_entries_s"] > 0 and d["drain_entries_s"] > 0
    assert d["drain_peak_traced_mb"] > 0 and d["drain_file_mb"] > 0
    assert out["duplicates"]["msg_s"] > 0
    client = redis.Redis.from_url(redis_url)
    assert not list(client.scan_iter(match="bench-*", count=1000))  # the throw-away namespace is gone
