"""Loading and validating pipelines: the issue's file as written, and each load error at its file:line."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from mesh import App
from mesh.agents.pipelines import (
    Backoff,
    FailureMode,
    Pipeline,
    PipelineError,
    PipelineSpec,
    load_pipeline,
    order,
    roots,
)
from mesh.contracts import ConfigError
from tests.pipelines.agents import CodeDiff, app

ISSUE_FILE = Path(__file__).parent / "multi-agent-orchestration.skill.yaml"


def errors(tmp_path: Path, text: str) -> list[str]:
    """The ``FILE:LINE: message`` lines loading ``text`` from a file gives (it must fail)."""
    path = tmp_path / "bad.yaml"
    path.write_text(dedent(text).lstrip())
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, app)
    return [str(e).replace(str(path), "bad.yaml") for e in caught.value.errors]


def test_the_issue_file_loads_unchanged_and_validates() -> None:
    spec = load_pipeline(ISSUE_FILE, app)
    assert spec.name == "multi-agent-orchestration" and spec.version == "1.0.0"
    assert order(spec) == ["researcher", "coder", "reviewer", "deployer"]
    assert roots(spec) == ["researcher"]
    researcher, coder, reviewer, deployer = spec.steps
    assert researcher.retry_policy is not None and researcher.retry_policy.max_attempts == 3
    assert researcher.retry_policy.backoff is Backoff.EXPONENTIAL
    assert coder.agent == "coder" and coder.idempotent and coder.state_input == "research_result"
    assert coder.idempotency_key is not None and coder.idempotency_key.render({"task_id": "t1"}) == "t1:coder"
    assert reviewer.gate is not None and reviewer.gate.cel == "coder.confidence >= 0.85"
    assert reviewer.gate.test({"coder": {"confidence": 0.9}}) and not reviewer.gate.test({"coder": {"confidence": 0.6}})
    assert deployer.gate is not None and deployer.gate.test({"reviewer": {"approved": True}})
    assert deployer.failure_mode is FailureMode.HALT_PIPELINE and not deployer.requires_human_approval
    assert spec.tracing.provider == "langfuse" and spec.tracing.log_inputs and spec.tracing.log_outputs
    assert spec.checkpointing.store == "redis" and spec.checkpointing.ttl_minutes == 60


def test_the_python_builder_gives_the_same_spec_and_digest_as_the_yaml() -> None:
    built = (Pipeline("multi-agent-orchestration", version="1.0.0",
                      description="Orchestrate multi-agent AI pipelines with distributed systems discipline")
             .step("researcher", model="claude-3-5-sonnet", timeout_ms=30000,
                   retry_policy={"max_attempts": 3, "backoff": "exponential"}, failure_mode="halt_pipeline",
                   output_schema="research_result")
             .step("coder", model="claude-3-5-sonnet", depends_on=["researcher"], timeout_ms=60000, idempotent=True,
                   idempotency_key="{{task_id}}:coder", state_input="research_result", output_schema="code_diff")
             .step("reviewer", model="claude-3-opus", depends_on=["coder"], timeout_ms=45000,
                   gate="{{coder.confidence}} >= 0.85", output_schema="review_result")
             .step("deployer", depends_on=["reviewer"], gate="{{reviewer.approved}} == true")
             .tracing(enabled=True, provider="langfuse", log_inputs=True, log_outputs=True)
             .checkpointing(enabled=True, store="redis", ttl_minutes=60)
             .build())
    loaded = load_pipeline(ISSUE_FILE, app)
    assert built == loaded
    assert built.digest() == loaded.digest()
    assert PipelineSpec.model_validate_json(built.canonical()).digest() == built.digest()


def test_a_changed_spec_has_another_digest() -> None:
    one = Pipeline("p").step("researcher").build()
    assert one.digest() != Pipeline("p", version="2").step("researcher").build().digest()


def test_app_pipeline_registers_a_file_a_builder_or_a_spec() -> None:
    mine = App("mine").include(app)
    spec = mine.pipeline(ISSUE_FILE)
    assert mine.pipelines == {"multi-agent-orchestration": spec}
    mine.pipeline(Pipeline("short").step("researcher"))
    assert set(mine.pipelines) == {"multi-agent-orchestration", "short"}
    with pytest.raises(ConfigError, match="twice"):
        mine.pipeline(spec)


def test_app_pipeline_checks_a_built_spec_against_the_app() -> None:
    bad = Pipeline("p").step("researcher").step("coder", depends_on=["researcher"], gate="researcher.nothing")
    with pytest.raises(ConfigError, match=r"ResearchResult .* has no field 'nothing'"):
        App("other").include(app).pipeline(bad)


def test_an_unknown_key_is_refused_at_its_line(tmp_path: Path) -> None:
    assert errors(tmp_path, """
        name: p
        agents:
          - id: researcher
            colour: red
        """) == ["bad.yaml:4: unknown key 'colour' in agents[0]; allowed: id, agent, model, timeout_ms, retry_policy, "
                 "on_false, output_schema, depends_on, idempotent, priority, idempotency_key, state_input, gate, when, "
                 "requires_human_approval, approval, for_each, max_parallel, join, item_id, input, compensate, sleep, "
                 "wait_for"]


def test_unknown_keys_at_every_level_are_refused(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        name: p
        agents:
          - id: researcher
            retry_policy: {max_attempts: 3, jitter: full}
        tracing:
          exporter: otlp
        cron: daily
        """)
    assert [line.split(": ")[0] for line in found] == ["bad.yaml:4", "bad.yaml:6", "bad.yaml:7"]
    assert "unknown key 'jitter' in agents[0].retry_policy" in found[0]
    assert "unknown key 'exporter' in tracing" in found[1]
    assert "unknown key 'cron' in the pipeline" in found[2]


