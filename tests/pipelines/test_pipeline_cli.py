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
