"""The ``mesh`` entry point as a real process: the tests run most commands in-process (the ``cli``
fixture calls ``mesh.ops.cli.invoke``), so these prove what only a process shows: the installed
console script starts, a command's exit code is the process's, and with stdin closed a command
that would ask for confirmation refuses instead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, flat, mesh_env

#: The console script pip installed next to this interpreter (pyproject.toml's [project.scripts]).
MESH = Path(sys.executable).parent / "mesh"


def test_the_mesh_console_script_answers_help_and_exits_with_the_commands_code(settings):
    def mesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(MESH), *args], env=mesh_env(settings), cwd=ROOT, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    helped = mesh("--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: mesh " in helped.stdout and "submit" in helped.stdout
    missing = mesh("status", "no-such-job")
    assert missing.returncode == 2, missing.stderr
    assert "no job no-such-job" in flat(missing.stderr) and missing.stdout == ""


def test_a_process_with_stdin_closed_refuses_to_replay_without_yes_and_exits_2(cli_process):
    res = cli_process("dlq", "replay", "--all")
    assert res.returncode == 2
    assert "add --yes to confirm (no terminal to ask on)" in flat(res.stderr)


def test_a_mesh_error_escaping_a_command_exits_2_without_a_traceback(cli_process):
    res = cli_process("send", "nosuchagent", "--payload", "{}")
    assert res.returncode == 2
    assert "unknown agent 'nosuchagent'" in flat(res.stderr) and "Traceback" not in res.stderr
