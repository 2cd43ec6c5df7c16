"""A job record's bytes put together from its steps' bytes, each step dumped once per step object
(mesh.broker.jobs.record_bytes), are byte for byte what the model dumps, whatever the record holds."""

from __future__ import annotations

import pytest

from mesh.broker import jobs
from mesh.broker.jobs import SPLICED_STEPS, record_bytes
from mesh.contracts import JobRecord, State, StepRecord, dumps, transition

TRACE = "ab" * 16


def job(ids: list[str], **fields: object) -> JobRecord:
    record = JobRecord(job_id="job-bytes", key="bytes", trace_id=TRACE, created_at=1.5, updated_at=2.5, **fields)
    for sid in ids:
        record = record.with_step(StepRecord(step_id=sid, agent="a", key=f"k/{sid}", input={"n": sid}))
    return record


IDS = [f"s{n}" for n in range(1, 2 * SPLICED_STEPS)]


@pytest.mark.parametrize("ids", [
    IDS,
    IDS[:SPLICED_STEPS - 1],  # too few: dumped whole
    [*IDS, 'quo"te', "back\\slash", "tab\there", "é-accent", "line\u2028sep", "/item/0", "a b"],
])
def test_a_records_bytes_are_the_models_whatever_its_step_ids(ids):
    record = job(ids)
    assert record_bytes(record) == dumps(record)
    assert record_bytes(record) == dumps(record)  # again, from the steps' kept bytes
    if ids == IDS:
        assert id(record.steps["s1"]) in jobs._FRAGMENTS  # put together from its steps' bytes


def test_a_changed_step_is_dumped_anew_and_the_others_kept():
    record = job(IDS)
    assert record_bytes(record) == dumps(record)
    step = transition(record.steps["s3"], State.RUNNING, now=3.5, token=7)
    changed = record.with_step(step).replaced({"state": State.RUNNING, "updated_at": 3.5})
    assert record_bytes(changed) == dumps(changed) and b'"token":7' in record_bytes(changed)
    assert record_bytes(record) == dumps(record)  # the record before it still reads as it was


def test_a_step_object_kept_under_another_id_is_dumped_under_that_id():
    record = job(IDS)
    record_bytes(record)
    moved = record.replaced({"steps": {("t" + sid if sid == "s2" else sid): s for sid, s in record.steps.items()}})
    assert record_bytes(moved) == dumps(moved) and b'"ts2":' in record_bytes(moved)


def test_steps_named_in_the_records_own_data_and_unknown_fields_keep_the_bytes_the_models():
    nested = job(IDS, pipeline_input={"steps": {}, "x": {"steps": {}}}, goal='"steps":{}')
    assert record_bytes(nested) == dumps(nested)
    newer = JobRecord.model_validate_json(dumps(job(IDS)).replace(b'"job_id"', b'"newer":{"steps":{}},"job_id"')
                                          .replace(b'"step_id":"s1"', b'"later":[1],"step_id":"s1"'))
    assert newer.__pydantic_extra__ and record_bytes(newer) == dumps(newer)
    assert b'"later":[1]' in record_bytes(newer)
    spliced = JobRecord.model_validate_json(dumps(job(IDS)).replace(b'"job_id"', b'"newer":[2],"job_id"')
                                            .replace(b'"step_id":"s1"', b'"later":[1],"step_id":"s1"'))
    assert record_bytes(spliced) == dumps(spliced) and id(spliced.steps["s1"]) in jobs._FRAGMENTS


def test_a_record_read_back_takes_the_steps_it_kept_unchanged_and_validates_the_rest():
    from mesh.broker.jobs import validated

    known = job(IDS)
    record_bytes(known)  # as its write left it
    running = transition(known.steps["s2"], State.RUNNING, now=3.5, token=7)
    later = known.with_step(running).with_step(StepRecord(step_id="s99", agent="a", key="k/s99"))
    later = later.replaced({"steps": {k: v for k, v in later.steps.items() if k != "s5"}, "tokens_in": 3})
    data = dumps(later)  # what another process wrote since

    read = validated(data, known)

    assert read == JobRecord.model_validate_json(data) and dumps(read) == data
    assert read.steps["s1"] is known.steps["s1"] and read.steps["s7"] is known.steps["s7"]  # taken as kept
    assert read.steps["s2"] is not known.steps["s2"] and read.steps["s2"].token == 7  # changed: validated
    assert "s5" not in read.steps and read.steps["s99"].key == "k/s99" and read.tokens_in == 3


def test_a_record_read_back_whose_bytes_differ_only_in_a_numbers_spelling_is_validated_whole():
    # 1 and 1.0 are equal as data, not as bytes: the step kept says 1.0, the bytes read say 1.
    from mesh.broker.jobs import validated

    known = job(IDS).with_step(StepRecord(step_id="n", agent="a", key="k/n", input={"v": 1.0}))
    record_bytes(known)
    data = dumps(known).replace(b'"v":1.0', b'"v":1')
    read = validated(data, known)
    assert read.steps["n"] is not known.steps["n"] and dumps(read) == data
    assert read == JobRecord.model_validate_json(data)


def test_a_record_of_another_job_or_too_few_steps_is_validated_whole():
    from mesh.broker.jobs import validated

    known = job(IDS)
    record_bytes(known)
    other = known.replaced({"job_id": "job-other"})
    read = validated(dumps(other), known)
    assert read.job_id == "job-other" and read.steps["s1"] is not known.steps["s1"]
    few = job(IDS[:2])
    assert validated(dumps(few), few).steps["s1"] is not few.steps["s1"]
