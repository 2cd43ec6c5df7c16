"""Envelope: the immutable delivery metadata around every payload."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from mesh.contracts import Envelope, child_key, new_trace_id, traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def make(**overrides: object) -> Envelope:
    values: dict[str, object] = {
        "key": "k1", "job_id": "j1", "step_id": "plan", "agent": "planner",
        "trace_id": TRACE, "deadline": 1_000.0, "payload": {"goal": "g"},
    }
    values.update(overrides)
    return Envelope(**values)


def test_valid_envelope_gets_defaults() -> None:
    env = make()
    assert env.attempt == 1
    assert env.hops == ()
    assert env.replay_of is None
    assert env.schema_version == 1
    assert env.payload == {"goal": "g"}


def test_envelope_is_frozen_assignment_raises() -> None:
    env = make()
    with pytest.raises(ValidationError):
        env.attempt = 2  # type: ignore[misc]
    assert env.attempt == 1


def test_envelope_forbids_extra_fields() -> None:
    with pytest.raises(ValidationError) as info:
        make(surprise=1)
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    assert info.value.errors()[0]["loc"] == ("surprise",)


@pytest.mark.parametrize(
    "trace_id",
    [
        "0" * 32,                       # all zero is invalid per W3C
        TRACE.upper(),                  # must be lowercase
        TRACE[:-1],                     # 31 digits
        TRACE + "0",                    # 33 digits
        "g" * 32,                       # not hex
        "",
    ],
)
def test_trace_id_must_be_32_lowercase_hex_not_all_zero(trace_id: str) -> None:
    with pytest.raises(ValidationError) as info:
        make(trace_id=trace_id)
    assert info.value.errors()[0]["loc"] == ("trace_id",)


def test_new_trace_id_is_accepted_by_envelope() -> None:
    trace_id = new_trace_id()
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    assert make(trace_id=trace_id).trace_id == trace_id


def test_attempt_must_be_at_least_one() -> None:
    with pytest.raises(ValidationError):
        make(attempt=0)


def test_traceparent_has_w3c_format_and_carries_trace_id() -> None:
    value = traceparent(TRACE)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", value)
    assert value.split("-")[1] == TRACE


def test_traceparent_span_id_is_fresh_each_call() -> None:
    assert traceparent(TRACE).split("-")[2] != traceparent(TRACE).split("-")[2]


def test_child_key_derives_deterministically_from_parent_key() -> None:
    assert child_key("job-1", "researcher", "r1") == "job-1/researcher/r1"
    assert child_key("job-1", "researcher", "r1") == child_key("job-1", "researcher", "r1")
    assert child_key("job-1", "researcher", "r1") != child_key("job-1", "researcher", "r2")
    assert child_key("job-1", "executor", "r1") != child_key("job-1", "researcher", "r1")


def test_remaining_s_uses_given_now() -> None:
    env = make(deadline=1_000.0)
    assert env.remaining_s(now=990.0) == 10.0
    assert env.remaining_s(now=1_000.0) == 0.0
    assert env.remaining_s(now=1_005.5) == -5.5
