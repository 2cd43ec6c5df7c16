"""The support example end to end: a real ``mesh worker --app examples.support.agents:app`` process,
the real Redis, a loopback tickets endpoint, and the local provider or a loopback OpenAI-compatible
endpoint. Parts that need ``ctx.model.complete`` skip until the providers have it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ROOT, mesh_env, wait_for

from examples.support import agents, run
from examples.support.agents import Filed, Filing, Ticket
from mesh import JobRef, MeshClient, MeshSettings, State, load_app
from mesh.broker import trace
from mesh.broker.client import job_id_for, trace_id_for
from mesh.broker.outbox import build_message, stage_all
from mesh.contracts import Envelope, JobRecord, StepRecord
from mesh.dlq import DeadLetterStore
from tests.agents.openai_server import FakeOpenAI, Reply, completion
from tests.httpserver import RecordingServer

APP = "examples.support.agents:app"
TOKEN = "tok-" + uuid.uuid4().hex
TICKET = Ticket(id="t-42", subject="Charged twice", body="My card was charged twice for the March invoice.")



def enqueue(client: MeshClient, agent: str, payload: dict[str, Any], *, key: str,
            contract_version: int | None = None) -> JobRef:
    """A job of one step for one of the app's agents, recorded and enqueued as ``MeshClient._send``
    does, with the agent's contract version stamped on it."""
    spec = agents.app.agents[agent]
    spec.input.model_validate(payload)
    now = time.time()
    ref = JobRef(id=job_id_for(key), key=key, trace_id=trace_id_for(key))
    env = Envelope(key=key, job_id=ref.id, step_id=agent, agent=agent, trace_id=ref.trace_id,
                   deadline=now + client.settings.job_deadline_s, payload=payload,
                   contract_version=contract_version or spec.version)
    step = StepRecord(step_id=agent, agent=agent, key=key, input=payload, sent_at=now, created_at=now, updated_at=now)
    record = JobRecord(job_id=ref.id, key=key, trace_id=ref.trace_id, steps={agent: step}, created_at=now,
                       updated_at=now)
    message = build_message(env)
    pipe = client.redis.pipeline(transaction=True)
    client.jobs.stage_create(pipe, record)
    trace.stage(pipe, client.keys, trace.event("enqueued", message.args[0], queue=agent, by="client"))
    stage_all(pipe, client.keys, [message])
    pipe.execute()
    return ref


@pytest.fixture
def app_client(settings: MeshSettings, rclient: Any) -> MeshClient:
    """A client that knows the support app: sends are checked with its models and stamped with their versions."""
    return MeshClient(settings, client=rclient, app=agents.app)


@pytest.fixture
def tickets() -> Any:
    """The tickets system: answers 201 with a reference per Idempotency-Key, as a real one would."""
    refs: dict[str, str] = {}

    def answer(_n: int, request: dict[str, Any]) -> tuple[int, Any]:
        ref = refs.setdefault(request["headers"]["idempotency-key"], f"TCK-{len(refs) + 1}")
        return 201, {"id": ref}

    with RecordingServer(answer) as server:
        yield server


def support_worker(worker_process: Callable[..., subprocess.Popen[bytes]], tickets: RecordingServer,
                   **env: str) -> subprocess.Popen[bytes]:
    return worker_process("--app", APP, "--threads", "2", SUPPORT_TICKETS_URL=tickets.url("/tickets"),
                          SUPPORT_TICKETS_TOKEN=TOKEN, **env)


def done(client: MeshClient, job: JobRef, timeout_s: float = 30.0) -> JobRecord:
    return client.wait(job.id, timeout_s=timeout_s)


def test_app_declares_three_agents_and_a_tool_with_their_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_app(APP)
    assert app is agents.app and set(app.agents) == {"triage", "summarize", "file"}
    triage = app.agents["triage"]
    assert (triage.input, triage.output, triage.version, triage.queue) == (Ticket, agents.Triage, 1, "triage")
    assert (triage.time_limit_s, triage.max_retries, triage.timeout_retries) == (60, 3, 1)
    filer = app.agents["file"]
    assert (filer.input, filer.output, filer.tools, filer.timeout_retries) == (Filing, Filed, ("file_ticket",), 0)
    tool = app.tools["file_ticket"]
    assert (tool.secrets, tool.effect, tool.args) == (("SUPPORT_TICKETS_TOKEN",), True, agents.FileTicket)
    monkeypatch.setenv("SUPPORT_TICKETS_URL", "https://tickets.example.com/api/tickets")
    args = agents.FileTicket(ticket_id="t", queue="billing", subject="s", summary="")
    assert tool.target(args) == "tickets.example.com:443"
    assert agents.file.spec is filer and agents.file.fn is filer.handler  # the declared agent, its function


