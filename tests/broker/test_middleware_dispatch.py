"""The broker's hook dispatch runs only the hooks middleware define (dramatiq's would call every
middleware's, most of them :class:`Middleware`'s no-op, four times a message), in dramatiq's order and
with its error handling, and follows the middleware as it changes."""

from __future__ import annotations

import linecache
import logging
import sys
from typing import Any

import pytest
from dramatiq.middleware import Middleware, SkipMessage

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
