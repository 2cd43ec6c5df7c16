"""Fleet-wide flow limits: rates (requests and model tokens per interval) and concurrency, per agent
or dependency and per key, kept in Redis and taken by one script call per limit (scripts/limits.lua).

A limit is named ``agent:{name}`` or ``dependency:{name}``. Its state for one flow key (the
envelope's ``flow_key``; None: the one shared limit) lives in the namespace's hash slot, as every
key of the mesh, so it runs on Redis Cluster as it does on one server. A rate is GCRA: a message over it
reserves its slot and is deferred to exactly then, coming back with a permit (so it waits once, in arrival
order); a concurrency slot is a lease renewed while the step runs and released when it settles, and a
message finding every slot held waits in the limit's FIFO list. A 429 from a dependency halves its rate
fleet-wide and the rate climbs back additively (AIMD). ``mesh limits set`` overrides a declaration at run
time (``{ns}:limits.set``), until ``mesh limits reset``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
import redis

from mesh.contracts.flow import MAX_CONCURRENCY, FlowLimits, canonical_rate, per_second

from .classify import named_wait
from .keys import Keys
from .settings import MeshSettings

logger = logging.getLogger(__name__)

LIMITS_LUA = resources.files("mesh.broker").joinpath("scripts/limits.lua").read_text()
#: ``mesh limits set``: the numbers given merged into the limit's override in one step, so two operators
#: setting different numbers of one limit at once both keep theirs (KEYS[1] the overrides' hash).
#: set_override's merge and its audit record (KEYS: the overrides hash, the limits' audit stream;
#: ARGV: the limit's name, the numbers given (JSON), who, when, the stream's approximate length).
SET_LUA = """
local current = redis.call("hget", KEYS[1], ARGV[1])
local value = current and cjson.decode(current) or {}
local given = cjson.decode(ARGV[2])
for name, number in pairs(given) do value[name] = number end
local encoded = cjson.encode(value)
redis.call("hset", KEYS[1], ARGV[1], encoded)
redis.call("xadd", KEYS[2], "MAXLEN", "~", ARGV[5], "*", "op", "set", "target", ARGV[1], "who", ARGV[3],
           "at", ARGV[4], "detail", cjson.encode({given = given, value = value}))
return encoded
"""

AGENT, DEPENDENCY = "agent:", "dependency:"
#: How far ahead of its rate a limit may run (ms): a burst of 100 ms' worth of requests.
BURST_MS = 100
#: The longest a message waiting for a concurrency slot sleeps before it looks again (ms); it sleeps
#: as long as the slots ahead of it take to turn over, by how long a slot is usually held, and one
#: next in line a tenth of a usual hold (scripts/limits.lua, HEAD_LOOKS).
WAIT_MAX_MS = 30_000
#: AIMD: a 429 multiplies the rate by DECREASE (at most once per DECREASE_HOLD_MS, so a volley of
#: 429s from one overrun counts once), never below MIN_FACTOR of the declared rate; it climbs back by
#: INCREASE_PER_S of the declared rate a second.
DECREASE, DECREASE_HOLD_MS, MIN_FACTOR, INCREASE_PER_S = 0.5, 1_000, 0.02, 0.02
#: The pause a 429 without Retry-After or a reset header imposes on the whole fleet (ms).
DEFAULT_PAUSE_MS = 1_000
#: Model tokens a call reserves before anything is known of it (afterwards: the calls' average).
EXPECTED_TOKENS = 1_000
#: How long a process reads overrides (``mesh limits set``) from its cache (s).
OVERRIDE_CACHE_S = 1.0
#: How often one process records a keyed limit's key as seen (s), and how many keys are kept listed.
KEY_SEEN_S, KEYS_KEPT = 5.0, 10_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def limit_name(kind: str, name: str) -> str:
    return f"{kind}{name}"


@dataclass(frozen=True)
class Effective:
    """A limit's numbers in force: the declaration's, or an operator's override of some of them."""

    requests: str | None = None
    tokens: str | None = None
    max: int | None = None

    @classmethod
    def of(cls, declared: FlowLimits | None, override: Mapping[str, Any] | None = None) -> Effective:
        rate, conc = (declared.rate, declared.concurrency) if declared is not None else (None, None)
        values: dict[str, Any] = {"requests": rate.requests if rate else None, "tokens": rate.tokens if rate else None,
                                  "max": conc.max if conc else None}
        for name, value in (override or {}).items():
            if name in values:
                values[name] = value
        return cls(requests=None if values["requests"] is None else str(values["requests"]),
                   tokens=None if values["tokens"] is None else str(values["tokens"]),
                   max=None if values["max"] is None else int(values["max"]))

    def unit_ms(self, what: str) -> float:
        """Milliseconds one request (``requests``) or one token (``tokens``) costs; 0: not limited."""
        rate = per_second(getattr(self, what))
        return 0.0 if rate is None else 1000.0 / rate


