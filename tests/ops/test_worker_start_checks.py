"""``mesh worker --app`` refuses, at start, a deployment mistake that would fail every call: an agent
naming an undeclared tool, a tool naming an undeclared one to undo its calls, a secret of a tool it
calls that is not set. One line naming what is wrong, exit 2, no traceback, nothing served; a client
sending to the agent needs none of it (only the worker serving the agent reads its tools' secrets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh import MeshClient
from mesh.contracts import ConfigError
from mesh.ops.worker import check_served
from tests.apps import misdeclared

MISTAKES = [
    ("no_tool", "error: agent 'triage' names undeclared tools ['lookup_ticket']; tools are none"),
    ("no_undo", "error: tool 'book' names undeclared tool 'unbook' as compensate=; tools are ['book']"),
    ("needs_secret", "error: agent 'reader' calls tool 'fetch_ticket': secret MISDECLARED_TOKEN is not set "
                     "(environment or MESH_SECRETS_DIR)"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("attr", "line"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_worker_refuses_a_mistake_of_its_app_at_start_in_one_line(cli_process: Any, attr: str,
                                                                    line: str) -> None:
    # A worker that started anyway serves until stopped: the timeout is the old behaviour's failure.
    done = cli_process("worker", "--app", f"tests.apps.misdeclared:{attr}", timeout=30)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert [ln for ln in done.stderr.splitlines() if ln.strip()] == [line]


@pytest.mark.slow
def test_several_processes_are_refused_once_before_any_starts(cli_process: Any) -> None:
    done = cli_process("worker", "--app", "tests.apps.misdeclared:needs_secret", "--processes", "2", timeout=30)
    assert done.returncode == 2
    assert [ln for ln in done.stderr.splitlines() if ln.strip()] == [MISTAKES[2][1]]


def test_only_the_secrets_of_the_tools_the_served_agents_call_are_needed(settings: Any, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MISDECLARED_TOKEN", raising=False)
    check_served(misdeclared.needs_secret, ["plain"], settings)  # calls no tool: needs no secret
    with pytest.raises(ConfigError, match="secret MISDECLARED_TOKEN is not set"):
        check_served(misdeclared.needs_secret, None, settings)
    (tmp_path / "MISDECLARED_TOKEN").write_text("a-long-enough-token\n")
    check_served(misdeclared.needs_secret, None, settings.model_copy(update={"secrets_dir": str(tmp_path)}))
    (tmp_path / "MISDECLARED_TOKEN").write_text("short")
    with pytest.raises(ConfigError, match="'fetch_ticket': MISDECLARED_TOKEN is 5 characters long"):
        check_served(misdeclared.needs_secret, None, settings.model_copy(update={"secrets_dir": str(tmp_path)}))


def test_a_client_sends_to_the_agent_without_its_tools_secrets(settings: Any, rclient: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MISDECLARED_TOKEN", raising=False)
    client = MeshClient(settings, client=rclient, app=misdeclared.needs_secret)
    ref = client.send("reader", {"text": "hi"})
    assert client.status(ref.id).steps["reader"].input == {"text": "hi"}
