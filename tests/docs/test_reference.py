"""The generated reference covers the whole public surface: every ``mesh`` command and option has
help text (the CLI page is made of it), every setting a description (the settings page), and
every name ``mesh`` exports is on the Python API page."""

from __future__ import annotations

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


def test_every_public_name_is_on_the_python_api_page() -> None:
    page = (ROOT / "docs/reference/python-api.md").read_text(encoding="utf-8")
    for name in mesh.__all__:
        assert f"`{name}" in page and f"::: mesh.{name}" in page, f"mesh.{name} is not documented"
