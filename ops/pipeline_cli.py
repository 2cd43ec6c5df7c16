"""``mesh pipeline``: check pipeline files against the app whose agents they name, register them by
name and content digest, list and show what is registered."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from mesh.ops import console as base

pipeline_app = typer.Typer(help="Declared pipelines: validate a file, register it, list and show what is registered.",
                           no_args_is_help=True)

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

    mesh_app = base.app_for(app_path)
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


@pipeline_app.command()
def register(
    file: Annotated[Path, typer.Argument(help="The pipeline's YAML file.", dir_okay=False)],
    app_path: AppPath = None,
    as_json: base.JsonFlag = False,
) -> None:
    """Load FILE, check it against the app, and register it by name and content digest as the newest
    version: `mesh run NAME` takes it; running jobs keep the version they started with."""
    _, spec = resolve_pipeline(str(file), app_path, must_be_file=True)
    digest = base.client().register(spec)
    if as_json:
        base.emit_json({"name": spec.name, "version": spec.version, "digest": digest})
        return
    base.out.print(Text(f"registered {spec.name} {spec.version}  digest {digest[:12]}"), highlight=False)


@pipeline_app.command("list")
def list_(as_json: base.JsonFlag = False) -> None:
    """Every registered pipeline: its newest version and digest, and how many versions are kept."""
    from mesh.agents.pipelines.engine import spec_from_json

    c = base.client()
    rows: list[dict[str, Any]] = []
    for name in c.pipelines.names():
        latest, versions = c.pipelines.versions(name)
        newest = versions.get(latest or "")
        spec = spec_from_json(newest) if newest is not None else None
        rows.append({"name": name, "version": spec.version if spec else None, "digest": latest,
                     "steps": len(spec.steps) if spec else 0, "versions": len(versions)})
    if as_json:
        base.emit_json(rows)
        return
    if not rows:
        base.err.print("no pipelines registered (mesh pipeline register FILE, or mesh run FILE)")
        return
    columns = (base.Column("name", key=True), base.Column("version"), base.Column("digest"), base.Column("steps"),
               base.Column("versions"))
    base.out.print(base.Listing(columns, [(str(r["name"]), str(r["version"]), str(r["digest"] or "")[:12],
                                           str(r["steps"]), str(r["versions"])) for r in rows]))


@pipeline_app.command()
def show(
    name: Annotated[str, typer.Argument(help="A registered pipeline's name.", show_default=False)],
    as_json: base.JsonFlag = False,
) -> None:
    """The newest registered version of NAME: its steps, their order, gates and policies."""
    from mesh.agents.pipelines.engine import spec_from_json
    from mesh.broker.pipelines import PipelineNotFound

    c = base.client()
    try:
        digest, data = c.pipelines.get(name)
    except PipelineNotFound as exc:
        base.fail(str(exc), base.EXIT_INPUT)
    spec = spec_from_json(data)
    summary = _summary(spec)
    _, versions = c.pipelines.versions(name)
    if as_json:
        base.emit_json({**summary, "versions": sorted(versions), "spec": data})
        return
    base.out.print(Text.assemble((f"{spec.name} ", "bold"), f"{spec.version}  digest {digest[:12]}  "
                                 f"({len(versions)} version(s) registered)"), highlight=False)
    if spec.description:
        base.out.print(Text(spec.description), highlight=False)
    base.out.print(Text(f"order: {' → '.join(summary['order'])}   roots: {', '.join(summary['roots'])}"),
                   highlight=False)
    for line in _lines(summary["steps"]):
        base.out.print(line, highlight=False)


def resolve_pipeline(name_or_file: str, app_path: str | None, *, must_be_file: bool = False) -> tuple[Any, Any]:
    """(the app, the spec loaded from the file) when ``name_or_file`` is a file (exit 2 with FILE:LINE
    errors if it does not load); (the app, None) for a name to look up when run."""
    from mesh.agents.pipelines import PipelineError, load_pipeline

    mesh_app = base.app_for(app_path)
    path = Path(name_or_file)
    if not must_be_file and not path.is_file() and path.suffix not in (".yaml", ".yml"):
        return mesh_app, None
    try:
        return mesh_app, load_pipeline(path, mesh_app)
    except PipelineError as exc:
        for error in exc.errors:
            base.err.print(Text(str(error)), highlight=False)
        raise typer.Exit(base.EXIT_INPUT) from None


def _summary(spec: Any) -> dict[str, Any]:
    from mesh.agents.pipelines import order, roots

    steps = []
    for s in spec.steps:
        steps.append({
            "id": s.id, "agent": s.agent_name, "depends_on": list(s.depends_on), "output_schema": s.output_schema,
            "failure_mode": s.failure_mode.value, "requires_human_approval": s.requires_human_approval,
            **({"approval": s.approval_policy.model_dump(mode="json")} if s.approval_policy else {}),
            **{name: {"source": e.source, "cel": e.cel, "reads": [".".join(p) for p in e.paths]}
               for name in ("gate", "when", "idempotency_key", "for_each", "item_id")
               if (e := getattr(s, name)) is not None},
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
            a = s.get("approval") or {}
            parts.append(f"awaits approval ({a.get('timeout', '24h')}, then {a.get('on_timeout', 'deny')})")
        out.append(Text("  " + "  ".join(parts)))
    return out
