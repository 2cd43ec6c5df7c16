"""``mesh pipeline``: check pipelines (YAML files, Python ones as ``module:attribute``, registered
ones) against the app whose agents they name, register them by name and content digest, list and
show them."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.text import Text

from mesh.ops import console as base

if typing.TYPE_CHECKING:
    from mesh.agents.pipelines import PipelineError

pipeline_app = typer.Typer(help="Declared pipelines: validate a file, register it, list and show what is registered.",
                           no_args_is_help=True)

AppPath = Annotated[str | None, typer.Option("--app", help="The app whose agents the file names, as "
                                             "module[:attribute] (default: the built-in planner, researcher and "
                                             "executor).", show_default=False)]


#: A Python pipeline: ``package.module:attribute`` (a ``Pipeline`` builder or a ``PipelineSpec``).
PYTHON_PIPELINE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")

Source = Annotated[str, typer.Argument(
    help="The pipeline: its YAML file, a registered name (mesh pipeline list; an app's own pipeline with "
         "--app), or a Python pipeline as module:attribute (a Pipeline builder or a PipelineSpec, imported "
         "from the current directory as --app is).", metavar="FILE|NAME|MODULE:ATTR", show_default=False)]


@dataclass(frozen=True)
class Loaded:
    """A pipeline a command was given, loaded and checked against ``app``: ``how`` it was given
    (``file``, ``python``, ``app``: the app declares it, ``registered``), ``digest``: the newest
    registered version's when it is one."""

    app: Any
    spec: Any
    how: str
    digest: str | None = None


def kind_of(source: str) -> str:
    """How ``source`` names a pipeline: ``file`` (an existing file, or a .yaml/.yml path), ``python``
    (``module:attribute``) or ``name``."""
    path = Path(source)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return "file"
    return "python" if PYTHON_PIPELINE.match(source) else "name"


def python_pipeline(source: str) -> Any:
    """The ``PipelineSpec`` at ``module:attribute`` (a builder is built); ConfigError saying what is
    wrong: the module does not import, has no such attribute, or it is no pipeline."""
    import importlib
    import os
    import sys

    from mesh.agents.app import App
    from mesh.agents.pipelines import Pipeline, PipelineSpec
    from mesh.contracts import ConfigError

    module_name, _, attr = source.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{source}: cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # the module itself fails (an app whose pipeline does not hold, a bug)
        raise _named(source, f"importing module {module_name!r} failed: {type(exc).__name__}: ", exc) from None
    for part in attr.split("."):
        if not hasattr(found, part):
            module = importlib.import_module(module_name)
            pipelines = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline | PipelineSpec))
            raise ConfigError(f"{source}: module {module_name!r} has no attribute {attr!r}; its pipelines: "
                              f"{', '.join(pipelines) or 'none'}")
        found = getattr(found, part)
    if isinstance(found, Pipeline):
        try:
            return found.build()
        except ConfigError as exc:
            raise _named(source, "", exc) from None
    if isinstance(found, PipelineSpec):
        return found
    hint = " (an app: run one of its pipelines by name with --app, or name the pipeline itself)" \
        if isinstance(found, App) else ""
    raise ConfigError(f"{source} is a {type(found).__name__}, not a Pipeline builder or a PipelineSpec{hint}")


def _named(source: str, said: str, exc: Exception) -> Exception:
    """A ConfigError of ``exc``'s lines (a pipeline's errors, one a line), each naming ``source``."""
    from mesh.contracts import ConfigError

    first, *more = str(exc).splitlines() or [""]
    return ConfigError("\n".join([f"{source}: {said}{first}", *(f"{source}: {line.strip()}" for line in more)]))


