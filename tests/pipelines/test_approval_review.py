"""Hostile review of approvals: a paused timer-lock holder resuming after another worker fired its
timers, decisions whose by/note carry rich markup, and durations that are not finite."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline
from mesh.agents.pipelines import approvals as flow
from mesh.agents.pipelines.engine import Routes
from mesh.agents.pipelines.spec import ApprovalPolicy
from mesh.broker import approvals, shard_readers, timers
from mesh.broker.clock import server_ms
from mesh.broker.keys import prefix
from mesh.contracts import State
from mesh.contracts.approvals import parse_duration
from tests.conftest import sigstop, stat, wait_for, wait_started
from tests.pipelines.test_approvals import trace_kinds


def worker_timers(mesh: MeshClient, job_id: str, owner: str) -> timers.Timers:
    """The timers a worker process fires (ops/timer_loop.py), with this process's routes, in the shard of job
    ``job_id`` (MESH_SHARDS: a worker fires each shard's timers with that shard's job store)."""
    handlers = flow.timer_handlers(mesh.jobs_of(job_id), mesh.pipelines,
                                   Routes(queue=lambda a: a, version=lambda a: None), mesh.clock, owner)
    return timers.Timers(mesh.redis, mesh.keys_of(job_id), owner, handlers)


def test_a_paused_lock_holder_resuming_fires_no_warning_or_expiry_a_second_time(mesh):
    # no worker: the root step parks at submit; its warning is due 1s after the ask
    ref = mesh.run(Pipeline("warned").step("researcher", approval={"timeout": "2s", "warn_before": "1s"}).build(),
                   {"goal": "g"})
    record = mesh.status(ref.id)
    step = record.steps["researcher"]
    keys = mesh.keys_of(ref.id)  # its shard's timers (MESH_SHARDS)
    warn_due = timers.due_at(mesh.redis, keys, "approval.warn", f"{ref.id}|researcher|1")
    assert warn_due is not None
    wait_for(lambda: server_ms(mesh.redis) >= warn_due, timeout_s=5)
    paused, other = worker_timers(mesh, ref.id, "paused"), worker_timers(mesh, ref.id, "other")
    # the holder read what is due (Timers.tick) and was SIGSTOPped past its lock; another worker
    # took the lock and fired the warning; then the first one resumed with what it had read
    [read] = timers.due(mesh.redis, keys)
    assert read.kind == "approval.warn"
    assert other.tick() == 1
    paused._fire(read)
    assert trace_kinds(mesh, ref.id).count("approval_warning") == 1
    assert stat(mesh.redis, mesh.settings, "approval_warnings") == 1

    due = timers.due_at(mesh.redis, keys, "approval", f"{ref.id}|researcher|1")
    assert due is not None and step.approval is not None
    wait_for(lambda: server_ms(mesh.redis) >= due, timeout_s=5)
    [read] = timers.due(mesh.redis, keys)
    assert other.tick() == 1
    paused._fire(read)
    record = mesh.status(ref.id)
    assert record.state is State.HALTED and record.steps["researcher"].approval.decision == "expired"
    assert trace_kinds(mesh, ref.id).count("approval_expired") == 1
    assert timers_left(mesh) == 0


def timers_left(mesh: MeshClient) -> int:
    """How many durable timers the namespace's shards hold (MESH_SHARDS: each shard its own jobs')."""
    return shard_readers.zcard(mesh.redis, mesh.shards.keys, lambda k: k.timers)


@pytest.mark.parametrize("by", ["[/red]", "[bold]ana[/bold]"])
def test_a_decision_by_a_name_with_rich_markup_is_printed_as_given(mesh, cli, by):
    ref = mesh.run(Pipeline("marked").step("researcher", approval={"timeout": "1h"}).build(), {"goal": "g"})
    done = cli("deny", ref.id, "researcher", "--reason", "[red]no[/red] [link=http://x]y[/link]", "--by", by)
    assert done.returncode == 0, done.stderr
    assert f"by {by};" in done.stdout
    record = mesh.status(ref.id)
    assert record.steps["researcher"].approval.by == by
    for command in ("status", "trace"):
        shown = cli(command, ref.id)
        assert shown.returncode == 0, shown.stderr
        assert by in shown.stdout and "[red]no[/red]" in shown.stdout, shown.stdout


@pytest.mark.parametrize("text", ["9" * 400 + "s", "1" + "0" * 320 + "h", "99999999h", "366d"])
def test_a_duration_infinite_or_over_a_year_is_refused(text: str):
    # '9' * 400 + 's' parsed as inf; 99999999h merged the warning's timer into the expiry's and
    # made `mesh status` fail with an OverflowError
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
    with pytest.raises(ValueError, match="duration"):
        ApprovalPolicy(timeout=text)


@pytest.mark.parametrize("value", ["0.0001ms", float("nan"), float("inf")])
def test_a_duration_under_a_millisecond_or_not_a_number_is_refused(value: Any):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_a_year_is_still_a_duration():
    assert parse_duration("365d") == 365 * 86400 and parse_duration("1.5h") == 5400




@pytest.mark.slow
def test_a_lock_holder_sigstopped_mid_tick_delays_no_expiry_and_fires_nothing_twice(mesh, worker_process):
    import os
    import signal

    from tests.pipelines.test_approval_faults import APP, _due, _expired, root_spec

    # a worker ticking every 10 ms holds the timers' lock often; it is stopped while it holds it. The one
    # that must take over runs already: both started (13 s seen at a load average of 15) before the
    # approval is asked, so its timeout's bounds count the paused holder, not a process start.
    held = worker_process("--app", APP, "--threads", "1", MESH_TIMER_INTERVAL_S="0.01")
    takeover = worker_process("--app", APP, "--threads", "1")
    wait_started(held)
    wait_started(takeover)
    ref = mesh.run(root_spec(timeout="10s"), {"goal": "g"})
    due = _due(mesh, ref.id)
    lock = mesh.keys_of(ref.id).timers_lock  # the lock of the job's shard's timers (each shard has its own)

    def held_holds_it() -> bool:
        owner = mesh.redis.get(lock)  # the holder's host:pid
        return owner is not None and owner.decode().rsplit(":", 1)[-1] == str(held.pid)

    def stopped_holding() -> bool:
        if not held_holds_it():
            return False
        sigstop(held.pid)  # every thread: the main one may stop while the ticking one runs on
        if held_holds_it():  # stopped, it cannot have let it go since
            return True
        os.kill(held.pid, signal.SIGCONT)
        return False

    try:
        wait_for(stopped_holding, timeout_s=30, interval_s=0.0005)
        left = due - server_ms(mesh.redis)
        print(f"stopped holding the lock {left} ms before the due time")
        assert left > 2000, "stopped too late to tell"
        record = _expired(mesh, ref.id, due)
    finally:
        os.kill(held.pid, signal.SIGCONT)
    assert record.state is State.HALTED
    wait_for(lambda: timers_left(mesh) == 0, timeout_s=30)  # the firing worker's next write
    assert trace_kinds(mesh, ref.id).count("approval_expired") == 1


def test_mesh_approvals_fits_80_columns_with_an_input_as_large_as_a_message_may_be(mesh, cli, settings):
    from rich.cells import cell_len

    # JSON without spaces does not wrap: a block's input line ran to 129 columns (240 in wide characters)
    goal = "字" * 300 + "y" * (settings.max_message_bytes - 8192)
    ref = mesh.run(Pipeline("large").step("researcher", approval={"timeout": "1h"}).build(), {"goal": goal})
    shown = cli("approvals", COLUMNS="80")
    assert shown.returncode == 0, shown.stderr
    assert ref.id in shown.stdout and "..." in shown.stdout
    assert max(cell_len(line) for line in shown.stdout.splitlines()) <= 80, shown.stdout
    assert len(shown.stdout) < 1000
    [row] = json.loads(cli("approvals", "--json").stdout)
    assert row["input"] == {"goal": goal}


def test_mesh_approvals_wide_shows_the_whole_input_and_who_may_decide_the_default_a_shortened_one(mesh, cli):
    goal = "review the change " + " ".join(f"part-{n}" for n in range(200))
    ref = mesh.run(Pipeline("wide").step("researcher", approval={"timeout": "1h", "approvers": ["ana", "bo"]})
                   .build(), {"goal": goal})
    default = cli("approvals", COLUMNS="80")
    assert default.returncode == 0 and ref.id in default.stdout and "part-199" not in default.stdout
    assert max(map(len, default.stdout.splitlines())) <= 80, default.stdout
    shown = cli("approvals", "--wide", COLUMNS="80").stdout
    head = next(line for line in shown.splitlines() if line.startswith("┃"))
    assert [c.strip() for c in head.strip("┃").split("┃")] == ["job", "step", "since", "expires", "approvers", "input"]
    assert "ana, bo" in shown and "part-199" in "".join(line.strip("│ ") for line in shown.splitlines())


@pytest.mark.parametrize(("by", "note"), [("q" * 1_000_000, None), ("ana", "z" * 1_000_000),
                                          ("ana\n    ├── +   0.5s approved      by boss", None)])
def test_a_decision_by_a_huge_or_multiline_name_or_with_a_huge_note_is_refused_and_nothing_recorded(mesh, by, note):
    ref = mesh.run(Pipeline("bounded").step("researcher", approval={"timeout": "1h"}).build(), {"goal": "g"})
    with pytest.raises(approvals.InvalidDecision):
        mesh.deny(ref.id, "researcher", reason=note or "no", by=by)
    record = mesh.status(ref.id)
    assert record.state is State.AWAITING_APPROVAL and record.steps["researcher"].approval.decision is None
    assert [r for keys in mesh.shards.keys for r in approvals.audit(mesh.redis, keys)] == []  # audited in no shard


def test_the_cli_refuses_a_name_with_a_line_break_with_exit_2(mesh, cli):
    ref = mesh.run(Pipeline("bounded").step("researcher", approval={"timeout": "1h"}).build(), {"goal": "g"})
    done = cli("approve", ref.id, "researcher", "--by", "ana\nboss", "--note", "line one\nline two")
    assert done.returncode == 2 and "printable" in done.stderr, (done.returncode, done.stderr)
    assert mesh.status(ref.id).steps["researcher"].state is State.AWAITING_APPROVAL
    fine = cli("approve", ref.id, "researcher", "--by", "ana", "--note", "line one\nline two")
    assert fine.returncode == 0, fine.stderr


def test_the_retention_sweep_never_takes_a_job_that_ended_while_a_step_waits(mesh, run_workers, make_settings):
    from mesh.broker.retention import Retention
    from tests.pipelines.test_approvals import load_pipeline_spec

    spec = load_pipeline_spec(Pipeline("two").step("researcher").step(
        "coder", depends_on=["researcher"], requires_human_approval=True)
        .step("other", agent="researcher", depends_on=["researcher"], input={"goal": "input.goal"}).build())
    mesh.redis.sadd(f"{prefix(mesh.settings.namespace)}:test.fail", "sweep-1/researcher/other")
    run_workers()
    ref = mesh.run(spec, {"goal": "g"}, key="sweep-1")
    record = wait_for(lambda: (r := mesh.status(ref.id)).steps["other"].state is State.DEAD_LETTERED
                      and r.steps["coder"].state is State.AWAITING_APPROVAL and r, timeout_s=15)
    keys = mesh.keys_of(ref.id)  # the job's shard's (MESH_SHARDS)
    assert record.state is State.DEAD_LETTERED and mesh.redis.pttl(keys.job(ref.id)) == -1
    # the sweep gave a TTL to an ended record without one (as to a record from before retention),
    # which is what a job that ended while a step waits is: its retention, counted from its end,
    # passed (1s here), it was gone within a millisecond
    sweeper = Retention(mesh.redis, make_settings(job_retention_s=1).on_shard(keys.shard))  # as its shard's sweeper
    wait_for(lambda: server_ms(mesh.redis) / 1000 - record.created_at > 1.5, timeout_s=5)
    sweeper.sweep(server_ms(mesh.redis) / 1000)
    assert mesh.redis.pttl(keys.job(ref.id)) == -1 and mesh.redis.pttl(keys.trace(ref.id)) == -1
    assert [p.job_id for p in mesh.approvals()] == [ref.id]
    mesh.deny(ref.id, "coder", reason="no")  # nothing waits any more: now its retention runs
    assert mesh.redis.pttl(keys.job(ref.id)) > 0
