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
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import httpx
import redis
from dramatiq.middleware import TimeLimitExceeded

from mesh.contracts import BreakerOpen, Brownout, DependencyTimeout

from .keys import Keys
from .redact import redact
from .settings import MeshSettings

logger = logging.getLogger(__name__)

BREAKER_LUA = resources.files("mesh.broker").joinpath("scripts/breaker.lua").read_text()

T = TypeVar("T")

#: Failures that count against a dependency's breaker: it is down (brownout) or it hangs (timeout;
#: the time limit cutting a call short is a timeout the dependency did not answer within).
COUNTED = (Brownout, DependencyTimeout, httpx.TimeoutException, TimeLimitExceeded)


@dataclass(frozen=True)
class BreakerState:
    """What ``mesh breakers`` shows for one dependency."""

    name: str
    state: str
    failures: int
    reopen_at: float | None
    cooldown_s: float
    trips: int
    last_error: str | None


class Breakers:
    """Guards calls to dependencies (``host:port`` of an HTTP endpoint, a model endpoint)."""

    def __init__(self, settings: MeshSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.namespace)
        self.script = client.register_script(BREAKER_LUA)

    def _call(self, command: str, name: str, owner: str = "", error: str = "") -> Any:
        s = self.settings
        return self.script(
            keys=[self.keys.breaker(name), self.keys.breaker_failures(name), self.keys.breakers],
            args=[command, name, owner, s.breaker_failures, int(s.breaker_window_s * 1000),
                  int(s.breaker_cooldown_s * 1000), int(s.breaker_max_cooldown_s * 1000),
                  int(s.breaker_probe_ttl_s * 1000), error[:500]],
        )

    def call(self, dependency: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one call to ``dependency``) if its breaker admits it, and record the outcome.

        Brownouts and timeouts count against the breaker; once it is open a Brownout carries the
        time to the reopen, so the message waits for it (a timeout keeps its fail-fast route). Any
        other outcome of a probe means the dependency answered, which closes the breaker.
        """
        owner = uuid.uuid4().hex
        verdict = self._call("admit", dependency, owner)
        state = verdict[0].decode()
        if state in ("open", "half_open"):
            raise BreakerOpen(dependency, int(verdict[1]) / 1000, state)
        probe = state == "probe"
        try:
            result = fn()
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
        return result

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

    def reset(self, name: str) -> bool:
        """Close ``name``'s breaker; False if no breaker of that name exists."""
        if not self.client.sismember(self.keys.breakers, name):
            return False
        self._call("reset", name)
        return True

    def list(self) -> list[BreakerState]:
        names = sorted(n.decode() for n in self.client.smembers(self.keys.breakers))  # type: ignore[union-attr]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.breaker(name))
            pipe.zcard(self.keys.breaker_failures(name))
        values = pipe.execute()
        out = []
        for i, name in enumerate(names):
            h = {k.decode(): v.decode() for k, v in values[2 * i].items()}
            state = h.get("state", "closed")
            out.append(BreakerState(
                name=name, state=state, failures=int(values[2 * i + 1]),
                reopen_at=int(h["reopen_at"]) / 1000 if state != "closed" and "reopen_at" in h else None,
                cooldown_s=int(h.get("cooldown_ms", self.settings.breaker_cooldown_s * 1000)) / 1000,
                trips=int(h.get("trips", 0)), last_error=h.get("last_error"),
            ))
        return out
