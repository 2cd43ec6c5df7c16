"""The Redis key layout of a deployment, written down once; every key is built here.

Below, ``{ns}`` is the namespace (MESH_NAMESPACE) between literal braces: the job record of job 123 in
namespace ``mesh`` is ``{mesh}:job:123`` (:func:`prefix`). Braces make the namespace the key's Redis
Cluster hash tag: a Cluster puts a key in the slot of the text between its first ``{`` and ``}``, so
every key of a namespace is in one slot, and every script, transaction and multi-key command of the
mesh touches one slot: the mesh runs on a Redis Cluster (one namespace on one shard), and on a single
Redis as before. This is layout version 2 (:data:`LAYOUT_VERSION`); the older one (version 1) wrote
``mesh:job:123``; ``mesh migrate`` moves a deployment's keys from it (:func:`legacy_pattern`). A
namespace holds no braces and no ``:`` (MESH_NAMESPACE's pattern), so no namespace's keys match another's.

dramatiq's own layout (``dramatiq/brokers/redis/dispatch.lua``), shared with it (the mesh gives dramatiq the
prefix as its namespace):

    {ns}:{queue}                      list of ready message ids
    {ns}:{queue}.msgs                 hash id -> encoded message
    {ns}:{queue}.DQ / .DQ.msgs        the same for delayed messages (retries, deferrals)
    {ns}:{queue}.high / .low          lists of ready message ids of high / low priority (the mesh's
                                      addition; {ns}:{queue} holds the normal ones)
    {ns}:{queue}.flow:{p}:{flow}      list of ready message ids of priority p and flow key {flow}
    {ns}:{queue}.flows:{p}            zset flow key -> round: the flows of priority p with ready work,
                                      served round robin ("" stands for the level's list)
    {ns}:{queue}.sched                hash: the fetch's share credits and rounds per priority, and
                                      the messages waiting in each priority's flows
                                      (broker/scripts/lanes_lib.lua says how lanes are served); the
                                      field lanes:{queue} of {ns}:stats is set while the queue's
                                      other lanes may have work
    {ns}:{queue}.wake                 list of wake-up tokens (the mesh's addition): every enqueue pushes
                                      one, and idle consumers block on it instead of polling
    {ns}:__acks__.{worker}.{queue}    set of ids a worker fetched and has not settled
    {ns}:__heartbeats__               zset worker id -> last heartbeat (ms)
    {ns}:__reap_after__               recovery pauses until this time (ms) after a worker saw an outage
    {ns}:__held__.{worker}            set of queues a worker has fetched from (the mesh's addition:
                                      recovery finds a dead worker's messages on every queue)
    {ns}:__stop__.{worker}            list of wake-up tokens a stopping worker pushes for its own idle
                                      consumers (the mesh's addition), so a stop never waits out their
                                      block; expires within seconds
    {ns}:{queue}.XQ                   dramatiq's dead letters: kept empty, the mesh DLQ replaces it

The mesh's own:

    {ns}:claim:{key}                  string "state|token|expires|owner|result": the idempotency claim on a
                                      message key (broker/scripts/claim_lib.lua, claim.lua; read in Python
                                      by broker/claims.py): state claimed|free|done, fencing token, lease
                                      end (ms, server clock), owner (empty once done), result (a done key's
                                      output up to MESH_CLAIM_RESULT_BYTES, else "@" and a reference to
                                      the step holding it: broker/claim_results.py); kept for
                                      MESH_DEDUP_TTL_S; a hash an earlier release wrote is still read
    {ns}:kills:{key}                  integer: owners of the claim on {key} that died holding it (taken
                                      over after their lease ran out), cleared when an attempt lets go;
                                      at MESH_POISON_KILLS the next delivery is dead-lettered as poison
    {ns}:breaker:{name}               hash: circuit breaker of a dependency (broker/scripts/breaker.lua)
    {ns}:breaker:{name}:failures      zset of recent brownouts (the failure window)
    {ns}:breaker:{name}:errors        list, capped at MESH_BREAKER_FAILURES: the recent failures' errors
                                      (JSON {at, error}); copied into the hash when the breaker opens
    {ns}:breaker:{name}:deferred      zset message id -> when it is due back (ms): messages an open
                                      breaker deferred (broker/router.py); those due in the future are
                                      the ones waiting on it; past ones are trimmed on each add
    {ns}:breakers                     set of every dependency that has a breaker
    {ns}:breakers.audit               stream, capped: who reset which breaker by hand, when, its state
                                      before (broker/control_audit.py)
    {ns}:routes                       hash "{failure class}:{route}" -> failed attempts routed so
    {ns}:job:{job_id}                 JSON job record (job fields and every step); expires
                                      MESH_JOB_RETENTION_S after the job ends (broker/jobs.py); one holding
                                      dead-lettered steps while their dead letters may be replayed; once
                                      ended, rewritten by the sweep without its default fields and with
                                      its trace's events as ``history`` (broker/compact.py)
    {ns}:jobs                         zset job id -> created time (s); members whose record expired
                                      are swept (broker/retention.py)
    {ns}:jobs.expired                 zset job id -> swept time (s): tombstones of swept jobs, so
                                      `mesh status` can say "expired"; capped and trimmed by the sweep
    {ns}:jobs.compact                 zset job id -> ended time (s): ended jobs the sweep compacts next
                                      (broker/compact.py); the write that ends a job adds it
    {ns}:jobs.kept:{name}             zset job id -> end time (s): the finished jobs of an agent (its name)
                                      or pipeline (pipeline:{name}), written only while
                                      MESH_JOB_RETENTION_COUNT is set; the sweep removes all but the newest
                                      N (broker/compact.py)
    {ns}:jobs.kept                    set of the names that have a {ns}:jobs.kept:{name}
    {ns}:cancel:{job_id}              string: the reason a job was cancelled (mesh cancel), written with
                                      its record; lease renewal reads it, so a running step sees
                                      ctx.cancelled; expires MESH_JOB_RETENTION_S after the cancel
    {ns}:trace:{job_id}               stream, capped: the job's timeline (broker/trace.py); expires
                                      with the job record; deleted when the job is compacted (its events
                                      move into the record), the events written after that stay in it
    {ns}:running                      zset "{job_id}/{step_id}" -> last progress (s) of running steps;
                                      members whose job record is gone are swept
    {ns}:outcomes                     hash "{agent}:{outcome}" -> messages (succeeded, retried, ...)
    {ns}:outcomes.flushed:{process}   string: the number of the last batch of step counters a worker process
                                      wrote (broker/observe.py, Counters), so a batch sent again is not
                                      added twice; expires a day after that batch
    {ns}:hist:{agent}                 hash: handler duration histogram (le buckets, sum)
    {ns}:tokens                       hash "{agent}:{in|out}" -> model tokens spent (prompt, completion)
    {ns}:tokens:{job_id}              integer: model tokens a job with a token budget has spent; expires
                                      MESH_JOB_RETENTION_S after the job's deadline (agents/providers/meter.py)
    {ns}:dlq:{entry_id}               hash: entry (JSON), raw (original message bytes), agent, class
    {ns}:dlq                          zset entry id -> dead-lettered time (ms)
    {ns}:dlq.agent:{agent}            zset entry id -> time, per agent ("-" when none)
    {ns}:dlq.agents                   set of agent names that ever had a dead letter
    {ns}:dlq.job:{job_id}             zset entry id -> time, the dead letters of one job (entries that name
                                      no job have none); how `mesh verify`/`settle` find a step's entry
    {ns}:dlq.jobs.since               string: when (ms) the first entry was indexed by job; entries from
                                      before it (written by an older mesh) are looked for by agent and time
    {ns}:console.logout:{id}          string: a console session logged out (id: a digest of its cookie), refused
                                      from then on; expires with the longest session (ops/web/auth.py)
    {ns}:dlq.class:{class}            zset entry id -> time, per failure class
    {ns}:dlq.audit                    stream, capped: who did what to which entry, when
    {ns}:dlq.replayed:{entry_id}      string (JSON): the tombstone of a replayed entry, written in the
                                      replay's transaction: what it was and where it went (when, by
                                      whom, message id, queue, job); expires after MESH_DLQ_RETENTION_S
                                      (MESH_DEDUP_TTL_S when that is 0) (dlq/replay.py)
    {ns}:pipeline:{name}              hash: a registered pipeline's versions, digest (sha256 of its canonical
                                      JSON) -> that JSON; field ``latest`` -> the newest digest (new runs
                                      take it; a running job keeps the digest it started with)
    {ns}:pipelines                    set of registered pipeline names
    {ns}:ledger:{job_id}:{step_id}    hash call number -> JSON effect entry (contracts/effects.py): the
                                      intent, outcome and verdict of each effectful tool call of a step
                                      (broker/ledger.py); expires MESH_DEDUP_TTL_S after its last write,
                                      or with its job's record once the job ends
    {ns}:loop:{job_id}:{step_id}      hash "turn-{t}" / "turn-{t}/call-{c}" -> JSON: a tool loop's checkpoints,
                                      each model turn and each tool call's result as the model was
                                      given it (broker/transcript.py); expires MESH_DEDUP_TTL_S after
                                      its last write
    {ns}:effects.unknown              zset "{job_id}/{step_id}/{n}" -> when its verdict became unknown (s):
                                      effects nobody has proven; left when verified, refuted or settled
    {ns}:effects.audit                stream, capped: who verified or settled which effect, when, why
    {ns}:pins:tools                   hash declared tool -> JSON of the definition (name, description,
                                      input schema, sha256) an MCP server presented the first time it was
                                      seen (agents/tools/pins.py); replaced only by ``mesh tools accept``
    {ns}:pins:presented               hash declared tool -> JSON of another definition a server presented
                                      since: the tool is refused until an operator accepts it
    {ns}:note:{effect_id}             JSON note written by the ``note`` tool; expires after
                                      MESH_NOTE_RETENTION_S
    {ns}:notes                        zset effect id -> written time (s); members whose note expired
                                      are swept
    {ns}:stats                        hash of counters (duplicates, dead letters, poison, sweeps, ...); its
                                      field ``fence`` is the last fencing token a claim took (claim.lua):
                                      never reset it, or tokens would repeat
    {ns}:layout                       string "2": the layout the namespace's data is in, written by
                                      ``mesh migrate`` once it moved the older layout's keys (broker/layout.py)
    {ns}:shards                       string "{first}+{count}": the shards the namespace's jobs are spread
                                      over (MESH_SHARD, MESH_SHARDS), set by the first process to use it;
                                      a process of another count refuses to start (broker/shards.py)
    {ns}:sweep.lock                   string, expires after MESH_SWEEP_INTERVAL_S: the worker that set
                                      it runs this interval's retention sweep of its shard (a lock per
                                      shard, as every key here: ops/sweeper.py)
    {ns}:timers                       zset "{kind}|{ref}" -> due time (ms, Redis TIME): durable timers
                                      (broker/timers.py), fired by whichever worker holds timers.lock
    {ns}:timers.lock                  string, expires within seconds: the worker that set it fires the
                                      due timers now (ops/timer_loop.py)
    {ns}:approvals                    zset "{job_id}|{step_id}" -> when it was asked (ms, Redis TIME):
                                      the steps awaiting a human's approval (broker/approvals.py)
    {ns}:approvals.audit              stream, capped: every approval decision (who, when, the note, the
                                      hash of the call), expiry and warning
    {ns}:waits                        zset "{job_id}|{step_id}" -> when it began (ms): the pipeline steps
                                      waiting durably (sleep:, wait_for:; broker/waits.py)
    {ns}:waits.event:{event}          zset "{job_id}|{step_id}" -> when it began (ms): the steps waiting
                                      for that event name (what mesh emit reads)
    {ns}:events:{event}               stream, capped at MESH_EVENT_KEEP, trimmed to MESH_EVENT_WINDOW_S and
                                      expiring with it: emitted events kept for waits that start later
                                      (each shard's; an entry's ``id``, when set, is the event's id: its
                                      first shard's copy's, MeshClient.emit)
    {ns}:signals:{job_id}             stream, capped at MESH_EVENT_KEEP, expiring MESH_EVENT_WINDOW_S after
                                      its last write: events signalled to a job that no step consumed yet
    {ns}:registry.agents              hash agent name -> JSON: the agent as its workers publish it on
                                      start (queue, contract version, input/output JSON Schema, tools;
                                      broker/registry.py); stays when its workers stop
    {ns}:registry.serving:{agent}     zset worker id (dramatiq broker id) -> when it published (ms, Redis
                                      TIME): the workers serving the agent; a worker removes itself on
                                      a graceful stop, dead ones are pruned by the next publish
    {ns}:registry.workers             hash worker id -> JSON: its label (host:pid), app, the contract
                                      version of each agent it serves, since when (ms, its first publish)
                                      and its shard when not 0 (its heartbeats are that shard's); with
                                      MESH_SHARDS > 1, every shard it consumes (``shards``), its shard the
                                      first of them: it heartbeats in each under this one id
    {ns}:limit.{{ns}|{name}|{flow_key}}  hash: a flow limit's state for one key (broker/limits.py,
                                      scripts/limits.lua): GCRA times of requests (tat) and tokens (ttat),
                                      the AIMD factor 429s left of the rate and its generation, counters;
                                      the braces after ``limit.`` are part of the name (the older layout's
                                      hash tag): the first ``{ns}`` is the hash tag, as for every key
    {ns}:limit.{...}:holders          zset holder -> lease end (ms): the concurrency slots held, renewed
                                      with the worker's claims; a dead worker's run out
    {ns}:limit.{...}:waiting          zset message key -> first arrival (ms): messages waiting for a slot,
                                      served in arrival order; {...}:alive, their last visit (stale pruned)
    {ns}:limits.declared              hash limit name -> JSON: the limit as the workers declaring it
                                      published it (agent:{name}, dependency:{name})
    {ns}:limits.set                   hash limit name -> JSON: an operator's override (mesh limits set),
                                      winning over the declaration until mesh limits reset
    {ns}:limits.audit                 stream, capped: who set or reset which limit, when, to what
                                      (broker/control_audit.py)
    {ns}:limits.keys:{name}           zset flow key -> last use (ms): the keys a keyed limit has seen (the
                                      10,000 most recent)
    {ns}:probe                        string, for a moment: written and deleted by ``mesh bench`` and ``mesh
                                      soak`` to check they may write in their throw-away namespace
    {ns}:latency:{side}               list: ``mesh bench``'s send-to-start latencies (s), in its throw-away
                                      namespace only (ops/bench.py)
    (The registry's names hold a dot, which agent names cannot, so no queue's key collides with them.)
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

from redis.crc import key_slot

#: The layout's version: 2 since every key carries its namespace as a hash tag (``{ns}:``); 1 was ``ns:``.
LAYOUT_VERSION = 2


def prefix(namespace: str) -> str:
    """What every key of ``namespace`` starts with, before its ``:``: the namespace as a Redis Cluster hash
    tag, ``{mesh}`` for ``mesh``. The scripts get it as their KEYS[1] (or a key that starts with it) and
    build every other key from it."""
    return "{" + namespace + "}"


def legacy_pattern(namespace: str) -> str:
    """A SCAN pattern matching every key of ``namespace`` in the older layout (``ns:...``, version 1):
    what ``mesh migrate`` moves, and what tests clean up as well."""
    return f"{namespace}:*"


#: Redis Cluster's hash slots, and how near (in slots) a shard's tag lands to its target slot.
SLOTS, SLOT_TOLERANCE = 16384, 64

#: The golden ratio's fractional part: shard s's target slot is ``frac(s * PHI) * SLOTS``, so the first N
#: shards' targets cut the slots into gaps of at most three lengths within a factor of 1.62 of each other
#: (the three-gap theorem), whatever N: spread evenly over a cluster's primaries.
_PHI = (5 ** 0.5 - 1) / 2


@functools.lru_cache(maxsize=4096)
def shard_prefix(namespace: str, shard: int) -> str:
    """The hash tag of shard ``shard`` of ``namespace``: shard 0's is the namespace's own (:func:`prefix`);
    shard ``s`` >= 1's is ``{ns:s}`` or, when that slot is not within :data:`SLOT_TOLERANCE` of the shard's
    target (``frac(s * golden ratio)`` of the slots), ``{ns:s.k}`` with the first ``k`` whose slot is: on a
    cluster whose primaries hold contiguous ranges of slots (``redis-cli --cluster create`` makes them so),
    shards 1..N spread evenly over the primaries. Worked out once per shard (~0.1 ms); a namespace holds no
    ``:``, so no other namespace's tag is one."""
    if shard == 0:
        return prefix(namespace)
    target = (shard * _PHI) % 1 * SLOTS
    for salt in itertools.count():
        tag = f"{namespace}:{shard}" if salt == 0 else f"{namespace}:{shard}.{salt}"
        away = abs(key_slot(tag.encode()) - target)
        if min(away, SLOTS - away) <= SLOT_TOLERANCE:
            return "{" + tag + "}"
    raise AssertionError("unreachable")  # pragma: no cover - itertools.count never ends