def load(source: str, app_path: str | None, *, registered: bool = True, as_json: bool = False) -> Loaded:
    """The pipeline ``source`` names (a file, ``module:attribute``, a pipeline the app declares or,
    with ``registered``, a registered name), checked against the app. Exit 2 with one error per line
    (``FILE:LINE: message`` for a file) when it is not found or does not hold (``as_json``: as
    ``mesh pipeline validate --json`` prints them)."""
    from mesh.agents.pipelines import PipelineError, load_pipeline, problems
    from mesh.agents.pipelines.engine import spec_from_json
    from mesh.broker.pipelines import PipelineNotFound
    from mesh.contracts import ConfigError

    mesh_app = base.app_for(app_path)

    def refused(lines: list[str]) -> typing.NoReturn:
        refuse(lines, source if as_json else None, mesh_app.name)
    kind = kind_of(source)
    if kind == "file":
        try:
            return Loaded(mesh_app, load_pipeline(Path(source), mesh_app), "file")
        except PipelineError as exc:
            refused([str(e) for e in exc.errors] + ([] if as_json else without_app(exc, app_path, mesh_app.name)))
    if kind == "python":
        try:
            spec = python_pipeline(source)
        except ConfigError as exc:
            refused(str(exc).splitlines())
        how, digest = "python", None
    elif source in mesh_app.pipelines:
        spec, how, digest = mesh_app.pipelines[source], "app", None
    elif not registered:
        refused([f"{source}: no such file, and app {mesh_app.name!r} declares no pipeline of that name (give a YAML "
                 "file, module:attribute, or --app with the app that declares it)"])
    else:
        try:
            digest, data = base.client().pipelines.get(source)
        except PipelineNotFound as exc:
            refused([f"{exc} (nor a file, nor a pipeline app {mesh_app.name!r} declares; module:attribute names a "
                     "Python pipeline)"])
        spec, how = spec_from_json(data), "registered"
    found = problems(spec, mesh_app)
    if found:
        refused([f"{source}: {'.'.join(map(str, p.loc))}: {p.message}" for p in found])
    return Loaded(mesh_app, spec, how, digest)


def without_app(exc: PipelineError, app_path: str | None, app_name: str) -> list[str]:
    """The line that says why a file's agents are unknown when no ``--app`` was given: it was checked
    against the built-in app, and the user's app is named with ``--app``."""
    if app_path is not None or not any(f"which app {app_name!r} does not declare" in e.message for e in exc.errors):
        return []
    return [f"(no --app given: checked against the built-in app {app_name!r}; name the app that declares these "
            "agents with --app module[:attribute])"]


def refuse(lines: list[str], json_source: str | None = None, app_name: str = "") -> typing.NoReturn:
    """Exit 2 with one error per line on stderr; with ``json_source``, as ``--json`` (``valid: false``,
    each error's message without the source it starts with)."""
    if json_source is not None:
        base.emit_json({"valid": False, "file": json_source, "app": app_name, "errors": [
            {"file": json_source, "line": None, "message": line.removeprefix(f"{json_source}: ")} for line in lines]})
    else:
        for line in lines:
            base.err.print(Text(line), highlight=False)
    raise typer.Exit(base.EXIT_INPUT)


@pipeline_app.command()
def validate(
    source: Source,
    app_path: AppPath = None,
    as_json: base.JsonFlag = False,
) -> None:
    """Load the pipeline and check it against the app: keys and types, the depends_on DAG, agents,
    output schemas, every expression, and that each step's input fits its agent's input model. Exit 0
    with a summary; exit 2 with one error per line (FILE:LINE: for a file)."""
    from mesh.agents.pipelines import PipelineError, load_pipeline

    mesh_app = base.app_for(app_path)
    if kind_of(source) == "file":
        try:
            spec = load_pipeline(Path(source), mesh_app)
        except PipelineError as exc:
            if as_json:
                base.emit_json({"valid": False, "file": source, "app": mesh_app.name, "errors": [
                    {"file": e.file, "line": e.line, "message": e.message} for e in exc.errors]})
            else:
                for said in [str(e) for e in exc.errors] + without_app(exc, app_path, mesh_app.name):
                    base.err.print(Text(said), highlight=False)
            raise typer.Exit(base.EXIT_INPUT) from None
    else:
        spec = load(source, app_path, as_json=as_json).spec
    summary = _summary(spec)
    if as_json:
        base.emit_json({"valid": True, "file": source, "app": mesh_app.name, **summary,
                        "spec": orjson.loads(spec.canonical())})
        return
    _title(spec, f"valid against app {mesh_app.name!r}", f"digest {summary['digest'][:12]}")
    for line in [*_pipeline_lines(summary), *_lines(summary["steps"])]:
        base.out.print(line, highlight=False)