@dataclass
class Held:
    """What one message took of its limits: the slots it holds (released when it settles) and, for
    the dependencies its tools reach, the one request each it was admitted with."""

    holder: str
    limits: list[tuple[str, str | None]] = field(default_factory=list)
    #: Dependencies whose admitted request the first call uses; later calls take their own.
    unused: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    #: The limits whose concurrency slot it holds (renewed and released whatever an override says
    #: since), and the ms each admission moved its request schedule on (given back when undone).
    slots: set[tuple[str, str | None]] = field(default_factory=set)
    charged: dict[tuple[str, str | None], float] = field(default_factory=dict)
    #: Tokens reserved by each model call not yet settled (oldest first), per limit: an async handler's
    #: calls run side by side, each reserving and settling its own.
    reserved: dict[tuple[str, str | None], list[int]] = field(default_factory=dict)
    #: The limits whose tokens the admission booked for the first model call (it reserves none itself),
    #: and the ms that booking moved each token schedule on (given back when the admission is undone).
    prepaid: set[tuple[str, str | None]] = field(default_factory=set)
    tokens_charged: dict[tuple[str, str | None], float] = field(default_factory=dict)
    #: Given back (:meth:`Limiter.release`): a step's success lets go before its write sends the next
    #: step (:func:`let_go`), and its message's settling then releases nothing twice.
    released: bool = False

    def took(self, name: str, flow_key: str | None, verdict: Verdict) -> None:
        """Record limit ``name`` (for ``flow_key``) as taken with ``verdict``, an admission."""
        self.limits.append((name, flow_key))
        self.charged[(name, flow_key)] = verdict.charged_ms
        if verdict.slot:
            self.slots.add((name, flow_key))
        if verdict.tokens:  # booked for its first model call, which reserves no more
            self.reserved[(name, flow_key)] = [verdict.tokens]
            self.prepaid.add((name, flow_key))
            self.tokens_charged[(name, flow_key)] = verdict.tokens_charged_ms


@dataclass(frozen=True)
class Verdict:
    """A limit's answer: admitted, or why not and for how long (ms), with the limit's generation."""

    admitted: bool
    reason: str = ""
    wait_ms: int = 0
    gen: int = 0
    #: Admitted: whether it holds a concurrency slot, and the ms it moved the request schedule on.
    slot: bool = False
    charged_ms: float = 0.0
    #: The model tokens booked for the message's first call (admitted: by this take, or by the one that
    #: gave it its permit; deferred for its rate: reserved with its request), and the ms this take
    #: moved the token schedule on.
    tokens: int = 0
    tokens_charged_ms: float = 0.0


_current = threading.local()


def current_held() -> tuple[Limiter, Held] | None:
    """The limiter and what the message this thread runs took of it (None: no limited message)."""
    return getattr(_current, "held", None)


def set_current(value: tuple[Limiter, Held] | None) -> None:
    _current.held = value


@contextmanager
def acting_for(value: tuple[Limiter, Held] | None) -> Iterator[None]:
    """This thread spends for the message ``value`` took its limits for (a thread an async handler's
    call runs in), as the thread running it does."""
    before = current_held()
    set_current(value)
    try:
        yield
    finally:
        set_current(before)