@dataclass(frozen=True)
class Keys:
    """Every key of a namespace, as seen from one of its shards (``shard``, MESH_SHARD; 0 by default).

    The keys of jobs and what runs them (queues, acks, heartbeats, records, traces, claims, the DLQ and
    every index and counter a step's or a settlement's write touches) are the shard's: ``{ns}:...`` on
    shard 0, ``{ns:s}:...`` on shard s (:attr:`prefix`). The fleet-wide keys (breakers, the registry,
    flow limits, registered pipelines, tool pins, the layout marker, console sessions) are the
    namespace's whatever the shard (:attr:`fleet`), and no script, transaction or multi-key command
    touches both kinds: on a Redis Cluster they are two slots."""

    namespace: str
    shard: int = 0
    #: the shard's hash tag (:func:`shard_prefix`), worked out once: the job and queue families'
    prefix: str = field(init=False, repr=False, compare=False)
    #: the namespace's hash tag (:func:`prefix`): the fleet-wide keys'
    fleet: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", shard_prefix(self.namespace, self.shard))
        object.__setattr__(self, "fleet", prefix(self.namespace))

    def queue(self, queue: str) -> str:
        return f"{self.prefix}:{queue}"

    def messages(self, queue: str) -> str:
        return f"{self.prefix}:{queue}.msgs"

    def delayed(self, queue: str) -> str:
        return f"{self.prefix}:{queue}.DQ"

    def delayed_messages(self, queue: str) -> str:
        return f"{self.prefix}:{queue}.DQ.msgs"

    def lane(self, queue: str, priority: str) -> str:
        """The list of ``queue``'s ready messages of ``priority`` without a flow key."""
        return self.queue(queue) if priority == "normal" else f"{self.prefix}:{queue}.{priority}"

    def flow(self, queue: str, priority: str, flow: str) -> str:
        """The list of ``queue``'s ready messages of ``priority`` and flow key ``flow`` (as JSON escapes it)."""
        return f"{self.prefix}:{queue}.flow:{priority}:{flow}"

    def flows(self, queue: str, priority: str) -> str:
        return f"{self.prefix}:{queue}.flows:{priority}"

    def sched(self, queue: str) -> str:
        return f"{self.prefix}:{queue}.sched"

    def wake(self, queue: str) -> str:
        return f"{self.prefix}:{queue}.wake"

    def stop(self, worker_id: str) -> str:
        return f"{self.prefix}:__stop__.{worker_id}"

    def acks(self, worker_id: str, queue: str) -> str:
        return f"{self.prefix}:__acks__.{worker_id}.{queue}"

    def held(self, worker_id: str) -> str:
        return f"{self.prefix}:__held__.{worker_id}"

    @property
    def acks_pattern(self) -> str:
        return f"{self.prefix}:__acks__.*"

    @property
    def heartbeats(self) -> str:
        return f"{self.prefix}:__heartbeats__"

    def claim(self, key: str) -> str:
        return f"{self.prefix}:claim:{key}"

    def kills(self, key: str) -> str:
        return f"{self.prefix}:kills:{key}"

    def breaker(self, name: str) -> str:
        return f"{self.fleet}:breaker:{name}"

    def breaker_failures(self, name: str) -> str:
        return f"{self.fleet}:breaker:{name}:failures"

    def breaker_errors(self, name: str) -> str:
        return f"{self.fleet}:breaker:{name}:errors"

    def breaker_deferred(self, name: str) -> str:
        return f"{self.fleet}:breaker:{name}:deferred"

    @property
    def breakers(self) -> str:
        return f"{self.fleet}:breakers"

    @property
    def breakers_audit(self) -> str:
        return f"{self.fleet}:breakers.audit"

    @property
    def routes(self) -> str:
        return f"{self.prefix}:routes"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def trace(self, job_id: str) -> str:
        return f"{self.prefix}:trace:{job_id}"

    @property
    def running(self) -> str:
        return f"{self.prefix}:running"

    @property
    def outcomes(self) -> str:
        return f"{self.prefix}:outcomes"

    def outcomes_flushed(self, process: str) -> str:
        return f"{self.prefix}:outcomes.flushed:{process}"

    @property
    def tokens(self) -> str:
        return f"{self.prefix}:tokens"

    def job_tokens(self, job_id: str) -> str:
        return f"{self.prefix}:tokens:{job_id}"

    def histogram(self, agent: str) -> str:
        return f"{self.prefix}:hist:{agent}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def jobs_expired(self) -> str:
        return f"{self.prefix}:jobs.expired"

    @property
    def jobs_compact(self) -> str:
        return f"{self.prefix}:jobs.compact"

    def jobs_kept(self, name: str) -> str:
        return f"{self.prefix}:jobs.kept:{name}"

    @property
    def jobs_kept_names(self) -> str:
        return f"{self.prefix}:jobs.kept"

    def dead_letter(self, entry_id: str) -> str:
        return f"{self.prefix}:dlq:{entry_id}"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def dlq_by_agent(self, agent: str) -> str:
        return f"{self.prefix}:dlq.agent:{agent}"

    @property
    def dlq_agents(self) -> str:
        return f"{self.prefix}:dlq.agents"

    def dlq_by_job(self, job_id: str) -> str:
        return f"{self.prefix}:dlq.job:{job_id}"

    @property
    def dlq_jobs_since(self) -> str:
        return f"{self.prefix}:dlq.jobs.since"

    def dlq_by_class(self, failure_class: str) -> str:
        return f"{self.prefix}:dlq.class:{failure_class}"

    def console_logout(self, session_id: str) -> str:
        return f"{self.fleet}:console.logout:{session_id}"

    @property
    def dlq_audit(self) -> str:
        return f"{self.prefix}:dlq.audit"

    def dlq_replayed(self, entry_id: str) -> str:
        return f"{self.prefix}:dlq.replayed:{entry_id}"

    def pipeline(self, name: str) -> str:
        return f"{self.fleet}:pipeline:{name}"

    @property
    def pipelines(self) -> str:
        return f"{self.fleet}:pipelines"

    def ledger(self, job_id: str, step_id: str) -> str:
        return f"{self.prefix}:ledger:{job_id}:{step_id}"

    def loop(self, job_id: str, step_id: str) -> str:
        return f"{self.prefix}:loop:{job_id}:{step_id}"

    @property
    def effects_unknown(self) -> str:
        return f"{self.prefix}:effects.unknown"

    @property
    def effects_audit(self) -> str:
        return f"{self.prefix}:effects.audit"

    def note(self, effect_id: str) -> str:
        return f"{self.prefix}:note:{effect_id}"

    @property
    def notes(self) -> str:
        return f"{self.prefix}:notes"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def sweep_lock(self) -> str:
        return f"{self.prefix}:sweep.lock"

    @property
    def timers(self) -> str:
        return f"{self.prefix}:timers"

    @property
    def timers_lock(self) -> str:
        return f"{self.prefix}:timers.lock"

    @property
    def approvals(self) -> str:
        return f"{self.prefix}:approvals"

    @property
    def approvals_audit(self) -> str:
        return f"{self.prefix}:approvals.audit"

    @property
    def waits(self) -> str:
        return f"{self.prefix}:waits"

    def waits_for(self, event: str) -> str:
        return f"{self.prefix}:waits.event:{event}"

    def events(self, event: str) -> str:
        return f"{self.prefix}:events:{event}"

    def signals(self, job_id: str) -> str:
        return f"{self.prefix}:signals:{job_id}"

    @property
    def tool_pins(self) -> str:
        return f"{self.fleet}:pins:tools"

    @property
    def tool_presented(self) -> str:
        return f"{self.fleet}:pins:presented"

    @property
    def registry(self) -> str:
        return f"{self.fleet}:registry.agents"

    def serving(self, agent: str) -> str:
        return f"{self.fleet}:registry.serving:{agent}"

    @property
    def registry_workers(self) -> str:
        return f"{self.fleet}:registry.workers"

    def limit(self, name: str, flow_key: str | None) -> str:
        """The state hash of limit ``name`` for ``flow_key`` (None: the one shared limit); its other keys
        add ``:holders``, ``:waiting`` and ``:alive`` after it, in the same hash slot."""
        return f"{self.fleet}:limit.{{{self.namespace}|{name}|{flow_key or ''}}}"

    @property
    def limits_declared(self) -> str:
        return f"{self.fleet}:limits.declared"

    @property
    def limits_set(self) -> str:
        return f"{self.fleet}:limits.set"

    @property
    def limits_audit(self) -> str:
        return f"{self.fleet}:limits.audit"

    def limit_keys(self, name: str) -> str:
        return f"{self.fleet}:limits.keys:{name}"

    @property
    def layout(self) -> str:
        """The marker of the layout the namespace's data is in (broker/layout.py: written by ``mesh migrate``)."""
        return f"{self.fleet}:layout"

    @property
    def shard_count(self) -> str:
        """How many shards the namespace's jobs are spread over, and from which: ``"{first}+{count}"``
        (MESH_SHARD, MESH_SHARDS), written by the first process to use the namespace (broker/shards.py)."""
        return f"{self.fleet}:shards"

    @property
    def probe(self) -> str:
        """The key ``mesh bench`` and ``mesh soak`` write and delete to check they may (ops/namespaces.py)."""
        return f"{self.fleet}:probe"

    def bench_latency(self, side: str) -> str:
        """``mesh bench``'s list of send-to-start latencies of one side (mesh, raw) in its throw-away namespace."""
        return f"{self.fleet}:latency:{side}"

    @property
    def everything(self) -> str:
        """A SCAN pattern matching every key of shard 0 and the fleet-wide keys (``{ns}:*``; Redis's glob
        reads the braces literally); :attr:`patterns` adds every other shard's."""
        return f"{self.fleet}:*"

    @property
    def patterns(self) -> tuple[str, str]:
        """SCAN patterns matching, together, every key of the deployment, whatever its shards: ``{ns}:*``
        and ``{ns:*}:*`` (a namespace holds no ``:``, so no other namespace's keys match either)."""
        return f"{self.fleet}:*", "{" + f"{self.namespace}:*" + "}:*"

    @property
    def legacy_everything(self) -> str:
        """:func:`legacy_pattern`: every key of the deployment in the older layout."""
        return legacy_pattern(self.namespace)
