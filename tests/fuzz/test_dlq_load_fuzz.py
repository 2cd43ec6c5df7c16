"""``mesh dlq load`` of an export file with a hostile line among good ones: the file is refused
with ExportFileError naming the line and nothing is loaded, or (the line is a valid entry after
all) every entry is loaded; never another error, never half a file. Hostile lines include messages
addressed to the mesh's own keys, to other agents and under other labels, and lines and messages
over the caps; whatever loads is then replayed, and goes only to its own agent's queue."""

from __future__ import annotations

import base64
import itertools
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mesh.broker import job_id_for
from mesh.broker.keys import Keys, prefix
from mesh.dlq import DeadLetter, DeadLetterStore, Filter, Replayer
from mesh.dlq.checks import Limits, Routes
from mesh.dlq.export import ExportFileError, load
from mesh.dlq.store import Stored
from tests.fuzz.strategies import SCALE, hostile, numbers, raw_bytes, texts, valid_envelope

#: Caps small enough to cross cheaply (the defaults are MESH_MAX_MESSAGE_BYTES and four times it).
LIMITS = Limits(max_line_bytes=16 * 1024, max_raw_bytes=4 * 1024)

#: Names that are keys of the mesh's own (``{ns}:{name}``), other agents, and near misses.
NAMES = st.one_of(texts, st.sampled_from([
    "stats", "claim:victim-key", "dlq", "jobs", "running", "registry.agents", "dlq.audit", "executor.msgs",
    "executor.DQ", "executor.wake", "__heartbeats__", "planner", "researcher", "executor", "ghost", "Executor",
    "executor ", "sink", "sink\x1b[2J", "-"]))

GOOD = {"entry_id": "e", "queue": "executor", "agent": "executor", "failure_class": "permanent",
        "error": "boom", "worker": "w"}

#: Hostile values for each field of an exported entry.
ENTRY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "entry_id": texts, "queue": texts, "agent": st.one_of(texts, st.none()), "failure_class": texts,
    "error": texts, "worker": texts, "traceback": texts, "envelope": hostile, "attempts": hostile,
    "dead_lettered_at": st.one_of(numbers, st.sampled_from(["inf", "-inf", "NaN", 1e308, -1e308, 1e16])),
    "replay_count": numbers, "host": texts, "key": texts, "dependency": texts, "unexpected": texts,
}


@st.composite
def addressed_lines(draw: Any) -> bytes:
    """A valid entry whose message's queue, actor, envelope agent or label may be anything."""
    actor = draw(st.one_of(st.just("executor"), NAMES))
    queue = draw(st.one_of(st.just(actor), NAMES))
    env = valid_envelope("executor")
    # A one-message job's ids, so a replay whose record expired may recreate it.
    env.update(job_id=job_id_for(env["key"]), step_id=actor, agent=draw(st.one_of(st.just(actor), NAMES)))
    raw = orjson.dumps({"queue_name": queue, "actor_name": actor, "args": [env], "kwargs": {}, "options": {},
                        "message_id": "m", "message_timestamp": 0})
    entry = {**GOOD, "entry_id": f"msg-{uuid.uuid4().hex}", "agent": draw(st.one_of(st.just(actor), NAMES,
                                                                                    st.none())),
             "queue": draw(st.one_of(st.just("executor"), NAMES)), "envelope": env, "key": env["key"]}
    return orjson.dumps({"entry": entry, "raw_b64": base64.b64encode(raw).decode()})


@st.composite
def oversize_lines(draw: Any) -> bytes:
    """A line or a message around the caps: one byte under, at, or over them."""
    which = draw(st.sampled_from(["line", "raw"]))
    over = draw(st.sampled_from([-1, 0, 1, 1000]))
    entry = {**GOOD, "entry_id": f"big-{uuid.uuid4().hex}"}
    if which == "raw":
        raw = b"x" * (LIMITS.max_raw_bytes + over)
        return orjson.dumps({"entry": entry, "raw_b64": base64.b64encode(raw).decode()})
    line = orjson.dumps({"entry": {**entry, "error": ""}, "raw_b64": ""})
    entry["error"] = "e" * (LIMITS.max_line_bytes + over - len(line))
    return orjson.dumps({"entry": entry, "raw_b64": ""})


@st.composite
def bad_lines(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "entry", "raw_b64", "addressed", "addressed", "oversize"]))
    if kind == "addressed":
        return draw(addressed_lines())
    if kind == "oversize":
        return draw(oversize_lines())
    if kind == "bytes":
        return draw(raw_bytes).replace(b"\n", b" ")
    if kind == "json":
        return orjson.dumps(draw(hostile))
    entry = {**GOOD, "entry_id": f"bad-{uuid.uuid4().hex}"}
    raw: Any = base64.b64encode(b"{}").decode()
    if kind == "entry":
        for name in draw(st.lists(st.sampled_from(sorted(ENTRY_FIELDS)), min_size=1, max_size=3, unique=True)):
            entry[name] = draw(ENTRY_FIELDS[name])
    else:
        raw = draw(st.one_of(hostile, st.sampled_from(["!!!", "YQ", "YWJj\n", "=="])))
    return orjson.dumps({"entry": entry, "raw_b64": raw})


