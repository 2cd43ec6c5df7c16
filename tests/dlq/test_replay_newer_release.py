"""A dead letter whose job a newer release of the mesh has moved into a state this release does not
know (during a rolling deploy: ``quarantined``, ``archived``): this release never moves a record out
of such a state, so its replay must not send the step to run again behind the newer release's back."""

from __future__ import annotations

import orjson

from mesh.broker.client import job_id_for
from mesh.contracts import JobRecord, StepRecord, dumps
from mesh.dlq import DeadLetterStore, Replayer
from tests.dlq.bulk import generate, nth_id


def test_a_dead_letter_whose_job_a_newer_release_owns_is_skipped_not_run_again(client, settings):
    store = DeadLetterStore(client.redis, client.keys)
    generate(client.redis, client.keys, 1, 1_700_000_000.0)
    eid = nth_id(0)
    env = orjson.loads(client.redis.hget(client.keys.dead_letter(eid), "raw"))["args"][0]
    assert env["job_id"] == job_id_for(env["key"])
    step = StepRecord(step_id=env["step_id"], agent=env["agent"], key=env["key"], state="quarantined")
    record = JobRecord(job_id=env["job_id"], key=env["key"], trace_id=env["trace_id"], state="quarantined",
                       steps={step.step_id: step})
    client.redis.set(client.keys.job(env["job_id"]), dumps(record))

    replayer = Replayer(store, settings)
    dry = replayer.replay(replayer.entries([eid]), dry_run=True)
    report = replayer.replay(replayer.entries([eid]))

    assert dry.replayed == report.replayed == []  # before: replayed, the effect sent to run again
    assert "quarantined" in report.skipped[eid] and report.skipped == dry.skipped
    assert store.get(eid) is not None
    assert client.queues([env["agent"]])[env["agent"]]["ready"] == 0