def test_file_agent_files_once_per_key_with_its_secret_key_token_and_trace(
        worker_process: Any, app_client: MeshClient, tickets: RecordingServer) -> None:
    support_worker(worker_process, tickets)
    filing = Filing(ticket=TICKET, queue="billing", summary="Charged twice in March.")
    job = enqueue(app_client, "file", filing.model_dump(mode="json"), key="support/t-42/file")
    record = done(app_client, job)
    assert record.state is State.SUCCEEDED, record
    assert Filed.model_validate(record.steps["file"].result) == Filed(ticket_id="t-42", queue="billing",
                                                                      reference="TCK-1")
    (request,) = tickets.requests
    assert request["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert request["headers"]["idempotency-key"] == job.key
    assert int(request["headers"]["x-mesh-fencing-token"]) > 0
    assert job.trace_id in request["headers"]["traceparent"]
    assert request["json"] == {"ticket_id": "t-42", "queue": "billing", "subject": TICKET.subject,
                               "summary": "Charged twice in March."}

    # The same key again: acked as a duplicate, the stored result stands, nothing is filed twice.
    enqueue(app_client, "file", filing.model_dump(mode="json"), key=job.key)
    wait_for(lambda: int(app_client.redis.hget(app_client.keys.stats, "duplicates") or 0) == 1)
    assert len(tickets.requests) == 1 and done(app_client, job).state is State.SUCCEEDED
    calls = [e for e in trace.read(app_client.redis, app_client.keys, job.id) if e["event"] == "tool_call"]
    assert [(c["tool"], c["dependency"]) for c in calls] == [("file_ticket", tickets.host_port)]
    assert TOKEN not in json.dumps(trace.read(app_client.redis, app_client.keys, job.id))


def test_refused_filing_is_dead_lettered_with_its_secret_masked_and_replays_once_fixed(
        worker_process: Any, app_client: MeshClient, cli: Any) -> None:
    def refuse_first(n: int, request: dict[str, Any]) -> tuple[int, Any]:
        token = request["headers"]["authorization"]
        return (403, {"error": f"token {token} has no access"}) if n == 1 else (201, {"id": "TCK-9"})

    with RecordingServer(refuse_first) as tickets:
        support_worker(worker_process, tickets)
        filing = Filing(ticket=TICKET, queue="account")
        job = enqueue(app_client, "file", filing.model_dump(mode="json"), key="support/t-42/file")
        assert done(app_client, job).state is State.DEAD_LETTERED
        (entry,) = DeadLetterStore(app_client.redis, app_client.keys).newest()
        assert (entry.agent, entry.failure_class, len(tickets.requests)) == ("file", "permanent", 1)
        assert TOKEN not in entry.model_dump_json()

        replayed = cli("dlq", "replay", "--all", "--yes")
        assert replayed.returncode == 0, replayed.stderr
        record = done(app_client, job)
        assert record.state is State.SUCCEEDED, record
        assert record.steps["file"].result == {"ticket_id": "t-42", "queue": "account", "reference": "TCK-9"}
        assert [r["headers"]["idempotency-key"] for r in tickets.requests] == [job.key, job.key]


def test_message_for_another_contract_version_is_dead_lettered_naming_both_versions(
        worker_process: Any, app_client: MeshClient, tickets: RecordingServer) -> None:
    support_worker(worker_process, tickets)
    filing = Filing(ticket=TICKET, queue="billing")
    job = enqueue(app_client, "file", filing.model_dump(mode="json"), key="support/t-42/v2", contract_version=2)
    assert done(app_client, job).state is State.DEAD_LETTERED
    (entry,) = DeadLetterStore(app_client.redis, app_client.keys).newest()
    assert entry.failure_class == "invalid_input"
    assert "contract version 2" in entry.error and "version 1" in entry.error, entry.error
    assert tickets.requests == []


def test_ticket_is_triaged_summarized_and_filed_with_the_local_provider(
        worker_process: Any, app_client: MeshClient, tickets: RecordingServer) -> None:
    support_worker(worker_process, tickets)
    outcome = run.handle(app_client, TICKET, timeout_s=30)
    assert outcome.triage.queue in agents.QUEUES and 0 <= outcome.triage.confidence <= 1
    assert isinstance(outcome.summary, str)
    (request,) = tickets.requests
    assert request["json"]["queue"] == outcome.filed.queue and outcome.filed.reference == "TCK-1"

    # Handled again: every key names the job already done, so the ticket is not filed twice.
    assert run.handle(app_client, TICKET, timeout_s=30) == outcome
    assert len(tickets.requests) == 1


def model_answers(request: dict[str, Any]) -> Reply:
    """A route for triage's prompt, a summary for summarize's (told apart by their system prompts)."""
    prompt = json.dumps(request["messages"])
    answer = ({"summary": "Customer was charged twice for March."} if "summarize" in prompt
              else {"queue": "Billing", "confidence": 0.92, "reason": "a duplicate charge"})
    return 200, completion(json.dumps(answer)), {}


def test_ticket_is_triaged_summarized_and_filed_with_an_openai_compatible_endpoint(
        worker_process: Any, app_client: MeshClient, tickets: RecordingServer) -> None:
    with FakeOpenAI(model_answers) as api:
        support_worker(worker_process, tickets, MESH_MODEL_PROVIDER="openai", MESH_MODEL_URL=api.url)
        outcome = run.handle(app_client, TICKET, timeout_s=30)
        assert len(api.requests) == 2
    assert (outcome.triage.queue, outcome.triage.confidence) == ("billing", 0.92)
    assert outcome.summary == "Customer was charged twice for March."
    (request,) = tickets.requests
    assert (request["json"]["queue"], request["json"]["summary"]) == ("billing", outcome.summary)


def test_run_script_prints_the_filed_ticket(worker_process: Any, settings: MeshSettings,
                                            tickets: RecordingServer) -> None:
    support_worker(worker_process, tickets)
    done_run = subprocess.run([sys.executable, "-m", "examples.support.run", "--id", "t-7", TICKET.subject,
                               TICKET.body], env=mesh_env(settings), cwd=ROOT, capture_output=True, text=True,
                              timeout=90, stdin=subprocess.DEVNULL)
    assert done_run.returncode == 0, done_run.stderr
    printed = json.loads(done_run.stdout)
    assert printed["ticket"] == "t-7" and printed["filed"]["reference"] == "TCK-1"
    assert len(tickets.requests) == 1
