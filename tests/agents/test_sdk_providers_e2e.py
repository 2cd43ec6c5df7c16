"""A declared agent on a real worker whose provider is a vendor's SDK (``openai_sdk``,
``anthropic``) against a loopback server of that wire format: the answer is the step's output and
each response's usage reaches the step, the job and its ``model_call`` event; a 429 defers the
message by its Retry-After, without spending a retry, and the job then succeeds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mesh.broker import MeshClient, trace
from mesh.contracts import State
from tests.agents.test_model_tokens_e2e import Triage, app
from tests.agents.test_sdk_providers import WIRES, Wire
from tests.httpserver import RecordingServer

pytestmark = pytest.mark.slow  # every test here starts a worker

ROUTE = {"queue": "billing", "confidence": 0.75}


@pytest.fixture(params=WIRES, ids=[w.provider for w in WIRES])
def wire(request: pytest.FixtureRequest) -> Wire:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def serve(make_settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    from mesh.ops.worker import start_worker

    workers = []

    def run(wire: Wire, server: RecordingServer) -> Any:
        settings = make_settings(model_provider=wire.provider, model_url=wire.base(server),
                                 model_name="claude-3-5-sonnet", model_api_key="sk-test-key-0123",
                                 model_timeout_s=10)
        workers.append(start_worker(settings, None, 2, app=app))
        return workers[-1]

    yield run
    for worker in workers:
        worker.stop(timeout=10_000)
        worker.broker.close()


def test_a_worker_on_the_sdk_answers_meters_and_defers_a_429(client: MeshClient, serve: Any, wire: Wire) -> None:
    answer = wire.answer(ROUTE, (10, 5))
    if wire.provider == "anthropic":
        answer["content"][0]["name"] = "Triage"

    def reply(n: int, request: dict[str, Any]) -> tuple[Any, ...]:
        return (429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}) if n == 1 else (200, answer)

    with RecordingServer(reply) as server:
        serve(wire, server)
        sent = MeshClient(client.settings, client=client.redis, app=app).send("triage", {"text": "my invoice"})
        record = client.wait(sent.id, timeout_s=30)
    assert record.state is State.SUCCEEDED, record.error
    assert Triage(**record.steps["triage"].result) == Triage(**ROUTE)
    assert len(server.requests) == 2 and server.requests[1]["at"] - server.requests[0]["at"] >= 1.0
    step = record.steps["triage"]
    assert (step.tokens_in, step.tokens_out) == (record.tokens_in, record.tokens_out) == (10, 5)
    assert step.attempt == 1 and step.picked_up == 2  # picked up twice; the deferral spent no retry
    calls = [e for e in trace.read(client.redis, client.keys, sent.id) if e["event"] == "model_call"]
    assert [(c["model"], c["outcome"]) for c in calls] == [("claude-3-5-sonnet", "rate_limited"),
                                                          ("claude-3-5-sonnet", "ok")]