class Limiter:
    """The declared limits of one process and the script that takes them."""

    def __init__(self, settings: MeshSettings, client: redis.Redis, declared: Mapping[str, FlowLimits]) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.namespace, settings.shard)
        self.declared = dict(declared)
        self.script = client.register_script(LIMITS_LUA)
        self.lease_ms = int(settings.claim_lease_s * 1000)
        self._overrides: tuple[float, dict[str, dict[str, Any]]] = (-OVERRIDE_CACHE_S, {})
        self._seen: dict[tuple[str, str], float] = {}
        self._tokens_per_call: dict[str, float] = {}
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    # -- names and numbers --

    def _limit_keys(self, name: str, flow_key: str | None) -> list[str]:
        state = self.keys.limit(name, flow_key)
        return [state, f"{state}:holders", f"{state}:waiting", f"{state}:alive"]

    def overrides(self) -> dict[str, dict[str, Any]]:
        at, cached = self._overrides
        if time.monotonic() - at < OVERRIDE_CACHE_S:
            return cached
        try:
            raw = self.client.hgetall(self.keys.limits_set)
        except redis.RedisError:
            return cached
        fresh = {_text(k): orjson.loads(v) for k, v in raw.items()}
        self._overrides = (time.monotonic(), fresh)
        return fresh

    def effective(self, name: str) -> Effective:
        return Effective.of(self.declared.get(name), self.overrides().get(name))

    def keyed(self, name: str) -> bool:
        limits = self.declared.get(name)
        return limits is not None and limits.key is not None

    # -- taking, releasing, renewing --

    def expected_tokens(self, name: str) -> int:
        """The tokens a model call governed by ``name`` is expected to spend (0: no token rate)."""
        if not self.effective(name).unit_ms("tokens"):
            return 0
        return max(1, int(self._tokens_per_call.get(name, EXPECTED_TOKENS)))

    def take(self, name: str, flow_key: str | None, holder: str, member: str, permit: Any = None) -> Verdict:
        """``permit``: ``[gen, due, tokens]`` (tokens: what its reservation booked) from an earlier
        deferral for the rate."""
        eff = self.effective(name)
        valid = isinstance(permit, list) and len(permit) in (2, 3) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in permit)
        gen, due, booked = ([*permit, 0][:3] if valid else (-1, 0, 0))
        tokens = self.expected_tokens(name)
        reply = self.script(keys=self._limit_keys(name, flow_key), args=[
            "take", holder, member, self.lease_ms, eff.max or 0, eff.unit_ms("requests"), BURST_MS,
            eff.unit_ms("tokens"), BURST_MS, int(gen), int(due), WAIT_MAX_MS, INCREASE_PER_S, DECREASE_HOLD_MS,
            tokens])
        if int(reply[0]) == 1:
            if flow_key is not None:
                self._saw(name, flow_key)
            tok_ms = float(reply[4]) if len(reply) > 4 else 0.0
            return Verdict(True, gen=int(reply[1]), slot=bool(eff.max),
                           charged_ms=float(reply[3]) if len(reply) > 3 else 0.0,
                           tokens=tokens if tok_ms else max(0, booked), tokens_charged_ms=tok_ms)
        reason = _text(reply[1])
        return Verdict(False, reason, max(0, int(reply[2])), int(reply[3]), tokens=tokens if reason == "rate" else 0)

    def untake(self, name: str, flow_key: str | None, holder: str, charged_ms: float,
               tokens_charged_ms: float = 0.0) -> None:
        """A take undone: its slot freed and the ``charged_ms`` (``tokens_charged_ms``) its admission
        moved the request (token) schedule on given back (none for an admission with a permit: its
        reservation stays)."""
        self.script(keys=self._limit_keys(name, flow_key), args=["untake", holder, charged_ms, tokens_charged_ms])

    def give_back(self, name: str, flow_key: str | None, tokens: int = 0) -> None:
        """A reserved request (and the ``tokens`` reserved with it) that will not be used (its message
        cannot wait that long): its slot freed."""
        eff = self.effective(name)
        unit, tok_unit = eff.unit_ms("requests"), eff.unit_ms("tokens")
        if unit:
            self.script(keys=self._limit_keys(name, flow_key), args=["force", "tat", unit, -1])
        if tok_unit and tokens:
            self.script(keys=self._limit_keys(name, flow_key), args=["force", "ttat", tok_unit, -tokens])

    def leave(self, name: str, flow_key: str | None, member: str) -> None:
        """A waiter that will not come back (its deadline passed): out of the waiting list at once,
        so the messages behind it do not wait for it to lapse."""
        self.script(keys=self._limit_keys(name, flow_key), args=["leave", member])

    def _saw(self, name: str, flow_key: str) -> None:
        now = time.monotonic()
        if now - self._seen.get((name, flow_key), -KEY_SEEN_S) < KEY_SEEN_S:
            return
        self._seen[(name, flow_key)] = now
        if len(self._seen) > 10_000:
            self._seen.clear()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.limit_keys(name), {flow_key: int(time.time() * 1000)})
        pipe.zremrangebyrank(self.keys.limit_keys(name), 0, -KEYS_KEPT - 1)  # the most recent only
        try:
            pipe.execute()
        except redis.RedisError as exc:
            logger.warning("could not index a limit key", extra={"limit": name, "error": str(exc)})

    def hold(self, held: Held) -> None:
        with self._lock:
            self._held[held.holder] = held

    def release(self, held: Held) -> None:
        """Give back what ``held`` took: its slots freed, the tokens of model calls that never settled
        given back. Once: a second call (its message settling after :func:`let_go`) does nothing; a
        Redis error leaves its slots to their leases (no longer renewed) and its tokens spent."""
        with self._lock:
            self._held.pop(held.holder, None)
            if held.released:
                return
            held.released = True
        held_ms = int((time.monotonic() - held.started) * 1000)
        pipe = self.client.pipeline(transaction=False)
        for name, flow_key in held.slots:
            self.script(keys=self._limit_keys(name, flow_key), args=["release", held.holder, held_ms], client=pipe)
        for (name, flow_key), reserved in held.reserved.items():  # model calls that never settled
            if sum(reserved):
                self.script(keys=self._limit_keys(name, flow_key),
                            args=["force", "ttat", self.effective(name).unit_ms("tokens"), -sum(reserved)],
                            client=pipe)
        pipe.execute()

    def renew(self) -> None:
        """Renew the lease of every slot this process holds: one pipelined round trip."""
        with self._lock:
            held = list(self._held.values())
        pipe = self.client.pipeline(transaction=False)
        renewed: list[tuple[Held, str, str | None]] = []
        for h in held:
            for name, flow_key in h.slots:  # a rate holds no slot
                self.script(keys=self._limit_keys(name, flow_key), args=["renew", self.lease_ms, h.holder],
                            client=pipe)
                renewed.append((h, name, flow_key))
        if not len(pipe):
            return
        for (h, name, flow_key), still in zip(renewed, pipe.execute(), strict=True):
            if int(still) == 0:
                self._hold_again(h, name, flow_key)

    def _hold_again(self, held: Held, name: str, flow_key: str | None) -> None:
        """A slot whose lease ran out while its step still runs (its process was stopped, or could not
        reach Redis, for longer than the lease): the step goes on whatever the limit says, so its slot
        is counted again, over the max if another message took it meanwhile (no message is admitted
        until the count is back under it). Under the lock a release takes, so a step that settled
        meanwhile is not counted again."""
        with self._lock:
            if self._held.get(held.holder) is not held or (name, flow_key) not in held.slots:
                return
            self.script(keys=self._limit_keys(name, flow_key), args=["rehold", self.lease_ms, held.holder])
        logger.warning("a limit slot's lease ran out while its step ran; counted again",
                       extra={"limit": name, "holder": held.holder})

    # -- what a running step spends --

    def call_made(self, held: Held, dependency: str) -> None:
        """A tool call to ``dependency``: its admitted request, or (a later call) one more, taken now."""
        with self._lock:  # calls of an async handler run side by side: one of them uses it
            first = dependency in held.unused
            held.unused.discard(dependency)
        if first:
            return
        name = limit_name(DEPENDENCY, dependency)
        unit = self.effective(name).unit_ms("requests") if name in self.declared else 0.0
        if unit:
            self.script(keys=self._limit_keys(name, None), args=["force", "tat", unit, 1])

    def reserve_tokens(self, held: Held) -> None:
        """Before a model call: reserve its expected tokens on each token rate the message took."""
        for name, flow_key in held.limits:
            unit = self.effective(name).unit_ms("tokens")
            if not unit:
                continue
            with self._lock:
                if (name, flow_key) in held.prepaid:  # the first call: its admission booked its tokens
                    held.prepaid.discard((name, flow_key))
                    continue
            expected = int(self._tokens_per_call.get(name, EXPECTED_TOKENS))
            self.script(keys=self._limit_keys(name, flow_key), args=["force", "ttat", unit, expected])
            with self._lock:
                held.reserved.setdefault((name, flow_key), []).append(expected)

    def settle_tokens(self, held: Held, spent: int) -> None:
        """After a model call: what it spent replaces what it reserved (the difference taken or given back);
        with calls side by side, each settles one reservation, and a call that reserved nothing (Redis
        could not be asked) is charged what it spent."""
        for name, flow_key in held.limits:
            unit = self.effective(name).unit_ms("tokens")
            if not unit:
                continue
            with self._lock:
                pending = held.reserved.get((name, flow_key))
                reserved = pending.pop(0) if pending else 0
                if pending == []:
                    del held.reserved[(name, flow_key)]
            if spent != reserved:
                self.script(keys=self._limit_keys(name, flow_key), args=["force", "ttat", unit, spent - reserved])
            before = self._tokens_per_call.get(name, float(spent))
            self._tokens_per_call[name] = 0.8 * before + 0.2 * spent

    def penalize(self, dependency: str, retry_after_s: float | None) -> None:
        """A 429 from ``dependency``: its rate halves fleet-wide and pauses for the wait it named."""
        name = limit_name(DEPENDENCY, dependency)
        if name in self.declared:
            self._lower(name, None, retry_after_s)

    def model_refused(self, held: Held | None, dependency: str | None, retry_after_s: float | None) -> list[str]:
        """A 429 from the model endpoint ``dependency`` (its ``host:port``) for a call of the message
        ``held`` took its limits for: lowered fleet-wide (halved and paused, as :meth:`penalize` does)
        are the rates that govern model calls — the agent's own ``rate:`` (its requests and the
        tokens each call reserves), any other limit the call reserved tokens on, and the endpoint's
        ``dependency:`` limit when one is declared. The limits lowered, by name."""
        lowered: list[tuple[str, str | None]] = []
        for name, flow_key in held.limits if held is not None else ():
            eff = self.effective(name)
            if (name.startswith(AGENT) and (eff.requests or eff.tokens)) or eff.tokens:
                lowered.append((name, flow_key))
        if dependency is not None and limit_name(DEPENDENCY, dependency) in self.declared:
            own = (limit_name(DEPENDENCY, dependency), None)
            if own not in lowered:
                lowered.append(own)
        for name, flow_key in lowered:
            self._lower(name, flow_key, retry_after_s)
        return [name for name, _ in lowered]

    def _lower(self, name: str, flow_key: str | None, retry_after_s: float | None) -> None:
        wait = named_wait(retry_after_s)
        pause = DEFAULT_PAUSE_MS if wait is None else int(min(wait, 3600) * 1000)
        factor, gen = self.script(keys=self._limit_keys(name, flow_key),
                                  args=["penalize", pause, DECREASE, MIN_FACTOR, DECREASE_HOLD_MS])
        logger.info("rate lowered after a 429", extra={"limit": name, "factor": int(factor) / 1e6,
                                                       "generation": int(gen), "pause_ms": pause})

    def publish(self) -> None:
        """Record this process's declarations (``mesh limits`` lists them)."""
        if self.declared:
            self.client.hset(self.keys.limits_declared, mapping={
                name: orjson.dumps(limits.model_dump(mode="json", exclude_none=True))
                for name, limits in self.declared.items()})