@pipeline_app.command()
def register(
    source: Source,
    app_path: AppPath = None,
    as_json: base.JsonFlag = False,
) -> None:
    """Load the pipeline (a file, module:attribute, or one the app declares), check it against the app,
    and register it by name and content digest as the newest version: `mesh run NAME` takes it;
    running jobs keep the version they started with."""
    spec = load(source, app_path, registered=False).spec
    digest = base.client().register(spec)
    if as_json:
        base.emit_json({"name": spec.name, "version": spec.version, "digest": digest})
        return
    base.out.print(Text(f"registered {spec.name} {spec.version}  digest {digest[:12]}"), highlight=False)


@pipeline_app.command("list")
def list_(wide: base.WideFlag = False, as_json: base.JsonFlag = False) -> None:
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
    cut = None if wide else 12  # the digest's start, as `mesh status` shows it; --wide: whole
    base.out.print(base.Listing(columns, [(str(r["name"]), str(r["version"]), str(r["digest"] or "")[:cut],
                                           str(r["steps"]), str(r["versions"])) for r in rows], wide=wide))


@pipeline_app.command()
def show(
    source: Source,
    app_path: AppPath = None,
    as_json: base.JsonFlag = False,
) -> None:
    """The pipeline's steps, their order, gates and policies: a registered name's newest version, or a
    file's or module:attribute's (checked against the app, and said whether it is the registered one)."""
    c = base.client()
    loaded = load(source, app_path) if kind_of(source) != "name" or source in base.app_for(app_path).pipelines \
        else None
    if loaded is None:
        from mesh.agents.pipelines.engine import spec_from_json
        from mesh.broker.pipelines import PipelineNotFound

        try:
            digest, data = c.pipelines.get(source)
        except PipelineNotFound as exc:
            base.fail(f"{exc} (nor a file, nor a pipeline the app declares)", base.EXIT_INPUT)
        spec = spec_from_json(data)
    else:
        spec, digest, data = loaded.spec, loaded.spec.digest(), orjson.loads(loaded.spec.canonical())
    summary = _summary(spec)
    latest, versions = c.pipelines.versions(spec.name)
    if as_json:
        base.emit_json({**summary, "versions": sorted(versions), "registered": digest in versions,
                        "newest": latest == digest, "spec": data})
        return
    said = f"({len(versions)} version(s) registered)" if loaded is None else (
        "the newest registered version" if latest == digest else
        "registered, not the newest" if digest in versions else "not registered")
    _title(spec, f"digest {digest[:12]}", said)
    for line in [*_pipeline_lines(summary), *_lines(summary["steps"])]:
        base.out.print(line, highlight=False)


def _title(spec: Any, *parts: str) -> None:
    """``NAME VERSION  PART  PART``, the name bold: on one line when it fits :data:`WIDTH`, else a part
    that would run past it starts a line of its own."""
    first, *rest = base.fitted([f"{spec.name} {spec.version}", *parts], width=WIDTH)
    base.out.print(Text.assemble((f"{spec.name} ", "bold"), first.removeprefix(f"{spec.name} ")), highlight=False)
    for line in rest:
        base.out.print(Text(line), highlight=False)


