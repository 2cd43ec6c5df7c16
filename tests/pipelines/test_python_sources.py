"""A Python pipeline (``module:attribute``) that does not hold says so one line per error, each
naming the source, as a file's errors name FILE:LINE."""

from __future__ import annotations

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
