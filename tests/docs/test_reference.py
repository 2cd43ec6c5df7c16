"""The generated reference covers the whole public surface: every ``mesh`` command and option has
help text (the CLI page is made of it), every setting a description (the settings page), and
every name ``mesh`` exports is on the Python API page."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import typer

import mesh
from mesh.broker.settings import ENV_PREFIX, MeshSettings
from mesh.ops import docs_reference
from mesh.ops.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _commands(group: Any, path: str = "mesh") -> list[tuple[str, Any]]:
    found = []
    for name, command in group.commands.items():
        found.append((f"{path} {name}", command))
        if hasattr(command, "commands"):
            found.extend(_commands(command, f"{path} {name}"))
    return found


def test_every_command_and_option_has_help_and_is_on_the_cli_page() -> None:
    page = docs_reference.cli_markdown()
    commands = _commands(typer.main.get_command(app))
    assert len(commands) > 30
    for path, command in commands:
        assert command.help, f"`{path}` has no help text"
        assert f"## `{path}`" in page, f"`{path}` is missing from the CLI reference"
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            assert getattr(param, "help", None), f"`{path}` {param.name}: no help text"


def test_every_setting_has_a_description_and_is_on_the_settings_page() -> None:
    page = docs_reference.settings_markdown()
    for name, field in MeshSettings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        assert field.description, f"{env} has no description"
        assert f"| `{env}` |" in page


def test_the_hook_fills_the_marked_pages_only() -> None:
    filled = docs_reference.on_page_markdown(f"# x\n\n{docs_reference.CLI_MARKER}\n")
    assert "## `mesh dlq replay`" in filled and docs_reference.CLI_MARKER not in filled
    assert docs_reference.on_page_markdown("# plain page\n") == "# plain page\n"
    for marker in (docs_reference.CLI_MARKER, docs_reference.SETTINGS_MARKER, docs_reference.KEYS_MARKER):
        assert any(marker in p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md")), marker


def _documented_names(page: str) -> list[str]:
    """The names the Python API page's "Names of `mesh`" tables list: each row's first cell, up to
    its call (`App(name)` is `App`)."""
    section = page[page.index("## Names of `mesh`"):]
    section = section[:section.index("\n## ", 1)]
    return [re.match(r"`(\w+)", line.split("|")[1].strip()).group(1)  # type: ignore[union-attr]
            for line in section.split("\n") if line.startswith("| `")]


def test_mesh_all_is_exactly_what_the_python_api_page_lists() -> None:
    """An app is told to raise PermanentFailure: every name it needs is a public name of `mesh`,
    listed (once) on the reference page, given its docstrings there, and importable."""
    page = (ROOT / "docs/reference/python-api.md").read_text(encoding="utf-8")
    listed = _documented_names(page)
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(n for n in listed if listed.count(n) > 1)}"
    assert sorted(listed) == sorted(mesh.__all__), (
        f"on the page, not in mesh.__all__: {sorted(set(listed) - set(mesh.__all__))}; "
        f"in mesh.__all__, not on the page: {sorted(set(mesh.__all__) - set(listed))}")
    directives = set(re.findall(r"^::: mesh\.(\w+)$", page, re.MULTILINE))
    assert directives == set(mesh.__all__), f"::: mesh.NAME differs by {sorted(directives ^ set(mesh.__all__))}"
    imported: dict[str, object] = {}
    exec("from mesh import *", imported)  # what `from mesh import *` gives an app
    assert set(mesh.__all__) <= set(imported)
    for name in ("PermanentFailure", "RateLimited", "Brownout", "EffectUnknown", "EffectRefuted", "AlreadyDecided",
                 "JobRecord", "StepRecord", "Pipeline", "load_pipeline", "JobNotFound"):
        assert name in mesh.__all__, f"mesh.{name} is not public"
    assert issubclass(mesh.PermanentFailure, mesh.MeshError) and issubclass(mesh.AlreadyDecided, mesh.MeshError)


def test_mesh_testing_all_is_exactly_what_the_python_api_page_lists() -> None:
    """The test seam an app's tests import: every public name listed (once), documented and importable."""
    import mesh.testing

    page = (ROOT / "docs/reference/python-api.md").read_text(encoding="utf-8")
    section = page[page.index("## Names of `mesh.testing`"):]
    section = section[:section.index("\n## ", 1)]
    listed = [re.match(r"`(\w+)", line.split("|")[1].strip()).group(1)  # type: ignore[union-attr]
              for line in section.split("\n") if line.startswith("| `")]
    assert sorted(listed) == sorted(mesh.testing.__all__) and len(listed) == len(set(listed))
    directives = re.findall(r"^::: mesh\.testing\.(\w+)$", page, re.MULTILINE)
    assert sorted(directives) == sorted(mesh.testing.__all__)
    assert all(hasattr(mesh.testing, name) for name in mesh.testing.__all__)


def _keys(model: Any, prefix: str) -> list[str]:
    """Every key a pipeline file may hold under ``model``, dotted, nested models followed."""
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        types = typing.get_args(field.annotation) or (field.annotation,)
        nested = [t for t in types if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            keys.extend(_keys(nested[0], f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def test_every_pipeline_key_is_on_the_pipeline_keys_page() -> None:
    """The keys page is written by hand (each key needs its why); it must not miss one the spec has."""
    from mesh.agents.pipelines import PipelineSpec, StepSpec

    page = (ROOT / "docs/reference/pipeline-keys.md").read_text(encoding="utf-8")
    documented = set()
    for cell in (line.split("|")[1] for line in page.split("\n") if line.startswith("| `")):
        names = [n.removeprefix("…").rstrip(":") for n in re.findall(r"`([^`]+)`", cell)]
        parent = names[0].rpartition(".")[0]  # `tracing.log_inputs` / `log_outputs`
        documented.update(n if "." in n or not parent else f"{parent}.{n}" for n in names)
    steps = _keys(StepSpec, "")
    spec = [k for k in _keys(PipelineSpec, "") if not k.startswith("steps")]  # the steps: StepSpec
    missing = sorted(set(steps + spec + ["agents"]) - documented)
    assert not missing, f"pipeline keys missing from docs/reference/pipeline-keys.md: {missing}"


def test_every_option_of_app_agent_and_app_tool_is_in_the_guide() -> None:
    """The guide's option tables of ``@app.agent`` and ``@app.tool`` name every keyword they take."""
    import inspect

    page = (ROOT / "docs/guides/agents-and-tools.md").read_text(encoding="utf-8")
    for decorator in (mesh.App.agent, mesh.App.tool):
        table = page[page.index(f"| `@app.{decorator.__name__}(...)` |"):]
        table = table[:table.index("\n\n")]
        for name in inspect.signature(decorator).parameters:
            if name not in ("self", "fn"):
                assert f"`{name}`" in table, f"@app.{decorator.__name__}({name}=...) is not in the guide's table"
