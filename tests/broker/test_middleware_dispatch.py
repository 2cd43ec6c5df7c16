"""The broker's hook dispatch runs only the hooks middleware define (dramatiq's would call every
middleware's, most of them :class:`Middleware`'s no-op, four times a message), in dramatiq's order and
with its error handling, and follows the middleware as it changes."""

from __future__ import annotations

import functools
import linecache
import logging
import sys
from typing import Any

import pytest
from dramatiq.broker import Broker, MessageProxy
from dramatiq.message import Message
from dramatiq.middleware import Middleware, MiddlewareError, SkipMessage

from mesh.broker import MeshSettings
from mesh.broker.mesh_broker import MeshBroker


class Noted(Middleware):
    def __init__(self, name: str, calls: list[str], fail: BaseException | None = None) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def before_ack(self, broker: Any, message: Any) -> None:
        self.calls.append(f"before {self.name}")
        if self.fail is not None:
            raise self.fail

    def after_ack(self, broker: Any, message: Any) -> None:
        self.calls.append(f"after {self.name}")
        if self.fail is not None:
            raise self.fail


def test_only_the_hooks_middleware_define_run_in_order_and_the_list_is_followed_as_it_changes(
        settings: MeshSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    noops: list[str] = []
    monkeypatch.setattr(Middleware, "before_ack", lambda self, broker, message: noops.append("before"))
    monkeypatch.setattr(Middleware, "after_ack", lambda self, broker, message: noops.append("after"))
    calls: list[str] = []
    broker = MeshBroker(settings)
    try:
        broker.add_middleware(Noted("a", calls))
        broker.emit_before("ack", None)
        broker.emit_after("ack", None)
        assert calls == ["before a", "after a"]
        assert noops == []  # the other middleware's no-ops: not called
        broker.add_middleware(Noted("b", calls))  # after a dispatch: the next one runs its hooks too
        calls.clear()
        broker.emit_before("ack", None)
        broker.emit_after("ack", None)
        assert calls == ["before a", "before b", "after b", "after a"]
        broker.middleware.remove(next(m for m in broker.middleware if isinstance(m, Noted) and m.name == "a"))
        calls.clear()
        broker.emit_before("ack", None)
        assert calls == ["before b"]
        assert noops == []
    finally:
        broker.close()


def test_a_failing_hook_is_logged_and_the_others_run_and_a_middleware_error_is_raised(
        settings: MeshSettings, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    broker = MeshBroker(settings)
    try:
        broker.add_middleware(Noted("a", calls, fail=RuntimeError("broken")))
        broker.add_middleware(Noted("b", calls))
        with caplog.at_level(logging.CRITICAL):
            broker.emit_before("ack", None)
            broker.emit_after("ack", None)
        assert calls == ["before a", "before b", "after b", "after a"]
        assert [r.getMessage() for r in caplog.records if "Unexpected failure" in r.getMessage()] == [
            f"Unexpected failure in before_ack of {broker.middleware[-2]!r}.",
            f"Unexpected failure in after_ack of {broker.middleware[-2]!r}."]
        broker.middleware[-2].fail = SkipMessage("skip")  # type: ignore[attr-defined]
        calls.clear()
        with pytest.raises(SkipMessage):
            broker.emit_before("ack", None)
        assert calls == ["before a"]
    finally:
        broker.close()


def test_a_middleware_added_while_the_hooks_are_worked_out_again_is_not_left_out(settings: MeshSettings) -> None:
    # Another thread adds a middleware while this one, dispatching, works the hooks out again: here at
    # the very point the hooks were worked out and the result is about to be noted (a trace stands for
    # the other thread, which could run there). The list noted must be the one the hooks came from, or
    # the next dispatches take the new list for known and never run the added middleware's hook.
    calls: list[str] = []
    broker = MeshBroker(settings)
    late = Noted("late", calls)
    added: list[bool] = []

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_name != "_hooks":
            return None
        if event == "line" and not added and "self._hook_cache[name] =" in linecache.getline(
                frame.f_code.co_filename, frame.f_lineno):
            added.append(True)
            broker.add_middleware(late)  # "another thread", between the lookup and its note
        return trace

    try:
        broker.add_middleware(Noted("first", calls))  # the list changed: the next dispatch works it out again
        sys.settrace(trace)
        try:
            broker.emit_before("ack", None)
        finally:
            sys.settrace(None)
        assert added and calls == ["before first"]  # added after this dispatch's lookup: not run by it
        calls.clear()
        broker.emit_before("ack", None)
        assert calls == ["before first", "before late"]
    finally:
        broker.close()


class Parent(Middleware):
    def before_process_message(self, broker: Any, message: Any) -> None:
        pass


class Child(Parent):
    def after_process_message(self, broker: Any, message: Any, *, result: Any = None,
                              exception: Any = None) -> None:
        pass


def test_the_hooks_run_are_dramatiqs_less_the_no_ops_in_its_order(settings: MeshSettings) -> None:
    # dramatiq's own middleware, one inheriting a hook and defining another, one given a hook on the
    # instance: for each signal a message goes through, the hooks run (which, and in which order, the
    # after-hooks last added first) are those dramatiq's dispatch runs, less Middleware's no-ops.
    from dramatiq.middleware import (
        AgeLimit,
        Callbacks,
        CurrentMessage,
        Pipelines,
        Retries,
        ShutdownNotifications,
        TimeLimit,
    )

    broker = MeshBroker(settings, middleware=[AgeLimit(), TimeLimit(), ShutdownNotifications(), Callbacks(),
                                              Pipelines(), Retries(), CurrentMessage(), Child()])
    assigned = Middleware()

    def before_ack(broker: Any, message: Any) -> None:
        pass

    assigned.before_ack = before_ack  # type: ignore[method-assign]
    broker.add_middleware(assigned)
    noops = {getattr(Middleware, name).__code__ for name in dir(Middleware) if name.startswith(("before_", "after_"))}

    def called(dispatch: Any, signal: str, *args: Any, **kwargs: Any) -> list[Any]:
        seen: list[Any] = []

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code.co_name.startswith(("before_", "after_")):
                seen.append((frame.f_code, id(frame.f_locals.get("self", assigned))))

        sys.setprofile(profile)
        try:
            dispatch(signal, *args, **kwargs)
        except MiddlewareError:
            pass  # raised by both alike: what ran before it is compared
        finally:
            sys.setprofile(None)
        return [c for c in seen if c[0] not in noops]

    try:
        message = MessageProxy(Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={}))
        for signal, args, kwargs in [("ack", (message,), {}), ("nack", (message,), {}),
                                     ("process_message", (message,), {"result": None}),
                                     ("skip_message", (message,), {})]:
            for mesh, dramatiq_ in [(broker.emit_before, Broker.emit_before),
                                    (broker.emit_after, Broker.emit_after)]:
                if mesh == broker.emit_before and signal == "skip_message":
                    continue  # dramatiq has no before_skip_message
                ours = called(mesh, signal, *args, **kwargs)
                theirs = called(functools.partial(dramatiq_, broker), signal, *args, **kwargs)
                assert ours == theirs, (signal, mesh)
        assert called(broker.emit_before, "ack", message)  # the hook assigned on the instance runs
    finally:
        broker.close()
