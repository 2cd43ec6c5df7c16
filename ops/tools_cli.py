"""``mesh tools``: the pinned definitions of MCP tools; show what a server changed, accept it."""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.text import Text

from mesh.ops.console import EXIT_FAILED, EXIT_INPUT, MARKUP, Column, JsonFlag, Listing, client, emit_json, fail, out

tools_app = typer.Typer(help="MCP tools' pinned definitions: list them, show a server's changes, accept them.",
                        rich_markup_mode=MARKUP, epilog="Examples: `mesh tools`, `mesh tools diff`, "
                        "`mesh tools accept github.search_issues`")

ToolArg = Annotated[str, typer.Argument(help="The declared tool (server.tool).", metavar="TOOL", show_default=False)]


def _pins() -> Any:
    from mesh.agents.tools.pins import Pins

    c = client()
    return Pins(c.redis, c.keys)


@tools_app.callback(invoke_without_command=True)
def tools_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List every pinned MCP tool: its sha256 and whether its server now presents another definition."""
    if ctx.invoked_subcommand is not None:
        return
    pins = _pins()
    pinned = pins.pinned()
    drifted = {d.tool: d for d in pins.drifts()}
    if as_json:
        emit_json([{"tool": tool, "sha256": d.digest, "changed": drifted[tool].changed if tool in drifted else [],
                    **asdict(d)} for tool, d in pinned.items()])
        return
    if not pinned:
        out.print("no pinned tools yet: a worker pins an MCP server's allowed tools when it first sees them")
        return
    rows = [(tool, d.digest[:12], ", ".join(drifted[tool].changed) if tool in drifted else "-")
            for tool, d in pinned.items()]
    out.print(Listing((Column("tool", key=True), Column("sha256"), Column("changed (refused)", wrap=True)), rows))


@tools_app.command("diff")
def tools_diff(tool: Annotated[str | None, typer.Argument(help="Only this tool (server.tool).", metavar="[TOOL]",
                                                          show_default=False)] = None,
               as_json: JsonFlag = False) -> None:
    """Show each refused tool's pinned definition against the one its server presents now."""
    drifts = [d for d in _pins().drifts() if tool is None or d.tool == tool]
    if as_json:
        emit_json([{"tool": d.tool, "changed": d.changed, "pinned": {**asdict(d.pinned), "sha256": d.pinned.digest},
                    "presented": {**asdict(d.presented), "sha256": d.presented.digest}} for d in drifts])
        return
    if not drifts:
        out.print(f"no changes waiting{f' for {tool}' if tool else ''}: every server presents its pinned tools",
                  markup=False)
        return
    for d in drifts:
        out.print(Text(f"{d.tool}: {', '.join(d.changed)} changed (pinned {d.pinned.digest[:12]}, presented "
                       f"{d.presented.digest[:12]}); refused until accepted"), soft_wrap=False)
        before = json.dumps(asdict(d.pinned), indent=2, sort_keys=True).splitlines()
        after = json.dumps(asdict(d.presented), indent=2, sort_keys=True).splitlines()
        for line in difflib.unified_diff(before, after, "pinned", "presented", lineterm="", n=1):
            out.print(Text(line), soft_wrap=False)


@tools_app.command("accept")
def tools_accept(tool: ToolArg, as_json: JsonFlag = False) -> None:
    """Accept what TOOL's server presents now: it becomes the pin, and the tool is called again."""
    pins = _pins()
    if tool not in pins.pinned():
        fail(f"no pinned tool {tool!r}; `mesh tools` lists them", EXIT_INPUT)
    accepted = pins.accept(tool)
    if accepted is None:
        fail(f"{tool} has no change waiting: its server presents its pinned definition", EXIT_FAILED)
    if as_json:
        emit_json({"tool": tool, "sha256": accepted.digest, **asdict(accepted)})
        return
    out.print(f"{tool}: accepted sha256 {accepted.digest[:12]}", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``mesh tools`` to ``app``."""
    app.add_typer(tools_app, name="tools")
