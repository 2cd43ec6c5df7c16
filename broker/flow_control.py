"""FlowControl: a message takes its limits (broker/limits.py) before it runs, or waits for them.

It runs before the claim's hook: a message over a limit is deferred to when capacity frees, on the
delay queue (no worker thread waits), with a counter of its own (``mesh_flow_waits``), so it spends
neither its retry budget nor MESH_MAX_DEFERS; only its deadline bounds the wait. A rate's deferral
carries the permit of the slot it reserved (``mesh_flow``), so it comes back once, in arrival order.
What the message took is released when it settles; its slots' leases are renewed meanwhile, so a
worker killed mid-step gives them back within MESH_LEASE_S (MESH_HEARTBEAT_TIMEOUT_S by default).
A 429 from a limited dependency lowers that dependency's rate for the whole fleet; a model endpoint's
429 lowers the rates that govern model calls as it comes (:func:`mesh.broker.limits.model_refused`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
from dramatiq.broker import Broker, MessageProxy
from dramatiq.middleware import Middleware, SkipMessage

from mesh.contracts import FailureClass
from mesh.contracts.flow import flow_key

from . import trace
from .clock import server_now_ms
from .limits import Held, Limiter, new_holder, set_current
from .router import dead_letter_with_step
from .settle import RetryLater, decide, delayed_copy

logger = logging.getLogger(__name__)

#: The wait after Redis could not be asked (ms).
UNANSWERED_WAIT_MS = 1_000
#: The shortest wait before its deadline a message waiting for a slot is deferred by; closer to its
#: deadline it is dead-lettered (ms).
LAST_WAIT_MS = 50


class FlowControl(Middleware):
    """Takes each message's limits before it runs; defers it while they are spent."""

    def __init__(self, limiter: Limiter, plan: Mapping[str, Sequence[str]],
                 render: Callable[[str, dict[str, Any]], str | None] | None = None) -> None:
        """``plan``: agent -> the limits its messages take (``agent:{name}``, ``dependency:{name}``).
        ``render``: the flow key of a message that came without one (its sender did not know the
        agent's limits)."""
        self.limiter = limiter
        self.plan = {agent: tuple(names) for agent, names in plan.items() if names}
        self.render = render
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def after_worker_boot(self, broker: Broker, worker: Any) -> None:
        if not self.plan:
            return
        try:
            self.limiter.publish()
        except redis.RedisError as exc:
            logger.warning("could not publish the declared limits", extra={"error": str(exc)})
        self._renewer = threading.Thread(target=self._renew_loop, name="mesh-limit-renewer", daemon=True)
        self._renewer.start()

    def after_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        self._stop.set()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.limiter.lease_ms / 3000):
            try:
                self.limiter.renew()
            except redis.RedisError as exc:
                logger.warning("limit slot renewal failed; retrying", extra={"error": str(exc)})

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        set_current(None)
        names = self.plan.get(message.actor_name)
        envelope = message.args[0] if message.args and isinstance(message.args[0], dict) else None
        if not names or envelope is None or not isinstance(envelope.get("key"), str):
            return
        key = self._flow_key(message.actor_name, envelope)
        held = Held(new_holder(getattr(broker, "broker_id", "worker")))
        permits = dict(message.options.get("mesh_flow") or {})
        try:
            for name in names:
                limit_key = key if self.limiter.keyed(name) else None
                verdict = self.limiter.take(name, limit_key, held.holder, envelope["key"],
                                            permits.get(f"{name}|{limit_key or ''}"))
                if not verdict.admitted:
                    self._undo(held)
                    if verdict.reason == "rate":
                        permits[f"{name}|{limit_key or ''}"] = [verdict.gen, 1, verdict.tokens]
                    # A concurrency wait is an estimate (how long slots are usually held), a rate's or
                    # the tokens' the time its capacity frees.
                    estimate = verdict.reason == "concurrency"
                    if not self._defer(broker, message, verdict.wait_ms, permits, f"{name} {verdict.reason}",
                                       estimate=estimate):
                        if verdict.reason == "rate":
                            # its slot (and tokens) go to the next message
                            self.limiter.give_back(name, limit_key, verdict.tokens)
                        elif estimate:  # its place in the waiting list goes to the next message
                            self.limiter.leave(name, limit_key, envelope["key"])
                    raise SkipMessage(f"{envelope['key']}: waits for {name}")
                held.took(name, limit_key, verdict)
                if name.startswith("dependency:"):
                    held.unused.add(name.removeprefix("dependency:"))
        except redis.RedisError as exc:
            self._undo(held)
            self._defer(broker, message, UNANSWERED_WAIT_MS, permits, f"limits unanswered: {exc}", estimate=True)
            raise SkipMessage(f"{envelope['key']}: its limits could not be taken") from None
        # A permit is spent once: a retry of this attempt reserves afresh.
        message.options.pop("mesh_flow", None)
        self.limiter.hold(held)
        message.mesh_flow_held = held  # type: ignore[attr-defined]
        set_current((self.limiter, held))

    def _flow_key(self, agent: str, envelope: dict[str, Any]) -> str | None:
        key = flow_key(envelope)
        if key is None and self.render is not None and isinstance(envelope.get("payload"), dict):
            try:
                key = self.render(agent, envelope["payload"])
            except Exception as exc:  # the key cannot be rendered: the one shared limit
                logger.warning("limit key not rendered", extra={"agent": agent, "error": str(exc)})
        return key

    def _undo(self, held: Held) -> None:
        for name, limit_key in held.limits:
            try:
                self.limiter.untake(name, limit_key, held.holder, held.charged.get((name, limit_key), 0.0),
                                    held.tokens_charged.get((name, limit_key), 0.0))
            except redis.RedisError as exc:  # its slot's lease runs out instead
                logger.warning("could not give a limit back", extra={"limit": name, "error": str(exc)})
        held.limits.clear()
        held.slots.clear()
        held.charged.clear()
        held.reserved.clear()
        held.prepaid.clear()
        held.tokens_charged.clear()

    def _defer(self, broker: Broker, message: MessageProxy, delay_ms: int, permits: dict[str, Any],
               reason: str, *, estimate: bool = False) -> bool:
        """Defer ``message`` by ``delay_ms``; False when its deadline passes first (it is dead-lettered).
        ``estimate``: ``delay_ms`` is a guess of when to look again, not when the limit frees, so a
        message whose deadline comes sooner looks again halfway to it, until it is too close."""
        envelope = message.args[0]
        waits = int(message.options.get("mesh_flow_waits", 0))
        now_ms = server_now_ms(broker)
        deadline = envelope.get("deadline")
        if isinstance(deadline, int | float) and (now_ms + delay_ms) >= deadline * 1000:
            left_ms = int(deadline * 1000 - now_ms)
            if estimate and left_ms // 2 >= LAST_WAIT_MS:
                delay_ms = left_ms // 2
            else:
                return self._too_late(broker, message, reason, delay_ms, left_ms, estimate)
        copy = delayed_copy(
message._message, delay_ms, now_ms=now_ms, mesh_flow=permits, mesh_flow_waits=waits + 1)
        decide(message, RetryLater(copy, delay_ms, stat="deferred_flow", route="flow:defer"))
        if waits == 0:  # its first wait is traced; the others only counted
            ev = trace.event("deferred", envelope, worker=trace.worker_name(), reason=reason,
                             until=(now_ms + delay_ms) / 1000)
            try:
                trace.emit(self.limiter.client, self.limiter.keys, ev)
            except redis.RedisError as exc:
                logger.warning("could not write a trace event", extra={"error": str(exc)})
        return True

    def _too_late(self, broker: Broker, message: MessageProxy, reason: str, delay_ms: int, left_ms: int,
                  estimate: bool) -> bool:
        """Dead-letter ``message``: its deadline passes before its limit frees."""
        if estimate:
            why = f"{reason}: its deadline passed while it waited ({max(left_ms, 0)} ms left)"
        else:
            why = f"{reason}: its deadline passes before the limit frees ({delay_ms} ms)"
        decide(message, dead_letter_with_step(broker, message, FailureClass.DEADLINE, why, None))
        logger.warning("message dead-lettered waiting for a limit", extra={"key": message.args[0].get("key"),
                                                                            "reason": why})
        return False

    def after_process_message(self, broker: Broker, message: MessageProxy, *, result: Any | None = None,
                              exception: BaseException | None = None) -> None:
        set_current(None)
        held: Held | None = message.__dict__.pop("mesh_flow_held", None)
        if held is not None:
            try:
                self.limiter.release(held)
            except redis.RedisError as exc:  # its slots' leases run out instead
                logger.warning("could not release limit slots", extra={"error": str(exc)})
        if (exception is not None and getattr(exception, "failure_class", None) is FailureClass.RATE_LIMITED
                and not getattr(exception, "mesh_limits_lowered", False)):  # a model's 429: lowered when it came
            dependency = getattr(exception, "context", {}).get("dependency")
            if isinstance(dependency, str):
                try:
                    self.limiter.penalize(dependency, getattr(exception, "retry_after_s", None))
                except redis.RedisError as exc:
                    logger.warning("could not lower a rate after a 429", extra={"error": str(exc)})

    after_skip_message = after_process_message
