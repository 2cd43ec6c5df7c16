"""Names that explain themselves: ``steps:`` (``agents:`` still read), ``{{key}}`` (``{{task_id}}``
still read), one rule for agent names and step ids, ``max_attempts`` for agents as for steps, and
``on_false:`` (``failure_mode:`` still read); an old and a new name given together is an error."""

from __future__ import annotations

import json
from pathlib import Path
from textwrap import dedent

import pytest
from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.pipelines import FailureMode, Pipeline, PipelineError, load_pipeline
from mesh.agents.pipelines.engine import Routes, Run, begin
from mesh.contracts import ConfigError, JobRecord, State
from tests.pipelines.agents import app

ISSUE_FILE = Path(__file__).parent / "multi-agent-orchestration.skill.yaml"


class Q(BaseModel):
    text: str


RUN = Run(trace_id="0" * 31 + "1", deadline=2e9)


def errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(dedent(text).lstrip())
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, app)
    return [str(e).replace(str(path), "bad.yaml") for e in caught.value.errors]


def started(text: str, key: str = "order-7") -> tuple[JobRecord, list]:
    spec = load_pipeline(dedent(text), app)
    record = JobRecord(job_id="j", key=key, trace_id="0" * 31 + "1", pipeline=spec.name,
                       pipeline_digest=spec.digest(), pipeline_input={"goal": "g", "confidence": 0.2})
    record, messages, _ = begin(spec, record, RUN, Routes(), now=1.0)
    return record, messages


def test_steps_is_the_list_agents_its_older_name_and_both_is_an_error(tmp_path: Path) -> None:
    new = load_pipeline("name: p\nsteps:\n  - id: researcher\n", app)
    old = load_pipeline("name: p\nagents:\n  - id: researcher\n", app)
    assert new == old and new.digest() == old.digest()
    assert errors(tmp_path, "name: p\n") == ["bad.yaml:1: steps: required key missing"]
    found = errors(tmp_path, "name: p\nsteps:\n  - id: researcher\nagents:\n  - id: coder\n")
    assert found == ["bad.yaml:1: give the steps as `steps:` or by its older name `agents:`, not both"]
    unknown = errors(tmp_path, "name: p\nsteps:\n  - id: researcher\ncron: daily\n")
    assert "allowed: name, version, description, steps (or agents), tracing" in unknown[0]


def test_key_names_the_jobs_key_in_templates_and_inputs_as_task_id_did() -> None:
    record, messages = started("""
        name: p
        steps:
          - id: researcher
            agent: jot  # takes any field: ref is none of Task's
            idempotency_key: "{{key}}:research"
            input:
              goal: input.goal
              ref: key + "/" + task_id
        """)
    assert record.steps["researcher"].key == "order-7:research"
    assert [m.args[0]["key"] for m in messages] == ["order-7:research"]
    assert messages[0].args[0]["payload"] == {"goal": "g", "ref": "order-7/order-7"}
    spec = load_pipeline(ISSUE_FILE, app)  # the seed file's {{task_id}} renders as before
    coder = spec.step("coder").idempotency_key
    assert coder is not None and coder.render({"task_id": "t1"}) == "t1:coder"


def test_key_is_reserved_as_a_step_id_and_read_as_a_string(tmp_path: Path) -> None:
    found = errors(tmp_path, "name: p\nsteps:\n  - id: key\n    agent: researcher\n")
    assert found[0].startswith("bad.yaml:3: steps[0].id: step id 'key' is reserved")
    found = errors(tmp_path, 'name: p\nsteps:\n  - id: researcher\n    idempotency_key: "{{key.part}}"\n')
    assert found == ["bad.yaml:4: step 'researcher': idempotency_key '{{key.part}}' reads key.part, but key is a "
                     "string"]


def test_step_ids_and_agent_names_follow_one_rule_and_the_error_says_why(tmp_path: Path) -> None:
    mine = App("mine")
    with pytest.raises(ConfigError) as caught:
        @mine.agent(name="web-search")
        def search(ctx: Context, q: Q) -> Q:
            return q
    said = str(caught.value)
    assert "agent name 'web-search' must be a lower-case name" in said
    assert "Agent names and step ids follow this one rule" in said and "write 'web_search'" in said
    found = errors(tmp_path, "name: p\nsteps:\n  - id: web-search\n    agent: researcher\n")
    assert found[0].startswith("bad.yaml:3: steps[0].id: step id 'web-search' must be a lower-case name")
    assert "Agent names and step ids follow this one rule" in found[0] and "write 'web_search'" in found[0]

    @mine.agent(name="web_search", queue="web-search")  # a queue may keep its '-'
    def search2(ctx: Context, q: Q) -> Q:
        return q
    assert mine.agents["web_search"].queue == "web-search"


def test_an_agent_counts_max_attempts_as_a_step_does_max_retries_its_older_name() -> None:
    mine = App("mine")

    @mine.agent(max_attempts=4)
    def four(ctx: Context, q: Q) -> Q:
        return q

    @mine.agent(max_retries=3)
    def old(ctx: Context, q: Q) -> Q:
        return q

    assert mine.agents["four"].max_retries == mine.agents["old"].max_retries == 3
    assert mine.agents["four"].max_attempts == mine.agents["old"].max_attempts == 4
    with pytest.raises(ConfigError) as caught:
        mine.agent(four, name="both", max_attempts=4, max_retries=3)
    said = str(caught.value)
    assert "give max_attempts=4 or max_retries=3, not both" in said
    assert "max_attempts counts every attempt, the first included" in said
    assert "max_attempts=4 is max_retries=3" in said
    with pytest.raises(ConfigError, match="at least 1"):
        mine.agent(four, name="none", max_attempts=0)


STEP = """
name: p
steps:
  - id: researcher
    gate: input.confidence > 0.5
    {line}
"""


def test_on_false_says_what_a_false_gate_does_failure_mode_its_older_name(tmp_path: Path) -> None:
    for line in ("on_false: continue", "failure_mode: continue"):
        record, messages = started(STEP.format(line=line))
        assert record.steps["researcher"].state is State.SKIPPED and messages == []
        assert load_pipeline(dedent(STEP.format(line=line)), app).step("researcher").on_false is FailureMode.CONTINUE
    record, messages = started(STEP.format(line="on_false: halt_pipeline"))
    assert record.state is State.HALTED and messages == []
    found = errors(tmp_path, STEP.format(line="on_false: continue\n    failure_mode: continue"))
    assert found == ["bad.yaml:3: steps[0]: give what a false gate does as `on_false:` or by its older name "
                     "`failure_mode:`, not both"]
    built = Pipeline("p").step("researcher", gate="input.confidence > 0.5", on_false="continue").build()
    assert built == load_pipeline(dedent(STEP.format(line="failure_mode: continue")), app)


def test_the_stored_spec_keeps_failure_mode_so_digests_and_older_workers_hold() -> None:
    """A spec is stored (and hashed) by the name its key was first stored under: the seed file keeps
    the digest it had, and the stored JSON loads back to the same spec."""
    spec = load_pipeline(ISSUE_FILE, app)
    stored = json.loads(spec.canonical())
    assert [s["failure_mode"] for s in stored["steps"]] == ["halt_pipeline"] * 4
    assert not any("on_false" in s for s in stored["steps"])
    assert spec.digest() == "ec26f96eadfd54c34724cc0f69dfe85ab3f627e7b30a562e9f18058560962ff5"
    again = type(spec).model_validate(stored)
    assert again == spec and again.step("deployer").on_false is FailureMode.HALT_PIPELINE
