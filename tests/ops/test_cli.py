"""The ``mesh`` CLI against real Redis (each test in its own namespace): in-process through the
entry point's code (the ``cli`` fixture), or as a real process where the test says so."""

from __future__ import annotations

import json

import pytest
from conftest import flat, wait_for

from mesh.broker import job_id_for
from mesh.contracts import State

AGENTS = ("planner", "researcher", "executor")
NOTE = {"tool": "note", "args": {"title": "hello"}}


def jobs_indexed(client) -> int:
    """How many jobs the jobs indexes of the namespace's shards hold (MESH_SHARDS: each job in its own)."""
    return sum(client.redis.zcard(keys.jobs) for keys in client.shards.keys)


def assert_nothing_enqueued(client) -> None:
    assert all(d == {"ready": 0, "delayed": 0, "in_flight": 0} for d in client.queues().values())
    assert jobs_indexed(client) == 0
    for keys in {client.keys, *client.shards.keys}:  # no job record in any shard (nor in shard 0)
        assert list(client.redis.scan_iter(match=keys.job("*"))) == []


def test_submit_wait_json_runs_the_whole_pipeline_to_success(cli, worker_process):
    worker_process()
    res = cli("submit", "Find out how retries work, then write a note", "--wait", "--json",
              "--timeout", "60", timeout=90)
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    assert record["state"] == "succeeded"
    agents = {step["agent"] for step in record["steps"].values()}
    assert agents == set(AGENTS)
    assert all(step["state"] == "succeeded" for step in record["steps"].values())


@pytest.mark.parametrize(("payload", "named"), [
    ('{"tool": "note", "args": {"titel": "x"}}', ("args.title", "args.titel")),
    ('{"tool": "no_such_tool", "args": {}}', ("unknown tool 'no_such_tool'",)),
    ('{"tool": "note", ', ("--payload is not JSON",)),
], ids=["misspelled-arg", "unknown-tool", "not-json"])
def test_send_invalid_payload_exits_2_names_the_problem_and_enqueues_nothing(cli, client, payload, named):
    res = cli("send", "executor", "--payload", payload)
    assert res.returncode == 2, res.stderr
    for text in named:
        assert text in flat(res.stderr)
    assert res.stdout == ""
    assert_nothing_enqueued(client)


def test_send_file_with_three_valid_lines_enqueues_three(cli, client, tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"key": f"bulk-{i}", "payload": {"tool": "note", "args": {"title": f"n{i}"}}})
                            + "\n" for i in range(3)))
    res = cli("send", "executor", "--file", str(path), "--json")
    assert res.returncode == 0, res.stderr
    assert [r["key"] for r in json.loads(res.stdout)] == ["bulk-0", "bulk-1", "bulk-2"]
    depths = json.loads(cli("queues", "--json").stdout)
    assert depths["executor"] == {"ready": 3, "delayed": 0, "in_flight": 0}
    assert jobs_indexed(client) == 3


