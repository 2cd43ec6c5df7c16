"""The body every agent actor shares: check the envelope, pick the step up, run, record, hand on."""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import httpx
import redis
from pydantic import BaseModel, ValidationError
from redis import Redis

from mesh.broker import claim_results, redact, trace
from mesh.broker.breaker import Breakers
from mesh.broker.clock import ServerClock
from mesh.broker.connection import staged
from mesh.broker.fence import Fence
from mesh.broker.idempotency import current_lease
from mesh.broker.jobs import JobNotFound, JobStore, on_step_lost
from mesh.broker.keys import Keys
from mesh.broker.limits import let_go
from mesh.broker.mesh_broker import MeshBroker
from mesh.broker.observe import Counters, FlushCounters, count_outcome, observe_duration, running_member
from mesh.broker.pipelines import PipelineStore
from mesh.broker.settings import MeshSettings
from mesh.broker.shared_claims import SharedClaims
from mesh.broker.step_write import SENTINEL, Picked, PickUp, StepWrites, Written
from mesh.contracts import (
    TERMINAL,
    ConfigError,
    ContractError,
    CycleDetected,
    DeadlineExceeded,
    Envelope,
    InvalidOutput,
    JobRecord,
    LeaseLost,
    MeshError,
    OutcomeUnrecorded,
    PermanentFailure,
    Plan,
    State,
    dumps,
)
from mesh.contracts.jobs import UNDO_CALLS, is_compensation
from mesh.contracts.messages import validate_model, validate_output_model

from .app import AgentSpec, App
from .async_context import run_handler
from .context import Context
from .effects import with_effect
from .event_loop import EventLoops
from .pipelines import PipelineSpec, approvals, progress
from .pipelines.engine import Routes, after_loss, load_spec, retention_s, traced
from .pipelines.export import SpanExport
from .providers import Meter, ModelProvider, provider_for
from .tool_loop import CallNeedsApproval
from .tools.allow import Resolver, system_resolver

logger = logging.getLogger(__name__)


class Undone(BaseModel):
    """The output of a compensation of tool calls: how many were undone."""

    undone: int

