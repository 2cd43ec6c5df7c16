"""``mesh pipeline validate`` as a real subprocess: exit codes, FILE:LINE errors, --json."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

ISSUE_FILE = str(Path(__file__).parent / "multi-agent-orchestration.skill.yaml")
APP = "tests.pipelines.agents:app"
Cli = Callable[..., CompletedProcess[str]]


def test_validate_the_issue_file_exits_0_with_the_dag(cli: Cli) -> None:
    run = cli("pipeline", "validate", ISSUE_FILE, "--app", APP)
    assert run.returncode == 0, run.stderr
    assert "multi-agent-orchestration 1.0.0" in run.stdout
    assert "order: researcher → coder → reviewer → deployer" in run.stdout
    assert "gate: coder.confidence >= 0.85 (false: halt_pipeline)" in run.stdout
    assert "key: {{task_id}}:coder" in run.stdout


def test_validate_and_show_of_a_long_name_fit_80_columns_the_digest_on_a_line_of_its_own(cli: Cli) -> None:
    run = cli("pipeline", "validate", ISSUE_FILE, "--app", APP, COLUMNS="80")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert max(map(len, lines)) <= 80, run.stdout
    assert lines[0] == "multi-agent-orchestration 1.0.0  valid against app 'orchestration'", lines
    assert lines[1].startswith("digest ") and len(lines[1]) == len("digest ") + 12, lines
    assert cli("pipeline", "register", ISSUE_FILE, "--app", APP).returncode == 0
    shown = cli("pipeline", "show", ISSUE_FILE, "--app", APP, COLUMNS="80")
    assert shown.returncode == 0, shown.stderr
    assert max(map(len, shown.stdout.splitlines())) <= 80, shown.stdout
    assert shown.stdout.splitlines()[:2] == [f"multi-agent-orchestration 1.0.0  {lines[1]}",
                                             "the newest registered version"], shown.stdout


def test_validate_json_gives_order_roots_gates_and_digest(cli: Cli) -> None:
    run = cli("pipeline", "validate", ISSUE_FILE, "--app", APP, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["valid"] is True and report["app"] == "orchestration"
    assert report["order"] == ["researcher", "coder", "reviewer", "deployer"] and report["roots"] == ["researcher"]
    assert report["gates"] == {"reviewer": "coder.confidence >= 0.85", "deployer": "reviewer.approved == true"}
    assert len(report["digest"]) == 64
    coder = report["steps"][1]
    assert coder["idempotency_key"] == {"source": "{{task_id}}:coder", "cel": 'string(task_id) + ":coder"',
                                        "reads": ["task_id"]}


def test_validate_exits_2_with_file_line_errors(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nagents:\n  - id: researcher\n  - id: reviewer\n    depends_on: [researcher]\n"
                   "    gate: coder.confidence > 0.5\n  - id: writer\n")
    run = cli("pipeline", "validate", str(bad), "--app", APP)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert lines[0].startswith(f"{bad}:6: step 'reviewer': gate 'coder.confidence > 0.5' reads coder.confidence")
    assert lines[1].startswith(f"{bad}:7: step 'writer' runs agent 'writer'")


def test_validate_json_lists_errors_and_exits_2(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nagents:\n  - id: researcher\n    depends_on: [researcher]\n")
    run = cli("pipeline", "validate", str(bad), "--app", APP, "--json")
    assert run.returncode == 2
    assert json.loads(run.stdout)["errors"] == [
        {"file": str(bad), "line": 4, "message": "depends_on makes a cycle: researcher → researcher"}]


def test_validate_defaults_to_the_builtin_app(cli: Cli) -> None:
    run = cli("pipeline", "validate", ISSUE_FILE)
    assert run.returncode == 2
    assert f"{ISSUE_FILE}:16: step 'coder' runs agent 'coder', which app 'mesh' does not declare" in run.stderr
    assert run.stderr.splitlines()[-1] == ("(no --app given: checked against the built-in app 'mesh'; name the app "
                                           "that declares these agents with --app module[:attribute])")


def test_validate_a_missing_file_or_app_exits_2(cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "none.yaml"
    run = cli("pipeline", "validate", str(missing), "--app", APP)
    assert run.returncode == 2 and f"{missing}:1: cannot read the file" in run.stderr
    run = cli("pipeline", "validate", ISSUE_FILE, "--app", "no_such_module:app")
    assert run.returncode == 2 and "cannot import app module" in run.stderr


def test_register_list_and_show_a_pipeline(cli: Cli) -> None:
    done = cli("pipeline", "register", ISSUE_FILE, "--app", APP, "--json")
    assert done.returncode == 0, done.stderr
    digest = json.loads(done.stdout)["digest"]

    listed = json.loads(cli("pipeline", "list", "--json").stdout)
    assert listed == [{"name": "multi-agent-orchestration", "version": "1.0.0", "digest": digest, "steps": 4,
                       "versions": 1}]
    shown = cli("pipeline", "show", "multi-agent-orchestration")
    assert shown.returncode == 0, shown.stderr
    assert "order: researcher → coder → reviewer → deployer" in shown.stdout and digest[:12] in shown.stdout
    assert json.loads(cli("pipeline", "show", "multi-agent-orchestration", "--json").stdout)["digest"] == digest
    missing = cli("pipeline", "show", "nope")
    assert missing.returncode == 2 and "no pipeline 'nope'" in missing.stderr


def test_mesh_run_a_file_waits_for_success_and_status_shows_a_halt(cli: Cli, worker_process, tmp_path: Path) -> None:
    worker_process("--app", APP)
    ok = cli("run", ISSUE_FILE, "--app", APP, "--input", '{"goal": "ship it"}', "--wait", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["state"] == "succeeded"

    task = tmp_path / "task.json"
    task.write_text('{"goal": "risky", "confidence": 0.6}')
    halted = cli("run", "multi-agent-orchestration", "--app", APP, "--input", f"@{task}", "--key", "k-1", "--wait")
    assert halted.returncode == 1, halted.stderr
    assert "halted" in halted.stdout
    status = cli("status", "k-1")
    assert status.returncode == 0, status.stderr
    text = " ".join(status.stdout.split())
    assert "halted" in text and "coder.confidence" in text and "0.6" in text
    assert "not sent: the job halted" in text


def test_mesh_run_refuses_bad_input_and_unknown_names(cli: Cli) -> None:
    bad = cli("run", ISSUE_FILE, "--app", APP, "--input", "[1]")
    assert bad.returncode == 2 and "JSON object" in bad.stderr
    unknown = cli("run", "nope", "--input", "{}")
    assert unknown.returncode == 2 and "no pipeline 'nope'" in unknown.stderr
    wrong = cli("run", ISSUE_FILE, "--app", APP, "--input", '{"topic": 1}')
    assert wrong.returncode == 2 and "goal" in wrong.stderr


#: A pipeline that sets every key a step and a pipeline have (the test below checks it stays so).
EVERY_KEY = """\
name: every-key
version: "2.1"
description: A pipeline with every key set, so that show and validate print each.
tracing: {enabled: true, provider: otlp, log_inputs: true, log_outputs: true}
checkpointing: {enabled: true, store: redis, ttl_minutes: 90}
input_schema: task
steps:
  - id: scout
    agent: scout
    model: gpt-test-mini
    timeout_ms: 45000
    retry_policy: {max_attempts: 5, backoff: fixed}
    output_schema: research_result
    idempotent: true
    priority: high
    idempotency_key: "{{key}}:scout"
    compensate: {agent: scout, input: {goal: input.goal}, retry_policy: {max_attempts: 2, backoff: none},
                 timeout_ms: 1500}
  - id: coder
    depends_on: [scout]
    state_input: research_result
  - id: fetch
    depends_on: [scout]
    for_each: 'scout.sources.filter(s, s.score >= 2.0)'
    max_parallel: 4
    join: {min_success: 0.8}
    item_id: "s{{item.score}}"
    when: item.score > 0.5
    on_false: continue
    input:
      url: item.url
      score: item.score * 2.0
  - id: digest
    depends_on: [fetch]
    input:
      items: fetch
    gate: size(fetch) > 0
    requires_human_approval: true
    approval: {timeout: 2h, on_timeout: escalate, approvers: [alice, bob], warn_before: 30m}
  - id: nap
    depends_on: [digest]
    sleep: 10m
  - id: paid
    depends_on: [nap]
    wait_for: {event: payment.settled, match: event.order == input.goal, timeout: 1h, on_timeout: continue}