# -- reading and changing limits (mesh limits) --


@dataclass(frozen=True)
class LimitState:
    """One limit for one key, as ``mesh limits`` shows it."""

    name: str
    flow_key: str | None
    requests: str | None
    tokens: str | None
    max: int | None
    overridden: bool
    #: What 429s left of the declared rate (1: all of it).
    factor: float
    in_flight: int
    waiting: int
    #: How far the request and token buckets run ahead of now (ms): reserved requests wait that long.
    ahead_ms: int
    tokens_ahead_ms: int
    rejected: int
    admitted: int


def declared_limits(client: redis.Redis, keys: Keys) -> dict[str, FlowLimits]:
    raw: dict[Any, Any] = client.hgetall(keys.limits_declared)
    return {_text(k): FlowLimits.model_validate_json(v) for k, v in raw.items()}


def overrides(client: redis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    raw: dict[Any, Any] = client.hgetall(keys.limits_set)
    return {_text(k): orjson.loads(v) for k, v in raw.items()}


def set_override(client: redis.Redis, keys: Keys, name: str, *, requests: str | None = None,
                 tokens: str | None = None, max: int | None = None, by: str | None = None) -> dict[str, Any]:
    """Override some of limit ``name``'s numbers for the whole fleet (kept until :func:`reset_override`),
    audited as done by ``by`` (default ``user@host``) in the same script call (``{ns}:limits.audit``).
    A rate is stored in its canonical form (``5/2s``); the numbers given are merged into the override
    atomically, so concurrent calls for different numbers of one limit all keep theirs."""
    requests, tokens = (None if rate is None else canonical_rate(rate) for rate in (requests, tokens))
    if max is not None and not 1 <= max <= MAX_CONCURRENCY:
        raise ValueError(f"a concurrency max is between 1 and {MAX_CONCURRENCY:,}, not {max}")
    given = {k: v for k, v in (("requests", requests), ("tokens", tokens), ("max", max)) if v is not None}
    if not given:
        raise ValueError("give --requests, --tokens or --max")
    from . import control_audit
    from .trace import operator

    merged: Any = client.register_script(SET_LUA)(
        keys=[keys.limits_set, keys.limits_audit],
        args=[name, orjson.dumps(given), by or operator(), f"{time.time():.3f}", control_audit.AUDIT_MAXLEN])
    value: dict[str, Any] = orjson.loads(merged)
    return value


def reset_override(client: redis.Redis, keys: Keys, name: str, by: str | None = None) -> bool:
    """Drop an override: the declaration is in force again. False when there was none. Audited as
    done by ``by`` (default ``user@host``), with the override it dropped, in the same transaction."""
    from . import control_audit
    from .trace import operator

    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.limits_set)
                was: Any = pipe.hget(keys.limits_set, name)
                if was is None:
                    return False
                pipe.multi()
                pipe.hdel(keys.limits_set, name)
                control_audit.stage(pipe, keys.limits_audit, "reset", name, by or operator(), was=orjson.loads(was))
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def limit_states(client: redis.Redis, keys: Keys, names: Iterable[str] | None = None,
                 max_keys: int = 20) -> list[LimitState]:
    """Every declared limit (or ``names``), and each keyed one for its ``max_keys`` most recent keys."""
    declared = declared_limits(client, keys)
    over = overrides(client, keys)
    script = client.register_script(LIMITS_LUA)
    rows: list[LimitState] = []
    for name in sorted(set(declared) | set(over) if names is None else names):
        limits = declared.get(name)
        eff = Effective.of(limits, over.get(name))
        flow_keys: list[str | None] = [None]
        if limits is not None and limits.key is not None:
            found: list[Any] = client.zrevrange(keys.limit_keys(name), 0, max_keys - 1)
            flow_keys = [_text(k) for k in found] or [None]
        for flow_key in flow_keys:
            state = keys.limit(name, flow_key)
            tat, ttat, factor, held, waiting, _gen, rejected, now, admitted = script(
                keys=[state, f"{state}:holders", f"{state}:waiting", f"{state}:alive"], args=["show", INCREASE_PER_S])
            rows.append(LimitState(
                name=name, flow_key=flow_key, requests=eff.requests, tokens=eff.tokens, max=eff.max,
                overridden=name in over, factor=int(factor) / 1e6, in_flight=int(held), waiting=int(waiting),
                ahead_ms=max(0, int(float(tat) - int(now))), tokens_ahead_ms=max(0, int(float(ttat) - int(now))),
                rejected=int(rejected), admitted=int(admitted)))
    return rows


