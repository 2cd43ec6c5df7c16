"""An app for the crash tests of a key shared across shards (tests/pipelines/test_shared_key_shards.py).

``post`` counts its runs per key in ``{ns}:test.runs`` and, while ``{ns}:test.wait`` exists (or the set
``{ns}:test.wait_keys`` holds its key), writes its
process id to ``{ns}:test.holder`` and waits (at most 60 s) for ``{ns}:test.release``; then it calls
``bump``, an effect that counts itself per key in ``{ns}:test.effects`` (through the fence: a paused
attempt's late call is refused), and answers the process id that ran it.

A worker process started with TEST_KILL_AFTER_SHARED_DONE=1 SIGKILLs itself right after a shared
claim is stored as done (broker/shared_claims.py), before the job's own write, once for each time the
test sets ``{ns}:test.kill``; with TEST_STOP_AFTER_SHARED_DONE=1 it SIGSTOPs itself there, for each
``{ns}:test.stop``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from pydantic import BaseModel

from mesh import App, Context, ToolContext
from mesh.broker.keys import prefix
from mesh.broker.shared_claims import SharedClaim, SharedClaims
from mesh.contracts import PermanentFailure, Receipt

app = App("shared-shards")


class Task(BaseModel):
    goal: str


class Posted(BaseModel):
    goal: str
    pid: int


class Bump(BaseModel):
    goal: str


@app.tool
def bump(ctx: ToolContext, args: Bump) -> Receipt:
    ctx.redis.hincrby(f"{prefix(ctx.settings.namespace)}:test.effects", ctx.key, 1)
    return Receipt(tool="bump", effect_id=f"bump-{args.goal}")


@app.agent(tools=["bump"])
def post(ctx: Context, task: Task) -> Posted:
    return _post(ctx, task)


class BigTask(Task):
    pad: int


class BigPosted(Posted):
    pad: str


@app.agent(tools=["bump"])
def post_big(ctx: Context, task: BigTask) -> BigPosted:
    """``post`` with ``pad`` bytes of padding in its output (over MESH_CLAIM_RESULT_BYTES: a large output)."""
    return BigPosted(**_post(ctx, task).model_dump(), pad="x" * task.pad)


class Stamped(BaseModel):
    token: int


@app.tool
def mark(ctx: ToolContext, args: Bump) -> Receipt:
    """Appends the fencing token it is called with to ``{ns}:test.tokens`` (what an endpoint sees)."""
    ctx.redis.rpush(f"{prefix(ctx.settings.namespace)}:test.tokens", ctx.fencing_token)
    return Receipt(tool="mark", effect_id=f"mark-{args.goal}")


@app.agent(tools=["mark"])
def stamp(ctx: Context, task: Task) -> Stamped:
    """Calls ``mark``, then fails for good while ``{ns}:test.fail`` exists; answers ``ctx.token``."""
    ctx.call(mark, Bump(goal=task.goal))
    if ctx.runtime.redis.exists(f"{prefix(ctx.runtime.settings.namespace)}:test.fail"):
        raise PermanentFailure("told to fail")
    return Stamped(token=ctx.token)


def _post(ctx: Context, task: Task) -> Posted:
    runtime, ns = ctx.runtime, ctx.runtime.settings.namespace
    runtime.redis.hincrby(f"{prefix(ns)}:test.runs", ctx.key, 1)
    if runtime.redis.exists(f"{prefix(ns)}:test.wait") or runtime.redis.sismember(f"{prefix(ns)}:test.wait_keys",
                                                                                   ctx.key):
        runtime.redis.set(f"{prefix(ns)}:test.holder", os.getpid())
        deadline = time.monotonic() + 60
        while not runtime.redis.exists(f"{prefix(ns)}:test.release") and time.monotonic() < deadline:
            time.sleep(0.05)  # a stand-in for slow work: the test releases it
    ctx.call(bump, Bump(goal=task.goal))
    return Posted(goal=task.goal, pid=os.getpid())


if os.environ.get("TEST_STOP_AFTER_SHARED_DONE") == "1":
    _done_first = SharedClaims.done

    def _done_then_stop(self: SharedClaims, claim: SharedClaim, result: bytes) -> Any:
        ok = _done_first(self, claim, result)
        if ok and self.client.delete(f"{prefix(claim.keys.namespace)}:test.stop"):
            # between the shared done and the job's own write. To this thread (as tests/apps/pickup.py's
            # stops_once): a process's SIGSTOP is taken by its main thread, which then stops the others,
            # and until then this one ran on; on a loaded machine its job write landed, and was logged,
            # before the process stopped (1 run in 20).
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        return ok

    SharedClaims.done = _done_then_stop  # type: ignore[method-assign]


if os.environ.get("TEST_KILL_AFTER_SHARED_DONE") == "1":
    _done = SharedClaims.done

    def _done_then_die(self: SharedClaims, claim: SharedClaim, result: bytes) -> Any:
        ok = _done(self, claim, result)
        if ok and self.client.delete(f"{prefix(claim.keys.namespace)}:test.kill"):
            os.kill(os.getpid(), signal.SIGKILL)  # between the shared done and the job's own write
        return ok

    SharedClaims.done = _done_then_die  # type: ignore[method-assign]
