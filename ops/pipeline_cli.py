"""``mesh pipeline``: check pipeline files against the app whose agents they name."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from mesh.contracts import ConfigError
from mesh.ops import console as base

pipeline_app = typer.Typer(help="Declared pipelines: validate a file.", no_args_is_help=True)

AppPath = Annotated[str | None, typer.Option("--app", help="The app whose agents the file names, as "
                                             "module[:attribute] (default: the built-in planner, researcher and "
                                             "executor).", show_default=False)]


@pipeline_app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="The pipeline's YAML file.", dir_okay=False)],
    app_path: AppPath = None,
    as_json: base.JsonFlag = False,
) -> None:
    """Load FILE and check it against the app: keys and types, the depends_on DAG, agents, output
    schemas and every expression. Exit 0 with a summary; exit 2 with one FILE:LINE: error per line."""
    from mesh.agents.pipelines import PipelineError, load_pipeline

    mesh_app = _app(app_path)
    try:
        spec = load_pipeline(file, mesh_app)
    except PipelineError as exc:
        if as_json:
            base.emit_json({"valid": False, "file": str(file), "app": mesh_app.name, "errors": [
                {"file": e.file, "line": e.line, "message": e.message} for e in exc.errors]})
        else:
            for error in exc.errors:
                base.err.print(Text(str(error)), highlight=False)
        raise typer.Exit(base.EXIT_INPUT) from None
    summary = _summary(spec)
    if as_json:
        base.emit_json({"valid": True, "file": str(file), "app": mesh_app.name, **summary})
        return
    base.out.print(Text.assemble((f"{spec.name} ", "bold"), f"{spec.version}  valid against app {mesh_app.name!r}  "
                                 f"digest {summary['digest'][:12]}"), highlight=False)
    base.out.print(Text(f"order: {' → '.join(summary['order'])}   roots: {', '.join(summary['roots'])}"),
                   highlight=False)
    for line in _lines(summary["steps"]):
        base.out.print(line, highlight=False)


def _app(path: str | None) -> Any:
    from mesh.agents.app import load_app
    from mesh.agents.builtin import app as builtin

    if path is None:
        return builtin
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `mesh worker --app`: the app is found from here
    try:
        return load_app(path)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--app") from None


def _summary(spec: Any) -> dict[str, Any]:
    from mesh.agents.pipelines import order, roots

    steps = []
    for s in spec.steps:
        steps.append({
            "id": s.id, "agent": s.agent_name, "depends_on": list(s.depends_on), "output_schema": s.output_schema,
            "failure_mode": s.failure_mode.value, "requires_human_approval": s.requires_human_approval,
            **{name: {"source": e.source, "cel": e.cel, "reads": [".".join(p) for p in e.paths]}
               for name in ("gate", "when", "idempotency_key", "for_each") if (e := getattr(s, name)) is not None},
        })
    return {"name": spec.name, "version": spec.version, "digest": spec.digest(), "order": order(spec),
            "roots": roots(spec), "steps": steps,
            "gates": {s.id: s.gate.cel for s in spec.steps if s.gate is not None}}


def _lines(steps: list[dict[str, Any]]) -> list[Text]:
    """One line per step, nothing cut: ids, agents and schemas are what the file says."""
    width = max(len(s["id"]) for s in steps)
    out = []
    for s in steps:
        parts = [f"{s['id']:<{width}}", f"agent {s['agent']}"]
        if s["depends_on"]:
            parts.append(f"after {', '.join(s['depends_on'])}")
        if s["output_schema"]:
            parts.append(f"output {s['output_schema']}")
        parts += [f"{k}: {s[k]['cel']}" for k in ("for_each", "when") if k in s]
        if "idempotency_key" in s:
            parts.append(f"key: {s['idempotency_key']['source']}")
        if "gate" in s:
            parts.append(f"gate: {s['gate']['cel']} (false: {s['failure_mode']})")
        if s["requires_human_approval"]:
            parts.append("awaits approval")
        out.append(Text("  " + "  ".join(parts)))
    return out
