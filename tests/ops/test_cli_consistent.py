"""Issue 24, the CLI consistent: commands that name the same things take them the same way, and
say the same thing about them."""

from __future__ import annotations

import json

import pytest
from conftest import flat

from mesh.broker import MeshClient


def sent(cli, key: str) -> str:
    res = cli("send", "researcher", "--payload", '{"question": "what is a DLQ?"}', "--key", key, "--json")
    assert res.returncode == 0, res.stderr
    job_id: str = json.loads(res.stdout)[0]["job_id"]
    return job_id


def test_trace_takes_a_job_key_an_id_and_its_start_as_status_does(cli):
    job_id = sent(cli, "order-7")
    for given in ("order-7", job_id, job_id[:10], job_id[4:12]):
        status, trace = cli("status", given, "--json"), cli("trace", given, "--json")
        assert status.returncode == trace.returncode == 0, (given, status.stderr, trace.stderr)
        assert json.loads(status.stdout)["job_id"] == json.loads(trace.stdout)["job_id"] == job_id


@pytest.mark.parametrize("given", ["key", "id"])
def test_trace_of_an_expired_job_says_it_expired_as_status_does(cli, settings, rclient, given):
    job_id = sent(cli, "order-8")
    keys = MeshClient(settings, client=rclient).keys
    rclient.delete(keys.job(job_id), keys.trace(job_id))  # what retention removes; the index still names it
    name = "order-8" if given == "key" else job_id
    said = f"job {job_id} expired: records are kept MESH_JOB_RETENTION_S="
    for cmd in ("status", "trace"):
        res = cli(cmd, name)
        assert res.returncode == 2 and said in flat(res.stderr), (cmd, res.stderr)
    for cmd in ("status", "trace"):
        res = cli(cmd, "order-never-sent")
        assert res.returncode == 2
        assert "no job order-never-sent (nor a job of key 'order-never-sent')" in flat(res.stderr), (cmd, res.stderr)
