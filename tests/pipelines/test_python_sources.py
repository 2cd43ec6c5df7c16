"""A Python pipeline (``module:attribute``) that does not hold says so one line per error, each
naming the source, as a file's errors name FILE:LINE; ``validate --json`` says so as JSON, as it
does for a file."""

from __future__ import annotations

import json
from collections.abc import Callable
from subprocess import CompletedProcess

import pytest

Cli = Callable[..., CompletedProcess[str]]
APP = "tests.pipelines.agents:app"


@pytest.mark.parametrize(("source", "says"), [
    ("tests.pipelines.flows_unbuilt:twice", [
        "pipeline 'py-twice' is invalid:",
        "step 'coder': timeout_ms: Input should be greater than 0"]),
    ("tests.pipelines.flows_broken:review", [
        "importing module 'tests.pipelines.flows_broken' failed: ConfigError: pipeline 'broken' is invalid:",
        "steps.0.id: step 'nobody' runs agent 'nobody', which app 'broken' does not declare; its agents are none"]),
])
def test_each_error_of_a_python_pipeline_is_one_line_naming_the_source(cli: Cli, source: str,
                                                                       says: list[str]) -> None:
    for command in (("pipeline", "validate"), ("run",)):
        run = cli(*command, source, "--app", APP, *(("--input", "{}") if command == ("run",) else ()))
        assert run.returncode == 2, run.stdout
        assert run.stderr.splitlines() == [f"{source}: {line}" for line in says], run.stderr


def test_validate_json_says_a_python_or_registered_pipeline_is_invalid_as_it_does_a_files(cli: Cli) -> None:
    source = "tests.pipelines.flows:mistyped"
    run = cli("pipeline", "validate", source, "--app", APP, "--json")
    assert run.returncode == 2
    said = json.loads(run.stdout)
    assert (said["valid"], said["file"], said["app"]) == (False, source, "orchestration")
    assert [e["message"] for e in said["errors"]] == [
        "steps.1.input.sumary: step 'coder': input field 'sumary' is not a field of ResearchResult (the input of "
        "agent 'coder'); its fields: summary, sources, confidence",
        "steps.1.input: step 'coder': input gives no 'summary', which ResearchResult (the input of agent 'coder') "
        "requires"]
    assert {(e["file"], e["line"]) for e in said["errors"]} == {(source, None)}
    unknown = cli("pipeline", "validate", "nothing_registered", "--json")
    assert unknown.returncode == 2 and json.loads(unknown.stdout)["valid"] is False


def test_an_app_whose_module_fails_on_import_is_a_bad_app_option(cli: Cli) -> None:
    for command in (("pipeline", "validate", "agents/builtin.yaml"), ("run", "agents/builtin.yaml", "--input", "{}")):
        run = cli(*command, "--app", "tests.pipelines.app_raises")
        assert run.returncode == 2, run.stderr  # bad input, not 1 (a job that did not succeed)
        said = " ".join(run.stderr.replace("│", " ").split())
        assert "Invalid value for --app: importing app module 'tests.pipelines.app_raises' failed: RuntimeError: " \
               "MY_APP_TOKEN is not set" in said and "Traceback" not in run.stderr
