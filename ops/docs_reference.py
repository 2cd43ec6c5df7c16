"""Reference pages made from the code when the documentation site is built.

``mkdocs.yml`` loads this module as a hook: a page holding the line ``<!-- generated: cli -->`` gets
every ``mesh`` command (from the typer app: usage, help, every argument and option), one holding
``<!-- generated: settings -->`` every ``MESH_*`` setting (from :class:`MeshSettings`: type, default,
description), one holding ``<!-- generated: keys -->`` the Redis key layout (the docstring of
``mesh.broker.keys``, where it is written once). The pages cannot drift from ``mesh --help`` or
the settings model: they are made from them on every build.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from pydantic.fields import FieldInfo

CLI_MARKER = "<!-- generated: cli -->"
SETTINGS_MARKER = "<!-- generated: settings -->"
KEYS_MARKER = "<!-- generated: keys -->"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _commands(group: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    """Every command under ``group`` with its path, depth first in the order ``--help`` lists them."""
    import click

    found: list[tuple[tuple[str, ...], Any]] = []
    for name in group.list_commands(click.Context(group)):
        command = group.commands[name]
        if getattr(command, "hidden", False):
            continue
        found.append(((*path, name), command))
        if hasattr(command, "commands"):
            found.extend(_commands(command, (*path, name)))
    return found


def _command_markdown(path: tuple[str, ...], command: Any, context_class: Any) -> str:
    """One command's section: usage, its help and epilog, a table of its parameters."""
    ctx = context_class(command, info_name="mesh " + " ".join(path))
    usage = command.get_usage(ctx).removeprefix("Usage: ")
    lines = [f"## `mesh {' '.join(path)}`", "", f"`{usage}`", ""]
    if command.help:
        lines += [_paragraphs(command.help), ""]
    if hasattr(command, "commands"):
        subs = ", ".join(f"[`{n}`](#mesh-{'-'.join(path)}-{n})" for n in command.commands)
        lines += [f"Commands: {subs}.", ""]
    records = [p.get_help_record(ctx) for p in command.params]
    rows = [r for r in records if r is not None]
    if rows:
        lines += ["| argument or option | meaning |", "| --- | --- |"]
        lines += [f"| `{_cell(opts)}` | {_cell(help_)} |" for opts, help_ in rows]
        lines.append("")
    if command.epilog:
        lines += [_paragraphs(command.epilog), ""]
    return "\n".join(lines)


def _paragraphs(text: str) -> str:
    """A docstring's paragraphs as Markdown: lines of a paragraph joined, paragraphs kept apart."""
    paras = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(p.split()) for p in paras)


def cli_markdown() -> str:
    """Every ``mesh`` command, generated from the typer app."""
    import typer

    from mesh.ops.cli import app

    root = typer.main.get_command(app)
    context_class = root.context_class
    head = [_paragraphs(root.help or ""), "", _paragraphs(root.epilog or ""), "",
            "| command | what it does |", "| --- | --- |"]
    commands = _commands(root, ())
    for path, command in commands:
        anchor = "mesh-" + "-".join(path)
        summary = _cell((command.help or "").strip().split("\n\n")[0])
        head.append(f"| [`mesh {' '.join(path)}`](#{anchor}) | {summary} |")
    body = [_command_markdown(path, command, context_class) for path, command in commands]
    return "\n".join(head) + "\n\n" + "\n".join(body)


def _default(name: str, field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default is None:
        return "unset"
    value = field.default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`" if value != "" else "empty"


def _type(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("NoneType", "None")
    text = re.sub(r"<class '([^']+)'>", r"\1", text).replace("pydantic.types.", "")
    if "Literal" in text:  # the choices, as a reader types them
        choices = " | ".join(re.findall(r"'([^']+)'", text))
        text = choices + (" | None" if "Optional" in text or "None" in text else "")
    bounds = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
    limits = [f"{sym} {getattr(m, attr)}" for m in field.metadata
              for attr, sym in bounds if getattr(m, attr, None) is not None]
    return text + (f" ({', '.join(limits)})" if limits else "")


def settings_markdown() -> str:
    """Every ``MESH_*`` setting, generated from the settings model."""
    from mesh.broker.settings import ENV_PREFIX, MeshSettings

    lines = ["| variable | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in MeshSettings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        lines.append(f"| `{env}` | {_cell(_type(field))} | {_cell(_default(name, field))} | "
                     f"{_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def keys_markdown() -> str:
    """The Redis key layout, from the module that builds every key."""
    from mesh.broker import keys

    return "```text\n" + textwrap.dedent((keys.__doc__ or "").split("\n", 2)[2]).strip("\n") + "\n```\n"


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    """The mkdocs hook: put the generated reference where a page asks for it."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_markdown())
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_markdown())
    if KEYS_MARKER in markdown:
        markdown = markdown.replace(KEYS_MARKER, keys_markdown())
    return markdown
