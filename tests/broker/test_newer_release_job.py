"""A message whose job a newer release of the mesh moved into a state this release does not know
(a rolling deploy: the newer release archived it) is not run by this release: no effect is sent,
the record keeps the newer release's state, and the message is kept in the DLQ saying why."""

from __future__ import annotations

import pytest
from conftest import wait_for

from mesh.broker import MeshClient
from mesh.contracts import dumps, loads
from mesh.dlq import DeadLetterStore
from tests.httpserver import RecordingServer


@pytest.mark.slow
def test_a_step_of_a_job_a_newer_release_archived_is_not_run(make_settings, start_worker, rclient):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        client = MeshClient(settings, client=rclient)
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url(), "json": {"n": 1}}})
        key = client.keys.job(ref.id)
        record = loads(rclient.get(key))
        record.update(state="archived", archived_by="ops")
        rclient.set(key, dumps(record))

        start_worker(settings, ("executor",))
        store = DeadLetterStore(client.redis, client.keys)
        wait_for(lambda: store.count() == 1, timeout_s=60)
        requests = list(server.requests)

    assert requests == []  # before: the effect was sent for a job the newer release had archived
    [entry] = store.newest()
    assert "'archived', a state of a newer release" in entry.error and entry.failure_class == "permanent"
    after = loads(rclient.get(key))
    assert after["state"] == "archived" and after["archived_by"] == "ops"
    assert after["steps"]["executor"]["state"] == "dead_lettered"  # with the reason, for that release