@dataclass
class AgentRuntime:
    """What agents share in one worker process: the app, settings, Redis, job store, model provider,
    HTTP client and breakers."""

    settings: MeshSettings
    redis: Redis
    provider: ModelProvider
    #: The app whose agents this worker serves (the built-in one is loaded by whoever serves it).
    app: App
    http: httpx.Client = field(default_factory=httpx.Client)
    breakers: Breakers | None = None
    #: How tools resolve host names (see :mod:`mesh.agents.tools.allow`).
    resolve: Resolver = system_resolver

    def __post_init__(self) -> None:
        self.worker = trace.worker_name()
        self.keys = Keys(self.settings.namespace, self.settings.shard)
        self.jobs = JobStore(self.redis, self.keys, self.settings.job_retention_s,
                             self.settings.dead_letter_job_retention_s)
        self.pipelines = PipelineStore(self.redis, self.keys)
        self.steps = StepWrites(self.redis, self.jobs, self.settings.dedup_ttl_s)
        self.steps.pick_up = self.pick_up
        #: The steps' success counters, written once per MESH_COUNTER_FLUSH_S; None (0): with each write.
        self.counters = (Counters(self.redis, self.keys, self.settings.counter_flush_s)
                         if self.settings.counter_flush_s > 0 else None)
        self.fence = Fence(self.settings, self.redis)
        self.shared_claims = SharedClaims(self.settings, self.redis)
        self.clock = ServerClock(self.redis)
        self.spans = SpanExport(self.settings.otlp_endpoint, service=f"mesh:{self.settings.namespace}")
        agents = self.app.agents
        self.routes = Routes.from_settings(self.settings, queue=lambda a: agents[a].queue if a in agents else a,
                                           version=lambda a: agents[a].version if a in agents else None,
                                           flow_key=self.app.flow_key)
        if self.breakers is None:
            self.breakers = Breakers(self.settings, self.redis)
        # A pipeline step lost on the failure path (the broker's) moves its job on by the engine.
        on_step_lost(lambda record, events: after_loss(load_spec(self.pipelines, record.pipeline or "",
                                                                 record.pipeline_digest or ""),
                                                       record, self.routes, events))

    @classmethod
    def from_settings(cls, settings: MeshSettings, client: Redis, app: App) -> AgentRuntime:
        breakers = Breakers(settings, client)
        provider = provider_for(settings, breakers, Meter(settings, client))
        return cls(settings=settings, redis=client, provider=provider, breakers=breakers, app=app)

    def handle(self, spec: AgentSpec, raw: Any) -> None:
        """Run one message whose key this thread has claimed; the result goes to the job record
        and to the claim (``done``), both fenced by the claim's token."""
        agent = spec.name
        if not (isinstance(raw, dict) and isinstance(raw.get("key"), str) and raw["key"]):
            # A foreign producer's bare payload: poison, not a sign of a broken deployment.
            raise ContractError(f"not a mesh message: a {agent} message carries an envelope with a key, "
                                f"not {type(raw).__name__} {str(raw)[:80]}")
        lease = current_lease()
        if lease is None:
            raise PermanentFailure("no claim held on the message key: the broker lacks the Idempotency middleware")
        picked = lease.picked
        if isinstance(picked, Picked) and picked.envelope is not None and raw == picked.raw:
            # Its pick-up, written by the success that fetched this very message, validated this envelope
            # and input: checked again for what moves with time (the deadline), not validated again.
            env, checked = self.checked(agent, picked.envelope), picked.payload
        else:
            env, checked = self.envelope(agent, raw), None
        if env.contract_version is not None and env.contract_version != spec.version:
            raise ContractError(f"message for contract version {env.contract_version} of agent {agent!r}; this "
                                f"worker serves version {spec.version}: not run against the wrong model. If no "
                                f"worker serves {env.contract_version} any more and the payload fits version "
                                f"{spec.version}: mesh dlq replay ID --to-version {spec.version}")
        # A compensation of the step's tool calls (tools declared with compensate=): the compensating
        # tools run, not the handler, and neither the agent's input nor its output model applies.
        undo = env.payload.get(UNDO_CALLS) if is_compensation(env.step_id) else None
        try:
            payload = (None if isinstance(undo, list) else checked if checked is not None
                       else validate_model(agent, spec.input, env.payload))
        except ContractError as exc:  # dead-lettered: its error names the job's step and the field
            raise ContractError(f"step {env.step_id}: {exc.message}", errors=exc.errors, agent=agent) from None
        envelope = trace.fields_of(env)
        member = running_member(env.job_id, env.step_id)
        events: list[dict[str, Any]] = []
        start = self._start(env, lease.token, events)

        # The success is computed from what this write leaves: the record is read and validated once.
        read, lease.record = lease.record, None
        lease.picked = None
        if isinstance(picked, Exception):  # its pick-up, written by the success that fetched it, refused
            raise picked
        mine = picked.record.steps.get(env.step_id) if isinstance(picked, Written) else None
        if (isinstance(picked, Written) and picked.record.job_id == env.job_id and mine is not None
                and mine.state is State.RUNNING and mine.token == lease.token):
            written = picked  # written by the success that fetched this message (mesh.broker.step_write)
        else:
            try:
                written = self.steps.write(env.job_id, start, fence=lease, also=self._index_running(env),
                                           events=events, read=read)
            except JobNotFound:
                raise PermanentFailure(f"job {env.job_id} has no record", job_id=env.job_id) from None
        record = written.record
        step = record.steps[env.step_id]
        if step.state is State.AWAITING_APPROVAL:
            lease.result, lease.done = None, False  # the key stays free for the approved call
            logger.info("step parked for approval", extra={"key": env.key, "job_id": env.job_id,
                                                           "step_id": env.step_id})
            return
        flow = self.flow(record)
        if step.state is State.CANCELLED and step.result is None:
            # Its job was cancelled before it ran (mesh cancel): acked, nothing run, the key left free.
            trace.emit(self.redis, self.keys, trace.event("not_run", envelope, worker=self.worker,
                                                          reason=step.error or "cancelled"))
            lease.result, lease.done = None, False
            return
        if step.state in TERMINAL:
            # Finished before its claim said so (a crash between the two): a duplicate, answered
            # with the stored result. A dead-lettered step stays free for its replay.
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self.keys.stats, "duplicates", 1)
            count_outcome(pipe, self.keys, agent, "duplicate")
            trace.stage(pipe, self.keys, trace.event("duplicate", envelope, worker=self.worker, state=str(step.state)))
            pipe.execute()
            logger.info("duplicate suppressed", extra={"key": env.key, "trace_id": env.trace_id})
            lease.result, lease.done = step.result, step.state is State.SUCCEEDED
            return
        if lease.served and lease.recorded_output is None:
            # The key's effect happened, but its output is kept nowhere any more: never run it again.
            raise PermanentFailure(lease.output_gone or f"key {env.key} is done but its output is not kept")
        if lease.recorded_output is not None:
            # An earlier attempt finished and Redis refused its record, or another job's step under
            # this key (a shared idempotency_key) did the work: record that output, run nothing.
            result: Any = lease.recorded_output
            effect = None
        else:
            ctx = Context(self, env, spec, lease)
            try:
                if isinstance(undo, list):
                    result = ctx.undo(undo)
                elif inspect.iscoroutinefunction(spec.handler):  # on this thread's event loop
                    result = run_handler(ctx, typing.cast(BaseModel, payload))
                else:
                    result = spec.handler(ctx, payload)
            except CallNeedsApproval as asked:  # a destructive call of its tool loop: parked, not failed
                self._park_call(flow, env, lease, asked, member)
                return
            effect = ctx.effect()
        if isinstance(result, BaseModel):  # by its wire names: the output model validates those
            result = result.model_dump(mode="json", by_alias=True)
        # Masked before anything keeps it: the record, the claim, the trace, the next steps' messages.
        output = (validate_output_model(agent, spec.output, redact.redact_value(result)) if not isinstance(undo, list)
                  else Undone.model_validate(redact.redact_value(result)))
        self._check_limits(agent, output)
        duration = time.monotonic() - lease.started

        served = lease.served

        def counted(pipe: Any) -> None:
            if served:  # nothing ran: the output is another job's, under the same key
                count_outcome(pipe, self.keys, agent, "duplicate")
                return
            count_outcome(pipe, self.keys, agent, "succeeded")
            observe_duration(pipe, self.keys, agent, duration)

        def succeeded(pipe: Any, record: JobRecord) -> None:
            pipe.zrem(self.keys.running, member)
            if self.counters is None:
                counted(pipe)

        shared = {"shared": True} if served else {}
        dumped = output.model_dump(mode="json", by_alias=True)
        events = [trace.event("succeeded", envelope, worker=self.worker, duration_s=round(duration, 4),
                              **shared, **traced(flow, "output", dumped))]
        # The claim's done (bounded like every done claim, MESH_CLAIM_RESULT_BYTES) and the message's ack
        # go with the record, the trace, the counters and the next steps' messages: one script.
        done = None if lease.shared else claim_results.encode(dumped, lease.envelope,
                                                               self.settings.claim_result_bytes)
        try:
            change = progress.complete(env, output, (lease.tokens_in, lease.tokens_out), spec=flow,
                                       routes=self.routes, events=events, undo_calls=lease.undo_calls or None)
            # The handler is done: its flow-limit slots go back before the write sends its next step,
            # which would otherwise find them held and wait on the delay queue.
            let_go()
            if lease.across is not None and lease.across.held:
                # The key's claim in its own shard first (another slot): a crash after it leaves the key
                # done, and the redelivery records its output into this job, running nothing again. The
                # output whole, never a reference to this step's record: that write has not landed yet,
                # and a crash before it would leave the key done with its output kept nowhere.
                self._done_shared(env, lease, claim_results.whole(dumped))
            wrote = self.steps.write(env.job_id, with_effect(change, env.step_id, effect), fence=lease,
                                     also=succeeded, events=events, retention_s=retention_s(flow), known=written,
                                     done=done, settle=True)
        except redis.RedisError as exc:
            raise OutcomeUnrecorded(f"step finished but its record failed: {exc}", dumped) from exc
        self._shrink_shared(env, lease, dumped, wrote.record)
        if self.counters is not None:  # once the write landed: counted once, whatever it was retried
            counted(self.counters)
        lease.result = dumped
        self._export(flow, env, duration, output=lease.result)
        logger.info("step succeeded", extra={"agent": agent, "key": env.key, "trace_id": env.trace_id,
                                             "job_id": env.job_id, "attempt": env.attempt, "token": lease.token,
                                             "duration_s": round(duration, 4)})

    def _done_shared(self, env: Envelope, lease: Any, done: bytes) -> None:
        """Store the shared claim (broker/shared_claims.py) as done with ``done`` (its reference, for a large
        output, names this shard), fenced by its token: LeaseLost, and nothing written, when another attempt
        took the key over or finished it (this one was paused)."""
        claim = lease.across
        if not self.shared_claims.done(claim, done):
            lease.lost = True
            self.fenced(env, "shared done", claim.token)
            raise LeaseLost(lease.key, claim.token)

    def _shrink_shared(self, env: Envelope, lease: Any, dumped: dict[str, Any], record: JobRecord) -> None:
        """A large output this attempt stored whole in the shared claim, replaced there by a reference to
        its step (naming this shard) once the job's record holds it, as a done claim keeps a large output.
        Left whole when the record does not hold it, or Redis does not answer (a cost, not a loss)."""
        claim = lease.across
        if claim is None or not claim.done:
            return
        ref = claim_results.encode(dumped, lease.envelope, self.settings.claim_result_bytes, shard=self.settings.shard)
        step = record.steps.get(env.step_id)
        if not ref.startswith(claim_results.REF) or step is None or step.result != dumped:
            return
        try:
            self.shared_claims.keep(claim, ref)
        except redis.RedisError as exc:
            logger.warning("shared claim's output left whole", extra={"key": env.key, "error": str(exc)})

    def _index_running(self, env: Envelope) -> Any:
        """What a pick-up's write stages beside the record: the running index's entry of ``env``'s step,
        when the write leaves it running (read by stuck detection and ``mesh status``)."""
        member = running_member(env.job_id, env.step_id)

        def also(pipe: Any, record: JobRecord) -> None:
            if record.steps[env.step_id].state is State.RUNNING:
                pipe.zadd(self.keys.running, {member: self.clock.now_s()})  # compared on other hosts

        return also

    def _start(self, env: Envelope, token: int, events: list[dict[str, Any]]) -> Any:
        """The pick-up of ``env``'s step by the attempt holding ``token``: its change, which leaves
        its ``picked_up`` event (and an approval's) in ``events``."""
        picked = trace.event("picked_up", trace.fields_of(env), worker=self.worker, token=token)

        def start(record: JobRecord) -> Any:
            events[:] = [picked]  # a transaction retried after a conflict starts over
            # A declared pipeline's spec says whether the input is kept in the event, or its size and hash.
            picked.update(traced(self.flow(record), "input", env.payload))
            parked = approvals.recheck(self.flow(record), record, env, events)
            if parked is not None:  # not the call a person approved: asked (again), not run
                return parked, []
            return progress.start(env, token)(record)

        return start

    def pick_up(self, record: JobRecord, data: bytes, message: Any) -> PickUp | None:
        """The pick-up of ``message``, the next step of ``record``'s job, computed from ``record`` (as
        ``data``, what a success leaves) with :data:`~mesh.broker.step_write.SENTINEL` as its token, for
        the success's write to run once that write has claimed the message (see
        :mod:`mesh.broker.step_write`); None when the step would not simply run (checks that :meth:`handle`
        makes before its pick-up fail, an approval is asked, it is cancelled or already ended)."""
        spec = self.app.agents.get(message.actor_name)
        raw = message.args[0] if len(message.args) == 1 and not message.kwargs else None
        if spec is None or not isinstance(raw, dict) or message.options.get("mesh_output") is not None:
            return None
        try:
            env = self.envelope(spec.name, raw)
            if env.contract_version is not None and env.contract_version != spec.version:
                return None
            if is_compensation(env.step_id):
                return None
            if self.shared_claims.where(env.key, raw) is not None:
                # Its key is claimed in another shard too (broker/shared_claims.py), where another job may
                # hold it: the message may go to the delay queue instead of running, and its record must
                # not say running meanwhile (a cancel would wait for it, and let it run after).
                return None
            payload = validate_model(spec.name, spec.input, env.payload)
        except MeshError:
            return None
        events: list[dict[str, Any]] = []
        new, messages = self._start(env, SENTINEL, events)(record)
        step = new.steps.get(env.step_id)
        if messages or step is None or step.state is not State.RUNNING or step.token != SENTINEL or len(events) != 1:
            return None
        pipe = self.redis.pipeline(transaction=False)
        self.jobs.stage_write(pipe, record, new, [], events=events, also=self._index_running(env))
        commands = staged(pipe)
        key = self.keys.job(env.job_id)
        written = next((c[2] for c, _ in commands if c[0] == "SET" and c[1] == key), None)
        if not isinstance(written, bytes) or any(c[0] in ("EVAL", "EVALSHA", "FCALL") for c, _ in commands):
            return None
        return PickUp(message.options["redis_message_id"], env.step_id, commands, Written(new, written), raw, env,
                      payload)

    def timer_handlers(self) -> dict[str, Any]:
        """What fires this app's durable timers (approvals' expiries and warnings, sleeps and waits) here."""
        from .pipelines.waits import Waits

        waits = Waits(self.jobs, self.pipelines, self.routes, self.settings, self.clock)
        return {**approvals.timer_handlers(self.jobs, self.pipelines, self.routes, self.clock, self.worker),
                **waits.timer_handlers()}

    def _check_limits(self, agent: str, output: BaseModel) -> None:
        """InvalidOutput, before anything is recorded or sent, for an output over MESH_MAX_OUTPUT_BYTES
        or a plan of more steps than MESH_MAX_FAN_OUT."""
        limits = self.settings
        if isinstance(output, Plan) and len(output.steps) > limits.max_fan_out:
            raise InvalidOutput(f"{agent} planned {len(output.steps)} steps, over MESH_MAX_FAN_OUT "
                                f"({limits.max_fan_out}); no step was sent", size=len(output.steps),
                                limit=limits.max_fan_out)
        data = dumps(output)
        if len(data) > limits.max_output_bytes:
            raise InvalidOutput(f"{agent} output of {len(data)} bytes (sha256 {hashlib.sha256(data).hexdigest()}) "
                                f"is over MESH_MAX_OUTPUT_BYTES ({limits.max_output_bytes}); not kept",
                                size=len(data), limit=limits.max_output_bytes)

    def _export(self, flow: PipelineSpec | None, env: Envelope, duration: float, output: Any) -> None:
        """The step's span to OTLP when its pipeline's tracing asks for it: never the step's outcome."""
        try:
            started = time.time() - duration
            self.spans.step(flow, env, started, input=env.payload, output=output,
                            calls=lambda: self._calls(env, started))
        except Exception as exc:  # an exporter bug must not fail a step that is already recorded
            logger.warning("could not export the step's span", extra={"job_id": env.job_id, "error": str(exc)})

    def _park_call(self, flow: PipelineSpec | None, env: Envelope, lease: Any, asked: CallNeedsApproval,
                   member: str) -> None:
        """Park the step for a person's approval of the destructive call ``asked``; its key stays free
        for the approved run (:func:`mesh.agents.pipelines.approvals.park_call`)."""
        events: list[dict[str, Any]] = []
        self.jobs.update(env.job_id, approvals.park_call(flow, env, asked.call, asked.hash, events), fence=lease,
                         events=events, also=lambda pipe, record: pipe.zrem(self.keys.running, member))
        lease.result, lease.done = None, False
        logger.info("step parked for the approval of a call", extra={"key": env.key, "job_id": env.job_id,
                                                                     "step_id": env.step_id, "hash": asked.hash})

    def _calls(self, env: Envelope, started: float) -> list[dict[str, Any]]:
        """The model and tool calls this attempt of ``env``'s step made, from the job's trace."""
        return [e for e in trace.read(self.redis, self.keys, env.job_id)
                if e.get("event") in ("model_call", "tool_call") and e.get("step_id") == env.step_id
                and e.get("attempt") == env.attempt and float(e.get("at") or 0) >= started]

    def flow(self, record: JobRecord) -> PipelineSpec | None:
        """The spec a declared pipeline's job started with; None for any other job."""
        if not (record.pipeline and record.pipeline_digest):
            return None
        return load_spec(self.pipelines, record.pipeline, record.pipeline_digest)

    def tool_call(self, env: Envelope, tool: str, dependency: str, duration_s: float, *,
                  token: int | None = None, status: Any = None, error: str | None = None) -> None:
        """Trace one tool call with the fencing token that made it, and count it as progress (the
        handler moved on), in one round trip."""
        call = trace.event("tool_call", trace.fields_of(env), worker=self.worker, tool=tool, token=token,
                           dependency=dependency, duration_s=round(duration_s, 4),
                           status=redact.redact_value(status), error=error)
        self.progress(env, f"{tool} call to {dependency} {'failed' if error else 'returned'}", before=call)

    def fenced(self, env: Envelope, call: str, token: int) -> None:
        """Trace a call refused because the attempt's lease (``token``) was lost to another owner."""
        ev = trace.event("fenced", trace.fields_of(env), worker=self.worker, call=call, token=token)
        try:
            trace.emit(self.redis, self.keys, ev)
        except redis.RedisError as exc:  # a trace line: the refusal stands without it
            logger.warning("could not trace a fenced call", extra={"error": str(exc)})

    def progress(self, env: Envelope, note: str, *, before: dict[str, Any] | None = None) -> None:
        """The handler moved on: the step's progress counter advances (a step that only heartbeats
        without this is reported stuck). ``before`` is an event written ahead of it, in the same trip."""
        lease = current_lease()
        n = 0
        if lease is not None:
            lease.progress += 1
            lease.progress_at = time.monotonic()
            n = lease.progress
        pipe = self.redis.pipeline(transaction=False)
        if before is not None:
            trace.stage(pipe, self.keys, before)
        pipe.zadd(self.keys.running, {running_member(env.job_id, env.step_id): self.clock.now_s()}, xx=True)
        trace.stage(pipe, self.keys, trace.event("progress", trace.fields_of(env), worker=self.worker,
                                                 progress=n, note=redact.redact(note)))
        try:
            pipe.execute()
        except redis.RedisError as exc:
            # A trace line, not the step's outcome: it must never replace what the handler did.
            logger.warning("could not record progress", extra={"job_id": env.job_id, "error": str(exc)})

    def envelope(self, agent: str, raw: Any) -> Envelope:
        """``raw`` validated as the envelope of a message to ``agent``, and :meth:`checked`."""
        try:
            env = Envelope.model_validate(raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            raise ContractError(f"invalid envelope: {exc.error_count()} error(s)",
                                errors=errors) from None  # type: ignore[arg-type]
        return self.checked(agent, env)

    def checked(self, agent: str, env: Envelope) -> Envelope:
        """``env``, when it is a message to ``agent`` whose deadline has not passed and whose hops
        allow it to run; else the error that dead-letters it."""
        if env.agent != agent:
            raise ContractError(f"envelope for {env.agent!r} delivered to {agent!r}")
        left = env.remaining_s(self.clock.now_s())  # the deadline is on the Redis server's clock
        if left <= 0:
            raise DeadlineExceeded(f"deadline passed {-left:.1f}s ago", deadline=env.deadline)
        if agent in env.hops:
            raise CycleDetected(f"{agent} re-entered: hops {' > '.join(env.hops)}", hops=env.hops)
        if len(env.hops) >= self.settings.max_hops:
            raise CycleDetected(f"{len(env.hops)} hops reach MESH_MAX_HOPS={self.settings.max_hops}")
        return env


def _runs_async(app: App, names: list[str]) -> bool:
    """Whether an agent of ``names``, or a tool or verifier one of them calls, is ``async def``: its
    worker threads then make event loops (a sync handler's async tool runs on the thread's loop too)."""
    tools = [app.tools[t] for n in names for t in app.agents[n].tools if t in app.tools]
    return any(inspect.iscoroutinefunction(fn) for fn in [*(app.agents[n].handler for n in names),
                                                           *(t.run for t in tools), *(t.verify for t in tools)])


def declare_app(broker: MeshBroker, runtime: AgentRuntime, names: list[str] | None = None) -> list[dramatiq.Actor]:
    """Declare the app's agents (``names``, default all) as dramatiq actors on ``broker``, each on its
    own queue, with its policy as actor options (time limit, retries, timeout retries)."""
    app = runtime.app
    app.check()
    names = list(app.agents) if names is None else names
    unknown = [n for n in names if n not in app.agents]
    if unknown:
        raise ConfigError(f"no agent named {', '.join(map(repr, unknown))} in app {app.name!r}; "
                          f"agents are {', '.join(app.agents)}")
    if _runs_async(app, names) and not any(isinstance(m, EventLoops) for m in broker.middleware):
        broker.add_middleware(EventLoops())  # each worker thread's loop closed as the thread stops
    if runtime.counters is not None and not any(isinstance(m, FlushCounters) and m.counters is runtime.counters
                                                for m in broker.middleware):
        broker.add_middleware(FlushCounters(runtime.counters))  # the last interval's, when the worker stops
    actors = []
    for name in names:
        spec = app.agents[name]

        def run(*args: Any, _spec: AgentSpec = spec, **kwargs: Any) -> None:
            if len(args) != 1 or kwargs:
                raise ContractError(f"a {_spec.name} message carries exactly one envelope, "
                                    f"not {len(args)} args and {len(kwargs)} kwargs")
            runtime.handle(_spec, args[0])

        run.__name__ = run.__qualname__ = name
        options: dict[str, Any] = {"timeout_retries": spec.timeout_retries, "throws": (MeshError,)}
        if spec.time_limit_s is not None:
            options["time_limit"] = int(spec.time_limit_s * 1000)
        if spec.max_retries is not None:
            options["max_retries"] = spec.max_retries
        actors.append(dramatiq.Actor(run, broker=broker, actor_name=name, queue_name=spec.queue, priority=0,
                                     options=options))
        broker.record_queues.add(spec.queue)  # each step's pick-up starts from the record its fetch read
    # A step's success fetches its next step for this worker's consumer, when it has room (step_write.py).
    runtime.steps.eager = broker.eager_slot
    return actors