def new_holder(worker_id: str) -> str:
    return f"{worker_id}:{uuid.uuid4().hex[:12]}"


# -- hooks for the step that runs (tool calls, model calls) --


def _with_held(call: Callable[[Limiter, Any], None], failed: str, **extra: Any) -> None:
    """``call(limiter, held)`` for the step this thread runs, if it holds limits; a Redis error is
    logged as ``failed`` (the step goes on: a count it could not make is not its failure)."""
    current = current_held()
    if current is not None:
        limiter, held = current
        try:
            call(limiter, held)
        except redis.RedisError as exc:
            logger.warning(failed, extra={**extra, "error": str(exc)})


def call_made(dependency: str) -> None:
    """A tool call to ``dependency`` from the step this thread runs: counted against its rate."""
    _with_held(lambda limiter, held: limiter.call_made(held, dependency),
               "could not count a call against its limit", dependency=dependency)


def model_refused(exc: BaseException) -> None:
    """A model call of the step this thread runs was answered 429 (``exc``, a RateLimited naming the
    endpoint as its ``dependency``): the rates that govern model calls are lowered for the fleet
    (:meth:`Limiter.model_refused`), and ``exc`` marked so the step's end does not lower them again."""
    current = current_held()
    if current is None:
        return
    limiter, held = current
    context = getattr(exc, "context", None)
    dependency = context.get("dependency") if isinstance(context, dict) else None
    try:
        limiter.model_refused(held, dependency if isinstance(dependency, str) else None,
                              getattr(exc, "retry_after_s", None))
    except redis.RedisError as error:
        logger.warning("could not lower a rate after a model's 429", extra={"error": str(error)})
        return
    exc.mesh_limits_lowered = True  # type: ignore[attr-defined]


def let_go() -> None:
    """The step this thread runs has returned and its success is about to be written: what its message
    took of its limits is given back now (:meth:`Limiter.release`), before the write makes its next
    step visible. A next step of the same agent (or of one sharing a limit with it) would otherwise
    reach a worker thread while the slot is still held and be deferred (on the delay queue, 100 ms and
    more) on most hops of a sequential pipeline. The handler is done: no call of it counts against the
    limits any more; a write that fails and retries the step takes a slot afresh."""
    current = current_held()
    if current is None:
        return
    set_current(None)
    limiter, held = current
    try:
        limiter.release(held)
    except redis.RedisError as exc:  # its slots' leases run out instead
        logger.warning("could not release limit slots", extra={"error": str(exc)})


def reserve_tokens() -> None:
    """Before a model call of the step this thread runs: its expected tokens reserved."""
    _with_held(lambda limiter, held: limiter.reserve_tokens(held), "could not reserve model tokens")


def settle_tokens(spent: int) -> None:
    """After a model call of the step this thread runs: the tokens it spent replace its reservation."""
    _with_held(lambda limiter, held: limiter.settle_tokens(held, spent), "could not settle model tokens")