def good_line(i: int) -> bytes:
    entry = DeadLetter(**{**GOOD, "entry_id": f"good-{uuid.uuid4().hex[:8]}-{i}"})
    return orjson.dumps({"entry": entry.model_dump(mode="json"), "raw_b64": base64.b64encode(b"{}").decode()})


def test_an_export_file_with_any_hostile_line_is_refused_whole_or_loaded_whole(client, settings, tmp_path):
    counter = itertools.count()
    cases = {"refused": 0, "loaded": 0, "replayed": 0, "not replayed": 0}

    @hsettings(max_examples=300 * SCALE)
    @given(bad=bad_lines(), good=st.integers(0, 4), at=st.integers(0, 4))
    @example(bad=orjson.dumps({"entry": {**GOOD, "dead_lettered_at": "inf"}, "raw_b64": ""}), good=2, at=2)
    @example(bad=orjson.dumps({"entry": {**GOOD, "dead_lettered_at": 1e308}, "raw_b64": ""}), good=2, at=2)
    @example(bad=orjson.dumps({"entry": {**GOOD, "dead_lettered_at": "NaN"}, "raw_b64": ""}), good=2, at=2)
    def run(bad: bytes, good: int, at: int) -> None:
        n = next(counter)
        store = DeadLetterStore(client.redis, Keys(f"{client.keys.prefix}:load{n}"))
        lines = [good_line(i) for i in range(good)]
        lines.insert(min(at, good), bad)
        path = tmp_path / f"export-{n}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            report = load(store, path, limits=LIMITS)
        except ExportFileError as exc:
            assert f":{min(at, good) + 1} is not an exported dead letter" in str(exc) \
                or f":{min(at, good) + 1} is refused: " in str(exc), str(exc)
            assert "\x1b" not in str(exc), "a hostile name is quoted, its escapes escaped"
            assert store.count() == 0, "a refused file loaded nothing"
            cases["refused"] += 1
            return
        assert report.loaded + report.already_present == len(lines) - sum(not line.strip() for line in lines)
        loaded = [s for batch in store.iter(_all()) for s in batch]
        assert len(loaded) == report.loaded
        for stored in loaded:  # what was loaded reads back as it was written
            assert isinstance(stored, Stored) and store.get(stored.entry.entry_id) == stored.entry
            assert len(stored.raw) <= LIMITS.max_raw_bytes
        cases["loaded"] += 1
        replay_goes_only_where_it_belongs(store, settings, cases)

    run()
    print(f"dlq load fuzz: {cases}")
    assert all(cases.values()), cases


def replay_goes_only_where_it_belongs(store: DeadLetterStore, settings: Any, cases: dict[str, int]) -> None:
    """Replay everything loaded: each message lands on its own agent's queue under its label, or its
    entry stays in the DLQ with a reason; no key of the mesh's own changes type."""
    ns = store.keys.namespace
    types_before = {k: store.client.type(k) for k in store.client.scan_iter(match=f"{prefix(ns)}:*")}
    routes = Routes.read(store.client, store.keys)
    replayer = Replayer(store, settings)
    report = replayer.replay(replayer.entries(flt=Filter()))
    assert not report.errors
    for entry_id, reason in report.skipped.items():
        assert reason and store.get(entry_id) is not None, "an entry not replayed stays in the DLQ"
    for entry_id in report.replayed:
        assert store.get(entry_id) is None
    for queue in set(routes.queues.values()):
        for data in store.client.hvals(store.keys.messages(queue)):
            message = orjson.loads(data)
            assert routes.queues[message["actor_name"]] == queue == message["queue_name"]
            assert message["args"][0]["agent"] == message["actor_name"]
    queued = sum(store.client.llen(store.keys.queue(q)) for q in set(routes.queues.values()))
    assert queued == len(report.replayed), "every replayed entry is on its agent's queue, nothing else is"
    for key, kind in types_before.items():
        assert store.client.type(key) in (kind, b"none"), f"{key!r} changed type"
    assert not list(store.client.scan_iter(match=f"{prefix(ns)}:claim:*")), "no claim was written"
    cases["replayed"] += len(report.replayed)
    cases["not replayed"] += len(report.skipped)


def _all() -> Any:
    from mesh.dlq import Filter

    return Filter()


@pytest.mark.parametrize("when", ["inf", "-inf", "NaN", 1e308])
def test_an_entry_dead_lettered_at_a_time_that_is_not_a_time_is_refused_before_anything_loads(
        client, tmp_path: Path, when: Any):
    store = DeadLetterStore(client.redis, client.keys)
    path = tmp_path / "export.jsonl"
    path.write_bytes(good_line(0) + b"\n" + orjson.dumps({"entry": {**GOOD, "dead_lettered_at": when},
                                                          "raw_b64": ""}) + b"\n")
    with pytest.raises(ExportFileError, match=r"export.jsonl:2 is not an exported dead letter.*dead_lettered_at"):
        load(store, path)
    assert store.count() == 0