def test_a_bad_type_is_refused_at_its_line(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        name: p
        agents:
          - id: researcher
          - id: coder
            depends_on: [researcher]
            timeout_ms: soon
            failure_mode: retry
        """)
    assert found[0].startswith("bad.yaml:6: agents[1].timeout_ms: Input should be a valid integer")
    assert found[1] == ("bad.yaml:7: agents[1].failure_mode: Input should be 'halt_pipeline' or 'continue' "
                        "(got 'retry')")


def test_max_attempts_counts_the_first_attempt_so_zero_is_refused(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        name: p
        agents:
          - id: researcher
            retry_policy:
              max_attempts: 0
        """)
    assert found == ["bad.yaml:5: agents[0].retry_policy.max_attempts: Input should be greater than or equal to 1 "
                     "(got 0)"]


def test_a_cycle_names_its_members(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        name: p
        agents:
          - id: researcher
          - id: coder
            depends_on: [reviewer]
          - id: reviewer
            depends_on: [deployer]
          - id: deployer
            depends_on: [coder]
        """)
    assert found == ["bad.yaml:5: depends_on makes a cycle: coder → reviewer → deployer → coder"]


def test_a_step_depending_on_itself_is_a_cycle(tmp_path: Path) -> None:
    assert errors(tmp_path, """
        name: p
        agents:
          - id: researcher
            depends_on: [researcher]
        """) == ["bad.yaml:4: depends_on makes a cycle: researcher → researcher"]


def test_an_unknown_step_in_depends_on_is_refused_at_its_line(tmp_path: Path) -> None:
    assert errors(tmp_path, """
        name: p
        agents:
          - id: researcher
          - id: coder
            depends_on:
              - researcher
              - writer
        """) == ["bad.yaml:7: step 'coder' depends on unknown step 'writer'; steps are researcher, coder"]


def test_an_unknown_agent_is_refused_at_its_line(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        name: p
        agents:
          - id: researcher
          - id: writer
          - id: second_review
            agent: critic
        """)
    known = ", ".join(app.agents)
    assert found == [
        f"bad.yaml:4: step 'writer' runs agent 'writer', which app 'orchestration' does not declare; "
        f"its agents are {known}",
        f"bad.yaml:6: step 'second_review' runs agent 'critic', which app 'orchestration' does not declare; "
        f"its agents are {known}"]


