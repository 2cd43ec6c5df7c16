"""Data is never read as rich markup: a key, a tool name or an operator's argument holding ``[/bold]``,
``[red]...[/red]`` or ``[link=...]`` is printed as it is by the real ``mesh`` commands (an unmatched
closing tag would raise ``MarkupError`` once the command's work is done; a tag would restyle the line)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import mesh_env

from mesh.agents.tools.pins import Definition, Pins
from mesh.broker import MeshClient
from mesh.broker.settings import MeshSettings
from mesh.contracts.errors import ToolRefused
from tests.agents.openai_server import FakeOpenAI, completion, default_responder
from tests.httpserver import RecordingServer

MARKUP = "x [/bold] [red]y[/red] [link=http://e]z[/link]"


def test_mesh_send_prints_a_markup_like_key_as_given(client: MeshClient, cli):
    done = cli("send", "executor", "--payload", json.dumps({"tool": "note", "args": {"title": "t"}}), "--key", MARKUP)
    assert done.returncode == 0, done.stderr + done.stdout
    assert f"  key={MARKUP}" in done.stdout, done.stdout
    assert "sent 1 message(s) to executor" in done.stderr


def test_mesh_tools_diff_prints_a_markup_like_tool_argument_as_given(client: MeshClient, cli):
    done = cli("tools", "diff", MARKUP)
    assert done.returncode == 0, done.stderr + done.stdout
    assert f"no changes waiting for {MARKUP}: every server presents its pinned tools" in done.stdout, done.stdout


def test_mesh_tools_accept_prints_a_markup_like_tool_name_as_given(client: MeshClient, cli):
    tool = f"srv.{MARKUP}"  # as a server names it
    pins = Pins(client.redis, client.keys)
    pins.check(tool, Definition(name=MARKUP, description="first", input_schema={"type": "object"}))
    with pytest.raises(ToolRefused):  # refused until accepted
        pins.check(tool, Definition(name=MARKUP, description="changed", input_schema={"type": "object"}))
    assert [d.tool for d in pins.drifts()] == [tool]

    done = cli("tools", "accept", tool)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.startswith(f"{tool}: accepted sha256 "), done.stdout
    assert pins.pinned()[tool].description == "changed"


def demo(settings: MeshSettings, goal: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``mesh demo`` as a process (it starts its own workers), on this test's namespace."""
    return subprocess.run([sys.executable, "-m", "mesh.ops.cli", "demo", "--goal", goal, "--timeout", "60"],
                          env=mesh_env(settings, COLUMNS="200", **env), capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_mesh_demo_prints_a_markup_like_step_error_as_given(settings: MeshSettings):
    """A dependency's words in a step's error (here where it redirects to) are shown as they are."""
    where = f"http://e/{MARKUP}"
    with RecordingServer(lambda _n, _request: (302, {}, {"Location": where})) as server:
        done = demo(settings, f"post the summary to {server.url('/orders')}", MESH_HTTP_ALLOW=server.host_port)

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stdout + done.stderr  # the job did not succeed: its step is dead-lettered
    assert f"dead_lettered ({server.host_port} answered 302 redirecting to {where}: redirects are not followed)" \
        in done.stdout, done.stdout


@pytest.mark.slow
def test_mesh_demo_prints_a_markup_like_source_a_model_cites_as_given(settings: MeshSettings):
    """A model's output (the source a finding cites) is data: shown as the model gave it."""
    def cites_markup(request: dict[str, Any]) -> Any:
        status, body, headers = default_responder(request)
        answer = json.loads(body["choices"][0]["message"]["content"])
        if "findings" in answer:
            answer["findings"][0]["source"] = MARKUP
            body = completion(json.dumps(answer), model=request.get("model", "fake-model"))
        return status, body, headers

    with FakeOpenAI(cites_markup) as api:
        done = demo(settings, "summarise the release", MESH_MODEL_PROVIDER="openai", MESH_MODEL_URL=api.url,
                    MESH_MODEL_API_KEY="sk-test-key", MESH_MODEL_NAME="gpt-test")

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"  r1 cites {MARKUP}\n" in done.stdout, done.stdout
