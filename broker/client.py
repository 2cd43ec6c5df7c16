"""MeshClient: how applications put work on the mesh and follow it.

    ref = client.send(classify, Incoming(text="..."))   # a declared agent and its input model
    ref.result(timeout_s=30)                            # Classified, once the job succeeded

Agents are named by their declared object (``@app.agent``) or by name, payloads given as the
agent's input model or as a dict; either way a payload is checked before anything is written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast, overload

import orjson
import redis
from dramatiq.message import Message
from pydantic import BaseModel

from mesh.contracts import (
    CONTRACTS,
    PRIORITIES,
    TERMINAL,
    ConfigError,
    ContractError,
    JobRecord,
    KeyConflict,
    LimitExceeded,
    MeshError,
    NoOutput,
    Priority,
    State,
    UnknownAgent,
    dumps,
    loads,
    validate_input,
)
from mesh.contracts.approvals import Decision
from mesh.contracts.declared import AgentRef, In, Out
from mesh.contracts.messages import validate_model

from . import approvals, trace
from . import lanes as queue_lanes
from . import waits as wait_store
from .clock import ServerClock
from .connection import (
    NotReplicated,
    WaitingPipeline,
    connect,
    is_cluster,
    on_slot,
    replicated,
    staged,
    transaction,
)
from .jobs import JobNotFound, JobStore
from .keys import Keys
from .observe import running_member
from .outbox import EnqueueScript, NewJobs, encode_checked, register, stage_all
from .pipelines import LATEST, PipelineConflict, PipelineStore, StartRun, stage_register
from .registry import AgentCatalog, Registry
from .settings import MeshSettings
from .shard_readers import pending_approvals, pending_waits, queue_depths
from .shards import Shards, job_id_for, refuse_held_first_shard, shards_refusal


class WaitTimeout(MeshError):
    def __init__(self, job_id: str, timeout_s: float, record: JobRecord) -> None:
        super().__init__(f"job {job_id} still {record.state} after {timeout_s:g}s", job_id=job_id)
        self.record = record


T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """Where a message for an agent goes and what it must satisfy first: its queue, the contract
    version stamped on it (None: unchecked), the check of its payload, and its input and output
    models when the client knows them (None: the agent's workers published a schema only)."""

    agent: str
    queue: str
    version: int | None
    check: Callable[[Any], Any]
    input: type[BaseModel] | None = None
    output: type[BaseModel] | None = None
    #: The flow key of a payload (its agent's limit ``key`` rendered); None: the sender does not know
    #: the agent's limits, and its worker renders the key when it picks the message up.
    flow_key: Callable[[dict[str, Any]], str | None] | None = None


@dataclass(frozen=True)
class JobRef(Generic[T]):
    """A job sent: its id, the key it was sent with and its trace. :meth:`result` waits for its output,
    typed: a ``JobRef[Triage]`` (from ``client.send(triage, ...)``) returns a ``Triage``, a pipeline
    run's its succeeded :class:`JobRecord` (``record.output(step)`` reads each step's output)."""

    id: str
    key: str
    trace_id: str
    #: The client that sent it (None: a ref built by hand, which cannot wait).
    client: MeshClient | None = field(default=None, repr=False, compare=False)
    #: How its output is read from its succeeded record (None: the record itself).
    reader: Callable[[JobRecord], T] | None = field(default=None, repr=False, compare=False)

    def result(self, *, timeout_s: float = 30.0) -> T:
        """Wait (``client.wait``) until the job ends and return its output; NoOutput, naming the job's
        state and error, when it ended otherwise (dead-lettered, halted, cancelled, ...); WaitTimeout
        (with the record as it was) when it has not ended within ``timeout_s``."""
        if self.client is None:
            raise ConfigError(f"job {self.id}: this JobRef knows no client; use client.wait({self.id!r})")
        record = self.client.wait(self.id, timeout_s=timeout_s)
        if record.state is not State.SUCCEEDED:
            raise NoOutput(self.id, str(record.state), record.error)
        return cast(T, record) if self.reader is None else self.reader(record)


#: Trace events one XREAD of :meth:`MeshClient.events` takes at most.
TRACE_BATCH = 200


def checked(priority: Any) -> None:
    """ConfigError unless ``priority`` is one of the levels (high, normal, low)."""
    if priority not in PRIORITIES:
        raise ConfigError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")


def payload_hash(agent: str, payload: dict[str, Any]) -> str:
    """What a key is bound to: the agent and the payload, hashed independent of the keys' order."""
    canonical = orjson.dumps({"agent": agent, "payload": payload}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def trace_id_of(job_id: str) -> str:
    """The W3C trace id of a job the mesh creates: its id's 32 hex digits (``job-`` left out). A job
    id is a uuid5's hex (:func:`job_id_for`: lowercase, its version digit 5, so never all zero), so
    this is a valid trace id, the same for every send of a key, and a trace id names its job with no
    index to read: ``job-`` + the trace id. Every job the mesh creates (a send, a run, a rerun) takes
    its trace id from here."""
    return job_id.removeprefix("job-")


def trace_id_for(key: str) -> str:
    """The W3C trace id of the job a key names (:func:`trace_id_of` of its job id): every send of that
    key reports the same trace."""
    return trace_id_of(job_id_for(key))


@dataclass
class Batch:
    """The new jobs of a send in one shard (:meth:`MeshClient._build`): its keys, the jobs, their refs."""

    keys: Keys
    jobs: NewJobs
    refs: list[JobRef[Any]]


def _refuse_conflicts(records: list[JobRecord], stored: list[Any]) -> None:
    """KeyConflict for the first record whose key already names a job created with another payload
    (stored, or earlier in the same batch)."""
    batch: dict[str, str | None] = {}
    for record, raw in zip(records, stored, strict=True):
        bound = loads(raw).get("payload_hash") if raw else batch.get(record.key)
        batch.setdefault(record.key, record.payload_hash)
        if bound is not None and bound != record.payload_hash:
            raise KeyConflict(record.key, record.job_id, next(iter(record.steps.values())).agent)


#: More bytes than an envelope and its message add to a payload (a key is at most 512 characters, a
#: step id 128): a payload this far under MESH_MAX_MESSAGE_BYTES makes a message within it.
ENVELOPE_SLACK = 8192


#: What loads the pipeline :meth:`MeshClient.submit` runs (the built-in planner → researchers →
#: executor): registered when ``mesh`` is imported and called at the first submit, so neither the
#: broker nor ``import mesh`` loads the built-in app.
_entry: Callable[[], Any] | None = None


def on_submit(load: Callable[[], Any]) -> None:
    """Register what returns the pipeline spec ``MeshClient.submit`` runs (``mesh`` does: it loads
    :mod:`mesh.agents.builtin` when first called)."""
    global _entry
    _entry = load


#: Job control (cancel, rerun), registered by the agents layer (``mesh.agents.pipelines.jobctl``),
#: which holds the engine they need: the broker imports nothing of it.
_control: dict[str, Callable[..., Any]] = {}


def on_job_control(**handlers: Callable[..., Any]) -> None:
    """Register what :meth:`MeshClient.cancel` and :meth:`MeshClient.rerun` call."""
    _control.update(handlers)


def _declared(agent: str, queue: str, version: int, input: type[BaseModel], output: type[BaseModel],
              flow_key: Callable[[dict[str, Any]], str | None] | None = None) -> Target:
    """The target of a declared agent: checked with its input model; the built-in models' own check
    goes further (an executor call's args fit its tool)."""
    builtin = agent in CONTRACTS and CONTRACTS[agent][0] is input
    check = functools.partial(validate_input, agent) if builtin else functools.partial(validate_model, agent, input)
    return Target(agent, queue, version, check, input, output, flow_key)


def _step_output(step_id: str, model: type[BaseModel] | None) -> Callable[[JobRecord], Any]:
    """How a sent job's output is read: its one step's, as ``model`` (None: the stored dict)."""
    return lambda record: record.output(step_id, model) if model is not None else record.output(step_id)


class MeshClient:
    """Submit goals, send messages to one agent, and follow jobs. Settings come from ``MESH_*``
    unless given; the Redis connection may be injected. With ``app`` (a ``mesh.App``) its agents'
    payloads are checked with their models and stamped with their contract version; without it, an
    agent other than the built-in ones is checked against the input schema its workers published."""

    def __init__(self, settings: MeshSettings | None = None, *, client: redis.Redis | None = None,
                 app: AgentCatalog | None = None) -> None:
        self.settings = settings or MeshSettings.from_env()
        self.redis = client or connect(self.settings)
        self.keys = Keys(self.settings.namespace, self.settings.shard)
        #: The namespace's shards (MESH_SHARD, MESH_SHARDS): a job is written and read in its own
        #: (:meth:`keys_of`); with one, that shard's keys are :attr:`keys`.
        self.shards = Shards.of(self.settings)
        self.jobs = JobStore(self.redis, self.keys, self.settings.job_retention_s,
                             self.settings.dead_letter_job_retention_s)
        #: The job stores of the other shards, made when first used (:meth:`jobs_on`).
        self._stores: dict[int, JobStore] = {self.keys.shard: self.jobs}
        self.app = app
        self.registry = Registry(self.redis, self.keys, self.settings.heartbeat_timeout_s)
        self.pipelines = PipelineStore(self.redis, self.keys)
        self._enqueue = register(self.redis)
        #: On a cluster with several shards, an enqueue script per shard, each keeping a connection of its
        #: shard's node (one kept connection would go back and forth between the nodes' pools).
        self._enqueues: dict[int, EnqueueScript] = {}
        self._run_script = StartRun(self.redis, self.keys)
        #: Pipeline versions (name, digest) this client has stored: a later run of one only makes it
        #: the newest again (one HSET), without sending the spec.
        self._registered: set[tuple[str, str]] = set()
        #: Deadlines are set on the Redis server's clock, where workers check them.
        self.clock = ServerClock(self.redis)
        #: The targets of declared agents by name, each with what it was made of (the app, its spec of
        #: the agent and the spec's queue, version and models, the agent given): made again when any of
        #: them is no longer what it was.
        self._targets: dict[str, tuple[Any, Any, Any, Target]] = {}
        #: Whether the namespace was found free of unmigrated data of the older key layout and its
        #: recorded shards the client's (checked once, before this client's first enqueue:
        #: :meth:`layout_refusal`).
        self._layout_ok = False
        #: What the namespace's recorded shards refused, when they did (:func:`~mesh.broker.shards.check_shards`).
        self._shards_refused: ConfigError | None = None
        #: Whether the namespace's shards were found recorded, or this client tried to record them
        #: (:meth:`layout_refusal` with ``record``, before its first enqueue).
        self._shards_known = False

    def keys_of(self, job_id: str) -> Keys:
        """The keys of the shard job ``job_id`` lives in (:meth:`Shards.of_job`: a hash of its id); with
        one shard, :attr:`keys`."""
        return self.shards.of_job(job_id) if self.shards.many else self.keys

    def jobs_of(self, job_id: str) -> JobStore:
        """The job store of the shard job ``job_id`` lives in; with one shard, :attr:`jobs`."""
        return self.jobs_on(self.shards.of_job(job_id)) if self.shards.many else self.jobs

    def jobs_on(self, keys: Keys) -> JobStore:
        """The job store of the shard whose keys are ``keys``."""
        store = self._stores.get(keys.shard)
        if store is None:
            store = self._stores[keys.shard] = JobStore(self.redis, keys, self.settings.job_retention_s,
                                                        self.settings.dead_letter_job_retention_s)
        return store

    def layout_refusal(self, *, record: bool = False) -> str | None:
        """Why the namespace may not be written: it holds data of the older key layout that ``mesh
        migrate`` never moved (broker/layout.py), which this client would not see, or another process
        recorded other shards for it (MESH_SHARD, MESH_SHARDS: broker/shards.py), where this client
        would put jobs its workers do not look for; None when it may. One round trip until the answer
        is None, then none (the shards are read in that round trip; on a Cluster, where the layout
        needs none, in a GET of their own). ``record`` (before the client's first enqueue):
        when no shards are recorded, record the client's, as a worker's start does, in one more."""
        if self._layout_ok and (self._shards_known or not record):
            return None
        from .layout import UNREAD, unmigrated_and

        key = self.shards.home.shard_count
        refused, recorded = unmigrated_and(self.redis, self.keys.namespace, key)
        if refused is None and recorded is UNREAD and (self.shards.many or is_cluster(self.redis)):
            # on a Cluster with one shard too: a sender left at MESH_SHARDS=1 beside workers of several
            # would write every job in a shard none of them serves
            recorded = self.redis.get(key)
        if record and refused is None and recorded is None:
            # SET NX GET: the count found if another process was first; else a worker counting otherwise
            # would start, record its own, and look for this client's jobs elsewhere (not by a user held to
            # other keys, nor while Redis is out of memory: the send itself says so if it must)
            if self.shards.start > self.shards.first:  # as a worker's start: shard 0's jobs left unread
                refuse_held_first_shard(self.redis, self.shards)
            with contextlib.suppress(redis.exceptions.NoPermissionError, redis.exceptions.OutOfMemoryError):
                recorded = self.redis.set(key, self.shards.recorded, nx=True, get=True)
        self._shards_known = record or recorded is not None
        self._shards_refused = None if refused is not None or recorded is UNREAD else \
            shards_refusal(recorded, self.shards)
        if self._shards_refused is not None:
            refused = self._shards_refused.message
        self._layout_ok = refused is None
        return refused

    def _check_layout(self) -> None:
        """ConfigError before this client's first enqueue into an unmigrated namespace (the messages
        would wait in the new layout while the older one's, unseen, hold the namespace's earlier work),
        or into one whose recorded shards are not the client's (recording the client's when none are)."""
        if not self._layout_ok or not self._shards_known:
            refused = self.layout_refusal(record=True)
            if self._shards_refused is not None:
                raise self._shards_refused
            if refused is not None:
                raise ConfigError(refused, namespace=self.keys.namespace)

    def submit(self, goal: str, *, key: str | None = None, token_budget: int | None = None,
               priority: Priority = "normal") -> JobRef[JobRecord]:
        """Run the built-in pipeline (planner → researchers → executor) for ``goal``: a run of the
        declared pipeline ``mesh`` on ``{"goal": goal}`` (see :meth:`run`). ``token_budget``: model
        tokens the job may spend (default MESH_JOB_TOKEN_BUDGET; 0 = none); past it the job is
        dead-lettered ``budget_exceeded``. ``priority``: as :meth:`run`'s."""
        checked(priority)
        if _entry is None:
            raise ConfigError("no built-in pipeline is registered: import mesh (it registers it)")
        return self._start(_entry(), {"goal": goal}, key=key, token_budget=token_budget, goal=goal, priority=priority)

    @overload
    def send(self, agent: AgentRef[In, Out], payload: In | dict[str, Any], *, key: str | None = None,
             token_budget: int | None = None, priority: Priority = "normal") -> JobRef[Out]: ...
    @overload
    def send(self, agent: str, payload: BaseModel | dict[str, Any], *, key: str | None = None,
             token_budget: int | None = None, priority: Priority = "normal") -> JobRef[Any]: ...

    def send(self, agent: AgentRef[Any, Any] | str, payload: BaseModel | dict[str, Any], *, key: str | None = None,
             token_budget: int | None = None, priority: Priority = "normal") -> JobRef[Any]:
        """One message to one agent, checked against its input contract before it reaches Redis.
        ``agent``: the declared agent (``@app.agent``) or its name; ``payload``: its input model or a
        dict. A model of another class than the agent's input is a ContractError, nothing sent.
        ``priority``: ``high``, ``normal`` or ``low``, its place in the agent's queue."""
        if priority not in PRIORITIES:
            checked(priority)
        target = self.target(agent)
        data = self._payload(target, payload) if isinstance(payload, BaseModel) else payload
        target.check(data)
        return self._write(*self._build(target, [(target.agent, data, key)], token_budget=token_budget,
                                        priority=priority))[0]

    @overload
    def send_many(self, agent: AgentRef[In, Out], items: Iterable[tuple[In | dict[str, Any], str | None]],
                  *, chunk: int = 1000, token_budget: int | None = None,
                  priority: Priority = "normal") -> list[JobRef[Out]]: ...
    @overload
    def send_many(self, agent: str, items: Iterable[tuple[BaseModel | dict[str, Any], str | None]],
                  *, chunk: int = 1000, token_budget: int | None = None,
                  priority: Priority = "normal") -> list[JobRef[Any]]: ...

    def send_many(self, agent: AgentRef[Any, Any] | str, items: Iterable[tuple[BaseModel | dict[str, Any], str | None]],
                  *, chunk: int = 1000, token_budget: int | None = None,
                  priority: Priority = "normal") -> list[JobRef[Any]]:
        """Many ``(payload, key)`` messages to one agent in pipelined chunks; every payload is checked
        before any is sent. ``token_budget`` and ``priority`` apply to each job."""
        checked(priority)
        target = self.target(agent)
        batch = []
        for index, (payload, key) in enumerate(items):
            try:
                data = self._payload(target, payload)
                target.check(data)
            except ContractError as exc:
                raise ContractError(f"item {index}: {exc.message}", errors=exc.errors, index=index) from None
            batch.append((data, key))
        steps = [(target.agent, p, k) for p, k in batch]
        # Every message is checked against the limits before the first is sent.
        self._check_limits(target, steps, token_budget)
        return self._send_chunks(target, [steps[i:i + chunk] for i in range(0, len(steps), chunk)],
                                 token_budget=token_budget, priority=priority)

    def run(self, pipeline: Any, input: BaseModel | dict[str, Any], *, key: str | None = None,
            token_budget: int | None = None, replace: bool = True, priority: Priority = "normal") -> JobRef[JobRecord]:
        """Run a declared pipeline on ``input`` (a model or a dict; its ``result()`` is the succeeded
        job's record: ``record.output(step)``): ``pipeline`` is a ``PipelineSpec`` or a name (the client's
        app's pipeline of that name, else the newest registered one). The spec is registered by name
        and digest as the newest (its JSON sent by the client's first run of that version only), the job
        recorded with every step (queued, unsent) and the root steps sent, all at once: one script call
        (a transaction when a root step waits or asks for approval at once). A key already naming a
        run of the same pipeline and input returns that job; with another input, KeyConflict.
        ``replace=False``: PipelineConflict (nothing sent, nothing registered) when another version
        of the name is registered as the newest, checked in that same write. ``priority``: the job's
        steps' place in their agents' queues (``high``, ``normal``, ``low``), for every step that does
        not declare its own."""
        checked(priority)
        data = input.model_dump(mode="json", by_alias=True) if isinstance(input, BaseModel) else input
        return self._start(self._pipeline_spec(pipeline), data, key=key, token_budget=token_budget, replace=replace,
                           priority=priority)

    def _start(self, spec: Any, input: dict[str, Any], *, key: str | None, token_budget: int | None,
               goal: str | None = None, replace: bool = True, priority: Priority = "normal") -> JobRef[JobRecord]:
        # The spec model and the engine live with the agents: the spec starts its own run (duck-typed,
        # as a job-record change is), and the broker only stores its JSON.
        routes: dict[str, Target] = {}

        def target(agent: str) -> Target:
            if agent not in routes:
                routes[agent] = self.target(agent)
            return routes[agent]

        check_input = getattr(spec, "check_input", None)
        if check_input is not None and self.app is not None:
            check_input(input, self.app)  # its input_schema's model, when it declares one
        # A root step without input: (nor for_each) is given the run's input as it is; the others'
        # inputs are built by the engine below and checked as sent.
        for root in (s for s in spec.steps if not s.depends_on and s.input is None and s.for_each is None
                     and not getattr(s, "waits", False)):  # a sleep: or wait_for: step runs no agent
            target(root.agent_name).check(input)
        now = time.time()
        budget = (self.settings.job_token_budget if token_budget is None else token_budget) or None
        key = key or uuid.uuid4().hex
        job_id = job_id_for(key)
        trace_id = trace_id_of(job_id)
        ref: JobRef[JobRecord] = JobRef(id=job_id, key=key, trace_id=trace_id, client=self)
        digest = spec.digest()  # once a run: the spec's canonical JSON, hashed
        record = JobRecord(job_id=ref.id, key=key, trace_id=trace_id, goal=goal, created_at=now, updated_at=now,
                           payload_hash=payload_hash(f"pipeline:{spec.name}", input), pipeline=spec.name,
                           pipeline_digest=digest, pipeline_input=input, priority=priority)
        record, messages, events = spec.start(
            record, trace_id=trace_id, deadline=self.clock.now_s() + self.settings.job_deadline_s, token_budget=budget,
            queue=lambda a: target(a).queue, version=lambda a: target(a).version, now=now,
            flow_key=lambda a, payload: (lambda t: t.flow_key(payload) if t.flow_key is not None else None)(target(a)),
            max_fan_out=self.settings.max_fan_out, settings=self.settings)
        for message in messages:
            env = message.args[0]
            try:
                target(env["agent"]).check(env["payload"])
            except ContractError as exc:
                raise ContractError(f"step {env['step_id']}: {exc.message}", errors=exc.errors, agent=env["agent"],
                                    job_id=ref.id) from None
        refused = [s for s in record.steps.values() if s.state is State.DEAD_LETTERED]
        if refused:  # a root the engine would not send: a list, key, expression or input past a limit
            why = f"step {refused[0].step_id}: {refused[0].error or ''}"
            named = re.search(r"MESH_[A-Z_]+", why)
            if named is None:  # the run's input does not fit its expressions (a field missing)
                raise ContractError(why, job_id=ref.id)
            limit = getattr(self.settings, named.group().removeprefix("MESH_").lower(), -1)
            raise LimitExceeded(why, setting=named.group(), limit=limit if isinstance(limit, int) else -1, size=-1)
        encoded = [self._encode(m) for m in messages]
        keys, jobs = self.keys_of(ref.id), self.jobs_of(ref.id)  # the job's shard
        probe = self.redis.pipeline(transaction=False)  # never sent: what creating the record stages
        jobs.stage_create(probe, record)
        if len(staged(probe)) == 2:  # the record and its index alone: one script call
            return self._start_run(spec, digest, record, ref, messages, encoded, events, replace)
        # A root step that waits (sleep:, wait_for:) or asks for approval at once also stages its
        # index entries and timers (scripts of their own): the transaction below writes them.
        apart = keys.fleet != keys.prefix  # a shard's job: the spec registered first, on its own
        if apart:
            try:
                self._register(spec, digest, replace)
            except PipelineConflict:  # a key bound to another input is the conflict found first, as on shard 0
                _refuse_conflicts([record], [self.redis.get(keys.job(ref.id))])
                raise
        while True:
            with transaction(self.redis, self.settings) as pipe:
                try:
                    pipe.watch(keys.job(ref.id), *([] if replace or apart else [keys.pipeline(spec.name)]))
                    existing = pipe.get(keys.job(ref.id))
                    _refuse_conflicts([record], [existing])
                    latest: Any = None if replace or apart else pipe.hget(keys.pipeline(spec.name), LATEST)
                    if latest is not None and latest.decode() != digest:
                        raise PipelineConflict(spec.name, latest.decode(), digest)
                    pipe.multi()
                    if not apart:  # the spec's JSON always (HSETNX): a version this client stored may be lost since
                        stage_register(pipe, keys, spec.name, digest, spec.canonical())
                    if existing is None:  # a re-sent run of the same key and input is that job
                        jobs.stage_create(pipe, record)
                        for message in messages:
                            trace.stage(pipe, keys, trace.event("enqueued", message.args[0],
                                                                queue=message.queue_name, by="client"))
                        for ev in events:
                            trace.stage(pipe, keys, ev)
                        stage_all(pipe, keys, messages, encoded)
                    pipe.execute()
                    self._registered.add((spec.name, digest))
                    replicated(pipe, [ref])
                    return ref
                except redis.WatchError:
                    continue

    def _register(self, spec: Any, digest: str, replace: bool) -> None:
        """Register ``spec`` (version ``digest``) as its name's newest, in a transaction of its own on the
        namespace's keys; PipelineConflict when ``replace`` is False and another version is the newest."""
        key = self.keys.pipeline(spec.name)
        while True:
            with transaction(self.redis, self.settings) as pipe:
                try:
                    pipe.watch(key)
                    latest: Any = None if replace else pipe.hget(key, LATEST)
                    if latest is not None and latest.decode() != digest:
                        raise PipelineConflict(spec.name, latest.decode(), digest)
                    pipe.multi()
                    stage_register(pipe, self.keys, spec.name, digest, spec.canonical())
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def _start_run(self, spec: Any, digest: str, record: JobRecord, ref: JobRef[JobRecord], messages: list[Message],
                   encoded: list[bytes], events: list[dict[str, Any]], replace: bool) -> JobRef[JobRecord]:
        """:meth:`_start`'s writes for a record that creates nothing but itself and its index: one
        script call (broker/pipelines.py :class:`StartRun`), then WAIT with MESH_REDIS_WAIT_REPLICAS."""
        self._check_layout()
        wanted = self.settings.redis_wait_replicas
        registered = (spec.name, digest) in self._registered  # stored by this client's first run of it
        enqueued = [trace.event("enqueued", m.args[0], queue=m.queue_name, by="client") for m in messages]
        bodies = [(m.queue_name, m.options["redis_message_id"], data)
                  for m, data in zip(messages, encoded, strict=True)]
        while True:
            answer, acked = self._run_script(
                job_id=record.job_id, payload_hash=record.payload_hash or "", record=dumps(record),
                created_at=record.created_at, name=spec.name, digest=digest, replace=replace,
                canonical=None if registered else spec.canonical(), events=enqueued + events, messages=bodies,
                wait=(wanted, self.settings.redis_wait_timeout_ms) if wanted else None,
                keys=self.keys_of(record.job_id))
            if answer != b"spec" or not registered:
                break
            registered = False  # Redis lost the version this client stored: sent again, with its JSON
            self._registered.discard((spec.name, digest))
        if answer == b"key":
            raise KeyConflict(record.key, record.job_id, next(iter(record.steps.values())).agent)
        if isinstance(answer, bytes):
            raise PipelineConflict(spec.name, answer.decode().removeprefix("pipeline:"), digest)
        self._registered.add((spec.name, digest))
        if acked < wanted:
            raise NotReplicated(acked, wanted, self.settings.redis_wait_timeout_ms, [ref])
        return ref

    def register(self, spec: Any) -> str:
        """Register ``spec`` (a ``PipelineSpec``) by name and digest, as the newest; its digest."""
        digest: str = spec.digest()
        self.pipelines.register(spec.name, digest, spec.canonical())
        return digest

    def _pipeline_spec(self, pipeline: Any) -> Any:
        if not isinstance(pipeline, str):
            return pipeline
        declared = getattr(self.app, "pipelines", None) or {}
        if pipeline in declared:
            return declared[pipeline]
        if self.app is None:
            raise ConfigError(f"pipeline {pipeline!r} is run by name by a client that knows its app "
                              "(MeshClient(app=...)); or pass the spec")
        _, data = self.pipelines.get(pipeline)
        return self.app.stored_pipeline(data)

    def target(self, agent: str | AgentRef[Any, Any]) -> Target:
        """How a message for ``agent`` is checked and routed: by its declared models (a declared agent,
        or one the client's app declares), by the built-in contracts, or by the schema the agent's
        workers published (one Redis read). UnknownAgent, naming the known agents, when none of them
        knows it."""
        app, given, ref = self.app, cast(Any, agent), isinstance(agent, AgentRef)
        if isinstance(agent, AgentRef):
            name, given = agent.name, (agent, agent.queue, agent.version, agent.input, agent.output)
        else:
            name = agent
        spec = app.agents.get(name) if app is not None else None
        # What the target is made of in the spec, read again: a catalog's spec need not be frozen
        # (App's is), and one changed in place is the same object.
        held = None if spec is None else (spec, spec.queue, spec.version, getattr(spec, "input", None),
                                          getattr(spec, "output", None))
        cached = self._targets.get(name)
        if cached is not None and cached[0] is app and cached[1] == held and cached[2] == given:
            return cached[3]
        made = self._target(agent)
        if spec is not None or ref:  # a declared agent: made of what is compared above
            self._targets[name] = (app, held, given, made)
        return made

    def _target(self, agent: str | AgentRef[Any, Any]) -> Target:
        if isinstance(agent, AgentRef):
            own = self.app.agents.get(agent.name) if self.app is not None else None
            if own is not None and (own.input, own.output, own.queue) != (agent.input, agent.output, agent.queue):
                raise ContractError(f"agent {agent.name!r} of the client's app takes a {own.input.__name__} (queue "
                                    f"{own.queue!r}); the agent given is another's, taking a {agent.input.__name__} "
                                    f"(queue {agent.queue!r}); nothing was sent", agent=agent.name)
            return _declared(agent.name, agent.queue, agent.version, agent.input, agent.output,
                             self._flow_key(agent.name) if own is not None else getattr(agent, "flow_key", None))
        spec = self.app.agents.get(agent) if self.app is not None else None
        if self.app is not None and spec is not None:
            return _declared(agent, spec.queue, spec.version, *self.app.contracts[agent], self._flow_key(agent))
        if agent in CONTRACTS:
            return Target(agent, agent, None, functools.partial(validate_input, agent), *CONTRACTS[agent])
        published = self.registry.get(agent)
        if published is None:
            known = self.known_agents()  # read after: an agent published in between is sent to, not refused
            published = self.registry.get(agent) if agent in known else None
            if published is None:
                raise UnknownAgent(agent, known)
        return Target(agent, published.queue, published.version, published.validate_input)

    def _flow_key(self, agent: str) -> Callable[[dict[str, Any]], str | None] | None:
        """How the client's app renders ``agent``'s flow key (None: an app that does not)."""
        render = getattr(self.app, "flow_key", None)
        return None if render is None else functools.partial(render, agent)

    @staticmethod
    def _payload(target: Target, payload: Any) -> Any:
        """``payload`` as the message carries it: a model dumped by its wire names (ContractError for
        a model of another class than ``target``'s input), anything else as given, to be checked."""
        if not isinstance(payload, BaseModel):
            return payload
        if target.input is not None and not isinstance(payload, target.input):
            raise ContractError(f"agent {target.agent!r} takes a {target.input.__name__}, not a "
                                f"{type(payload).__name__}; nothing was sent", agent=target.agent)
        return payload.model_dump(mode="json", by_alias=True)

    def known_agents(self) -> list[str]:
        """Every agent a message can be sent to: the built-in ones, the app's, then the published ones."""
        known = dict.fromkeys(CONTRACTS)
        if self.app is not None:
            known.update(dict.fromkeys(self.app.agents))
        known.update(dict.fromkeys(self.registry.agents()))
        return list(known)

    def _encode(self, message: Message, index: int | None = None) -> bytes:
        """``message`` encoded; LimitExceeded (naming item ``index``) when over MESH_MAX_MESSAGE_BYTES or
        MESH_MAX_JSON_DEPTH."""
        try:
            return encode_checked(message, self.settings.max_message_bytes, self.settings.max_json_depth)
        except LimitExceeded as exc:
            if index is None:
                raise
            raise LimitExceeded(f"item {index}: {exc.message}", index=index, **exc.context) from None

    def _send(self, target: Target, items: list[tuple[str, dict[str, Any], str | None]], *,
              token_budget: int | None = None, priority: Priority = "normal") -> list[JobRef[Any]]:
        """Record and enqueue ``(step_id, payload, key)`` items for ``target`` whose payloads were validated.
        A given key already bound to another payload raises KeyConflict and nothing is sent; the check
        and the writes are one script (:class:`~mesh.broker.outbox.NewJobs`), so two racing senders of
        one key cannot both win."""
        return self._write(*self._build(target, items, token_budget=token_budget, priority=priority))

    def _check_limits(self, target: Target, items: list[tuple[str, dict[str, Any], str | None]],
                      token_budget: int | None) -> None:
        """LimitExceeded, naming the item, for a message over MESH_MAX_MESSAGE_BYTES or MESH_MAX_JSON_DEPTH.
        A payload far enough under both is within them whatever its envelope (an envelope adds far
        less than ENVELOPE_SLACK bytes and three levels of nesting); only the others are built to see."""
        size, depth = self.settings.max_message_bytes - ENVELOPE_SLACK, self.settings.max_json_depth - 4
        for index, item in enumerate(items):
            data = dumps(item[1])
            if len(data) > size or data.count(b"[") + data.count(b"{") > depth:
                self._build(target, [item], token_budget=token_budget, first=index)

    def _send_chunks(self, target: Target, chunks: list[list[tuple[str, dict[str, Any], str | None]]], *,
                     token_budget: int | None = None, priority: Priority = "normal") -> list[JobRef[Any]]:
        """:meth:`_send` of each chunk in turn, each built while the one before it is written (a thread
        waits for Redis meanwhile). A chunk is written only once the one before it was, so a conflict
        stops the sending at its chunk, as one chunk at a time would."""
        if not chunks:
            return []
        refs: list[JobRef[Any]] = []
        built = self._build(target, chunks[0], token_budget=token_budget, priority=priority)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-send") as writer:
            for part in chunks[1:]:
                writing = writer.submit(self._write, *built)
                built = self._build(target, part, token_budget=token_budget, priority=priority)
                refs += writing.result()
        return refs + self._write(*built)

    def _build(self, target: Target, items: list[tuple[str, dict[str, Any], str | None]], *,
               token_budget: int | None = None, first: int | None = None,
               priority: Priority = "normal") -> tuple[list[Batch], list[JobRef[Any]]]:
        """The jobs and messages of ``items``, nothing written: one batch per shard they go to (one
        with one shard), and every item's ref, in order; LimitExceeded for a message over
        MESH_MAX_MESSAGE_BYTES or MESH_MAX_JSON_DEPTH (naming its batch index when ``first`` is given:
        the index of the first item)."""
        agent = target.agent
        now = time.time()
        budget = (self.settings.job_token_budget if token_budget is None else token_budget) or None
        deadline = self.clock.now_s() + self.settings.job_deadline_s

        def new_batch(keys: Keys, expected: int) -> Batch:
            return Batch(keys, NewJobs(agent=agent, queue=target.queue, version=target.version, goal=None, now=now,
                                       deadline=deadline, token_budget=budget,
                                       max_bytes=self.settings.max_message_bytes,
                                       max_depth=self.settings.max_json_depth, expected=expected,
                                       priority=priority), [])

        many = self.shards.many
        batches: dict[int, Batch] = {}
        batch = new_batch(self.keys, len(items))
        refs = []
        reader = _step_output(agent, target.output)
        for index, (step_id, payload, given) in enumerate(items):
            # Sends of one key are one job, so they share its trace (its id's); a fresh key, a fresh one.
            key = given or uuid.uuid4().hex
            job_id = job_id_for(key)
            ref = JobRef(id=job_id, key=key, trace_id=trace_id_of(job_id), client=self, reader=reader)
            if many:  # the batch of the job's shard
                shard = self.shards.shard_of(job_id)
                batch = batches.get(shard) or batches.setdefault(
                    shard, new_batch(self.shards.of_job(job_id), len(items) // self.shards.count + 1))
            try:
                batch.jobs.add(step_id, payload, key=key, job_id=ref.id, trace_id=ref.trace_id,
                               flow_key=target.flow_key(payload) if target.flow_key is not None else None,
                               payload_hash=payload_hash(agent, payload), checked=bool(given))
            except LimitExceeded as exc:
                if first is None:
                    raise
                raise LimitExceeded(f"item {first + index}: {exc.message}", index=first + index,
                                    **exc.context) from None
            batch.refs.append(ref)
            refs.append(ref)
        return (list(batches.values()) if many else [batch]), refs

    def _write(self, batches: list[Batch], refs: list[JobRef[Any]]) -> list[JobRef[Any]]:
        """Write what :meth:`_build` built, one script call per batch (per shard), one shard after the
        other; with MESH_REDIS_WAIT_REPLICAS, each followed by a WAIT for the replicas on the same
        connection (NotReplicated, once every batch is written, when too few confirmed one of them).
        KeyConflict stops at the batch of the key that conflicts: nothing of that batch is written,
        the batches (shards) before it are."""
        self._check_layout()
        wanted = self.settings.redis_wait_replicas
        least = wanted
        for batch in batches:
            jobs, keys = batch.jobs, batch.keys
            if wanted:
                def send(node: redis.Redis, jobs: NewJobs = jobs, keys: Keys = keys) -> Any:
                    pipe = WaitingPipeline(node, wanted, self.settings.redis_wait_timeout_ms)  # the WAIT on the
                    jobs.write(self._enqueue, keys, client=pipe)  # connection of the script's writes
                    return *pipe.execute(), pipe.acked

                answer, acked = on_slot(self.redis, keys.prefix, send)
                conflict = jobs.conflict(answer)
                least = min(least, int(acked))
            else:
                conflict = jobs.conflict(jobs.write(self._enqueue_on(keys), keys))
            if conflict is not None:
                raise KeyConflict(batch.refs[conflict].key, batch.refs[conflict].id, jobs.agent)
        if least < wanted:
            raise NotReplicated(least, wanted, self.settings.redis_wait_timeout_ms, refs)
        return refs

    def _enqueue_on(self, keys: Keys) -> EnqueueScript:
        """The enqueue script a send to the shard of ``keys`` calls (:attr:`_enqueues`)."""
        if not self.shards.many or not is_cluster(self.redis):
            return self._enqueue
        script = self._enqueues.get(keys.shard)
        if script is None:
            script = self._enqueues[keys.shard] = register(self.redis)
        return script

    def approvals(self) -> list[approvals.Pending]:
        """The pipeline steps waiting for a person's approval, oldest first (``mesh approvals``): every
        shard's."""
        return pending_approvals(self.redis, self.shards.keys if self.shards.many else (self.keys,))

    def approve(self, job_id: str, step_id: str, *, note: str | None = None, by: str | None = None) -> JobRecord:
        """Approve the exact call step ``step_id`` of job ``job_id`` (an id, or the key it was sent
        with) waits with: it is sent. ``by`` defaults to ``user@host``. Raises AlreadyDecided (the
        first decision won), ApprovalExpired or NotAwaiting (mesh.broker.approvals)."""
        return self._decide(job_id, step_id, Decision.APPROVED, by, note)

    def deny(self, job_id: str, step_id: str, *, reason: str, by: str | None = None) -> JobRecord:
        """Deny the waiting step: its ``on_false`` applies (halt the job, or skip the step and go on)."""
        return self._decide(job_id, step_id, Decision.DENIED, by, reason)

    def _decide(self, job_id: str, step_id: str, decision: Decision, by: str | None,
                note: str | None) -> JobRecord:
        job_id = self.named(job_id)
        change = approvals.decide_change(self.pipelines, lambda a: self.target(a).queue,
                                         lambda a: self.target(a).version, self.settings)
        verdict = approvals.Verdict(step_id=step_id, decision=decision, by=by or approvals.default_by(), note=note,
                                    at=self.clock.now_s())
        return approvals.decide(self.jobs_of(job_id), job_id, verdict, change)[0]

    def named(self, given: str) -> str:
        """The job ``given`` names: itself, or (when no job has that id and one has its key's) the job of
        the key it was sent with."""
        if self.redis.exists(self.keys_of(given).job(given)) == 0:
            keyed = job_id_for(given)
            if self.redis.exists(self.keys_of(keyed).job(keyed)):
                return keyed
        return given

    def signal(self, job_id: str, event: str, data: dict[str, Any] | None = None) -> wait_store.Delivery:
        """Deliver ``event`` (with ``data``, a JSON object) to job ``job_id`` (an id or its key): the
        step of it waiting longest for that event name resumes with ``data`` as its output (its
        ``match`` is not checked: the job is named); with none waiting yet, it is kept for one that
        starts within MESH_EVENT_WINDOW_S. Raises JobNotFound, NotWaiting (the job ended) or
        InvalidEvent (mesh.broker.waits)."""
        delivery: wait_store.Delivery = self._control("signal")(self, job_id, event, data)
        return delivery

    def emit(self, event: str, data: dict[str, Any] | None = None) -> wait_store.Delivery:
        """Deliver ``event`` to every pipeline step waiting for it whose ``match`` holds, and keep it
        for waits that start within MESH_EVENT_WINDOW_S (a job takes one event at most once)."""
        delivery: wait_store.Delivery = self._control("emit")(self, event, data)
        return delivery

    def waits(self, event: str | None = None) -> list[wait_store.Waiting]:
        """The pipeline steps waiting durably (``sleep:``, ``wait_for:``; for ``event`` only, when
        given), oldest first (``mesh waits``). InvalidEvent when ``event`` is no event name."""
        if event is not None:
            wait_store.check_event_name(event)
        return pending_waits(self.redis, self.shards.keys if self.shards.many else (self.keys,), event=event)

    def status(self, job_id: str) -> JobRecord:
        """The job's record; :class:`JobNotFound` when there is none (``expired`` when retention removed
        it once its job ended)."""
        record = self.jobs_of(job_id).get(job_id)
        if record is None:
            from .retention import expired

            raise JobNotFound(job_id, expired=expired(self.redis, self.keys_of(job_id), job_id))
        return record

    def cancel(self, job_id: str, reason: str | None = None) -> JobRecord:
        """Cancel a job: no new step is sent, running steps see ``ctx.cancelled`` (within one lease
        renewal) and their results are not recorded as successes, steps awaiting approval are
        withdrawn, and the compensations of what succeeded run; the job ends ``cancelled`` (or
        ``compensated``). Idempotent: a job already cancelled (or ended) is returned as it is."""
        return self._control("cancel")(self, job_id, reason)[0]

    def rerun(self, job_id: str, from_step: str, *, key: str | None = None) -> JobRef[JobRecord]:
        """A new run of a declared pipeline's job: the same spec digest and input, the outputs of the
        steps upstream of ``from_step`` reused, ``from_step`` and everything downstream run again under
        new keys; the two records name each other (``rerun_of``, ``reruns``)."""
        ref: JobRef[JobRecord] = self._control("rerun")(self, job_id, from_step, key=key)
        return ref

    def _control(self, name: str) -> Callable[..., Any]:
        if name not in _control:
            raise ConfigError(f"no job control is registered: import mesh (mesh.agents.pipelines.jobctl "
                              f"registers {name})")
        return _control[name]

    def stuck(self, record: JobRecord, *, now: float | None = None) -> dict[str, float]:
        """Running steps of ``record`` whose last progress is older than MESH_STUCK_AFTER_S: step id ->
        seconds without progress (on the Redis server's clock, as the workers record progress). Such a
        step is not shown as running happily."""
        running = [s for s in record.steps.values() if s.state is State.RUNNING]
        if not running:
            return {}
        now = self.clock.now_s() if now is None else now
        pipe, index = self.redis.pipeline(transaction=False), self.keys_of(record.job_id).running
        for step in running:
            pipe.zscore(index, running_member(record.job_id, step.step_id))
        out = {}
        for step, last in zip(running, pipe.execute(), strict=True):
            if last is not None and now - float(last) >= self.settings.stuck_after_s:
                out[step.step_id] = round(now - float(last), 1)
        return out

    def wait(self, job_id: str, *, timeout_s: float = 30.0, poll_s: float = 0.05) -> JobRecord:
        """Poll until the job ends (succeeded, dead_lettered or unknown) or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.status(job_id)
            if record.state in TERMINAL:
                return record
            if time.monotonic() >= deadline:
                raise WaitTimeout(job_id, timeout_s, record)
            time.sleep(poll_s)

    def events(self, job_id: str, *, last_id: str = "0", block_ms: int = 1000) -> Iterator[dict[str, Any]]:
        """The job's trace events as they happen, oldest first, ending once the job has ended and
        its last event was given. Each event is a dict (the fields :mod:`mesh.broker.trace` lists)
        with ``id``, its event id: pass the last one seen as ``last_id`` to go on where a reader
        stopped. ``job_id`` may be the key the job was sent with. Reads with ``XREAD BLOCK``
        (``block_ms`` at a time, then a look at the job's record); a job that has ended is read
        with :func:`mesh.broker.trace.read_since`. Raises JobNotFound for a job with neither a
        record nor events."""
        keys = self.keys_of(job_id)
        if self.redis.exists(keys.job(job_id), keys.trace(job_id)) == 0:
            job_id = job_id_for(job_id)
            keys = self.keys_of(job_id)
            if self.redis.exists(keys.job(job_id), keys.trace(job_id)) == 0:
                raise JobNotFound(job_id)
        stream, jobs = keys.trace(job_id), self.jobs_of(job_id)
        while True:
            record = jobs.get(job_id)
            if record is None or record.state in TERMINAL:  # what is left, from wherever the trace is kept
                for event_id, ev in trace.read_since(self.redis, keys, job_id, last_id):
                    yield {"id": event_id, **ev}
                return
            rows: Any = self.redis.xread({stream: last_id}, count=TRACE_BATCH, block=block_ms)
            for _, entries in rows or ():
                for event_id, ev in trace.decode(entries):
                    last_id = event_id
                    yield {"id": event_id, **ev}

    def agent_queues(self) -> list[str]:
        """The queues of every agent this client knows: built-in, the app's, and published ones."""
        queues = dict.fromkeys(CONTRACTS)
        if self.app is not None:
            queues.update(dict.fromkeys(spec.queue for spec in self.app.agents.values()))
        queues.update(dict.fromkeys(a.queue for a in self.registry.agents().values()))
        return list(queues)

    def queues(self, agents: Iterable[str] | None = None, *, lanes: bool = False) -> dict[str, dict[str, Any]]:
        """Per queue (default: every agent's, see :meth:`agent_queues`): ready (in every lane),
        delayed, and in flight (fetched by a worker, not yet settled). ``lanes``: also the ready
        messages ``by_priority`` and the ``flows`` (flow keys) with ready work. With several shards, each
        is the sum of every shard's (a flow key with ready work in two shards counts twice)."""
        if self.shards.many:
            return queue_depths(self, agents, lanes=lanes)
        # each queue once: its row is read by its place among the names (a name given twice took the next one's)
        names = list(dict.fromkeys(agents)) if agents is not None else self.agent_queues()
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hlen(self.keys.messages(name))
            pipe.hlen(self.keys.delayed_messages(name))
        values = pipe.execute()
        out: dict[str, dict[str, Any]] = {}
        for i, (name, lane) in enumerate(queue_lanes.depth(self.redis, self.keys, names).items()):
            stored, delayed = values[2 * i: 2 * i + 2]
            ready = lane["ready"]
            out[name] = {"ready": ready, "delayed": delayed, "in_flight": max(0, stored - ready)}
            if lanes:
                out[name].update(by_priority=lane["by_priority"], flows=lane["flows"])
        return out

    def close(self) -> None:
        self.redis.close()
