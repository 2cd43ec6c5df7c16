"""``TestMesh`` and ``run_pipeline``: an app's pipelines run in this process, on a real Redis.

    record = run_pipeline(app, "triage", {"id": "t-1", ...}, model=TestModel({...}),
                          tools={"file_ticket": fake}, approve={"file": True})

A ``TestMesh`` is a namespace of its own on the Redis at MESH_REDIS_URL (the project's embedded
one when none answers at the default URL), a worker serving the app's agents on threads of this
process (the production worker's broker, middleware, runtime and timer loop), a ``MeshClient``
that knows the app, and a :class:`~mesh.testing.TestClock` for the durable timers: the timers
(approvals' expiries and warnings, sleeps, wait_for timeouts) are due by the Redis clock, so
:meth:`TestMesh.advance` moves every timer of the namespace earlier by the time it lets pass, which
is what they would see had that time passed. Job deadlines, leases and retries keep the real
clock. Closing the mesh stops the worker and deletes every key of its namespace.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, overload

from dramatiq import Worker
from pydantic import BaseModel

from mesh.agents.app import App
from mesh.agents.pipelines import Pipeline, PipelineSpec
from mesh.agents.providers.meter import Meter
from mesh.broker import MeshClient, MeshSettings
from mesh.broker.approvals import EXPIRY, ask_ref
from mesh.broker.client import JobRef, WaitTimeout
from mesh.broker.clock import server_ms
from mesh.broker.keys import Keys
from mesh.broker.timers import Timers, due, due_at
from mesh.contracts import TERMINAL, ConfigError, JobRecord, State, StepRecord
from mesh.contracts.declared import AgentRef, In, Out

from .clock import TestClock
from .context import ToolCall, ToolRef, _fake, _tool_name
from .model import TestModel

#: How a step waiting for approval is decided: True approves, False denies, None lets it expire
#: (the clock is advanced past its timeout).
Approve = Mapping[str, bool | None]

#: How soon a job's timer counts as due for ``wait`` (ms): a short sleep the worker's timer loop is about to fire.
DUE_SOON_MS = 100

#: Moves every timer earlier by ARGV[1] ms: what the timers would see had that time passed.
_SHIFT = """
local moved = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #moved, 2 do
    redis.call('ZADD', KEYS[1], tonumber(moved[i + 1]) - tonumber(ARGV[1]), moved[i])
