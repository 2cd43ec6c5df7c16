"""A model API's 429 lowers the rate that governs the agent's model calls for the whole fleet: a real
worker process, an agent declaring ``rate: {requests: 40/s, tokens: ...}`` and asking a loopback
server speaking the OpenAI wire format that allows 5 requests a second and answers 429 beyond, with
Retry-After and ``x-ratelimit-*`` headers. The agent's rate factor drops (``mesh limits``, Redis), then
climbs back gradually once the 429s stop; every job succeeds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import wait_for
from httpserver import RecordingServer, SlidingWindow

from mesh.broker import MeshClient
from mesh.broker.limits import limit_states
from mesh.broker.settings import MeshSettings
from mesh.contracts import State
from tests.agents.openai_server import completion

pytestmark = pytest.mark.slow

APP = "tests.apps.model_limited:app"
LIMIT = "agent:asker"


class ModelWindow(SlidingWindow):
    """A chat-completions endpoint answering at most ``rate`` requests in any second; beyond, 429 with
    Retry-After and the ``x-ratelimit-*`` headers OpenAI sends."""

    refused = {"error": {"message": "Rate limit reached for requests", "type": "requests"}}

    def accept(self, in_window: int) -> tuple[Any, ...]:
        return 200, completion(json.dumps({"text": "ok"}), usage=(20, 5))


def factor(client: MeshClient) -> float:
    (state,) = limit_states(client.redis, client.keys, [LIMIT])
    return state.factor


def test_a_model_apis_429_lowers_the_agents_rate_for_the_fleet_and_it_recovers_gradually(
        settings: MeshSettings, client: MeshClient, worker_process: Any, cli: Any) -> None:
    from tests.apps.model_limited import app

    jobs = 30
    with RecordingServer(ModelWindow(5)) as server:
        worker_process("--app", APP, "--agents", "asker", "--threads", "4", MODEL_RATE="40/s",
                       MESH_MODEL_PROVIDER="openai", MESH_MODEL_URL=server.url("/v1"), MESH_MODEL_NAME="gpt-test",
                       MESH_MAX_DEFERS="100")
        sender = MeshClient(settings, client=client.redis, app=app)
        refs = sender.send_many("asker", [({"n": i}, f"ask-{i}") for i in range(jobs)])
        wait_for(lambda: factor(client) < 1, timeout_s=60, interval_s=0.05)  # lowered for the fleet
        wait_for(lambda: all(client.status(r.id).state is State.SUCCEEDED for r in refs), timeout_s=120,
                 interval_s=0.5)
        seen = list(server.requests)
    assert sum(1 for r in seen if r["status"] == 200) == jobs  # each job's answer came once
    assert any(r["status"] == 429 for r in seen)
    shown = {row["name"]: row for row in json.loads(cli("limits", "--json").stdout)}
    assert shown[LIMIT]["factor"] < 1 and shown[LIMIT]["rejected"] >= 1, shown[LIMIT]
    # No 429 comes any more: the factor climbs back a little at a time (AIMD), not to 1 at once.
    low = factor(client)
    assert low < 1
    climbed = wait_for(lambda: (f := factor(client)) >= low + 0.04 and f, timeout_s=30, interval_s=0.2)
    assert climbed < 1, (low, climbed)
    print(f"{sum(1 for r in seen if r['status'] == 429)} of {len(seen)} model calls answered 429; the agent's rate "
          f"factor {low:.3f} when the jobs had succeeded, {climbed:.3f} once it had climbed 0.04")