result: [fetch, digest]
limits:
  agents:
    scout: {rate: {requests: 600/min}, concurrency: {max: 4, key: input.goal}}
"""

#: What the text says of each key set above.
EVERY_KEY_SHOWN = [
    "every-key 2.1", "A pipeline with every key set", "order: scout → coder → fetch → digest → nap → paid",
    "tracing: otlp, logs inputs and outputs", "checkpointing: redis, kept 1h30m",
    "result: fetch, digest", "input_schema task",
    "agent scout", "model gpt-test-mini", "timeout 45s", "retry 5 attempt(s), fixed backoff",
    "output research_result", "idempotent", "priority high", "key: {{key}}:scout",
    "compensate: agent scout, input: goal = input.goal, retry 2 attempt(s), no backoff, timeout 1500ms",
    "after scout", "state_input research_result", "for_each: scout.sources.filter(s, s.score >= 2.0)",
    "max_parallel 4", "join: min_success 0.8", "item_id: s{{item.score}}", "when: item.score > 0.5",
    "on_false continue", "input: score = item.score * 2.0, url = item.url", "input: items = fetch",
    "gate: size(fetch) > 0 (false: halt_pipeline)", "awaits approval (2h, then escalate)", "approvers alice, bob",
    "warns 30m before", "limits of agent scout: 600/min requests, 4 at once per input.goal",
    "sleeps 10m (no agent)",
    "waits for event payment.settled where event.order == input.goal (1h, then continue; no agent)",
]


def _shown(stdout: str) -> str:
    """The text with every line within 80 columns, its lines joined (a part may wrap)."""
    lines = stdout.rstrip("\n").split("\n")
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    return " ".join(" ".join(lines).split())


def test_validate_and_show_print_every_key_and_json_is_the_whole_canonical_spec(cli: Cli, tmp_path: Path) -> None:
    """A registered join rule, retry policy, timeout, model, compensation or approval is visible to
    an operator: each key the file sets is in the text (within 80 columns) and in --json."""
    from mesh.agents.pipelines import PipelineSpec, StepSpec, load_pipeline
    from tests.pipelines.agents import app

    path = tmp_path / "every-key.yaml"
    path.write_text(EVERY_KEY)
    spec = load_pipeline(path, app)
    canonical = json.loads(spec.canonical())
    defaults = {k: f.get_default(call_default_factory=True) for k, f in StepSpec.model_fields.items()}
    set_keys = {k for s in spec.steps for k in StepSpec.model_fields if getattr(s, k) != defaults[k]}
    assert set_keys == set(StepSpec.model_fields), f"EVERY_KEY leaves unset: {set(StepSpec.model_fields) - set_keys}"
    assert all(getattr(spec, k) != f.get_default(call_default_factory=True)
               for k, f in PipelineSpec.model_fields.items() if k not in ("name", "steps"))

    for run in (cli("pipeline", "validate", str(path), "--app", APP),
                cli("pipeline", "register", str(path), "--app", APP) and cli("pipeline", "show", "every-key")):
        assert run.returncode == 0, run.stderr
        text = _shown(run.stdout)
        missing = [part for part in EVERY_KEY_SHOWN if part not in text]
        assert not missing, f"not shown: {missing}\n{run.stdout}"

    validated = json.loads(cli("pipeline", "validate", str(path), "--app", APP, "--json").stdout)
    shown = json.loads(cli("pipeline", "show", "every-key", "--json").stdout)
    for report in (validated, shown):
        assert report["spec"] == canonical
        assert report["tracing"] == canonical["tracing"] and report["checkpointing"] == canonical["checkpointing"]
        assert report["result"] == ["fetch", "digest"] and report["description"] == canonical["description"]
        for step, whole in zip(report["steps"], canonical["steps"], strict=True):
            whole = {("on_false" if k == "failure_mode" else k): v for k, v in whole.items()}  # its stored name
            unset = {k for k, v in whole.items() if v is None or v == defaults.get(k)}
            assert set(whole) - unset <= set(step), f"step {step['id']} lacks {set(whole) - unset - set(step)}"
        scout, fetch = report["steps"][0], report["steps"][2]
        assert scout["retry_policy"] == {"max_attempts": 5, "backoff": "fixed"} and scout["timeout_ms"] == 45000
        assert scout["model"] == "gpt-test-mini" and scout["idempotent"] is True
        assert scout["compensate"]["timeout_ms"] == 1500
        assert fetch["join"] == {"min_success": 0.8} and fetch["max_parallel"] == 4
        assert fetch["input"]["url"] == {"source": "item.url", "cel": "item.url", "reads": ["item.url"]}


FLOWS = "tests.pipelines.flows"


def test_validate_register_and_show_take_a_python_pipeline_or_a_registered_name(cli: Cli) -> None:
    for attr, name in (("review", "py-review"), ("short", "py-short")):
        run = cli("pipeline", "validate", f"{FLOWS}:{attr}", "--app", APP)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"{name} 1  valid against app 'orchestration'")
    assert "input_schema task" in cli("pipeline", "validate", f"{FLOWS}:review", "--app", APP).stdout

    unregistered = cli("pipeline", "show", f"{FLOWS}:review", "--app", APP)
    assert unregistered.returncode == 0, unregistered.stderr
    assert "not registered" in unregistered.stdout.splitlines()[0]
    done = cli("pipeline", "register", f"{FLOWS}:review", "--app", APP, "--json")
    assert done.returncode == 0, done.stderr
    digest = json.loads(done.stdout)["digest"]
    shown = json.loads(cli("pipeline", "show", f"{FLOWS}:review", "--app", APP, "--json").stdout)
    assert (shown["digest"], shown["registered"], shown["newest"]) == (digest, True, True)
    assert "the newest registered version" in cli("pipeline", "show", f"{FLOWS}:review", "--app", APP).stdout
    by_name = cli("pipeline", "validate", "py-review", "--app", APP, "--json")  # the registered one, checked again
    assert by_name.returncode == 0, by_name.stderr
    assert json.loads(by_name.stdout)["digest"] == digest


def test_a_bad_python_pipeline_says_what_is_wrong_and_exits_2(cli: Cli) -> None:
    for source, says in [
        ("tests.pipelines.nope:review", "tests.pipelines.nope:review: cannot import module 'tests.pipelines.nope'"),
        (f"{FLOWS}:missing", f"{FLOWS}:missing: module '{FLOWS}' has no attribute 'missing'; its pipelines: "
                             "mistyped, review, short"),
        ("tests.pipelines.flows_broken:review", "tests.pipelines.flows_broken:review: importing module "
                                                 "'tests.pipelines.flows_broken' failed: ConfigError: pipeline "
                                                 "'broken' is invalid:"),
        (f"{FLOWS}:NOT_A_PIPELINE", f"{FLOWS}:NOT_A_PIPELINE is a str, not a Pipeline builder or a PipelineSpec"),
        (APP, f"{APP} is a App, not a Pipeline builder or a PipelineSpec (an app: run one of its pipelines"),
        (f"{FLOWS}:mistyped", f"{FLOWS}:mistyped: steps.1.input.sumary: step 'coder': input field 'sumary' is not a "
                              "field of ResearchResult (the input of agent 'coder'); its fields: summary, sources, "
                              "confidence"),
    ]:
        for command in (("pipeline", "validate"), ("pipeline", "register"), ("pipeline", "show"), ("run",)):
            run = cli(*command, source, "--app", APP, *(("--input", "{}") if command == ("run",) else ()))
            assert run.returncode == 2, (command, source, run.stdout)
            assert says in " ".join(run.stderr.split()), (command, source, run.stderr)


def test_mesh_run_a_file_says_it_registered_it_and_refuses_to_replace_another_version(cli: Cli,
                                                                                    tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(Path(ISSUE_FILE).read_text())
    task = '{"goal": "ship it"}'
    first = cli("run", str(path), "--app", APP, "--input", task, "--json")
    assert first.returncode == 0, first.stderr
    registered = json.loads(first.stdout)["registration"]
    assert registered["registered"] == "new" and registered["name"] == "multi-agent-orchestration"
    again = cli("run", str(path), "--app", APP, "--input", task)
    assert again.returncode == 0, again.stderr
    assert again.stderr.startswith("already registered: multi-agent-orchestration 1.0.0  digest "
                                   f"{registered['digest'][:12]}")
    assert len(json.loads(cli("pipeline", "show", "multi-agent-orchestration", "--json").stdout)["versions"]) == 1

    path.write_text(path.read_text().replace("ttl_minutes: 60", "ttl_minutes: 90"))
    refused = cli("run", str(path), "--app", APP, "--input", task)
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr  # one line, whatever the width
    assert refused.stderr.startswith("error: pipeline 'multi-agent-orchestration' is registered as another version "
                                     f"(digest {registered['digest'][:12]}; ")
    assert "run with --register to register" in refused.stderr
    assert json.loads(cli("pipeline", "show", "multi-agent-orchestration", "--json").stdout)["digest"] == \
        registered["digest"]
    replaced = cli("run", str(path), "--app", APP, "--input", task, "--register")
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stderr.startswith("registered as the newest version: multi-agent-orchestration 1.0.0")
    assert f"(was {registered['digest'][:12]})" in replaced.stderr
    assert len(replaced.stdout.split()) == 1  # stdout: the job id alone

    py = cli("run", f"{FLOWS}:short", "--app", APP, "--input", task, "--json")
    assert py.returncode == 0, py.stderr
    assert json.loads(py.stdout)["registration"]["name"] == "py-short"


def test_mesh_run_checks_the_input_against_input_schema_and_each_roots_built_input(cli: Cli) -> None:
    # a root with input: is given what its fields build, not the run's input as it is
    ok = cli("run", f"{FLOWS}:short", "--app", APP, "--input", '{"goal": "g", "note": "not a Task field"}')
    assert ok.returncode == 0, ok.stderr
    bad = cli("run", f"{FLOWS}:short", "--app", APP, "--input", '{"goal": ["not", "text"]}')
    assert bad.returncode == 2
    assert "step researcher: invalid researcher input: goal: Input should be a valid string" in bad.stderr
    typed = cli("run", f"{FLOWS}:review", "--app", APP, "--input", '{"goal": "g", "count": "many"}')
    assert typed.returncode == 2
    assert "invalid pipeline 'py-review' input: count: Input should be a valid integer" in typed.stderr