def test_two_steps_may_run_one_agent(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("name: p\nagents:\n  - id: researcher\n  - id: second_opinion\n    agent: researcher\n")
    spec = load_pipeline(path, app)
    assert [s.agent for s in spec.steps] == ["researcher", "researcher"] and roots(spec) == [
        "researcher", "second_opinion"]


def test_an_unknown_output_schema_is_refused_at_its_line(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        name: p
        agents:
          - id: researcher
            output_schema: research_results
        """)
    [line] = found
    assert line.startswith("bad.yaml:4: output_schema 'research_results' names no model the app's agents declare; "
                           "known: ") and line.endswith("(the snake_case name of a model class)")
    assert "research_result, review_result" in line and "code_diff" in line


def test_an_output_schema_other_than_the_agents_output_is_refused(tmp_path: Path) -> None:
    assert errors(tmp_path, """
        name: p
        agents:
          - id: researcher
            output_schema: code_diff
        """) == ["bad.yaml:4: output_schema 'code_diff' is CodeDiff, but agent 'researcher' returns ResearchResult"]


def test_a_gate_syntax_error_is_a_load_error_at_its_line(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        name: p
        agents:
          - id: researcher
          - id: coder
            depends_on: [researcher]
            gate: "{{researcher.summary}} =="
        """)
    assert len(found) == 1
    assert found[0].startswith("bad.yaml:6: agents[1].gate: condition '{{researcher.summary}} ==' does not compile")


def test_a_gate_reading_a_field_no_upstream_schema_has_is_refused(tmp_path: Path) -> None:
    assert CodeDiff.model_fields.keys() == {"diff", "confidence"}
    assert errors(tmp_path, """
        name: p
        agents:
          - id: researcher
          - id: coder
            depends_on: [researcher]
          - id: reviewer
            depends_on: [coder]
            gate: "{{coder.certainty}} >= 0.85"
        """) == ["bad.yaml:8: step 'reviewer': gate '{{coder.certainty}} >= 0.85' reads coder.certainty, but "
                 "CodeDiff (the output of step 'coder') has no field 'certainty'; its fields: confidence, diff"]


def test_a_gate_reading_a_step_that_is_not_upstream_is_refused(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        name: p
        agents:
          - id: researcher
          - id: coder
          - id: reviewer
            depends_on: [researcher]
            when: coder.confidence > 0.5 && nobody.field == 1
        """)
    assert found == [
        "bad.yaml:7: step 'reviewer': when 'coder.confidence > 0.5 && nobody.field == 1' reads coder.confidence, "
        "but step 'coder' is not upstream of 'reviewer' (add it to depends_on)",
        "bad.yaml:7: step 'reviewer': when 'coder.confidence > 0.5 && nobody.field == 1' reads nobody.field, "
        "but 'nobody' is neither an upstream step nor the job; it may read researcher, input, job_id, key, task_id"]


def test_a_gate_may_read_a_transitive_upstream_step_and_the_job(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(dedent("""
        name: p
        agents:
          - id: researcher
          - id: coder
            depends_on: [researcher]
          - id: reviewer
            depends_on: [coder]
            gate: size(researcher.sources) > 0 && input.lang == "go" && job_id != ""
            idempotency_key: "{{input.repo}}/{{researcher.summary}}"
        """))
    assert load_pipeline(path, app).step("reviewer").gate is not None


def test_state_input_must_name_an_upstream_output(tmp_path: Path) -> None:
    assert errors(tmp_path, """
        name: p
        agents:
          - id: researcher
            output_schema: research_result
          - id: coder
            depends_on: [researcher]
            state_input: review_result
        """) == ["bad.yaml:7: state_input 'review_result' is neither an upstream step nor an upstream output_schema "
                 "of step 'coder'; upstream: research_result, researcher"]


def test_for_each_walks_a_list_and_item_is_typed(tmp_path: Path) -> None:
    path = tmp_path / "fan.yaml"
    path.write_text(dedent("""
        name: fan
        agents:
          - id: researcher
          - id: coder
            agent: fetch
            depends_on: [researcher]
            for_each: "{{researcher.sources}}"
            max_parallel: 4
            join: {min_success: 0.8}
            when: item.score > 0.5
            idempotency_key: "{{task_id}}:{{item.url}}"
        """))
    coder = load_pipeline(path, app).step("coder")
    assert coder.for_each is not None and coder.for_each.cel == "researcher.sources"
    assert coder.join is not None and coder.join.min_success == 0.8 and coder.max_parallel == 4
    found = errors(tmp_path, path.read_text().replace("item.score", "item.rank"))
    assert found == ["bad.yaml:10: step 'coder': when 'item.rank > 0.5' reads item.rank, but item has no field "
                     "'rank'; its fields: score, url"]


def test_for_each_over_a_non_list_and_a_bad_join_are_refused(tmp_path: Path) -> None:
    found = errors(tmp_path, """
        name: fan
        agents:
          - id: researcher
          - id: coder
            depends_on: [researcher]
            for_each: researcher.summary
          - id: reviewer
            depends_on: [researcher]
            for_each: researcher.sources
            join: {min_success: 1.5}
          - id: deployer
            max_parallel: 2
        """)
    assert found[0] == ("bad.yaml:10: agents[2].join.min_success: a fraction min_success must be in (0, 1]; got 1.5 "
                        "(write a count as an integer)")
    assert found[1] == "bad.yaml:11: agents[3]: max_parallel and join apply to a for_each step only"


def test_for_each_over_a_string_is_refused(tmp_path: Path) -> None:
    assert errors(tmp_path, """
        name: fan
        agents:
          - id: researcher
          - id: coder
            depends_on: [researcher]
            for_each: researcher.summary
        """) == ["bad.yaml:6: for_each 'researcher.summary' is str, not a list"]


def test_a_key_given_twice_and_broken_yaml_are_refused_at_their_line(tmp_path: Path) -> None:
    assert errors(tmp_path, """
        name: p
        agents:
          - id: researcher
            model: a
            model: b
        """) == ["bad.yaml:5: key 'model' is given twice"]
    found = errors(tmp_path, "name: p\nagents:\n  - id: researcher\n   bad: [\n")
    assert found[0].startswith("bad.yaml:4: not valid YAML")


def test_a_duplicate_step_id_and_a_missing_list_are_refused(tmp_path: Path) -> None:
    assert errors(tmp_path, "name: p\nagents:\n  - id: researcher\n  - id: researcher\n") == [
        "bad.yaml:2: agents: step id(s) researcher declared twice"]
    assert errors(tmp_path, "name: p\n") == ["bad.yaml:1: steps: required key missing"]


def test_step_ids_must_be_expression_names(tmp_path: Path) -> None:
    found = errors(tmp_path, "name: p\nagents:\n  - id: web-search\n  - id: input\n    agent: researcher\n")
    assert found[0].startswith("bad.yaml:3: agents[0].id: step id 'web-search' must be a lower-case name")
    assert found[1].startswith("bad.yaml:4: agents[1].id: step id 'input' is reserved")


def test_yaml_text_loads_as_well_as_a_file() -> None:
    spec = load_pipeline(ISSUE_FILE.read_text(), app)
    assert spec.digest() == load_pipeline(ISSUE_FILE, app).digest()
    with pytest.raises(PipelineError, match=r"^<string>:2: steps: a pipeline needs at least one step$"):
        load_pipeline("name: p\nsteps: []\n", app)


def test_a_relative_pipeline_file_not_found_says_it_is_read_from_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # as a worker started elsewhere than beside the app's module
    with pytest.raises(PipelineError) as missing:
        app.pipeline("article.yaml")
    assert str(missing.value) == (f"article.yaml:1: cannot read the file: No such file or directory (a relative path, "
                                  f"read from the current directory {tmp_path})")
    with pytest.raises(PipelineError) as absolute:
        load_pipeline(tmp_path / "article.yaml", app)
    assert str(absolute.value) == f"{tmp_path / 'article.yaml'}:1: cannot read the file: No such file or directory"