def resolve_pipeline(source: str, app_path: str | None) -> tuple[Any, Any]:
    """(the app, the spec) for ``mesh run``: a file or ``module:attribute`` loaded and checked (exit 2
    otherwise), a pipeline the app declares; (the app, None) for a name to look up when run."""
    if kind_of(source) == "name" and source not in base.app_for(app_path).pipelines:
        return base.app_for(app_path), None
    loaded = load(source, app_path, registered=False)
    return loaded.app, loaded.spec


def registration(c: Any, spec: Any, source: str, *, replace: bool) -> dict[str, Any]:
    """What running ``spec`` does to its name's registration, before it is run (a run registers the
    spec it runs as the newest version of its name): ``{"name", "digest", "registered": "new" |
    "already" | "replaced"}``. A name whose newest registered version is another digest is not
    replaced without ``replace`` (--register): exit 2 saying what to do."""
    latest, _ = c.pipelines.versions(spec.name)
    digest = spec.digest()
    said = "new" if latest is None else "already" if latest == digest else "replaced"
    if said == "replaced" and not replace:
        refuse_replacing(spec.name, typing.cast(str, latest), digest, source)
    return {"name": spec.name, "version": spec.version, "digest": digest, "registered": said,
            "previous": latest if said == "replaced" else None}


def refuse_replacing(name: str, latest: str, digest: str, source: str) -> typing.NoReturn:
    """Exit 2: ``source`` is not run, another version of ``name`` is registered as the newest."""
    base.fail(f"pipeline {name!r} is registered as another version (digest {latest[:12]}; {source} is "
              f"{digest[:12]}): run with --register to register {source} as its newest version, or run the "
              f"registered one: mesh run {name}", base.EXIT_INPUT)


def say_registration(done: dict[str, Any]) -> None:
    """One line (on stderr: stdout stays the job id) saying what the run did to the registration."""
    what = {"new": "registered", "already": "already registered:", "replaced": "registered as the newest version:"}
    previous = f" (was {done['previous'][:12]})" if done["previous"] else ""
    base.err.print(Text(f"{what[done['registered']]} {done['name']} {done['version']}  digest "
                        f"{done['digest'][:12]}{previous}"), highlight=False)


#: Expression keys of a step, shown with their CEL and what they read.
EXPRESSIONS = ("gate", "when", "idempotency_key", "for_each", "item_id")


def _expression(e: Any) -> dict[str, Any]:
    return {"source": e.source, "cel": e.cel, "reads": [".".join(p) for p in e.paths]}


def _summary(spec: Any) -> dict[str, Any]:
    """The whole spec, as ``--json`` prints it: every key a step sets (a key left unset is left out),
    expressions with their CEL and the fields they read, the pipeline's tracing, checkpointing and
    result, and the order and roots of its DAG."""
    from mesh.agents.pipelines import order, roots

    steps = []
    for s in spec.steps:
        step = {k: v for k, v in s.model_dump(mode="json").items() if v is not None and k != "approval"}
        step.update({
            "id": s.id, "agent": s.agent_name, "depends_on": list(s.depends_on), "output_schema": s.output_schema,
            "on_false": s.on_false.value, "requires_human_approval": s.requires_human_approval,
            **({"approval": s.approval_policy.model_dump(mode="json")} if s.approval_policy else {}),
            **{name: _expression(e) for name in EXPRESSIONS if (e := getattr(s, name)) is not None},
            **({"input": {k: _expression(e) for k, e in s.input.items()}} if s.input is not None else {}),
        })
        steps.append(step)
    return {"name": spec.name, "version": spec.version, "description": spec.description,
            "input_schema": spec.input_schema, "digest": spec.digest(),
            "order": order(spec), "roots": roots(spec), "steps": steps,
            "gates": {s.id: s.gate.cel for s in spec.steps if s.gate is not None},
            "tracing": spec.tracing.model_dump(mode="json"),
            "checkpointing": spec.checkpointing.model_dump(mode="json"),
            "result": list(spec.result) if spec.result is not None else None,
            "limits": spec.limits.model_dump(mode="json", exclude_none=True) if spec.limits is not None else None}