end
return #moved / 2
"""


class TestMesh:
    """An app on an in-process worker in a namespace of its own (see the module): ``run``/``send``
    work, ``wait`` for it (deciding approvals as ``approve`` says), ``approve``/``deny`` a step,
    ``advance`` the timers' clock. ``model``: the worker's provider (a :class:`TestModel` by
    default); ``tools``: fakes by tool name or declared function (a function of the validated args,
    or the result itself); ``secrets``: the real tools' secrets (as files in a folder of the mesh's
    own, never the environment); ``settings``: MESH_* overrides. Use it as a context manager."""

    __test__ = False  # not a pytest test class

    def __init__(self, app: App, *, model: TestModel | None = None, tools: Mapping[ToolRef, Any] | None = None,
                 secrets: Mapping[str, str] | None = None, redis_url: str | None = None, threads: int = 2,
                 clock: TestClock | None = None, **settings: Any) -> None:
        self.app = app
        self.model = model or TestModel()
        self.clock = clock or TestClock()
        self.clock.on_advance.append(self._shift)
        #: Every tool call the worker made, in order: ``(tool, args, result)`` (the exception when it raised).
        self.calls: list[ToolCall] = []
        self._lock = threading.Lock()
        self._fakes = {_tool_name(app, t): fake for t, fake in (tools or {}).items()}
        unknown = sorted(set(self._fakes) - set(app.tools))
        if unknown:
            raise ConfigError(f"fakes for tools app {app.name!r} does not declare: {unknown}")
        self._secrets = dict(secrets or {})
        self._secrets_dir: Path | None = None
        self._threads = threads
        # one shard whatever MESH_SHARDS says: its worker consumes one (a namespace of its own needs no more)
        self._overrides = {"namespace": f"test-{uuid.uuid4().hex[:12]}", "shards": 1, "retry_min_backoff_ms": 20,
                           "retry_max_backoff_ms": 100, "timer_interval_s": 0.05, "reconnect_delay_s": 0.5,
                           **settings}
        if redis_url is not None:
            self._overrides["redis_url"] = redis_url
        self.settings: MeshSettings | None = None
        self._client: MeshClient | None = None
        self._broker: Any = None
        self._worker: Worker | None = None
        self._timers: dict[str, Any] = {}

    def __enter__(self) -> TestMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> TestMesh:
        """Start the worker (refused, as a worker start, in the mesh's own fast test tier)."""
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> TestMesh:
        from mesh.agents.runtime import AgentRuntime, declare_app
        from mesh.broker.mesh_broker import build_broker
        from mesh.ops.local_redis import ensure_redis
        from mesh.ops.timer_loop import TimerLoop
        from mesh.ops.worker import IDLE_POLL_MS, check_served

        self._secrets_dir = Path(tempfile.mkdtemp(prefix="mesh-testing-"))
        for name, value in self._secrets.items():
            (self._secrets_dir / name).write_text(value)
        settings = MeshSettings.from_env(**self._overrides, secrets_dir=str(self._secrets_dir))
        if settings.shards > 1:
            raise ConfigError(f"a TestMesh runs its worker on one shard: shards={settings.shards} is not served "
                              "(leave it out: the mesh's namespace is its own)", shards=settings.shards)
        url = ensure_redis(settings)  # at the default URL, the embedded one when none answers
        self.settings = settings = settings.model_copy(update={"redis_url": url})
        app = self._worker_app()
        try:
            check_served(app, None, settings)
        except ConfigError as exc:
            if not exc.context.get("unset"):
                raise
            secret, tool = exc.context["secret"], exc.context["tool"]
            raise ConfigError(f"{exc}; a test gives it as secrets={{{secret!r}: ...}} (run_pipeline, TestMesh) "
                              f"or fakes the tool with tools={{{tool!r}: ...}}", **exc.context) from None
        self._broker = broker = build_broker(settings)
        self.model.meter = Meter(settings, broker.records)  # the job's token budget holds, as a worker's
        runtime = AgentRuntime(settings=settings, redis=broker.records, provider=self.model, app=app)
        broker.add_middleware(TimerLoop(settings, broker.records, runtime.timer_handlers()))
        actors = declare_app(broker, runtime)
        self._client = MeshClient(settings, client=broker.records, app=app)
        self._timers = runtime.timer_handlers()
        worker = Worker(broker, queues={a.queue_name for a in actors}, worker_threads=self._threads,
                        worker_timeout=IDLE_POLL_MS)
        broker.emit_after("process_boot")
        worker.start()
        self._worker = worker
        return self

    def close(self) -> None:
        """Stop the worker and delete the namespace's keys."""
        if self._worker is not None:
            self._worker.stop(timeout=10_000)
            self._worker = None
        if self._broker is not None:
            self._broker.close()
            self._broker = None
        if self._client is not None and self.settings is not None:
            r = self._client.redis
            for pattern in Keys(self.settings.namespace).patterns:
                keys = list(r.scan_iter(match=pattern, count=1000))
                for i in range(0, len(keys), 500):
                    r.delete(*keys[i:i + 500])
            r.close()
            self._client = None
        if self._secrets_dir is not None:
            shutil.rmtree(self._secrets_dir, ignore_errors=True)

    @property
    def client(self) -> MeshClient:
        """The mesh's client, which knows the app (``status``, ``cancel``, ``approvals``, ...)."""
        if self._client is None:
            raise ConfigError("the TestMesh is not started: use it as a context manager (with TestMesh(app) as m)")
        return self._client

    def run(self, pipeline: str | PipelineSpec | Pipeline, input: BaseModel | Mapping[str, Any], *,
            key: str | None = None, token_budget: int | None = None) -> JobRef[JobRecord]:
        """Start a run of ``pipeline`` (a name of the app's, a spec or a builder) on ``input`` (a model
        or a mapping)."""
        spec = pipeline.build() if isinstance(pipeline, Pipeline) else pipeline
        return self.client.run(spec, input if isinstance(input, BaseModel) else dict(input), key=key,
                               token_budget=token_budget)

    @overload
    def send(self, agent: AgentRef[In, Out], payload: In | Mapping[str, Any], *, key: str | None = None,
             token_budget: int | None = None) -> JobRef[Out]: ...
    @overload
    def send(self, agent: str, payload: BaseModel | Mapping[str, Any], *, key: str | None = None,
             token_budget: int | None = None) -> JobRef[Any]: ...

    def send(self, agent: AgentRef[Any, Any] | str, payload: BaseModel | Mapping[str, Any], *, key: str | None = None,
             token_budget: int | None = None) -> JobRef[Any]:
        """One message to one of the app's agents (the declared agent or its name; a model or a mapping)."""
        data = payload if isinstance(payload, BaseModel) else dict(payload)
        return self.client.send(agent, data, key=key, token_budget=token_budget)

    def wait(self, job: JobRef | str, *, approve: Approve | None = None, timeout_s: float = 30.0) -> JobRecord:
        """The job once it ended, or once a step waits for an approval ``approve`` does not decide
        (returned ``awaiting_approval``: approve, deny or ``advance`` then wait again), or for a timer or
        an event with nothing else in flight and no timer of it due (returned ``waiting``: ``advance``, or
        ``client.emit``). A step in
        ``approve`` is decided when it waits: True approves, False denies, None lets it expire."""
        job_id = job.id if isinstance(job, JobRef) else job
        decided: set[tuple[str, int]] = set()
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.client.status(job_id)
            if record.state in TERMINAL:
                return record
            waiting = [s for s in record.steps.values() if s.state is State.AWAITING_APPROVAL and s.approval]
            # a step waiting on a timer or an event: ``advance`` or an event (client.emit, .signal) ends it
            unscripted = any(s.state is State.WAITING for s in record.steps.values())
            for step in waiting:
                assert step.approval is not None
                if approve is None or step.step_id not in approve:
                    unscripted = True
                elif (step.step_id, step.approval.asks) not in decided:
                    decided.add((step.step_id, step.approval.asks))
                    self._decide(job_id, step.step_id, approve[step.step_id])
            # and the record read again unchanged: a timer leaves its set once its handler wrote the record,
            # so one fired between the read above and the look at the timers shows in a second read
            if (unscripted and not any(_in_flight(s) for s in record.steps.values()) and not self._due(job_id)
                    and self.client.status(job_id) == record):
                return record
            if time.monotonic() >= deadline:
                raise WaitTimeout(job_id, timeout_s, record)
            time.sleep(0.02)

    def _due(self, job_id: str) -> bool:
        """Whether a timer of the job is due now or within :data:`DUE_SOON_MS` (a sleep over or about to
        be, a wait's look for the events kept for it): the worker's timer loop is about to move it, so it
        is not left waiting yet. (A 1 ms sleep read the moment its step was written is not due yet.)"""
        keys = self.client.keys_of(job_id)
        seconds, micros = self.client.redis.time()
        soon = int(seconds) * 1000 + int(micros) // 1000 + DUE_SOON_MS
        members = self.client.redis.zrangebyscore(keys.timers, "-inf", soon)
        prefix = f"{job_id}|"
        return any((m.decode() if isinstance(m, bytes) else str(m)).partition("|")[2].startswith(prefix)
                   for m in members)

    def approve(self, job: JobRef | str, step: str, *, note: str | None = None, by: str = "test") -> JobRecord:
        """Approve the step waiting in ``job``."""
        return self.client.approve(job.id if isinstance(job, JobRef) else job, step, note=note, by=by)

    def deny(self, job: JobRef | str, step: str, *, reason: str = "denied by the test", by: str = "test") -> JobRecord:
        """Deny the step waiting in ``job``: its ``failure_mode`` applies."""
        return self.client.deny(job.id if isinstance(job, JobRef) else job, step, reason=reason, by=by)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the durable timers: those due by then fire (an approval expires,
        its warning is written) before this returns."""
        self.clock.advance(seconds)

    def expires_in_s(self, job: JobRef | str, step: str) -> float | None:
        """Seconds until the approval ``step`` of ``job`` waits for expires; None when it waits for none."""
        record = self.client.status(job.id if isinstance(job, JobRef) else job)
        rec = record.steps.get(step)
        if rec is None or rec.approval is None or rec.state is not State.AWAITING_APPROVAL:
            return None
        due = due_at(self.client.redis, self.client.keys_of(record.job_id), EXPIRY,
                     ask_ref(record.job_id, step, rec.approval.asks))
        return None if due is None else max(0.0, (due - server_ms(self.client.redis)) / 1000)

    def _decide(self, job_id: str, step: str, decision: bool | None) -> None:
        if decision is True:
            self.approve(job_id, step)
        elif decision is False:
            self.deny(job_id, step)
        else:
            left = self.expires_in_s(job_id, step)
            if left is not None:
                self.advance(left + 0.001)

    def _shift(self, seconds: float) -> None:
        """Move the namespace's timers ``seconds`` earlier, then fire those due (the timer loop may
        fire them first: each fires once)."""
        if self._client is None:
            return
        client, shards = self._client.redis, self._client.shards
        for keys in shards.keys:  # every shard's timers (MESH_SHARDS)
            client.eval(_SHIFT, 1, keys.timers, int(seconds * 1000))
        for keys in shards.keys:
            timers = Timers(client, keys, f"test-{uuid.uuid4().hex[:8]}", self._timers)
            deadline = time.monotonic() + 10.0
            while any(d.kind in self._timers for d in due(client, keys)) and time.monotonic() < deadline:
                if not timers.tick():  # the worker's timer loop holds the lock: it fires them
                    time.sleep(0.01)

    def _worker_app(self) -> App:
        """The app the worker serves: the app's agents and pipelines, its tools with the fakes in, every
        call recorded in ``calls``."""
        served = App(self.app.name)
        for spec in self.app.tools.values():
            if spec.name in self._fakes:  # a fake reads no secret, mints nothing and has no effect to verify
                fake = self._fakes[spec.name]
                spec = dataclasses.replace(spec, run=lambda ctx, args, fake=fake: _fake(fake, args), secrets=(),
                                           verify=None, mint=None)
            served.add_tool(dataclasses.replace(spec, run=self._recorded(spec.name, spec.run)))
        for agent in self.app.agents.values():
            served.add_agent(agent)
        served.pipelines.update(self.app.pipelines)
        return served

    def _recorded(self, tool: str, run: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(ctx: Any, args: Any) -> Any:
            try:
                result = run(ctx, args)
            except BaseException as exc:
                self._record(ToolCall(tool, args, exc))
                raise
            if inspect.isawaitable(result):  # an async tool (or fake): recorded once awaited
                return self._awaited(ToolCall(tool, args, result))
            self._record(ToolCall(tool, args, result))
            return result

        return recorded

    async def _awaited(self, call: ToolCall) -> Any:
        try:
            result = await call.result
        except BaseException as exc:
            self._record(call._replace(result=exc))
            raise
        self._record(call._replace(result=result))
        return result

    def _record(self, call: ToolCall) -> None:
        with self._lock:
            self.calls.append(call)


def _in_flight(step: StepRecord) -> bool:
    """The step is running or sent: the job moves on without a decision."""
    return step.state is State.RUNNING or (step.state is State.QUEUED and step.sent_at is not None)


def run_pipeline(app: App, pipeline: str | PipelineSpec | Pipeline, input: BaseModel | Mapping[str, Any], *,
                 model: TestModel | None = None, tools: Mapping[ToolRef, Any] | None = None,
                 secrets: Mapping[str, str] | None = None, approve: Approve | None = None, key: str | None = None,
                 token_budget: int | None = None, timeout_s: float = 30.0, **settings: Any) -> JobRecord:
    """Run ``pipeline`` of ``app`` on ``input`` on a :class:`TestMesh` of its own and return the job's
    record once it ended (or once a step waits for an approval ``approve`` does not decide). The
    namespace is deleted before this returns."""
    with TestMesh(app, model=model, tools=tools, secrets=secrets, **settings) as mesh:
        return mesh.wait(mesh.run(pipeline, input, key=key, token_budget=token_budget), approve=approve,
                         timeout_s=timeout_s)
