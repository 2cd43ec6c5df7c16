"""A pipeline step's ``model`` and ``retry_policy.backoff`` act: the model reaches the provider's
request (over a real worker and a loopback OpenAI-compatible server), and ``route()`` waits
between retries as the backoff says, always jittered; deferrals keep their own waits."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from mesh import App, Context, MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker.router import Route, route
from mesh.broker.settings import MeshSettings
from mesh.contracts import FailureClass as F
from mesh.contracts import State
from tests.agents.openai_server import FakeOpenAI, completion


class Topic(BaseModel):
    text: str


class Summary(BaseModel):
    text: str


class Noted(BaseModel):
    text: str
    backoff: str | None = None


app = App("step-policy")


@app.agent
def summarize(ctx: Context, topic: Topic) -> Noted:
    answer = ctx.model.complete(f"{ctx.step_id}: {topic.text}", Summary, system="Summarize.")
    return Noted(text=answer.text, backoff=ctx.env.backoff)


@pytest.fixture
def api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        server.responder = lambda request: (200, completion(json.dumps({"text": "short"})), {})
        yield server


@pytest.fixture
def worker(make_settings: Callable[..., MeshSettings], api: FakeOpenAI) -> Iterator[MeshSettings]:
    from mesh.ops.worker import start_worker

    settings = make_settings(model_provider="openai", model_url=api.url, model_name="gpt-test", model_timeout_s=10)
    started = start_worker(settings, None, 2, app=app)
    yield settings
    started.stop(timeout=10_000)
    started.broker.close()


@pytest.mark.slow
def test_a_steps_model_reaches_the_provider_and_a_step_without_one_uses_mesh_model_name(worker, rclient, api):
    spec = check(Pipeline("models")
                 .step("plain", agent="summarize", retry_policy={"max_attempts": 2, "backoff": "fixed"})
                 .step("sonnet", agent="summarize", model="claude-3-5-sonnet")
                 .build(), app)
    mesh = MeshClient(worker, client=rclient, app=app)
    record = mesh.wait(mesh.run(spec, {"text": "retries"}).id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    seen = {r["json"]["messages"][-1]["content"].split(":")[0]: r["json"]["model"] for r in api.requests}
    assert seen == {"plain": "gpt-test", "sonnet": "claude-3-5-sonnet"}
    # The step's backoff rides on its envelope (as the router reads it); a step without one has none.
    assert (record.result["plain"]["backoff"], record.result["sonnet"]["backoff"]) == ("fixed", None)


S = MeshSettings(max_retries=5, max_defers=3, retry_min_backoff_ms=100, retry_max_backoff_ms=10_000)


def delay(cls: F = F.UNKNOWN, backoff: str | None = None, *, attempt: int = 1, rng: float = 0.5,
          retry_after_s: float | None = None, defers: int = 0) -> Any:
    return route(cls, retry_after_s, attempt=attempt, defers=defers, remaining_s=math.inf, timeout_retries=0,
                 settings=S, rng=lambda: rng, backoff=backoff)


@pytest.mark.parametrize("backoff", [None, "exponential"])
def test_exponential_backoff_is_full_jitter_growing_with_the_attempt(backoff):
    assert [delay(backoff=backoff, attempt=n, rng=1.0).delay_ms for n in (1, 2, 3, 4)] == [100, 200, 400, 800]
    assert {delay(backoff=backoff, attempt=3, rng=x).delay_ms for x in (0.0, 0.5)} == {100, 250}


def test_fixed_backoff_waits_the_minimum_plus_up_to_as_much_again_whatever_the_attempt():
    for attempt in (1, 3, 5):
        got = [delay(backoff="fixed", attempt=attempt, rng=x) for x in (0.0, 0.5, 1.0)]
        assert {g.route for g in got} == {Route.RETRY}
        assert [g.delay_ms for g in got] == [100, 150, 200]


def test_no_backoff_retries_at_once_with_only_a_tenth_of_the_minimum_as_jitter():
    for attempt in (1, 5):
        got = [delay(backoff="none", attempt=attempt, rng=x) for x in (0.0, 0.5, 1.0)]
        assert {g.route for g in got} == {Route.RETRY}
        assert [g.delay_ms for g in got] == [0, 5, 10]


@pytest.mark.parametrize("backoff", ["fixed", "none"])
def test_deferrals_and_the_retry_budget_ignore_the_steps_backoff(backoff):
    assert delay(F.RATE_LIMITED, backoff, retry_after_s=2.0, rng=1.0).delay_ms == 2250
    assert delay(F.RATE_LIMITED, backoff, defers=2, rng=1.0).delay_ms == 400  # the defer's own full jitter
    assert delay(backoff=backoff, attempt=6).route is Route.DEAD_LETTER


def test_the_step_model_wrapper_keeps_the_providers_name_plans_and_other_attributes():
    from mesh.agents.context import StepModel
    from mesh.agents.providers import LocalProvider

    local = LocalProvider()
    wrapped = StepModel(local, "claude-3-5-sonnet")
    assert wrapped.name == local.name and wrapped._meter is local._meter  # type: ignore[attr-defined]
    assert wrapped.plan("fix the build") == local.plan("fix the build")
    assert wrapped.complete("hello", Summary) == local.complete("hello", Summary)
