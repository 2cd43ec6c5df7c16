"""``mesh bench`` runs end to end with a small N and reports every figure (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import redis

from mesh.ops.bench import BENCH_APP, Echo, bench_echo

SMALL = ("--messages", "60", "--pairs", "1", "--latency-samples", "3", "--dlq-entries", "100")


def positive(*values: float) -> bool:
    return all(isinstance(v, int | float) and v > 0 for v in values)


@pytest.mark.slow
def test_bench_json_reports_every_figure_at_each_prefetch_with_positive_counts_and_cleans_up(cli, redis_url):
    res = cli("bench", *SMALL, "--prefetch", "2,0", "--threads", "2", "--json", timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert set(out) == {"config", "throughput", "step", "enqueue", "pickup_latency", "dlq", "duplicates"}
    assert out["config"]["prefetch"] == [2, 4]  # 0: 2 x threads
    assert [t["prefetch"] for t in out["throughput"]] == [s["prefetch"] for s in out["step"]] == [2, 4]
    for t in out["throughput"]:
        assert positive(t["mesh_msg_s"], t["raw_msg_s"], t["ratio"]) and len(t["pairs"]) == 1
        c = t["redis_commands_per_message"]
        assert positive(c["mesh"], c["raw"]) and c["mesh_by_command"]["evalsha"] > 0
        for cpu in (t["worker_cpu_us_per_message"], t["redis_cpu_us_per_message"]):
            assert positive(cpu["mesh"], cpu["raw"], cpu["ratio"])
    for s in out["step"]:
        assert s["steps"] == 60
        assert positive(s["steps_s"], s["worker_cpu_us_per_step"], s["redis_cpu_us_per_step"],
                        s["redis_commands_per_step"])
        assert s["by_command"]["evalsha"] > 0
    assert positive(out["enqueue"]["send_many_msg_s"], out["enqueue"]["send_loop_msg_s"], out["enqueue"]["ratio"])
    for side in ("mesh", "raw"):
        assert out["pickup_latency"][side]["samples"] == 3 and out["pickup_latency"][side]["p50_ms"] > 0
    d = out["dlq"]
    assert d["entries"] == 100 and positive(d["replay_entries_s"], d["drain_entries_s"])
    assert positive(d["drain_peak_traced_mb"], d["drain_file_mb"], out["duplicates"]["msg_s"])
    client = redis.Redis.from_url(redis_url)
    assert not list(client.scan_iter(match="bench-*", count=1000))  # the throw-away namespace is gone


@pytest.mark.slow
def test_bench_table_fits_80_columns_on_a_wide_terminal_with_a_group_per_prefetch(cli):
    res = cli("bench", *SMALL, "--prefetch", "4", timeout=240, COLUMNS="200")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, res.stdout
    for label in ("prefetch 4", "no-op throughput", "worker CPU (µs/msg)", "Redis CPU (µs/msg)",
                  "real step, echo agent", "worker CPU (µs/step)", "Redis CPU (µs/step)", "send_many vs send()"):
        assert any(label in line for line in lines), label


@pytest.mark.slow
def test_a_bad_prefetch_list_is_refused_before_anything_runs(cli):
    res = cli("bench", "--prefetch", "8,x")
    assert res.returncode == 2 and "--prefetch" in res.stderr


def test_the_step_agent_is_declared_with_the_public_app_api_and_echoes_its_input():
    spec = BENCH_APP.agents["bench_echo"]
    assert (spec.input, spec.output) == (Echo, Echo)
    assert bench_echo(None, Echo(text="hi")) == Echo(text="hi")  # type: ignore[arg-type]
