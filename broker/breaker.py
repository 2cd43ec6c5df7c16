"""Circuit breakers shared by the whole fleet through Redis, one per dependency.

    closed ──(MESH_BREAKER_FAILURES brownouts or timeouts within MESH_BREAKER_WINDOW_S)──► open
    open ──(MESH_BREAKER_COOLDOWN_S passes)──► half_open: exactly one probe call, fleet-wide
    half_open ──probe succeeds──► closed     half_open ──probe fails──► open, cool-down doubled (capped)

While a breaker is open no worker calls the dependency: the call raises BreakerOpen with the
time left, and the router defers the message to the reopen time. Each transition is one call of
``scripts/breaker.lua``.

Timeouts count: a dependency that hangs is the usual shape of overload, and without the breaker
every message would wait out the full timeout on it. The timed-out message itself still fails
fast (its route is the timeout's); only the breaker counts it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import httpx
import redis
from dramatiq.middleware import TimeLimitExceeded

from mesh.contracts import BreakerOpen, Brownout, DependencyTimeout, loads

from .clock import server_ms
from .keys import Keys
from .redact import redact
from .settings import MeshSettings

logger = logging.getLogger(__name__)

BREAKER_LUA = resources.files("mesh.broker").joinpath("scripts/breaker.lua").read_text()

T = TypeVar("T")

#: How long a breaker's set of deferred messages outlives the last one's due time (ms).
DEFERRED_GRACE_MS = 60_000

#: Failures that count against a dependency's breaker: it is down (brownout) or it hangs (timeout;
#: the time limit cutting a call short is a timeout the dependency did not answer within).
COUNTED = (Brownout, DependencyTimeout, httpx.TimeoutException, TimeLimitExceeded)


@dataclass(frozen=True)
class OpeningFailure:
    """One of the failures that opened a breaker: when (s) and its error (masked)."""

    at: float
    error: str


@dataclass(frozen=True)
class BreakerState:
    """What ``mesh breakers`` shows for one dependency.

    ``failures`` counts the current failure window, which opening clears; ``opened_failures`` and
    ``opened_by`` keep the failures that opened it (the last opening's, newest first). ``reopen_in_s``
    is measured on the Redis server's clock, as the reopen time is. ``deferred``: messages the open
    breaker deferred that are not due back yet (see :meth:`Breakers.note_deferred`).
    """

    name: str
    state: str
    failures: int
    reopen_at: float | None
    cooldown_s: float
    trips: int
    last_error: str | None
    opened_at: float | None = None
    opened_failures: int = 0
    opened_by: tuple[OpeningFailure, ...] = ()
    reopen_in_s: float | None = None
    deferred: int = 0


class Breakers:
    """Guards calls to dependencies (``host:port`` of an HTTP endpoint, a model endpoint)."""

    def __init__(self, settings: MeshSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.namespace, settings.shard)
        self.script = client.register_script(BREAKER_LUA)

    def _call(self, command: str, name: str, owner: str = "", error: str = "", client: Any = None) -> Any:
        s = self.settings
        return self.script(
            keys=[self.keys.breaker(name), self.keys.breaker_failures(name), self.keys.breakers,
                  self.keys.breaker_errors(name)],
            args=[command, name, owner, s.breaker_failures, int(s.breaker_window_s * 1000),
                  int(s.breaker_cooldown_s * 1000), int(s.breaker_max_cooldown_s * 1000),
                  int(s.breaker_probe_ttl_s * 1000), error[:500]],
            client=client,
        )

    def call(self, dependency: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one call to ``dependency``) if its breaker admits it, and record the outcome.

        Brownouts and timeouts count against the breaker; once it is open a Brownout carries the
        time to the reopen, so the message waits for it (a timeout keeps its fail-fast route). Any
        other outcome of a probe means the dependency answered, which closes the breaker.
        """
        with self.guard(dependency):
            return fn()

    async def acall(self, dependency: str, fn: Callable[[], Awaitable[T]]) -> T:
        """:meth:`call` for a coroutine function: ``await fn()`` through the same breaker."""
        with self.guard(dependency):
            return await fn()

    @contextmanager
    def guard(self, dependency: str) -> Iterator[None]:
        """The breaker around one call to ``dependency`` (see :meth:`call`): BreakerOpen on entry
        while it is open; the call's outcome recorded on exit."""
        owner = uuid.uuid4().hex
        verdict = self._call("admit", dependency, owner)
        state = verdict[0].decode()
        if state in ("open", "half_open"):
            raise BreakerOpen(dependency, int(verdict[1]) / 1000, state)
        probe = state == "probe"
        try:
            yield
        except COUNTED as exc:
            # The error is kept as the breaker's last_error: masked like every error text the mesh keeps.
            verdict = self._record("failure", dependency, owner, redact(str(exc) or type(exc).__name__))
            if verdict is None:
                raise
            after, wait_ms = verdict
            if after != b"closed" and isinstance(exc, Brownout):
                exc.retry_after_s = int(wait_ms) / 1000
            if after == b"open":
                logger.warning("circuit breaker open", extra={"dependency": dependency,
                                                               "reopen_in_s": int(wait_ms) / 1000})
            raise
        except Exception:
            if probe:  # the dependency answered (a 4xx, a bad body): it is up
                self._record("success", dependency, owner)
            raise
        except BaseException as exc:
            if probe:  # stopped (shutdown) before any answer: not proof it is up
                self._record("failure", dependency, owner, f"probe interrupted: {type(exc).__name__}")
            raise
        if probe:
            self._record("success", dependency, owner)
            logger.info("circuit breaker closed", extra={"dependency": dependency})

    def _record(self, command: str, name: str, owner: str, error: str = "") -> Any:
        """Record a call's outcome; None when the mesh's Redis refuses. The call has happened
        (an effect may have been applied): a bookkeeping failure must never replace its outcome.
        An unrecorded probe frees its slot after MESH_BREAKER_PROBE_TTL_S."""
        try:
            return self._call(command, name, owner, error)
        except redis.RedisError as exc:
            logger.warning("could not record a call's outcome on its breaker",
                           extra={"dependency": name, "error": str(exc)})
            return None

    def reset(self, name: str, by: str | None = None) -> bool:
        """Close ``name``'s breaker, audited as done by ``by`` (default ``user@host``) with the state it
        was in, in one transaction (``{ns}:breakers.audit``); False if no breaker of that name exists."""
        from . import control_audit
        from .trace import operator

        look = self.client.pipeline(transaction=False)
        look.sismember(self.keys.breakers, name)
        look.hget(self.keys.breaker(name), "state")
        known, was = look.execute()
        if not known:
            return False
        pipe = self.client.pipeline(transaction=True)
        self._call("reset", name, client=pipe)
        control_audit.stage(pipe, self.keys.breakers_audit, "reset", name, by or operator(),
                            was=was.decode() if was else "closed")
        pipe.execute()
        return True

    def note_deferred(self, name: str, message_id: str, due_ms: int, pipe: Any = None, *,
                      now_ms: int | None = None) -> None:
        """Record that ``message_id`` waits on ``name``'s open breaker until ``due_ms`` (epoch ms on the
        Redis server's clock, as its delayed copy's eta; ``now_ms`` the server's time now, default this
        host's clock). One member per message (a re-deferral moves it), and members already due are
        trimmed on each add, so the set holds at most the messages waiting now."""
        own = pipe is None
        pipe = self.client.pipeline(transaction=False) if own else pipe
        key = self.keys.breaker_deferred(name)
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        ttl_ms = max(0, due_ms - now_ms) + DEFERRED_GRACE_MS
        pipe.zadd(key, {message_id: due_ms})
        pipe.zremrangebyscore(key, "-inf", f"({min(due_ms, now_ms)}")
        pipe.pexpire(key, ttl_ms, nx=True)  # a fresh set; then only ever lengthened
        pipe.pexpire(key, ttl_ms, gt=True)
        if own:
            pipe.execute()

    def list(self) -> list[BreakerState]:
        """Every breaker, with what opened it and the messages waiting on it (counted on Redis's clock)."""
        names = sorted(n.decode() for n in self.client.smembers(self.keys.breakers))  # type: ignore[union-attr]
        now_ms = server_ms(self.client)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.breaker(name))
            pipe.zcard(self.keys.breaker_failures(name))
            pipe.zcount(self.keys.breaker_deferred(name), f"({now_ms}", "+inf")
        values = pipe.execute()
        return [self._state(name, values[3 * i], values[3 * i + 1], values[3 * i + 2], now_ms)
                for i, name in enumerate(names)]

    def _state(self, name: str, raw: dict[bytes, bytes], failures: int, deferred: int, now_ms: int) -> BreakerState:
        h = {k.decode(): v.decode() for k, v in raw.items()}
        state = h.get("state", "closed")
        reopen_ms = int(h["reopen_at"]) if state != "closed" and "reopen_at" in h else None
        opened = state != "closed" and "opened_at" in h
        return BreakerState(
            name=name, state=state, failures=int(failures),
            reopen_at=reopen_ms / 1000 if reopen_ms is not None else None,
            cooldown_s=int(h.get("cooldown_ms", self.settings.breaker_cooldown_s * 1000)) / 1000,
            trips=int(h.get("trips", 0)), last_error=h.get("last_error"),
            opened_at=int(h["opened_at"]) / 1000 if opened else None,
            opened_failures=int(h.get("opened_failures", 0)) if opened else 0,
            opened_by=_opening_failures(h.get("opened_errors")) if opened else (),
            reopen_in_s=max(0.0, (reopen_ms - now_ms) / 1000) if reopen_ms is not None else None,
            deferred=int(deferred),
        )


def _opening_failures(raw: str | None) -> tuple[OpeningFailure, ...]:
    try:
        items = loads(raw) if raw else []
    except ValueError:
        return ()
    if not isinstance(items, list):  # Lua's cjson encodes an empty table as an object
        return ()
    return tuple(OpeningFailure(at=float(i.get("at", 0)) / 1000, error=str(i.get("error", "")))
                 for i in items if isinstance(i, dict))