def test_send_file_with_invalid_second_line_enqueues_nothing_and_names_the_item(cli, client, tmp_path):
    path = tmp_path / "notes.jsonl"
    lines = [{"payload": NOTE}, {"payload": {"tool": "note", "args": {"titel": "x"}}}, {"payload": NOTE}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    res = cli("send", "executor", "--file", str(path))
    assert res.returncode == 2
    message = flat(res.stderr)
    assert f"{path}:2" in message and "args.title" in message and "nothing was sent" in message
    assert_nothing_enqueued(client)


def test_send_file_with_a_line_that_is_not_json_names_the_line_and_enqueues_nothing(cli, client, tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps({"payload": NOTE}) + "\n{oops\n")
    res = cli("send", "executor", "--file", str(path))
    assert res.returncode == 2
    assert f"{path}:2 is not JSON" in flat(res.stderr)
    assert_nothing_enqueued(client)


def test_sent_job_is_queued_with_its_key_then_a_worker_makes_it_succeed(cli, client, worker_process):
    res = cli("send", "executor", "--key", "cli-key-1", "--payload", json.dumps(NOTE), "--json")
    assert res.returncode == 0, res.stderr
    [ref] = json.loads(res.stdout)
    assert ref["key"] == "cli-key-1"

    shown = cli("status", ref["job_id"], "--json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (record["job_id"], record["key"], record["state"]) == (ref["job_id"], "cli-key-1", "queued")
    assert record["steps"]["executor"]["state"] == "queued"

    worker_process("--agents", "executor")
    wait_for(lambda: client.status(ref["job_id"]).state is State.SUCCEEDED, timeout_s=30)
    final = json.loads(cli("status", ref["job_id"], "--json").stdout)
    assert final["state"] == "succeeded"
    assert final["result"]["executor"]["tool"] == "note"


def test_queues_json_reports_ready_delayed_in_flight_for_every_agent(cli):
    res = cli("queues", "--json")
    assert res.returncode == 0, res.stderr
    depths = json.loads(res.stdout)
    assert set(depths) == set(AGENTS)
    for agent in AGENTS:
        assert depths[agent] == {"ready": 0, "delayed": 0, "in_flight": 0}


def test_status_of_unknown_job_exits_2_saying_no_such_job(cli):
    res = cli("status", "no-such-job")
    assert res.returncode == 2
    assert "no job no-such-job" in flat(res.stderr)
    assert res.stdout == ""


@pytest.mark.parametrize("command", ["worker", "submit", "send", "status", "queues", "agents", "stats", "breakers",
                                     "dlq", "demo", "soak"])
def test_every_command_answers_help_with_exit_0(cli, command):
    res = cli(command, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout and command in res.stdout


def test_top_level_help_lists_every_command(cli):
    res = cli("--help")
    assert res.returncode == 0, res.stderr
    for command in ("worker", "submit", "send", "status", "queues", "agents", "stats", "breakers", "dlq", "ops",
                    "demo", "soak"):
        assert command in res.stdout


@pytest.mark.parametrize("args", [("queues",), ("status", "x"), ("submit", "goal"),
                                  ("send", "executor", "--payload", json.dumps(NOTE))])
def test_unknown_setting_makes_a_command_exit_2_naming_it(cli, client, args):
    res = cli(*args, MESH_BOGUS="1")
    assert res.returncode == 2
    assert "unknown settings: MESH_BOGUS" in flat(res.stderr)
    assert_nothing_enqueued(client)


def test_unreachable_redis_makes_queues_exit_3(cli_process):
    res = cli_process("queues", MESH_REDIS_URL="redis://127.0.0.1:1/0")
    assert res.returncode == 3
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in flat(res.stderr)


def test_send_to_unknown_agent_exits_2_listing_the_agents(cli, client):
    res = cli("send", "nosuchagent", "--payload", "{}")
    assert res.returncode == 2
    assert "unknown agent 'nosuchagent'; agents are planner, researcher, executor" in flat(res.stderr)
    assert_nothing_enqueued(client)


def test_send_needs_exactly_one_of_payload_or_file(cli, client, tmp_path):
    assert cli("send", "executor").returncode == 2
    both = cli("send", "executor", "--payload", "{}", "--file", str(tmp_path / "x.jsonl"))
    assert both.returncode == 2
    assert "exactly one of --payload or --file" in flat(both.stderr)
    assert_nothing_enqueued(client)


def test_square_brackets_in_user_text_are_printed_literally_not_as_markup(cli, client):
    res = cli("status", "[/x]")
    assert (res.returncode, flat(res.stderr)) == (2, "error: no job [/x] (nor a job of key '[/x]')")
    ref = client.submit("deploy [/x] now")
    shown = cli("status", ref.id)
    assert shown.returncode == 0, shown.stderr
    assert "goal: deploy [/x] now" in shown.stdout


def test_stats_json_counts_a_suppressed_duplicate(cli, client, settings, start_worker):
    payload = json.dumps(NOTE)
    assert cli("send", "executor", "--payload", payload, "--key", "twice").returncode == 0
    start_worker(settings, ("executor",))
    assert client.wait(job_id_for("twice"), timeout_s=30).state == "succeeded"
    assert cli("send", "executor", "--payload", payload, "--key", "twice").returncode == 0
    wait_for(lambda: json.loads(cli("stats", "--json").stdout)["duplicates"] == 1)
    counts = json.loads(cli("stats", "--json").stdout)
    # the worker's retention sweep at boot: the mesh's own work, each shard's sweeper's (MESH_SHARDS), added up
    assert counts.pop("sweeps") in range(len(client.shards.keys) + 1)
    assert counts.pop("compacted_jobs") in (0, 1)  # which compacts the job if it ended first
    assert counts == {"duplicates": 1, "deferred_in_flight": 0, "takeovers": 0, "superseded": 0, "retried": 0,
                      "deferred": 0, "dead_lettered": 0, "poison": 0, "recovered": 0, "reclaimed": 0, "replayed": 0,
                      "dlq_drained": 0, "dlq_purged": 0, "dlq_expired": 0, "approval_warnings": 0,
                      "approvals_approved": 0, "approvals_denied": 0, "approvals_expired": 0, "waits_slept": 0,
                      "waits_event": 0, "waits_timeout": 0, "deferred_flow": 0, "stuck": 0,
                      "swept_count": 0, "swept_jobs": 0, "swept_running": 0, "swept_notes": 0, "dlq_size": 0,
                      "routes": {},
                      # the note was verified by reading it back, once: the duplicate made no call
                      "effects_verified": 1, "effects_unverified": 0, "effects_refuted": 0, "effects_unknown": 0,
                      "effects_failed": 0, "effects_applied": 0, "effects_not_applied": 0}
