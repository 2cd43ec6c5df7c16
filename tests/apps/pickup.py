"""An app whose handlers look at their own step's record and trace from inside, right as they start:
what a step's pick-up guarantees to every other reader and writer of the record while its handler
runs (``mesh worker --app tests.apps.pickup:app``).

Each handler says what it saw in a Redis key of the test's namespace (:func:`seen_key`), so the
test reads it back instead of timing anything.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

from pydantic import BaseModel

from mesh import App, AsyncContext, Context, Pipeline
from mesh.broker import MeshClient
from mesh.broker.keys import prefix

app = App("pickup")

#: How long a held handler waits for its release at most (s).
HOLD_S = 60.0


class Item(BaseModel):
    text: str


class Done(BaseModel):
    text: str


def seen_key(namespace: str, job_id: str) -> str:
    return f"{prefix(namespace)}:test.seen:{job_id}"


def arrived_key(namespace: str, job_id: str) -> str:
    return f"{prefix(namespace)}:test.arrived:{job_id}"


def release_key(namespace: str, job_id: str) -> str:
    return f"{prefix(namespace)}:test.release:{job_id}"


def runs_key(namespace: str, job_id: str) -> str:
    return f"{prefix(namespace)}:test.runs:{job_id}"


def _ns(ctx: Context | AsyncContext) -> str:
    return str(ctx.runtime.settings.namespace)


def _look(ctx: Context | AsyncContext) -> None:
    """Keep, under :func:`seen_key`, the state the job's record shows for this step as its handler
    starts (what any reader or writer of the record sees then)."""
    state = ctx.runtime.jobs.get(ctx.job_id).steps[ctx.step_id].state
    ctx.runtime.redis.set(seen_key(_ns(ctx), ctx.job_id), state.value)


def _cancel(ctx: Context | AsyncContext) -> None:
    """Another writer of the record (``mesh cancel``) acts on the job while this handler runs."""
    MeshClient(ctx.runtime.settings, client=ctx.runtime.redis).cancel(ctx.job_id, reason="changed plans")


@app.agent
def noted(ctx: Context, item: Item) -> Done:
    """A short step that writes a progress note and ends at once."""
    ctx.progress(f"noted {item.text}")
    return Done(text=item.text)


@app.agent
def cancels(ctx: Context, item: Item) -> Done:
    """Its job is cancelled as its handler starts; it ends at once."""
    _look(ctx)
    _cancel(ctx)
    return Done(text=item.text)


@app.agent
async def cancels_async(ctx: AsyncContext, item: Item) -> Done:
    """Its job is cancelled as its handler starts; it awaits (an hour) until the cancel stops it."""
    _look(ctx)
    _cancel(ctx)
    await asyncio.sleep(3600)
    return Done(text="never")


@app.agent
def held(ctx: Context, item: Item) -> Done:
    """Says it started, then waits for its release (a step running for as long as the test likes)."""
    _look(ctx)
    ns = _ns(ctx)
    ctx.runtime.redis.set(arrived_key(ns, ctx.job_id), 1)
    deadline = time.monotonic() + HOLD_S
    while not ctx.runtime.redis.exists(release_key(ns, ctx.job_id)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return Done(text=item.text)


@app.agent
def dies_once(ctx: Context, item: Item) -> Done:
    """Its first run kills its own worker (SIGKILL) the moment it starts; the next run ends."""
    if ctx.runtime.redis.incr(runs_key(_ns(ctx), ctx.job_id)) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return Done(text=item.text)


@app.agent
def stops_once(ctx: Context, item: Item) -> Done:
    """Its first run stops its own worker (SIGSTOP) the moment it starts; woken (SIGCONT) long after
    another worker took the step over, it ends as if nothing happened.

    The signal goes to this thread (``pthread_kill``), not to the process (``os.kill``): a process's
    SIGSTOP is taken by one of its threads (the main one, as a rule), which then stops the others, and
    until then this thread runs on. On a loaded machine it returned, and its success was written and
    logged within milliseconds of the step's start (well within its lease), before the process stopped.
    Sent to itself, the stop takes this thread before the call returns."""
    if ctx.runtime.redis.incr(runs_key(_ns(ctx), ctx.job_id)) == 1:
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    return Done(text=item.text)



@app.agent
def relayed(ctx: Context, item: Item) -> Done:
    """A pipeline's first step: its success hands the next step over, its pick-up written with it
    (mesh.broker.step_write)."""
    return Done(text=item.text)


# Pipelines whose second step is one of the above, handed over by its first step's success.
for _name, _first, _second in [("then_cancels", relayed, cancels), ("then_held", relayed, held),
                               ("then_dies_once", relayed, dies_once), ("then_stops_once", relayed, stops_once),
                               ("then_noted", relayed, noted), ("held_then_noted", held, noted)]:
    app.pipeline(Pipeline(_name).step("first", agent=_first).step("second", agent=_second, depends_on=["first"]))
