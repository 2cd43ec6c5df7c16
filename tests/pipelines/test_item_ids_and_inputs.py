"""``for_each`` over any CEL list expression (a ``filter`` keeps the element type for load-time
checks), ``item_id`` naming each item, ``input:`` building a step's input field by field, and
``result:`` choosing which steps' outputs make the job's result: refused at load with FILE:LINE
when wrong, and run over real workers and Redis."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from mesh.agents.pipelines import Pipeline, PipelineError, load_pipeline
from mesh.agents.pipelines.engine import Routes, Run, advance, begin
from mesh.broker.keys import prefix
from mesh.contracts import JobRecord, State, transition
from tests.pipelines.agents import app

FLOW = """
name: picked
agents:
  - id: scout
  - id: fetch
    depends_on: [scout]
    for_each: 'scout.sources.filter(s, s.score >= 2.0)'
    item_id: "s{{item.score}}"
    input:
      url: item.url
      score: item.score * 2.0
  - id: digest
    depends_on: [fetch]
    input:
      items: fetch
      failed.note: 'size(fetch) > 1 ? "several" : null'
result: [fetch, digest]
"""


def errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(dedent(text).lstrip())
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, app)
    return [str(e).replace(str(path), "bad.yaml") for e in caught.value.errors]


def test_the_flow_loads_and_its_expressions_keep_what_the_file_says(tmp_path: Path) -> None:
    spec = load_pipeline(dedent(FLOW), app)
    fetch = spec.step("fetch")
    assert fetch.for_each is not None and fetch.for_each.cel == "scout.sources.filter(s, s.score >= 2.0)"
    assert fetch.item_id is not None and fetch.item_id.source == "s{{item.score}}"
    assert fetch.input is not None and set(fetch.input) == {"url", "score"}
    assert spec.result == ("fetch", "digest")
    again = Pipeline("picked").step("scout").step("fetch", depends_on=["scout"], for_each=fetch.for_each.source,
                                                 item_id="s{{item.score}}",
                                                 input={"url": "item.url", "score": "item.score * 2.0"})
    assert again.build().step("fetch") == fetch  # YAML and Python give one spec


def test_a_filtered_list_keeps_its_element_type_so_a_wrong_item_field_is_a_load_error(tmp_path: Path) -> None:
    found = errors(tmp_path, FLOW.replace("url: item.url", "url: item.address"))
    assert found == ["bad.yaml:9: step 'fetch': input.url 'item.address' reads item.address, but item has no "
                     "field 'address'; its fields: score, url"]
    found = errors(tmp_path, FLOW.replace('"s{{item.score}}"', '"s{{item.rank}}"'))
    assert len(found) == 1 and found[0].startswith("bad.yaml:7: step 'fetch': item_id 's{{item.rank}}' reads "
                                                   "item.rank, but item has no field 'rank'")
    found = errors(tmp_path, FLOW.replace("scout.sources.filter", "scout.pages.filter"))
    assert len(found) == 1 and found[0].startswith("bad.yaml:6: step 'fetch': for_each")
    assert "has no field 'pages'" in found[0]


def test_input_item_id_and_result_are_refused_where_they_cannot_apply(tmp_path: Path) -> None:
    assert errors(tmp_path, """
        name: p
        agents:
          - id: researcher
            item_id: "{{item.x}}"
        """) == ["bad.yaml:3: agents[0]: item_id applies to a for_each step only"]
    found = errors(tmp_path, FLOW.replace('"s{{item.score}}"', '"s{{task_id}}"'))
    assert found == ["bad.yaml:4: agents[1]: item_id 's{{task_id}}' reads no item field: every item would get the "
                     "same id"]
    found = errors(tmp_path, FLOW.replace("      items: fetch", "      bad-name: fetch"))
    assert len(found) == 1 and found[0].startswith("bad.yaml:13: agents[2].input: input field(s) 'bad-name'")
    found = errors(tmp_path, FLOW.replace("    input:\n      items: fetch", "    state_input: fetch\n    input:\n"
                                          "      items: fetch"))
    assert found == ["bad.yaml:11: agents[2]: give the step's input as state_input or as input, not both"]
    found = errors(tmp_path, FLOW.replace("result: [fetch, digest]", "result: [fetch, nope]"))
    assert found == ["bad.yaml:16: result names unknown step 'nope'; steps are scout, fetch, digest"]
    found = errors(tmp_path, FLOW.replace("      items: fetch", "      items: scout.nope"))
    assert len(found) == 1 and "has no field 'nope'" in found[0] and found[0].startswith("bad.yaml:14:")


def _ran(record: JobRecord, step_id: str, result: dict) -> JobRecord:
    step = record.steps[step_id]
    step = transition(transition(step, State.RUNNING, now=1.0), State.SUCCEEDED, now=1.0, result=result)
    return record.with_step(step)


def test_items_take_their_ids_and_inputs_and_the_job_its_chosen_result() -> None:
    spec = load_pipeline(dedent(FLOW), app)
    run = Run(trace_id="0" * 31 + "1", deadline=2e9)
    record = JobRecord(job_id="j", key="k", trace_id="0" * 31 + "1", pipeline="picked", pipeline_digest=spec.digest(),
                       pipeline_input={"goal": "g", "count": 4})
    record, messages, _ = begin(spec, record, run, Routes(), now=1.0)
    assert [m.args[0]["step_id"] for m in messages] == ["scout"]
    sources = [{"url": f"https://example.invalid/{i}", "score": float(i)} for i in range(4)]
    record, messages = advance(spec, _ran(record, "scout", {"summary": "g", "sources": sources}), run, Routes(), [],
                               now=2.0)
    items = [s for s in record.steps.values() if s.parent == "fetch"]
    assert [(s.step_id, s.index, s.key) for s in items] == [("s2", 0, "k/fetch/s2"), ("s3", 1, "k/fetch/s3")]
    assert [m.args[0]["payload"] for m in messages] == [{"url": "https://example.invalid/2", "score": 4.0},
                                                        {"url": "https://example.invalid/3", "score": 6.0}]
    for sid, words in (("s3", 30), ("s2", 20)):
        record, messages = advance(spec, _ran(record, sid, {"url": sid, "words": words}), run, Routes(), [], now=3.0)
    assert [m.args[0]["payload"] for m in messages] == [
        {"items": [{"url": "s2", "words": 20}, {"url": "s3", "words": 30}], "failed": {"note": "several"}}]
    record, _ = advance(spec, _ran(record, "digest", {"pages": 2, "words": 50}), run, Routes(), [], now=4.0)
    assert record.state is State.SUCCEEDED
    assert record.result == {"s2": {"url": "s2", "words": 20}, "s3": {"url": "s3", "words": 30},
                             "digest": {"pages": 2, "words": 50}}


def test_an_item_id_that_repeats_or_is_no_plain_id_dead_letters_the_step_sending_nothing() -> None:
    spec = load_pipeline(dedent(FLOW).replace('"s{{item.score}}"', '"{{item.url}}"'), app)
    run = Run(trace_id="0" * 31 + "1", deadline=2e9)
    record = JobRecord(job_id="j", key="k", trace_id="0" * 31 + "1", pipeline_input={"goal": "g"})
    record, _, _ = begin(spec, record, run, Routes(), now=1.0)
    sources = [{"url": "https://example.invalid/2", "score": 2.0}]
    record, messages = advance(spec, _ran(record, "scout", {"summary": "g", "sources": sources}), run, Routes(), [],
                               now=2.0)
    fetch = record.steps["fetch"]
    assert messages == [] and fetch.state is State.DEAD_LETTERED and fetch.failure_class == "invalid_output"
    assert "'https://example.invalid/2', which is not a plain id" in (fetch.error or "")
    assert not any(s.parent == "fetch" for s in record.steps.values())

    spec = load_pipeline(dedent(FLOW).replace('"s{{item.score}}"', '"{{item.score}}x"'), app)
    record = JobRecord(job_id="j", key="k", trace_id="0" * 31 + "1", pipeline_input={"goal": "g"})
    record, _, _ = begin(spec, record, run, Routes(), now=1.0)
    sources = [{"url": "a", "score": 2.0}, {"url": "b", "score": 2.0}]
    record, messages = advance(spec, _ran(record, "scout", {"summary": "g", "sources": sources}), run, Routes(), [],
                               now=2.0)
    assert messages == [] and "'2x', which another step of the job already has" in (record.steps["fetch"].error or "")
    assert record.state is State.DEAD_LETTERED


def test_over_real_workers_items_run_once_under_their_ids_and_the_job_gives_the_chosen_result(mesh, run_workers):
    spec = load_pipeline(dedent(FLOW), app)
    run_workers()
    ref = mesh.run(spec, {"goal": "g", "count": 4}, key="picked-1")
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED, record.error
    assert [sid for sid, s in record.steps.items() if s.parent == "fetch"] == ["s2", "s3"]
    assert record.steps["s3"].input == {"url": "https://example.invalid/3", "score": 6.0}
    assert record.result == {"s2": {"url": "https://example.invalid/2", "words": 40},
                             "s3": {"url": "https://example.invalid/3", "words": 60},
                             "digest": {"pages": 2, "words": 100}}
    raw = mesh.redis.hgetall(f"{prefix(mesh.settings.namespace)}:test.runs")
    assert {k.decode(): int(v) for k, v in raw.items()} == {  # type: ignore[union-attr]
        "picked-1/scout/scout": 1, "picked-1/fetch/s2": 1, "picked-1/fetch/s3": 1, "picked-1/digest/digest": 1}


def test_a_step_finishing_in_a_job_a_newer_release_archived_releases_nothing() -> None:
    # During a rolling deploy a newer release may move the job into a state this release does not
    # know (archived) while a step runs here: its success is recorded, but nothing more is sent.
    spec = load_pipeline(dedent(FLOW), app)
    run = Run(trace_id="0" * 31 + "1", deadline=2e9)
    record = JobRecord(job_id="j", key="k", trace_id="0" * 31 + "1", pipeline="picked", pipeline_digest=spec.digest(),
                       pipeline_input={"goal": "g", "count": 4})
    record, _, _ = begin(spec, record, run, Routes(), now=1.0)
    record = record.model_copy(update={"state": State("archived")})
    sources = [{"url": f"https://example.invalid/{i}", "score": float(i)} for i in range(4)]
    after, messages = advance(spec, _ran(record, "scout", {"summary": "g", "sources": sources}), run, Routes(), [],
                              now=2.0)
    assert messages == []  # before: the fetch items were sent, to be refused (or run) downstream
    assert after.state == "archived" and after.steps["scout"].state is State.SUCCEEDED
