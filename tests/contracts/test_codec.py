"""The orjson codec: dramatiq messages travel as JSON objects, never pickle."""

from __future__ import annotations

import pickle
from typing import Any

import dramatiq
import orjson
import pytest
from dramatiq.errors import DecodeError

from mesh.contracts import Envelope, OrjsonEncoder, dumps, loads

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def envelope() -> Envelope:
    return Envelope(key="k", job_id="j", step_id="s", agent="planner", trace_id=TRACE,
                    deadline=100.0, hops=("planner",), payload={"goal": "g"})


def test_encoder_round_trips_a_dramatiq_message_dict() -> None:
    message = dramatiq.Message(queue_name="planner", actor_name="planner",
                               args=(envelope().model_dump(mode="json"),), kwargs={},
                               options={"eta": 123, "mesh_attempts": []})
    encoder = OrjsonEncoder()
    decoded = encoder.decode(encoder.encode(message.asdict()))
    assert decoded["args"] == [envelope().model_dump(mode="json")]  # tuples come back as lists
    assert decoded["message_id"] == message.message_id
    rebuilt = dramatiq.Message(**decoded)
    assert rebuilt.actor_name == "planner"
    assert Envelope.model_validate(rebuilt.args[0]) == envelope()


def test_encoded_output_is_json_bytes_not_pickle() -> None:
    data = OrjsonEncoder().encode({"queue_name": "q", "args": [1, "two"], "kwargs": {}})
    assert isinstance(data, bytes)
    assert data.startswith(b"{")
    assert not data.startswith(b"\x80")  # pickle protocol 2+ header
    assert orjson.loads(data) == {"queue_name": "q", "args": [1, "two"], "kwargs": {}}


@pytest.mark.parametrize("data", [b"\x80\x04\x95garbage", b"not json", b"{", b"\xff\xfe"])
def test_decode_of_non_json_bytes_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        OrjsonEncoder().decode(data)
    assert info.value.data == data


def test_decode_refuses_pickled_payload() -> None:
    with pytest.raises(DecodeError):
        OrjsonEncoder().decode(pickle.dumps({"queue_name": "q"}))


@pytest.mark.parametrize("data", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_a_message_that_is_json_but_not_an_object_raises_decode_error(data: bytes) -> None:
    dramatiq.set_encoder(OrjsonEncoder())
    with pytest.raises(DecodeError):
        dramatiq.Message.decode(data)


@pytest.mark.parametrize("value", [[1, 2], "text", 42, 1.5, None, True, {"a": None}])
def test_encoder_round_trips_any_json_value_as_result_backends_need(value: object) -> None:
    encoder = OrjsonEncoder()
    assert encoder.decode(encoder.encode(value)) == value


def test_encoder_writes_non_string_keys_as_strings_like_dramatiqs_json_encoder() -> None:
    data = {1: "a", None: "b"}
    assert OrjsonEncoder().decode(OrjsonEncoder().encode(data)) == dramatiq.JSONEncoder().decode(
        dramatiq.JSONEncoder().encode(data)) == {"1": "a", "null": "b"}


def test_dumps_handles_pydantic_model() -> None:
    assert loads(dumps(envelope())) == envelope().model_dump(mode="json")


def test_dumps_handles_models_nested_in_plain_data_and_tuples() -> None:
    data = {"env": envelope(), "pair": (1, 2), "tags": frozenset({"a"})}
    decoded = loads(dumps(data))
    assert decoded["env"]["hops"] == ["planner"]
    assert decoded["pair"] == [1, 2]
    assert decoded["tags"] == ["a"]


def test_dumps_refuses_unknown_objects_instead_of_pickling() -> None:
    with pytest.raises(TypeError):
        dumps({"obj": object()})


def test_loads_accepts_str_and_bytes() -> None:
    assert loads('{"a": 1}') == loads(b'{"a": 1}') == {"a": 1}


def test_a_job_record_is_stored_without_its_null_fields_and_reads_back_the_same() -> None:
    """A record (and the models nested in it) leaves out the fields whose value is None, and only
    those: every such field's default is None, so it reads back equal. Plain data keeps its nulls (a
    user's input or result), and a model that is not a record keeps its own (an envelope)."""
    from mesh.contracts.approvals import Approval
    from mesh.contracts.jobs import JobRecord, StepRecord

    approval = Approval(hash="h" * 64, asked_at=1.0, timeout_s=60.0)
    step = StepRecord(step_id="s", agent="a", key="k", input={"n": None, "deep": [{"m": None}]},
                      result={"out": None}, approval=approval)
    record = JobRecord(job_id="j", key="k", trace_id=TRACE, steps={"s": step}, pipeline_input={"x": None})
    data = dumps(record)
    raw = loads(data)
    assert JobRecord.model_validate_json(data) == record
    assert "error" not in raw and "finished_at" not in raw and "goal" not in raw
    assert "decision" not in raw["steps"]["s"]["approval"] and "gate" not in raw["steps"]["s"]
    assert raw["steps"]["s"]["input"] == {"n": None, "deep": [{"m": None}]}
    assert raw["steps"]["s"]["result"] == {"out": None} and raw["pipeline_input"] == {"x": None}
    assert raw["state"] == raw["steps"]["s"]["state"] == "queued"  # what Lua scripts read: always there
    assert len(data) < len(orjson.dumps(record.model_dump(mode="json")))
    assert b"null" in dumps(envelope()) and loads(dumps(envelope())) == envelope().model_dump(mode="json")


def test_a_record_class_that_says_it_keeps_its_nulls_is_dumped_with_them() -> None:
    """``stored_without_nulls`` is read as a class attribute is (the nearest class that sets it), so a
    subclass of a record that sets it False keeps its null fields, as it did when ``dumps`` asked
    ``getattr``; any class of the MRO saying True must not win over it."""
    from typing import ClassVar

    from mesh.contracts.jobs import JobRecord

    class WithNulls(JobRecord):
        stored_without_nulls: ClassVar[bool] = False

    record = WithNulls(job_id="j", key="k", trace_id=TRACE, created_at=1.0, updated_at=1.0)
    assert loads(dumps(record)) == record.model_dump(mode="json") and loads(dumps(record))["error"] is None
    assert "error" not in loads(dumps(JobRecord(job_id="j", key="k", trace_id=TRACE)))


def _nulls_not_defaulting_to_none(model: type, seen: set[type] | None = None) -> list[str]:
    """The fields of ``model`` and of the models its fields hold (in lists, dicts, unions) that take None
    but default to something else: stored without its nulls, such a field would read back as its default."""
    import typing

    from pydantic import BaseModel

    seen = set() if seen is None else seen
    if model in seen:
        return []
    seen.add(model)
    out: list[str] = []

    def held(annotation: Any) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in held(arg)]

    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        default = field.get_default(call_default_factory=True)
        if type(None) in typing.get_args(field.annotation) and default is not None:
            out.append(f"{model.__name__}.{name}")
        for inner in held(field.annotation):
            out += _nulls_not_defaulting_to_none(inner, seen)
    return out


def test_every_field_of_a_job_record_that_takes_none_defaults_to_none() -> None:
    """What storing a record without its nulls rests on (``Record.stored_without_nulls``): a field that
    takes None and defaults to anything else would read back changed. The walk finds one such field."""
    from pydantic import BaseModel

    from mesh.contracts.jobs import JobRecord

    class Inner(BaseModel):
        colour: str | None = "red"

    class Outer(BaseModel):
        items: list[Inner] = []

    assert _nulls_not_defaulting_to_none(Outer) == ["Inner.colour"]
    assert _nulls_not_defaulting_to_none(JobRecord) == []
