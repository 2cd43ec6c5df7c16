"""``mesh dlq load`` of an export file with a hostile line among good ones: the file is refused
with ExportFileError naming the line and nothing is loaded, or (the line is a valid entry after
all) every entry is loaded; never another error, never half a file."""

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

from mesh.broker.keys import Keys
from mesh.dlq import DeadLetter, DeadLetterStore
from mesh.dlq.export import ExportFileError, load
from mesh.dlq.store import Stored
from tests.fuzz.strategies import SCALE, hostile, numbers, raw_bytes, texts

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
def bad_lines(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "entry", "raw_b64"]))
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


def test_an_export_file_with_any_hostile_line_is_refused_whole_or_loaded_whole(client, tmp_path):
    counter = itertools.count()
    cases = {"refused": 0, "loaded": 0}

    @hsettings(max_examples=300 * SCALE)
    @given(bad=bad_lines(), good=st.integers(0, 4), at=st.integers(0, 4))
    @example(bad=orjson.dumps({"entry": {**GOOD, "dead_lettered_at": "inf"}, "raw_b64": ""}), good=2, at=2)
    @example(bad=orjson.dumps({"entry": {**GOOD, "dead_lettered_at": 1e308}, "raw_b64": ""}), good=2, at=2)
    @example(bad=orjson.dumps({"entry": {**GOOD, "dead_lettered_at": "NaN"}, "raw_b64": ""}), good=2, at=2)
    def run(bad: bytes, good: int, at: int) -> None:
        n = next(counter)
        store = DeadLetterStore(client.redis, Keys(f"{client.keys.namespace}:load{n}"))
        lines = [good_line(i) for i in range(good)]
        lines.insert(min(at, good), bad)
        path = tmp_path / f"export-{n}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            report = load(store, path)
        except ExportFileError as exc:
            assert f":{min(at, good) + 1} is not an exported dead letter" in str(exc)
            assert store.count() == 0, "a refused file loaded nothing"
            cases["refused"] += 1
            return
        assert report.loaded + report.already_present == len(lines) - sum(not line.strip() for line in lines)
        loaded = [s for batch in store.iter(_all()) for s in batch]
        assert len(loaded) == report.loaded
        for stored in loaded:  # what was loaded reads back as it was written
            assert isinstance(stored, Stored) and store.get(stored.entry.entry_id) == stored.entry
        cases["loaded"] += 1

    run()
    print(f"dlq load fuzz: {cases}")
    assert cases["refused"] and cases["loaded"]


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
