"""The broker's hook dispatch runs only the hooks middleware define (dramatiq's would call every
middleware's, most of them :class:`Middleware`'s no-op, four times a message), in dramatiq's order and
with its error handling, and follows the middleware as it changes."""

from __future__ import annotations

import logging
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
