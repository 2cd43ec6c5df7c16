"""Hostile input for the fuzz tests: JSON of every shape, envelopes and dramatiq messages with one
or more fields made hostile, and raw bytes. Importing this module loads the Hypothesis profile:
derandomized and without an example database, so a CI run tries the same cases every time and
leaves no files behind. ``MESH_FUZZ_SCALE=20`` multiplies every test's examples for a longer run;
``HYPOTHESIS_PROFILE=random`` draws new cases each run."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                 HealthCheck.data_too_large])
settings.register_profile("random", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Multiplies the examples of every fuzz test (1 in CI).
SCALE = max(1, int(os.environ.get("MESH_FUZZ_SCALE", "1")))

I64 = 2**63 - 1

#: Numbers a producer may write in JSON (orjson reads no NaN or infinity literals, but strings do).
numbers = st.one_of(
    st.integers(min_value=-I64 - 1, max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 1, I64, -I64 - 1, 2**64 - 1, 1e308, -1e308, 5e-324]),
)
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "\u202e", "😀" * 10, "NaN", "inf", "-inf", "1e999", "null", "x" * 600,
                     "../../etc", "a:b:c", "*", "{}", "\ud7ff"]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value, nested a few levels."""
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=max_leaves)


def deep(depth: int, leaf: Any = 1) -> Any:
    """A list nested ``depth`` levels: deep within reason (orjson refuses more than 1024)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


hostile = st.one_of(scalars, json_values(), st.builds(deep, st.integers(1, 200)),
                    st.sampled_from([[], {}, "NaN", "Infinity", [None] * 50, {"": None}]))


def valid_envelope(agent: str = "executor", payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """A well-formed envelope for a job that does not exist (its key and ids are fresh)."""
    n = uuid.uuid4().hex
    return {"key": f"fz-{n}", "job_id": f"fz-job-{n[:12]}", "step_id": agent, "agent": agent,
            "trace_id": uuid.uuid4().hex, "deadline": time.time() + 600, "hops": [], "attempt": 1,
            "schema_version": 1, "payload": payload if payload is not None else
            {"tool": "note", "args": {"title": "fuzz"}}}


#: Values worth trying in each envelope field, on top of any JSON value.
ENVELOPE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "key": st.one_of(texts, st.just("k" * 513)),
    "job_id": texts,
    "step_id": texts,
    "agent": st.sampled_from(["planner", "researcher", "executor", "nobody", ""]),
    "trace_id": st.one_of(texts, st.just("0" * 32), st.just("A" * 32)),
    "deadline": st.one_of(numbers, st.sampled_from(["NaN", "inf", "-inf", "Infinity", 0, -1e308, 1e308, 1e18])),
    "hops": st.one_of(st.lists(texts, max_size=12), st.just(["executor"]), st.just(["x"] * 100)),
    "attempt": st.one_of(numbers, st.sampled_from([0, -1, I64, 1.5, "2", True])),
    "schema_version": numbers,
    "contract_version": st.one_of(numbers, st.none()),
    "replay_of": texts,
    "token_budget": numbers,
    "max_retries": st.one_of(numbers, st.sampled_from([-1, I64])),
    "backoff": st.one_of(texts, st.sampled_from(["fixed", "none", "exponential"])),
    "model": texts,
    "payload": st.one_of(hostile, st.fixed_dictionaries(
        {"tool": st.sampled_from(["note", "http_post", "rm"]), "args": hostile}),
        st.fixed_dictionaries({"goal": texts}), st.fixed_dictionaries({"question": texts})),
    "extra_field": scalars,
}


@st.composite
def hostile_envelopes(draw: Any, agent: str = "executor") -> dict[str, Any]:
    """A valid envelope with one to three fields replaced, removed or added."""
    env = valid_envelope(agent)
    for name in draw(st.lists(st.sampled_from(sorted(ENVELOPE_FIELDS)), min_size=1, max_size=3, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            env.pop(name, None)
        else:
            env[name] = draw(st.one_of(ENVELOPE_FIELDS[name], hostile))
    return env


#: Options a producer could set on a dramatiq message, the mesh's and dramatiq's.
OPTION_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "mesh_defers": numbers, "mesh_waits": numbers, "mesh_replays": numbers,
    "mesh_attempts": st.one_of(hostile, st.lists(st.fixed_dictionaries(
        {"attempt": numbers, "outcome": texts, "at": numbers}), max_size=3)),
    "mesh_output": hostile,
    "eta": st.one_of(numbers, st.sampled_from([1e18, I64, -1, 0, "soon", None])),
    "time_limit": st.one_of(numbers, texts),
    "throws": st.one_of(texts, st.just([]), st.just("ValueError")),
    "pipe_target": hostile,
    "retries": numbers,
    "max_retries": numbers,
    "redis_message_id": texts,
}


@st.composite
def hostile_messages(draw: Any, queue: str) -> dict[str, Any]:
    """A dramatiq message for ``queue`` whose envelope, options or own fields are hostile."""
    agent = queue
    message: dict[str, Any] = {"queue_name": queue, "actor_name": agent, "args": [valid_envelope(agent)],
                               "kwargs": {}, "options": {}, "message_id": str(uuid.uuid4()),
                               "message_timestamp": int(time.time() * 1000)}
    part = draw(st.sampled_from(["envelope", "envelope", "options", "message", "mixed"]))
    if part in ("envelope", "mixed"):
        message["args"] = [draw(hostile_envelopes(agent))]
    if part in ("options", "mixed"):
        names = draw(st.lists(st.sampled_from(sorted(OPTION_FIELDS)), min_size=1, max_size=3, unique=True))
        message["options"] = {n: draw(OPTION_FIELDS[n]) for n in names}
    if part in ("message", "mixed"):
        name = draw(st.sampled_from(["queue_name", "actor_name", "args", "kwargs", "options", "message_id",
                                     "message_timestamp", "extra"]))
        choices = {"queue_name": st.sampled_from(["planner", "nowhere", f"{queue}.DQ", ""]),
                   "actor_name": st.sampled_from(["planner", "nobody", "", "__init__"]),
                   "args": st.one_of(st.just([]), st.lists(hostile, max_size=3)),
                   "message_id": st.one_of(numbers, st.none(), st.just([]))}
        if draw(st.integers(0, 4)) == 0:
            message.pop(name, None)
        elif name == "message_id":
            # Never another string: a DLQ entry is filed under its message's id, and the tests find
            # each message's entry by it (see test_queue_fuzz for ids shared by distinct messages).
            message[name] = draw(choices[name])
        else:
            message[name] = draw(st.one_of(choices.get(name, hostile), hostile))
    return message


raw_bytes = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"\xff\xfe", b"null", b"{}", b"[]", b"1", b'"x"', b"NaN", b"{" * 2000,
                     b"[" * 1100 + b"]" * 1100, b'{"queue_name": 1}']),
    json_values().map(orjson.dumps),
)
