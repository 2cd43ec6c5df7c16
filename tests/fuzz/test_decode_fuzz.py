"""The decode path and the contract layer, fuzzed in process (no Redis): every function that reads
what a producer wrote either returns a value or raises its own documented error, never anything
else, and what it accepts survives an encode/decode round trip unchanged."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
from dramatiq.errors import DecodeError
from dramatiq.message import Message
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import ValidationError

from mesh.broker.deadline import effective_limit_ms
from mesh.broker.mesh_broker import MeshBroker
from mesh.broker.registry import PublishedAgent
from mesh.broker.settings import MeshSettings
from mesh.broker.settle import options_problem
from mesh.contracts import (
    CONTRACTS,
    ContractError,
    Envelope,
    InvalidOutput,
    OrjsonEncoder,
    dumps,
    loads,
    validate_input,
    validate_output,
)
from mesh.contracts.deadletter import DeadLetter
from tests.fuzz.strategies import (
    OPTION_FIELDS,
    SCALE,
    hostile,
    hostile_envelopes,
    hostile_messages,
    json_values,
    numbers,
    raw_bytes,
)

AGENTS = sorted(CONTRACTS)


@hsettings(max_examples=1000 * SCALE)
@given(data=raw_bytes)
@example(data=b"[" * 1100 + b"]" * 1100)
def test_the_encoder_decodes_any_bytes_or_raises_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        OrjsonEncoder().decode(data)


@hsettings(max_examples=1000 * SCALE)
@given(data=st.one_of(raw_bytes, st.sampled_from(["executor", "planner"]).flatmap(hostile_messages).map(dumps)))
def test_a_dramatiq_message_decodes_from_any_bytes_or_raises_decode_error(data: bytes) -> None:
    import dramatiq

    dramatiq.set_encoder(OrjsonEncoder())
    with contextlib.suppress(DecodeError):
        Message.decode(data)


@hsettings(max_examples=1000 * SCALE)
@given(options=st.one_of(
    st.dictionaries(st.sampled_from(sorted(OPTION_FIELDS)), hostile, max_size=4),
    st.sampled_from(sorted(OPTION_FIELDS)).flatmap(lambda n: OPTION_FIELDS[n].map(lambda v: {n: v}))),
    queue=st.sampled_from(["executor", "executor.DQ", None]))
def test_options_problem_answers_for_any_options_and_never_raises(options: dict[str, Any], queue: str | None) -> None:
    problem = options_problem(options, queue)
    assert problem is None or isinstance(problem, str)


@hsettings(max_examples=1500 * SCALE)
@given(env=st.sampled_from(AGENTS).flatmap(hostile_envelopes))
@example(env={**{"key": "k", "job_id": "j", "step_id": "s", "agent": "executor", "trace_id": "a" * 32,
                 "hops": [], "payload": {}}, "deadline": "NaN"})
@example(env={**{"key": "k", "job_id": "j", "step_id": "s", "agent": "executor", "trace_id": "a" * 32,
                 "hops": [], "payload": {}}, "deadline": "inf"})
def test_an_envelope_either_fails_validation_or_survives_a_round_trip_unchanged(env: dict[str, Any]) -> None:
    try:
        parsed = Envelope.model_validate(env)
    except ValidationError:
        return
    assert math.isfinite(parsed.deadline), "a deadline that never comes (or NaN) is no budget"
    assert Envelope.model_validate(loads(dumps(parsed))) == parsed


@hsettings(max_examples=1500 * SCALE)
@given(agent=st.sampled_from(AGENTS), payload=st.one_of(hostile, st.builds(dict, goal=hostile),
                                                         st.builds(dict, question=hostile),
                                                         st.builds(dict, tool=st.sampled_from(["note", "http_post"]),
                                                                   args=hostile)))
def test_the_contract_layer_accepts_or_names_the_problem_for_any_payload(agent: str, payload: Any) -> None:
    try:
        typed = validate_input(agent, payload)
    except ContractError as exc:
        assert exc.message and str(exc)
    else:
        assert validate_input(agent, loads(dumps(typed))) == typed
    try:
        validate_output(agent, payload)
    except InvalidOutput as exc:
        assert exc.message


@pytest.fixture(scope="module")
def published() -> dict[str, PublishedAgent]:
    from mesh.agents.builtin import app
    from mesh.ops.worker import published as publish

    return {name: publish(spec) for name, spec in app.agents.items()}


@hsettings(max_examples=500 * SCALE)
@given(agent=st.sampled_from(AGENTS), payload=st.one_of(hostile, st.builds(dict, goal=hostile),
                                                         st.builds(dict, tool=st.just("note"), args=hostile)))
def test_a_published_schema_checks_any_payload_with_a_contract_error(published, agent: str, payload: Any) -> None:
    try:
        published[agent].validate_input(payload)
    except ContractError as exc:
        assert exc.message


@pytest.fixture(scope="module")
def broker() -> MeshBroker:
    # No command is sent: the broker only builds dead-letter entries here.
    return MeshBroker(MeshSettings(redis_url="redis://127.0.0.1:1/0", namespace="fuzz"), middleware=[])


@hsettings(max_examples=1000 * SCALE)
@given(message=st.sampled_from(["executor", "planner"]).flatmap(hostile_messages), error=st.text(max_size=50))
def test_any_decoded_message_yields_a_dead_letter_that_survives_the_store(broker, message: dict[str, Any],
                                                                          error: str) -> None:
    import dramatiq

    dramatiq.set_encoder(OrjsonEncoder())
    try:
        decoded = Message.decode(dumps(message))
    except DecodeError:
        return  # not a dramatiq message: the consumer files it as poison with its bytes
    # What the consumer refuses as poison before any hook runs (MeshConsumer._next_message).
    if not (isinstance(decoded.options, dict) and isinstance(decoded.message_id, str)
            and isinstance(decoded.actor_name, str) and isinstance(decoded.queue_name, str)
            and isinstance(decoded.kwargs, dict)) or options_problem(decoded.options, decoded.queue_name):
        return
    entry = broker.dead_letter_entry(decoded, "permanent", error, None)
    assert DeadLetter.model_validate(loads(dumps(entry))) == entry


@hsettings(max_examples=1000 * SCALE)
@given(setting=st.integers(1, 10**9), option=st.one_of(hostile, numbers), deadline=st.one_of(hostile, numbers),
       now=st.integers(0, 2**45))
@example(setting=1000, option=None, deadline=-1e308, now=0)
@example(setting=1000, option=None, deadline=1e308, now=0)
def test_the_time_limit_is_a_positive_int_for_any_option_and_deadline(setting: int, option: Any, deadline: Any,
                                                                     now: int) -> None:
    limit = effective_limit_ms(setting, option, deadline_s=deadline, now_ms=now)
    assert isinstance(limit, int) and 1 <= limit <= setting


@hsettings(max_examples=1000 * SCALE)
@given(value=json_values(30))
def test_codec_dumps_and_loads_any_json_value_unchanged(value: Any) -> None:
    assert loads(dumps(value)) == value
