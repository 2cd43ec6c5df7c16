"""Declared agents calling ``ctx.model.complete`` in a real worker against a loopback model server:
repairs, tokens in the trace, the job record, the metrics and ``mesh status``, and the per-job
token budget failing closed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import wait_for
from pydantic import BaseModel, Field

from mesh import App, Context
from mesh.broker import MeshClient, trace
from mesh.contracts import State
from mesh.dlq import DeadLetterStore
from mesh.ops.metrics import MeshCollector
from tests.agents.openai_server import FakeOpenAI, Reply, completion, default_responder

pytestmark = pytest.mark.slow  # every test here starts a worker or a redis-server

USAGE = (10, 5)  # prompt, completion tokens of every answer the server gives


class Ticket(BaseModel):
    text: str


class Triage(BaseModel):
    queue: str
    confidence: float = Field(ge=0, le=1)


app = App("support")


@app.agent
def triage(ctx: Context, ticket: Ticket) -> Triage:
    return ctx.model.complete(f"Route: {ticket.text}", Triage, system="Route support tickets.")


@pytest.fixture
def api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def serve(make_settings: Callable[..., Any], api: FakeOpenAI) -> Iterator[Callable[..., Any]]:
    """Start a worker for ``app`` (or the built-in agents) with the openai provider on ``api``."""
    from mesh.ops.worker import start_worker

    workers = []

    def run(served: App | None = app, **overrides: Any) -> Any:
        settings = make_settings(**{"model_provider": "openai", "model_url": api.url, "model_name": "gpt-test",
                                    "model_timeout_s": 10, **overrides})
        workers.append(start_worker(settings, None, 2, app=served))
        return workers[-1]

    yield run
    for worker in workers:
        worker.stop(timeout=10_000)
        worker.broker.close()


def send_ticket(client: MeshClient, text: str, **kw: Any) -> str:
    return MeshClient(client.settings, client=client.redis, app=app).send("triage", {"text": text}, **kw).id


def answers(*contents: str) -> Callable[[dict[str, Any]], Reply]:
    """Answer with ``contents`` in turn (the last one from then on), each spending USAGE."""
    replies = list(contents)
    return lambda request: (200, completion(replies.pop(0) if len(replies) > 1 else replies[0], usage=USAGE), {})


def with_usage(request: dict[str, Any]) -> Reply:
    status, body, headers = default_responder(request)
    assert isinstance(body, dict)
    return status, {**body, "usage": {"prompt_tokens": USAGE[0], "completion_tokens": USAGE[1]}}, headers


def model_calls(client: MeshClient, job_id: str) -> list[dict[str, Any]]:
    return [e for e in trace.read(client.redis, client.keys, job_id) if e["event"] == "model_call"]


def test_a_repaired_answer_succeeds_and_its_tokens_reach_trace_job_record_metrics_and_status(
        client, api, serve, cli):
    api.responder = answers(json.dumps({"queue": "billing", "confidence": 7}),
                            json.dumps({"queue": "billing", "confidence": 0.75}))
    serve()
    job_id = send_ticket(client, "my invoice is wrong")
    record = client.wait(job_id, timeout_s=30)

    assert record.state is State.SUCCEEDED
    assert record.steps["triage"].result == {"queue": "billing", "confidence": 0.75}
    assert len(api.requests) == 2  # one answer, one repair: within the attempt, not a retry
    assert "less than or equal to 1" in api.requests[1]["json"]["messages"][-1]["content"]
    # Tokens of both requests: on the step, on the job ...
    step = record.steps["triage"]
    assert (step.tokens_in, step.tokens_out) == (record.tokens_in, record.tokens_out) == (20, 10)
    # ... in one model_call event ...
    [call] = model_calls(client, job_id)
    assert (call["agent"], call["model"], call["tokens_in"], call["tokens_out"], call["repairs"], call["outcome"]) == (
        "triage", "gpt-test", 20, 10, 1, "ok")
    # ... in the per-agent counters behind mesh_model_tokens_total ...
    [family] = [f for f in MeshCollector(client).collect() if f.name == "mesh_model_tokens"]
    assert {(s.labels["agent"], s.labels["direction"]): s.value for s in family.samples} == {
        ("triage", "in"): 20, ("triage", "out"): 10}
    # ... and in `mesh status`.
    status = cli("status", job_id, "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["tokens_in"], shown["steps"]["triage"]["tokens_out"]) == (20, 10)
    text = cli("status", job_id)
    assert "model tokens: 20 in, 10 out" in text.stdout and "20/10" in text.stdout
    timeline = cli("trace", job_id)
    assert "model_call" in timeline.stdout and "gpt-test: 20 tokens in, 10 out, 1 repair(s), ok" in timeline.stdout


def test_repairs_running_out_dead_letter_the_job_as_invalid_output_with_its_tokens(client, api, serve):
    api.responder = answers("I think it is billing.")
    serve(model_repairs=1, max_retries=0)
    record = client.wait(send_ticket(client, "my invoice is wrong"), timeout_s=30)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "invalid_output"
    assert "after 1 repair(s): not JSON" in record.steps["triage"].error
    assert len(api.requests) == 2
    assert (record.tokens_in, record.steps["triage"].tokens_out) == (20, 10)  # written by the failure path
    [call] = model_calls(client, record.job_id)
    assert (call["repairs"], call["outcome"]) == (1, "invalid_output")


def test_a_job_past_its_token_budget_after_a_call_is_dead_lettered_budget_exceeded_and_not_retried(
        client, api, serve):
    api.responder = answers(json.dumps({"queue": "billing", "confidence": 0.5}))
    serve(max_retries=3)
    job_id = send_ticket(client, "my invoice is wrong", token_budget=12)
    record = client.wait(job_id, timeout_s=30)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "budget_exceeded"
    assert "spent 15 of its 12 model tokens" in record.steps["triage"].error
    assert len(api.requests) == 1  # terminal: no retry asks the model again
    assert record.tokens_in + record.tokens_out == 15
    store = DeadLetterStore(client.redis, client.keys)
    wait_for(lambda: store.count() == 1)
    [entry_id] = client.redis.zrange(client.keys.dlq, 0, -1)
    assert store.get(entry_id.decode()).failure_class == "budget_exceeded"
    ttl = client.redis.pttl(client.keys.job_tokens(job_id))
    assert ttl > 0  # the job's counter expires


def test_a_spent_budget_stops_the_next_steps_model_call_before_it_is_made(client, api, serve):
    api.responder = with_usage
    serve(None)
    ref = client.submit("summarise the release", token_budget=15)  # the plan spends exactly 15
    record = client.wait(ref.id, timeout_s=30)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "budget_exceeded"
    assert record.steps["plan"].state is State.SUCCEEDED and record.steps["plan"].tokens_in == 10
    assert record.steps["r1"].failure_class == "budget_exceeded"
    assert "spent 15 of its 15 model tokens: no further model call is made" in record.steps["r1"].error
    assert len(api.requests) == 1  # the researcher's call was never made
    assert (record.tokens_in, record.tokens_out) == (10, 5)
    assert [c["outcome"] for c in model_calls(client, ref.id)] == ["ok", "budget_exceeded"]


def test_the_default_budget_setting_applies_to_jobs_sent_without_one(make_settings, rclient, api, serve):
    api.responder = answers(json.dumps({"queue": "billing", "confidence": 0.5}))
    serve()
    client = MeshClient(make_settings(job_token_budget=5), client=rclient)
    record = client.wait(send_ticket(client, "my invoice is wrong"), timeout_s=30)
    assert record.failure_class == "budget_exceeded"
    record = client.wait(send_ticket(client, "my invoice is wrong", token_budget=0), timeout_s=30)  # 0: none
    assert record.state is State.SUCCEEDED


def test_the_local_provider_answers_a_declared_agent_with_a_valid_output_and_counts_words_as_tokens(
        client, api, serve):
    serve(model_provider="local")
    record = client.wait(send_ticket(client, "my invoice is wrong"), timeout_s=30)

    assert record.state is State.SUCCEEDED
    answer = Triage.model_validate(record.steps["triage"].result)
    assert answer == Triage(queue="Route my invoice is wrong", confidence=0.9)
    words_in = len("Route: my invoice is wrong".split()) + len("Route support tickets.".split())
    words_out = len(json.dumps(answer.model_dump(mode="json")).split())
    assert (record.tokens_in, record.tokens_out) == (words_in, words_out)
    [call] = model_calls(client, record.job_id)
    assert (call["model"], call["tokens_in"], call["outcome"]) == ("local", words_in, "ok")
    assert api.requests == []
