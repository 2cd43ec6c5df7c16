"""The fast paths of a record's and a send's JSON, fuzzed against what they replaced: a contract's
``dumps`` (pydantic's serialiser, not ``model_dump`` then orjson), a record's ``replaced`` (not
``model_copy``), and a send's bytes formats (broker/outbox.py ``_formats``, not the models dumped).
Each gives the bytes the models gave, or refuses what they refused, as they refused it."""

from __future__ import annotations

import functools
from typing import Any

import orjson
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mesh.broker.outbox import NewJobs
from mesh.contracts import JobRecord, StepRecord, dumps
from tests.broker.test_send_bytes import job_models
from tests.fuzz.strategies import SCALE

#: Text the formats and JSON treat specially: ``%`` (the formats' sign), their slot names and marker
#: prefix, quotes, backslashes, controls, separators, lone surrogates, astral characters, a long run.
_PIECES = ["%", "%%", "%(key)b", ")b", "%(payload)b", "mesh-slot-", '"', "\\", "\x00", "\x1f", "\u2028", "é",
           "🙂", "{", "]", ":", ",", "\ud800", "\udfff", "x" * 300]
odd_text = st.lists(st.one_of(st.sampled_from(_PIECES), st.characters(codec=None)), min_size=1, max_size=6).map(
    "".join)
#: Integers over the whole range orjson writes (-2**63 .. 2**64-1) and past it on both sides.
edge_ints = st.one_of(st.integers(min_value=-(2**66), max_value=2**66),
                      st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, -(10**18)]))
leaves = st.one_of(st.none(), st.booleans(), edge_ints, st.floats(), odd_text)
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(odd_text, inner, max_size=3)), max_leaves=10)


def _outcome(make: Any) -> bytes | type[BaseException]:
    try:
        return make()
    except Exception as exc:  # the refusal's kind is compared, not its words
        return TypeError if isinstance(exc, TypeError) else type(exc)


def _as_models_gave(model: Any) -> bytes | type[BaseException]:
    """What the mesh wrote of ``model`` before contracts serialised straight to JSON (a record without its
    null fields: ``stored_without_nulls``)."""
    bare = getattr(model, "stored_without_nulls", False)
    return _outcome(lambda: orjson.dumps(model.model_dump(mode="json", exclude_none=bare)))


@hsettings(max_examples=300 * SCALE)
@given(values, st.dictionaries(st.text(max_size=8).map(lambda k: "x_" + k), values, max_size=2), odd_text)
@example({"n": 2**64}, {}, "e")  # past 64 bits: refused, not written for orjson to read back as a float
@example({"n": -(2**63) - 1}, {}, "e")
@example({"n": 2**64 - 1, "m": -(2**63)}, {}, "e")  # the edges orjson writes
@example("\ud800", {}, "e")  # a lone surrogate: refused as orjson refuses it (a TypeError)
@example(1e16, {"x_new": 10**19}, "\udc00")
def test_a_records_json_is_the_bytes_of_its_dump_or_refused_as_it_was(value: Any, extra: dict[str, Any],
                                                                         error: str) -> None:
    step = StepRecord.model_validate({"step_id": "s", "agent": "a", "key": "k", "input": {"v": value},
                                      "error": error, **extra})
    job = JobRecord(job_id="j", key="k", trace_id="0" * 31 + "1", steps={"s": step}, result={"r": value})
    for model in (step, job, job.replaced({"tokens_in": 3, "newer": value})):
        assert _outcome(lambda model=model: dumps(model)) == _as_models_gave(model)


@hsettings(max_examples=200 * SCALE)
@given(st.fixed_dictionaries({}, optional={"error": odd_text, "attempt": st.integers(0, 9), "newer": values,
                                           "result": st.dictionaries(odd_text, values, max_size=2), "x_y": values}),
       st.dictionaries(st.text(max_size=6).map(lambda k: "x_" + k), values, max_size=2))
