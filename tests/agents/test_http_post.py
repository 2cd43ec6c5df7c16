"""The http_post tool against a real loopback server, run by a real worker over real Redis."""

from __future__ import annotations

import re

from conftest import wait_for

from mesh.agents.tools import effect_id
from mesh.contracts import State
from mesh.dlq import DeadLetterStore
from tests.httpserver import RecordingServer

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")


def test_http_post_sends_idempotency_key_traceparent_and_the_json_args(client, make_settings, start_worker):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url("/orders"),
                                                                     "json": {"order": 42, "ok": True}}},
                          key="order-42")
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED
    [request] = server.requests
    assert request["path"] == "/orders"
    assert request["json"] == {"order": 42, "ok": True}
    headers = request["headers"]
    assert headers["idempotency-key"] == "order-42" == ref.key
    match = TRACEPARENT.match(headers["traceparent"])
    assert match and match.group(1) == ref.trace_id
    assert headers["x-mesh-fencing-token"] == "1"
    receipt = record.result["executor"]
    assert receipt["tool"] == "http_post" and receipt["effect_id"] == effect_id("order-42")
    assert receipt["detail"]["status"] == 200


def test_http_post_adds_findings_to_the_body_when_given(client, make_settings, start_worker):
    findings = [{"question": "what is a brownout", "summary": "s", "sources": ["corpus/failures.md#x"]}]
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {
            "url": server.url(), "json": {"text": "hi"}, "findings": findings}})
        assert client.wait(ref.id, timeout_s=20).state is State.SUCCEEDED

    assert server.requests[0]["json"] == {"text": "hi", "findings": findings}


def test_http_post_in_a_pipeline_carries_the_derived_key_and_the_jobs_trace(client, make_settings, start_worker):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        start_worker(settings)
        ref = client.submit(f"what is a brownout, then post the answer to {server.url('/hook')}", key="g-1")
        record = client.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED
    [request] = server.requests
    assert request["headers"]["idempotency-key"] == "g-1/executor/a1" == record.steps["a1"].key
    assert TRACEPARENT.match(request["headers"]["traceparent"]).group(1) == ref.trace_id
    assert request["json"]["text"].startswith("post the answer to")
    [finding] = request["json"]["findings"]
    assert finding["question"] == "what is a brownout" and finding["sources"]


def test_http_post_timeout_leaves_the_job_unknown_not_succeeded(client, make_settings, start_worker):
    with RecordingServer(hold=True) as server:
        settings = make_settings(http_allow=server.host_port, http_timeout_s=0.3, max_retries=3)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url()}})
        record = client.wait(ref.id, timeout_s=20)
        assert len(server.requests) == 1  # the effect may have happened: never retried blindly

    assert record.state is State.UNKNOWN and record.failure_class == "timeout"
    step = record.steps["executor"]
    assert step.state is State.UNKNOWN and step.result is None
    assert record.result is None
    store = DeadLetterStore(client.redis, client.keys)
    wait_for(lambda: store.count() == 1)  # the job is recorded before the message is settled
    [entry_id] = client.redis.zrange(client.keys.dlq, 0, -1)
    assert store.get(entry_id.decode()).failure_class == "timeout"


def test_http_post_to_a_url_with_an_invalid_port_is_refused_at_once_not_retried(
        client, make_settings, start_worker):
    start_worker(make_settings(max_retries=3), ("executor",))
    ref = client.send("executor", {"tool": "http_post", "args": {"url": "http://127.0.0.1:notaport/x"}})
    record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
    step = record.steps["executor"]
    assert step.picked_up == 1 and "refused" in step.error
