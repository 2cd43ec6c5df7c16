"""``--priority`` on ``mesh send``, ``run`` and ``submit``, and ``mesh queues --lanes``."""

from __future__ import annotations

import json

from conftest import flat

NOTE = {"tool": "note", "args": {"title": "hello"}}


def test_send_with_priority_high_waits_in_the_high_lane_and_queues_lanes_counts_it(cli, client):
    res = cli("send", "executor", "--payload", json.dumps(NOTE), "--priority", "high", "--json")
    assert res.returncode == 0, res.stderr
    assert client.redis.llen(client.keys.lane("executor", "high")) == 1
    assert client.redis.llen(client.keys.queue("executor")) == 0
    depths = json.loads(cli("queues", "--lanes", "--json").stdout)
    assert depths["executor"] == {"ready": 1, "delayed": 0, "in_flight": 0, "flows": 0,
                                  "by_priority": {"high": 1, "normal": 0, "low": 0}}
    table = cli("queues", "--lanes", COLUMNS="80").stdout.splitlines()
    row = next(line for line in table if line.startswith("┃"))
    assert [c.strip() for c in row.strip("┃").split("┃")] == ["queue", "ready", "delayed", "in flight", "high",
                                                             "normal", "low", "flows"]
    assert max(map(len, table)) <= 80


def test_submit_and_run_with_priority_low_record_it_on_the_job_and_its_messages(cli, client):
    res = cli("submit", "write a note", "--priority", "low", "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)["job_id"]
    assert client.status(job).priority == "low"
    assert client.redis.llen(client.keys.lane("planner", "low")) == 1


def test_an_unknown_priority_exits_2_naming_the_levels_and_sends_nothing(cli, client):
    for args in (("send", "executor", "--payload", json.dumps(NOTE)), ("submit", "a goal")):
        res = cli(*args, "--priority", "urgent")
        assert res.returncode == 2, res.stderr
        assert "give high, normal or low" in flat(res.stderr)
    assert client.redis.zcard(client.keys.jobs) == 0


def test_metrics_count_ready_messages_per_priority(client):
    import httpx
    from conftest import ops_server
    from prometheus_client.parser import text_string_to_metric_families

    client.send_many("executor", [(NOTE, None) for _ in range(2)], priority="low")
    with ops_server(client) as base:
        text = httpx.get(f"{base}/metrics", timeout=10).text
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("mesh_queue_ready_by_priority", frozenset({("queue", "executor"), ("priority", "low")}))] == 2
    assert samples[("mesh_queue_ready_by_priority", frozenset({("queue", "executor"), ("priority", "high")}))] == 0
    assert samples[("mesh_queue_ready", frozenset({("queue", "executor")}))] == 2
    assert samples[("mesh_queue_flows", frozenset({("queue", "executor")}))] == 0