#: Text output fits this many columns (a part longer than a line is wrapped, never cut).
WIDTH = 80


def _ms(ms: int) -> str:
    """A ``timeout_ms`` the way durations are written: ``45s``, ``2m``, or ``1500ms`` when not whole."""
    from mesh.contracts.approvals import show_duration

    return show_duration(ms / 1000) if ms % 1000 == 0 else f"{ms}ms"


def _retry(policy: dict[str, Any]) -> str:
    backoff = "no backoff" if policy["backoff"] == "none" else f"{policy['backoff']} backoff"
    return f"{policy['max_attempts']} attempt(s), {backoff}"


def _inputs(inputs: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v['source'] if isinstance(v, dict) else v}" for k, v in sorted(inputs.items()))


def _parts(s: dict[str, Any]) -> list[str]:
    """What a step's line says, one part per key the step sets, in the file's terms."""
    wait = s.get("wait_for")
    if "sleep" in s:
        parts = [f"sleeps {s['sleep']} (no agent)"]
    elif wait is not None:
        match = f" where {wait['match']}" if wait.get("match") else ""
        parts = [f"waits for event {wait['event']}{match} ({wait['timeout']}, then {wait['on_timeout']}; "
                 "no agent)"]
    else:
        parts = [f"agent {s['agent']}"]
    if s["depends_on"]:
        parts.append(f"after {', '.join(s['depends_on'])}")
    if s["output_schema"]:
        parts.append(f"output {s['output_schema']}")
    if "model" in s:
        parts.append(f"model {s['model']}")
    if "timeout_ms" in s:
        parts.append(f"timeout {_ms(s['timeout_ms'])}")
    if "retry_policy" in s:
        parts.append(f"retry {_retry(s['retry_policy'])}")
    if s.get("idempotent"):
        parts.append("idempotent")
    if s.get("priority"):
        parts.append(f"priority {s['priority']}")
    if "idempotency_key" in s:
        parts.append(f"key: {s['idempotency_key']['source']}")
    if "state_input" in s:
        parts.append(f"state_input {s['state_input']}")
    if "input" in s:
        parts.append(f"input: {_inputs(s['input'])}")
    if "for_each" in s:
        parts.append(f"for_each: {s['for_each']['cel']}")
    if "max_parallel" in s:
        parts.append(f"max_parallel {s['max_parallel']}")
    if "join" in s:
        parts.append(f"join: min_success {s['join']['min_success']}")
    if "item_id" in s:
        parts.append(f"item_id: {s['item_id']['source']}")
    if "when" in s:
        parts.append(f"when: {s['when']['cel']}")
    if "gate" in s:
        parts.append(f"gate: {s['gate']['cel']} (false: {s['on_false']})")
    elif s["on_false"] != "halt_pipeline":
        parts.append(f"on_false {s['on_false']}")
    if s["requires_human_approval"]:
        a = s.get("approval") or {}
        parts.append(f"awaits approval ({a.get('timeout', '24h')}, then {a.get('on_timeout', 'deny')})")
        if a.get("approvers"):
            parts.append(f"approvers {', '.join(a['approvers'])}")
        if a.get("warn_before"):
            parts.append(f"warns {a['warn_before']} before")
    if "compensate" in s:
        parts.append(f"compensate: {_compensation(s['compensate'])}")
    return parts


def _compensation(c: dict[str, Any]) -> str:
    said = [f"agent {c['agent']}" if c.get("agent") else f"tool {c['tool']}"]
    if c.get("input") is not None:
        said.append(f"input: {_inputs(c['input'])}")
    if c.get("retry_policy") is not None:
        said.append(f"retry {_retry(c['retry_policy'])}")
    if c.get("timeout_ms") is not None:
        said.append(f"timeout {_ms(c['timeout_ms'])}")
    return ", ".join(said)