def test_replaced_is_model_copy_with_update(update: dict[str, Any], extra: dict[str, Any]) -> None:
    step = StepRecord.model_validate({"step_id": "s", "agent": "a", "key": "k", "input": {"a": [1]}, **extra})
    got, want = step.replaced(update), step.model_copy(update=update)
    assert (got.__dict__, got.__pydantic_extra__, got.model_fields_set, got.__pydantic_private__) == \
        (want.__dict__, want.__pydantic_extra__, want.model_fields_set, want.__pydantic_private__)
    assert _outcome(lambda: dumps(got)) == _as_models_gave(want)
    # Shallow, as model_copy is: nested values shared, the original's dicts not the copy's.
    assert got.input is step.input and got.__dict__ is not step.__dict__
    assert got.__pydantic_extra__ is not step.__pydantic_extra__


def _models_gave(*, agent: str, queue: str, version: int | None, budget: int | None, goal: str | None,
                 priority: Any, now: float, deadline: float, step_id: str, payload: dict[str, Any], key: str,
                 job_id: str, trace_id: str, payload_hash: str, flow_key: str | None, rid: str,
                 mid: str) -> tuple[bytes, bytes, bytes] | type[BaseException]:
    """The record, event and message the models make of one job, as the mesh wrote them before the
    formats (payload encoded by orjson as sent)."""

    def make() -> tuple[bytes, bytes, bytes]:
        orjson.dumps(payload)  # a payload orjson refuses is refused by a send, whatever the models make of it
        record, event, message = job_models(
            agent=agent, queue=queue, version=version, token_budget=budget, goal=goal, priority=priority, now=now,
            deadline=deadline, step_id=step_id, payload=payload, key=key, job_id=job_id, trace_id=trace_id,
            payload_hash=payload_hash, flow_key=flow_key, rid=rid, mid=mid)
        return (orjson.dumps(record.model_dump(mode="json", exclude_none=True)), orjson.dumps(event),
                orjson.dumps(message))

    return _outcome(make)


@hsettings(max_examples=300 * SCALE)
@given(st.sampled_from(["executor", "a%(key)b", "é%%"]), st.one_of(st.none(), odd_text),
       st.sampled_from(["normal", "high", "low"]), st.one_of(st.none(), st.integers(1, 2**63 - 1)),
       st.one_of(st.none(), st.integers(1, 5)), st.floats(-1e18, 1e18), st.floats(0, 2e9),
       st.lists(st.tuples(odd_text, st.dictionaries(odd_text, values, max_size=3), st.one_of(st.none(), odd_text),
                          odd_text), min_size=1, max_size=3))
def test_a_sends_bytes_are_the_models_or_refused_as_they_refuse_them(agent: str, goal: str | None, priority: Any,
                                                                     budget: int | None, version: int | None,
                                                                     deadline: float, now: float,
                                                                     jobs: list[Any]) -> None:
    # One batch per example, its formats cached across examples (goals, budgets, priorities vary).
    batch = NewJobs(agent=agent, queue=agent + "-q", version=version, deadline=deadline, token_budget=budget,
                    goal=goal, now=now, max_bytes=1 << 20, max_depth=64, expected=len(jobs), priority=priority)
    for i, (given_key, payload, given_flow_key, step_id) in enumerate(jobs):
        key, flow_key = given_key[:512], given_flow_key and given_flow_key[:128]
        trace_id, job_id, bound = f"{i + 1:032x}", f"j{i}%(key)b", f"h{i}%"
        item = {"key": key, "job_id": job_id, "trace_id": trace_id, "payload_hash": bound, "flow_key": flow_key}
        got = _outcome(functools.partial(batch.add, step_id, payload, checked=True, **item))
        rid = mid = "00000000-0000-4000-8000-000000000000"
        if got is None:
            _, _, record, event, raw_rid, data = batch.jobs()[-1]
            rid, mid, got = raw_rid.decode(), orjson.loads(data)["message_id"], (record, event, data)
        want = _models_gave(agent=agent, queue=agent + "-q", version=version, budget=budget, goal=goal,
                            priority=priority, now=float(now), deadline=float(deadline), step_id=step_id,
                            payload=payload, key=key, job_id=job_id, trace_id=trace_id, payload_hash=bound,
                            flow_key=flow_key, rid=rid, mid=mid)
        if isinstance(got, tuple) or isinstance(want, tuple):
            assert got == want
        else:  # both refused (a key or step id the envelope refuses, a payload orjson refuses)
            assert issubclass(got, Exception) and issubclass(want, Exception)