def _pack(first: str, parts: list[str], indent: int) -> list[str]:
    """``first`` then the parts two spaces apart, a new line (at ``indent``) where the next part
    would pass :data:`WIDTH`; a part longer than a whole line is wrapped, nothing is cut."""
    import textwrap

    lines, line = [], first
    for part in parts:
        if len(line) + 2 + len(part) <= WIDTH:
            line += "  " + part
            continue
        lines.append(line)
        pieces = textwrap.wrap(part, WIDTH - indent, break_on_hyphens=False) or [part]
        lines += [" " * indent + p for p in pieces[:-1]]
        line = " " * indent + pieces[-1]
    return [*lines, line]


def _lines(steps: list[dict[str, Any]]) -> list[Text]:
    """A step's lines: its id, then every key it sets, within :data:`WIDTH` columns (ids, agents,
    schemas and expressions as the file says them, never cut)."""
    width = max(len(s["id"]) for s in steps)
    indent = 4 + width if 4 + width <= 24 else 6
    out = []
    for s in steps:
        head = f"  {s['id']:<{width}}"
        if len(head) > WIDTH:
            out.append(Text(head.rstrip()))
            head = " " * (indent - 2)
        out += [Text(line) for line in _pack(head, _parts(s), indent)]
    return out


def _wrapped(text: str, indent: int = 2) -> list[Text]:
    """``text`` in lines of at most :data:`WIDTH` columns, the later ones indented; nothing cut."""
    import textwrap

    return [Text(line) for line in textwrap.wrap(text, WIDTH, subsequent_indent=" " * indent,
                                                 break_on_hyphens=False) or [text]]


def _limits_text(limits: dict[str, Any]) -> str:
    """A declaration's limits in a line: ``600/min requests, 4 at once per input.tenant``."""
    rate, conc = limits.get("rate") or {}, limits.get("concurrency") or {}
    parts = [f"{rate[k]} {k}" for k in ("requests", "tokens") if k in rate]
    if conc:
        parts.append(f"{conc['max']} at once")
    key = rate.get("key") or conc.get("key")
    return ", ".join(parts) + (f" per {key}" if key else "")


def _pipeline_lines(summary: dict[str, Any]) -> list[Text]:
    """The pipeline's own keys: description, order and roots of its DAG, tracing, checkpointing,
    input_schema and result (``mesh pipeline validate`` and ``show`` print them above the steps)."""
    from mesh.contracts.approvals import show_duration

    t, c = summary["tracing"], summary["checkpointing"]
    logs = " and ".join(k for k in ("inputs", "outputs") if t[f"log_{k}"])
    tracing = "tracing: off" if not t["enabled"] else f"tracing: {t.get('provider') or 'on'}" + (
        f", logs {logs}" if logs else "")
    kept = f"kept {show_duration(c['ttl_minutes'] * 60)}" if c["ttl_minutes"] else "kept MESH_JOB_RETENTION_S"
    keys = [f"checkpointing: {c['store']}, {kept}" if c["enabled"] else "checkpointing: off"]
    if summary.get("input_schema"):
        keys.append(f"input_schema {summary['input_schema']}")
    if summary["result"] is not None:
        keys.append(f"result: {', '.join(summary['result'])}")
    for kind, named in (summary.get("limits") or {}).items():
        for name, limits in named.items():
            keys.append(f"limits of {kind.removesuffix('s')} {name}: {_limits_text(limits)}")
    lines = _wrapped(summary["description"], 0) if summary["description"] else []
    lines += _wrapped(f"order: {' → '.join(summary['order'])}   roots: {', '.join(summary['roots'])}")
    lines += [Text(line) for line in _pack(tracing, keys, 2)]
    return lines
