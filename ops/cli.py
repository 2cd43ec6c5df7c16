"""The ``mesh`` command line. Every command has ``--help``; those that print data take ``--json``."""

from __future__ import annotations

import gc
import textwrap
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import redis
import typer
from rich.table import Table
from rich.text import Text

from mesh.broker import JobNotFound, JobRef, MeshClient, WaitTimeout
from mesh.contracts import (
    TERMINAL,
    ContractError,
    JobRecord,
    KeyConflict,
    MeshError,
    State,
    UnknownAgent,
)
from mesh.ops import approvals_cli, effects_cli
from mesh.ops.agents_cli import agents as agents_command
from mesh.ops.console import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_TIMEOUT,
    MARKUP,
    Column,
    JsonFlag,
    Listing,
    WaitFlag,
    WaitTimeoutS,
    WideFlag,
    app_for,
    client,
    emit_json,
    err,
    fail,
    out,
    plain_help,
    resolve,
    settings,
    when,
)
from mesh.ops.dlq_cli import dlq_app
from mesh.ops.jobctl_cli import lines as jobctl_lines
from mesh.ops.jobctl_cli import register as register_jobctl
from mesh.ops.pipeline_cli import AppPath, pipeline_app, registration, resolve_pipeline, say_registration

#: States only a step takes: a job is never in them (settle derives a job's state from its steps).
STEP_ONLY = frozenset({State.SKIPPED, State.NOT_RUN})

app = typer.Typer(help="The agent mesh: queue-driven agents on dramatiq and Redis.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=MARKUP,
                  epilog="Exit codes: 0 ok, 1 the job did not succeed, 2 bad input, 3 Redis unreachable, "
                         "4 timed out. Settings come from MESH_* variables (MESH_REDIS_URL, MESH_NAMESPACE, ...).")


@app.callback()
def _logging() -> None:
    """Every command logs like the workers: JSON lines on stderr, readable lines on a terminal."""
    from mesh.ops.logs import setup_logging

    setup_logging("WARNING")


def _agents(value: str | None, app_path: str | None) -> list[str] | None:
    """The agents to serve, checked against the app (which is loaded here, so a bad path fails early)."""
    mesh_app = app_for(app_path)
    if value is None:
        return None
    names = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in names if a not in mesh_app.agents]
    if unknown or not names:
        raise typer.BadParameter(f"unknown agent(s) {', '.join(unknown) or '(none)'}; "
                                 f"agents of app {mesh_app.name!r} are {', '.join(mesh_app.agents)}",
                                 param_hint="--agents")
    return names


@app.command(epilog="Examples: `mesh worker` (the built-in agents), `mesh worker --agents planner "
             "--threads 8`, `mesh worker --app support.agents:app --processes 2`")
def worker(
    agents: Annotated[str | None, typer.Option(help="Comma-separated agents to serve (default: all of the app's).",
                                               metavar="NAMES", show_default=False)] = None,
    app_path: Annotated[str | None, typer.Option("--app", help="The app to serve, as module[:attribute], e.g. "
                                                 "support.agents:app (default: the built-in planner, researcher "
                                                 "and executor).", metavar="MODULE:APP", show_default=False)] = None,
    processes: Annotated[int, typer.Option(min=1, metavar="N", help="Worker processes.")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, metavar="N", help="Threads per process (default: "
                                                "MESH_WORKER_THREADS).")] = None,
) -> None:
    """Serve agents' queues until SIGTERM or Ctrl-C.

    On the way out, messages fetched but not started go back to their queues, and the worker
    withdraws its heartbeat and its place among the agents' workers."""
    from mesh.ops.logs import setup_logging
    from mesh.ops.worker import check_served, run_worker, supervise

    names = _agents(agents, app_path)
    s = settings()
    check_served(app_for(app_path), names, s)  # once, before any process starts or connects
    setup_logging()
    n_threads = threads or s.worker_threads
    if processes > 1:
        raise typer.Exit(supervise(names, processes, n_threads, app_path))
    raise typer.Exit(run_worker(s, names, n_threads, app_path))


@app.command(epilog="Examples: `mesh submit \"summarise the DLQ runbook\" --wait`, "
             "`mesh submit \"write the release note\" --key release-42`")
def submit(
    goal: Annotated[str, typer.Argument(help="What the mesh should do, in plain words.", metavar="GOAL",
                                        show_default=False)],
    key: Annotated[str | None, typer.Option(help="Idempotency key: the same key and goal are the same job; the "
                                            "same key with another goal is refused.", metavar="KEY")] = None,
    wait: WaitFlag = False,
    timeout: WaitTimeoutS = 60.0,
    as_json: JsonFlag = False,
) -> None:
    """Submit a goal to the whole pipeline: planner, researchers, executor.

    Prints the job id (with --wait, the finished job). A job still unfinished when --wait gives up
    exits 4, naming the agents no live worker serves."""
    c = client()
    try:
        ref = c.submit(goal, key=key)
    except ContractError as exc:
        fail(str(exc), EXIT_INPUT)
    _sent(c, ref, wait, timeout, as_json)


@app.command(epilog="Examples: `mesh run review.yaml --input '{\"goal\": \"add retries\"}' --app myapp --wait`, "
             "`mesh run multi-agent-orchestration --input @task.json --key review-7`")
def run(
    pipeline: Annotated[str, typer.Argument(help="A registered pipeline's name (mesh pipeline list; an app's own with "
                                             "--app), its YAML file, or a Python pipeline as module:attribute.",
                                             metavar="NAME|FILE|MODULE:ATTR", show_default=False)],
    input_: Annotated[str, typer.Option("--input", help="The run's input as JSON, or @FILE to read it from a file.",
                                        metavar="JSON|@FILE", show_default=False)],
    app_path: AppPath = None,
    key: Annotated[str | None, typer.Option(help="Idempotency key: the same key and input are the same run; the "
                                            "same key with another input is refused.", metavar="KEY")] = None,
    wait: WaitFlag = False,
    timeout: WaitTimeoutS = 60.0,
    as_json: JsonFlag = False,
    register: Annotated[bool, typer.Option("--register", help="Register the file (or module:attribute) as the "
                                           "newest version of its name even when another version is registered.")
                        ] = False,
) -> None:
    """Run a declared pipeline: record the job with every step, send the root steps.

    A file or module:attribute is loaded and checked against --app's agents, then registered by
    name and content digest (said on stderr; refused, exit 2, when another version of the name is
    registered, unless --register); a name runs the app's pipeline of that name, else the newest
    registered version. Prints the job id (with --wait, the finished job; exit 1 if it halted or
    failed)."""
    if input_.startswith("@"):
        path = Path(input_[1:])
        if not path.is_file():
            fail(f"--input {input_}: no such file", EXIT_INPUT)
        data = _json(path.read_bytes(), str(path))
    else:
        data = _json(input_, "--input")
    if not isinstance(data, dict):
        fail("--input must be a JSON object", EXIT_INPUT)
    mesh_app, spec = resolve_pipeline(pipeline, app_path)
    c = client()
    c.app = mesh_app
    done = registration(c, spec, pipeline, replace=register) if spec is not None else None
    try:
        ref = c.run(spec or pipeline, data, key=key)
    except (ContractError, KeyConflict, UnknownAgent) as exc:
        fail(f"{exc} (nothing was sent)", EXIT_INPUT)
    except MeshError as exc:  # no pipeline of that name
        fail(str(exc), EXIT_INPUT)
    if done is not None and not as_json:
        say_registration(done)
    _sent(c, ref, wait, timeout, as_json, app_path=app_path, extra={"registration": done} if done else None)


def _sent(c: MeshClient, ref: JobRef, wait: bool, timeout: float, as_json: bool,
          app_path: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """What submit and run print once the job is sent: its id, or with --wait the finished job
    (``extra``: more fields of its --json)."""
    if not wait:
        if as_json:
            emit_json({"job_id": ref.id, "key": ref.key, "trace_id": ref.trace_id, **(extra or {})})
        else:
            out.print(ref.id)
        return
    try:
        record = c.wait(ref.id, timeout_s=timeout)
    except WaitTimeout as exc:
        _show(exc.record, as_json, c.stuck(exc.record), c=c)
        unserved = _unserved(c, exc.record)
        if unserved:
            apps = {a: p.app for a, p in c.registry.agents().items() if a in unserved}
            fail(f"{exc}: no live worker serves {', '.join(unserved)} "
                 f"(start one: {_worker_command(unserved, app_path, apps)}; see mesh agents)", EXIT_TIMEOUT)
        fail(str(exc), EXIT_TIMEOUT)
    _show(record, as_json, c=c, extra=extra)
    if record.state is not State.SUCCEEDED:
        raise typer.Exit(EXIT_FAILED)


def _worker_command(agents: list[str], app_path: str | None, published: dict[str, str] | None = None) -> str:
    """The command that serves ``agents``: with the ``--app`` the command was given, exactly as given; a
    bare ``mesh worker`` serves only the built-in ones. Otherwise ``--app MODULE:APP``, naming the app
    their workers published (``published``: agent -> its app's name), when one app has them all."""
    from mesh.agents.builtin import app as builtin

    if app_path:
        return f"mesh worker --app {app_path}"
    if set(agents) <= set(builtin.agents):
        return "mesh worker"
    apps = {(published or {}).get(a, "") for a in agents}
    of = f" (the import path of app {next(iter(apps))!r})" if len(apps) == 1 and "" not in apps else ""
    return f"mesh worker --app MODULE:APP{of}"


def _unserved(c: MeshClient, record: JobRecord) -> list[str]:
    """Agents of the job's sent, unfinished steps that no live worker serves (by the published serving
    sets and the workers' heartbeats): why a job stays queued however long one waits. A pipeline step
    not sent yet waits for its dependencies, and a ``for_each`` step's own record for its items."""
    waiting = {s.agent for s in record.steps.values()
               if s.state not in TERMINAL and s.sent_at is not None and s.need is None}
    alive = {x.agent.name for x in c.registry.listing() if any(w.alive for w in x.workers)}
    return sorted(waiting - alive)


@app.command(epilog="Examples: `mesh send researcher --payload '{\"question\": \"what is a DLQ?\"}'`, "
             "`mesh send triage --file tickets.jsonl`")
def send(
    agent: Annotated[str, typer.Argument(help="planner, researcher, executor, or an agent its workers published "
                                          "(mesh agents).", metavar="AGENT", show_default=False)],
    payload: Annotated[str | None, typer.Option(help="The agent's input as JSON.", metavar="JSON")] = None,
    file: Annotated[Path | None, typer.Option(help='JSONL, one {"key": ..., "payload": ...} per line.',
                                              metavar="FILE")] = None,
    key: Annotated[str | None, typer.Option(help="Idempotency key (with --payload).", metavar="KEY")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Send messages straight to one agent.

    Every payload is checked first, against the built-in contract or the input schema the agent's
    workers published; on any error nothing is sent."""
    if (payload is None) == (file is None):
        fail("give exactly one of --payload or --file", EXIT_INPUT)
    c = client()
    try:
        c.target(agent)
    except UnknownAgent:
        fail(f"unknown agent {agent!r}; agents are {', '.join(c.known_agents())}", EXIT_INPUT)
    if payload is not None:
        items, where = [(_json(payload, "--payload"), key)], ["--payload"]
    else:
        rows = _read_jsonl(file)  # type: ignore[arg-type]
        items, where = [(p, k) for p, k, _ in rows], [f"{file}:{n}" for _, _, n in rows]
    try:
        refs = c.send_many(agent, items)
    except KeyConflict as exc:  # names its key, not an item index
        fail(f"{exc} (nothing of its chunk of 1000 was sent)" if len(items) > 1000 else f"{exc} (nothing was sent)",
             EXIT_INPUT)
    except ContractError as exc:
        index = exc.context.get("index", 0)
        message = exc.message.split(": ", 1)[1] if "index" in exc.context else exc.message
        fail(f"{where[index]}: {message} (nothing was sent)", EXIT_INPUT)
    if as_json:
        emit_json([{"job_id": r.id, "key": r.key, "trace_id": r.trace_id} for r in refs])
    else:
        for r in refs:
            out.print(f"{r.id}  key={r.key}", highlight=False)
        err.print(f"sent {len(refs)} message(s) to {agent}")


def _json(text: str | bytes, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        fail(f"{what} is not JSON: {exc}", EXIT_INPUT)


def _read_jsonl(path: Path) -> list[tuple[Any, str | None, int]]:
    if not path.exists():
        fail(f"{path}: no such file", EXIT_INPUT)
    items = []
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = _json(line, f"{path}:{n}")
            if not isinstance(row, dict) or "payload" not in row or set(row) - {"key", "payload"}:
                fail(f'{path}:{n}: each line must be {{"key": ..., "payload": {{...}}}}', EXIT_INPUT)
            items.append((row["payload"], row.get("key"), n))
    if not items:
        fail(f"{path}: no messages", EXIT_INPUT)
    return items


def _job_id(c: MeshClient, given: str) -> str:
    """The job id ``given`` is, or is the unique start of (``job-`` may be left out)."""
    return resolve(c, c.keys.jobs, given, "jobs", alias="job-")


def _job_candidates(c: MeshClient, given: str) -> list[str]:
    """The job ids ``given`` may name, in order: the id it is or starts, else itself then its key's job.

    The same key always names the same job, so a key the job was sent with finds it too."""
    from mesh.broker.client import job_id_for

    resolved = _job_id(c, given)
    if resolved != given or (given.startswith("job-") and len(given) == 36):
        return [resolved]
    return [given, job_id_for(given)]


def find_job(c: MeshClient, given: str) -> tuple[JobRecord | None, list[str]]:
    """The record of the job ``given`` names (:func:`_job_candidates`), or None; and the ids tried."""
    candidates = _job_candidates(c, given)
    for candidate in candidates:
        try:
            return c.status(candidate), candidates
        except JobNotFound:
            continue
    return None, candidates


@app.command(epilog="Example: `mesh status job-5f0c` (a unique start of the id is enough), `mesh status order-7`, "
             "or `mesh status` for the deployment")
def status(job_id: Annotated[str | None, typer.Argument(
               help="The job id (from `mesh submit` or `mesh jobs`) or its start, or the key it was sent with, "
                    "e.g. order-7. Without it: the deployment.", metavar="JOB_ID|KEY", show_default=False)] = None,
           wide: WideFlag = False, as_json: JsonFlag = False) -> None:
    """A job's state and every step's: attempts, timings, errors, results.

    A running step without progress for MESH_STUCK_AFTER_S shows as stuck; a job removed by
    retention is reported expired. Without a job: the Redis in use (address, role; for Sentinel
    the master it names now), the namespace, live workers and dead letters."""
    c = client()
    if job_id is None:
        _deployment(c, as_json)
        return
    record, candidates = find_job(c, job_id)
    if record is None:
        _no_job(c, job_id, candidates)
    _show(record, as_json, c.stuck(record), wide=wide, c=c)


def _no_job(c: MeshClient, given: str, candidates: list[str]) -> NoReturn:
    """Exit 2 for a job id or key that names no job any more: expired when retention removed it
    (what `mesh status` and `mesh trace` both say), else unknown."""
    from mesh.broker.retention import expired

    for candidate in candidates:
        if expired(c.redis, c.keys, candidate):
            fail(f"job {candidate} expired: records are kept MESH_JOB_RETENTION_S={c.settings.job_retention_s:g}s "
                 "after a job ends", EXIT_INPUT)
    fail(f"no job {given}" + ("" if len(candidates) == 1 else f" (nor a job of key {given!r})"), EXIT_INPUT)


def _deployment(c: MeshClient, as_json: bool) -> None:
    from mesh.broker.clock import server_ms
    from mesh.broker.connection import describe

    server = describe(c.settings, c.redis)
    since = server_ms(c.redis) - c.settings.heartbeat_timeout_s * 1000
    overview = {"redis": server, "namespace": c.settings.namespace,
                "workers": int(c.redis.zcount(c.keys.heartbeats, since, "+inf")), "dlq": int(c.redis.zcard(c.keys.dlq))}
    if as_json:
        emit_json(overview)
        return
    via = f", Sentinel service {server['sentinel']} via {', '.join(server['sentinels'])}" if "sentinel" in server \
        else ""
    tls = ", TLS" if server["tls"] else ""
    out.print(Text(f"redis:     {server.get('address', '?')} db {server['db']}, {server.get('role', '?')}{tls}{via}"))
    out.print(Text(f"namespace: {overview['namespace']}"))
    out.print(Text(f"workers:   {overview['workers']} live"))
    out.print(Text(f"dlq:       {overview['dlq']} entries"))


@app.command()
def jobs(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state, e.g. dead_lettered.",
                                              show_default=False)] = None,
    agent: Annotated[str | None, typer.Option(help="Only jobs with a step on this agent, e.g. executor.",
                                              show_default=False)] = None,
    since: Annotated[str | None, typer.Option(help="Created at or after: 15m, 2h, 3d (ago), UNIX s, ISO 8601.",
                                              show_default=False)] = None,
    key: Annotated[str | None, typer.Option(help="Only jobs whose key matches this glob, e.g. 'order-*'.",
                                            show_default=False)] = None,
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="At most this many, newest first.")] = 20,
    wide: WideFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Jobs, newest first, from the jobs index (no scan of the keyspace). State, agent and key are
    checked on the records, read newest first: at most the newest 10,000 (narrow with --since)."""
    from mesh.broker.joblist import SCAN_BUDGET, JobQuery, list_jobs
    from mesh.ops.dlq_cli import parse_time

    if state is not None and state not in set(State):
        fail(f"unknown state {state!r}; states are {', '.join(State)}", EXIT_INPUT)
    if state in STEP_ONLY:
        # A filter no job can match would answer "No such jobs" for ever: say where to look instead.
        fail(f"{state} is a step's state, never a job's: a job with steps not run halted (--state halted), "
             "one with skipped steps ended as the rest of its steps did; `mesh status JOB` lists its steps",
             EXIT_INPUT)
    query = JobQuery(state=State(state) if state else None, agent=agent, since=parse_time(since), key=key,
                     limit=limit)
    c = client()
    page = list_jobs(c.redis, c.keys, query)
    if page.cut_by_budget:
        err.print(Text(f"read the newest {SCAN_BUDGET:,} jobs only; narrow with --since to look further back"))
    if as_json:
        emit_json([{"job_id": r.job_id, "key": r.key, "state": str(r.state), "created_at": r.created_at,
                    "updated_at": r.updated_at, "goal": r.goal, "error": r.error,
                    "agents": sorted({s.agent for s in r.steps.values()}), "steps": len(r.steps)}
                   for r in page.jobs])
        return
    if not page.jobs:
        out.print("no such jobs")
        return
    columns = [Column("job", key=True), Column("state"), Column("created"), Column("key", key=True),
               Column("steps", justify="right")]
    out.print(Listing(columns, [(Text(r.job_id), str(r.state), when(r.created_at), Text(r.key), str(len(r.steps)))
                                for r in page.jobs], wide=wide))


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@app.command()
def workers(wide: WideFlag = False, as_json: JsonFlag = False) -> None:
    """Workers that serve agents: label (host:pid), app, agents, since when, last heartbeat, alive.
    A worker that stopped gracefully is gone; a killed one shows as dead until pruned."""
    from mesh.broker.registry import Registry

    c = client()
    listed, now_ms = Registry(c.redis, c.keys, c.settings.heartbeat_timeout_s).workers()
    if as_json:
        emit_json([{"id": w.id, "label": w.label, "app": w.app, "agents": list(w.agents),
                    "since": w.since_ms / 1000 if w.since_ms else None,
                    "heartbeat_age_s": (now_ms - w.heartbeat_ms) / 1000 if w.heartbeat_ms is not None else None,
                    "alive": w.alive} for w in listed])
        return
    if not listed:
        out.print("no workers: none has published what it serves (start one with `mesh worker`)")
        return
    rows = []
    for w in listed:
        beat = f"{_age((now_ms - w.heartbeat_ms) / 1000)} ago" if w.heartbeat_ms is not None else "none"
        rows.append((Text(w.label), Text(w.app or "-"), Text(", ".join(w.agents)),
                     when(w.since_ms / 1000) if w.since_ms else "-", beat,
                     Text("alive", "green") if w.alive else Text("dead", "red")))
    columns = [Column("worker", key=True), Column("app", key=True), Column("agents", wrap=True), Column("since"),
               Column("heartbeat"), Column("state")]
    out.print(Listing(columns, rows, wide=wide))


def _show(record: JobRecord, as_json: bool, stuck: dict[str, float] | None = None, *, wide: bool = False,
          c: MeshClient | None = None, extra: dict[str, Any] | None = None) -> None:
    from mesh.ops import dag

    stuck = stuck or {}
    nodes = dag.load(c, record) if record.pipeline and c is not None else None
    if as_json:
        emit_json({**record.model_dump(mode="json"), "stuck": stuck,
                   **({"dag": dag.as_json(nodes)} if nodes is not None else {}), **(extra or {})})
        return
    width = out.size.width
    head = Text.assemble(f"job {record.job_id}  ", (str(record.state), "bold"))
    trace = f"trace {record.trace_id}"
    if nodes is not None and head.cell_len + 2 + len(trace) > width:  # a pipeline's view fits the width
        out.print(head)
        out.print(Text(trace))
    else:
        out.print(Text.assemble(head, f"  {trace}"))
    if record.goal:
        out.print(Text(f"goal: {record.goal}"))
    if record.pipeline:
        out.print(Text(f"pipeline: {record.pipeline} ({(record.pipeline_digest or '')[:12]})"))
    if record.error and nodes is not None:
        lines = textwrap.wrap(f"error: {record.error}", max(20, width), subsequent_indent="       ",
                              break_long_words=False, break_on_hyphens=False)
        out.print(Text.assemble(("error:", "red"), lines[0].removeprefix("error:")))
        for rest in lines[1:]:
            out.print(Text(rest))
    elif record.error:
        out.print(Text.assemble(("error: ", "red"), record.error))
    if record.tokens_in or record.tokens_out:
        out.print(Text(f"model tokens: {record.tokens_in} in, {record.tokens_out} out"))
    for line in jobctl_lines(record):  # why it undoes its effects; the reruns it is of, or has
        out.print(line)
    if nodes is None:
        out.print(steps_table(record, stuck, wide=wide))
        return
    for drawn in dag.draw(record, nodes, stuck, width=width):
        out.print(drawn)


def steps_table(record: JobRecord, stuck: dict[str, float] | None = None, *, wide: bool = False) -> Listing:
    """Every step of ``record``: a table, or a block per step on a narrow terminal."""
    from mesh.ops import dag

    stuck = stuck or {}
    tokens = any(s.tokens_in or s.tokens_out for s in record.steps.values())
    columns = (Column("step", key=True), Column("agent", key=True), Column("state"), Column("attempt"),
               Column("took"), *([Column("tokens in/out")] if tokens else []), Column("detail", wrap=True))
    rows: list[tuple[str | Text, ...]] = []
    for step in record.steps.values():
        took = (f"{step.finished_at - step.started_at:.2f}s"
                if step.finished_at and step.started_at else "")
        detail = step.error or _summary(step.result) or ""
        if record.pipeline and step.state is State.QUEUED and step.sent_at is None:
            detail = "not sent: the job halted" if record.state is State.HALTED else "waits for its dependencies"
        if step.settlement is not None:
            detail = f"{detail}; {dag.settled_line(step)}" if detail else dag.settled_line(step)
        state = Text(dag.shown_state(step), style=_STATE_STYLE.get(step.state, ""))
        if step.step_id in stuck:
            state = Text(f"stuck ({stuck[step.step_id]:.0f}s without progress)", style="red")
        spent = [f"{step.tokens_in}/{step.tokens_out}"] if tokens else []
        rows.append((step.step_id, step.agent, state, str(step.attempt or ""), took, *spent, Text(detail)))
    return Listing(columns, rows, wide=wide)


_STATE_STYLE = {State.HALTED: "red", State.DEAD_LETTERED: "red", State.SKIPPED: "dim", State.NOT_RUN: "dim",
                State.AWAITING_APPROVAL: "yellow", State.CANCELLED: "dim", State.COMPENSATING: "yellow",
                State.COMPENSATED: "cyan"}


def _summary(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    if "steps" in result:
        return f"{len(result['steps'])} steps"
    if "summary" in result:
        return str(result["summary"])[:90]
    if "effect_id" in result:
        return f"{result.get('tool')} effect {result['effect_id']}"
    return str(result)[:90]


@app.command("trace", epilog="Example: `mesh trace job-5f0c --json`, or `mesh trace order-7`")
def trace_(job_id: Annotated[str, typer.Argument(
               help="The job id (from `mesh submit` or `mesh jobs`) or its start, or the key it was sent with, "
                    "e.g. order-7.", metavar="JOB_ID|KEY", show_default=False)],
           as_json: JsonFlag = False) -> None:
    """A job's timeline, step by step, with offsets and durations.

    Every step's events in order: enqueued, picked up, tool calls, deferrals, failures, dead
    letters, duplicates, success."""
    from mesh.broker import trace
    from mesh.ops import dag
    from mesh.ops.timeline import by_step, render

    c = client()
    given, candidates = job_id, _job_candidates(c, job_id)
    for job_id in candidates:
        events = trace.read(c.redis, c.keys, job_id)
        record = c.jobs.get(job_id)
        if events or record is not None:
            break
    else:
        _no_job(c, given, candidates)
    nodes = dag.load(c, record) if record is not None and record.pipeline else None
    if as_json:
        emit_json({"job_id": job_id, "state": str(record.state) if record else None,
                   "trace_id": record.trace_id if record else None, "steps": by_step(events), "events": events,
                   **({"dag": dag.as_json(nodes)} if nodes is not None else {})})
        return
    for line in render(record, events, nodes):
        out.print(line)  # soft-wrapped: a long line stays whole, never cropped at the terminal's width


@app.command()
def queues(as_json: JsonFlag = False) -> None:
    """Per agent queue: messages ready, delayed (retries) and in flight."""
    depths = client().queues()
    if as_json:
        emit_json(depths)
        return
    columns = (Column("queue", key=True), *(Column(n, justify="right") for n in ("ready", "delayed", "in flight")))
    out.print(Listing(columns, [(name, str(d["ready"]), str(d["delayed"]), str(d["in_flight"]))
                                for name, d in depths.items()]))


app.command("agents", epilog="Examples: `mesh agents`, `mesh agents --json`")(agents_command)


@app.command()
def stats(as_json: JsonFlag = False) -> None:
    """Counters of the deployment, and failed attempts by class and route.

    Duplicates suppressed or deferred, takeovers, retries, dead letters, poison, recoveries."""
    from mesh.ops.metrics import STATS

    c = client()
    raw = c.redis.hgetall(c.keys.stats)
    counts: dict[str, Any] = {name: int(raw.get(name.encode(), 0)) for name in STATS}
    counts["dlq_size"] = int(c.redis.zcard(c.keys.dlq))
    routes = {k.decode(): int(v) for k, v in sorted(c.redis.hgetall(c.keys.routes).items())}  # type: ignore[union-attr]
    if as_json:
        emit_json({**counts, "routes": routes})
        return
    table = Table("counter", "value", "meaning")
    for name, value in counts.items():
        table.add_row(name, str(value), STATS.get(name, "Entries in the dead-letter queue now."))
    out.print(table)
    if routes:
        by_route = Table("failure class : route", "attempts")
        for name, n in routes.items():
            by_route.add_row(Text(name), str(n))
        out.print(by_route)


@app.command()
def bench(
    messages: Annotated[int, typer.Option(min=10, metavar="N", help="Messages (and real steps) per run.")] = 5_000,
    processes: Annotated[int, typer.Option(min=1, metavar="N", help="Worker processes per side.")] = 2,
    threads: Annotated[int, typer.Option(min=1, metavar="N", help="Threads per worker process.")] = 4,
    prefetch: Annotated[str, typer.Option(metavar="N[,N...]", help="Prefetch per consumer, both sides; a "
                                          "comma list runs the throughput pairs and real steps at each; "
                                          "0: 2 x threads.")] = "0",
    pairs: Annotated[int, typer.Option(min=1, metavar="N", help="Alternating mesh/raw throughput pairs.")] = 2,
    latency_samples: Annotated[int, typer.Option(min=1, metavar="N", help="Idle pickup samples per side.")] = 30,
    dlq_entries: Annotated[int, typer.Option(min=10, metavar="N",
                                             help="Entries for the DLQ replay and drain runs.")] = 10_000,
    as_json: JsonFlag = False,
) -> None:
    """Measure the mesh against raw dramatiq on the configured Redis.

    Runs in a throw-away namespace: throughput and the CPU per message (workers, Redis) at each
    prefetch, Redis commands per message, real steps through a declared agent, enqueue rate, idle
    pickup latency, DLQ replay and drain."""
    from mesh.ops.bench import BenchConfig, run

    sweep = _prefetches(prefetch)
    s = settings()
    client()  # exits 3 if Redis does not answer
    cfg = BenchConfig(messages=messages, processes=processes, threads=threads, prefetch=sweep, pairs=pairs,
                      latency_samples=latency_samples, dlq_entries=dlq_entries)
    result = run(s, cfg, progress=lambda step: err.print(Text(f"bench: {step}"), style="dim"))
    if as_json:
        emit_json(result)
        return
    out.print(_bench_table(result))
    cf = result["config"]
    out.print(f"{cf['messages']:,} messages, {cf['processes']} processes x {cf['threads']} threads, "
              f"{cf['pairs']} mesh/raw pairs per prefetch.\nRedis CPU and commands count every client of "
              "that Redis, not only the bench.")


def _prefetches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = (-1,)
    if any(v < 0 for v in values):
        raise typer.BadParameter(f"{text!r}: give whole numbers >= 0, comma-separated (e.g. 8,32,64)",
                                 param_hint="--prefetch")
    return values


def _bench_table(result: dict[str, Any]) -> Table:
    """``mesh bench``'s figures in 80 columns: one group of rows per prefetch, then the rest."""
    table = Table("measure", "mesh", "raw", "mesh/raw")
    steps = {s["prefetch"]: s for s in result["step"]}
    for t in result["throughput"]:
        c, w, r = t["redis_commands_per_message"], t["worker_cpu_us_per_message"], t["redis_cpu_us_per_message"]
        st = steps[t["prefetch"]]
        table.add_row(Text(f"prefetch {t['prefetch']}", style="bold"), "", "", "")
        table.add_row("no-op throughput (msg/s)", f"{t['mesh_msg_s']:,.0f}", f"{t['raw_msg_s']:,.0f}",
                      f"{t['ratio']:.2f}")
        table.add_row("  worker CPU (µs/msg)", f"{w['mesh']:,.0f}", f"{w['raw']:,.0f}", f"{w['ratio']:.2f}")
        table.add_row("  Redis CPU (µs/msg)", f"{r['mesh']:,.0f}", f"{r['raw']:,.0f}", f"{r['ratio']:.2f}")
        table.add_row("  Redis commands per msg", f"{c['mesh']:.1f}", f"{c['raw']:.1f}", f"{c['mesh'] - c['raw']:+.1f}")
        table.add_row("real step, echo agent (steps/s)", f"{st['steps_s']:,.0f}", "", "")
        table.add_row("  worker CPU (µs/step)", f"{st['worker_cpu_us_per_step']:,.0f}", "", "")
        table.add_row("  Redis CPU (µs/step)", f"{st['redis_cpu_us_per_step']:,.0f}", "", "")
        table.add_row("  Redis commands per step", f"{st['redis_commands_per_step']:.1f}", "", "", end_section=True)
    e, p, d = result["enqueue"], result["pickup_latency"], result["dlq"]
    table.add_row("send_many vs send() loop (msg/s)", f"{e['send_many_msg_s']:,.0f}", f"{e['send_loop_msg_s']:,.0f}",
                  f"{e['ratio']:.1f}")
    table.add_row("idle pickup p50 (ms)", f"{p['mesh']['p50_ms']:.1f}", f"{p['raw']['p50_ms']:.1f}", "")
    table.add_row("idle pickup p99 (ms)", f"{p['mesh']['p99_ms']:.1f}", f"{p['raw']['p99_ms']:.1f}", "")
    table.add_row(f"DLQ replay of {d['entries']:,} (entries/s)", f"{d['replay_entries_s']:,.0f}", "", "")
    table.add_row(f"DLQ drain of {d['entries']:,} (entries/s)", f"{d['drain_entries_s']:,.0f}", "", "")
    table.add_row("DLQ drain peak traced memory (MB)", f"{d['drain_peak_traced_mb']:.1f}", "", "")
    table.add_row("  DLQ drain file (MB)", f"{d['drain_file_mb']:.1f}", "", "")
    table.add_row("already-done keys (msg/s)", f"{result['duplicates']['msg_s']:,.0f}", "", "")
    return table


@app.command(epilog="Examples: `mesh soak --minutes 60`, `mesh soak --seconds 30 --kill-every 10 --json`")
def soak(
    minutes: Annotated[float, typer.Option(min=0, metavar="N", help="How long to send traffic.")] = 10.0,
    seconds: Annotated[float | None, typer.Option(min=1, metavar="N", show_default=False,
                                                  help="How long to send traffic, in seconds (instead of --minutes).")
                       ] = None,
    interval: Annotated[float, typer.Option(min=1, metavar="SECONDS", help="Time between samples.")] = 30.0,
    processes: Annotated[int, typer.Option(min=1, metavar="N", help="Worker processes.")] = 2,
    threads: Annotated[int, typer.Option(min=1, metavar="N", help="Threads per worker process.")] = 4,
    rate: Annotated[float, typer.Option(min=0.1, metavar="N", help="Messages sent per second.")] = 5.0,
    kill_every: Annotated[float, typer.Option(min=0, metavar="SECONDS",
                                              help="SIGKILL and replace a worker this often; 0: never.")] = 60.0,
    as_json: JsonFlag = False,
) -> None:
    """Run mixed traffic with injected faults and report the memory of workers and Redis.

    In a fresh namespace (deleted at the end), with its own workers: whole jobs, note and
    http_post steps (a loopback server answers 200, 429, 503, 400 or too slowly), poison
    pushed raw, and a worker SIGKILLed and replaced every --kill-every seconds. Prints a sample
    every --interval, then a summary. Exits 1 if anything sent was lost."""
    from mesh.ops.soak import SoakConfig
    from mesh.ops.soak import run as run_soak

    s = settings()
    client()  # exits 3 if Redis does not answer
    cfg = SoakConfig(seconds=seconds if seconds is not None else minutes * 60, interval_s=interval,
                     processes=processes, threads=threads, rate=rate, kill_every_s=kill_every)
    show = (lambda line: err.print(Text(line), style="dim")) if as_json else (lambda line: out.print(Text(line)))
    result = run_soak(s, cfg, progress=show)
    if as_json:
        emit_json(result)
    else:
        r, m = result["worker_rss_mb"], result["redis_used_memory_mb"]
        table = Table("measure", "value")
        table.add_row("duration (s)", f"{result['duration_s']:.0f}")
        table.add_row("jobs sent / succeeded / dead-lettered", f"{result['sent']['jobs']} / "
                      f"{result['jobs']['succeeded']} / {result['jobs']['dead_lettered']}")
        table.add_row("poison sent / in the DLQ", f"{result['sent']['poison']} / {result['poison_dead_lettered']}")
        table.add_row("workers killed", str(result["workers"]["killed"]))
        table.add_row("worker RSS MB start / end / max", f"{r['start']} / {r['end']} / {r['max']}")
        table.add_row("Redis used_memory MB start / end / max", f"{m['start']} / {m['end']} / {m['max']}")
        n = result["namespace_memory_mb"]
        table.add_row("its namespace's keys MB start / end / max", f"{n['start']} / {n['end']} / {n['max']}")
        table.add_row("lost", str(result["lost"]))
        out.print(table)
    if result["lost"]:
        raise typer.Exit(EXIT_FAILED)


breakers_app = typer.Typer(help="Circuit breakers of the dependencies, shared by the whole fleet.",
                           rich_markup_mode=MARKUP, epilog="Examples: `mesh breakers`, "
                           "`mesh breakers reset api.example.com:443`")
app.add_typer(breakers_app, name="breakers")


@breakers_app.callback(invoke_without_command=True)
def breakers_list(ctx: typer.Context, wide: WideFlag = False, as_json: JsonFlag = False) -> None:
    """List every breaker: state, failures in the window, reopen time (on Redis's clock), cool-down, trips,
    messages deferred on it, last error; an open one also shows the failures that opened it."""
    if ctx.invoked_subcommand is not None:
        return
    import dataclasses

    from mesh.broker.breaker import Breakers

    c = client()
    states = Breakers(c.settings, c.redis).list()
    if as_json:
        emit_json([dataclasses.asdict(b) for b in states])
        return
    if not states:
        out.print("no breakers yet: none of the dependencies has failed")
        return
    columns = (Column("dependency", key=True), Column("state"), Column("failures", justify="right"),
               Column("reopens in"), Column("cool-down"), Column("trips", justify="right"),
               Column("deferred", justify="right"), Column("last error", wrap=True))
    rows = []
    for b in states:
        reopen = f"{b.reopen_in_s:.1f}s" if b.reopen_in_s is not None else "-"
        rows.append((b.name, b.state, str(b.failures), reopen, f"{b.cooldown_s:g}s", str(b.trips), str(b.deferred),
                     b.last_error or "-"))
    out.print(Listing(columns, rows, wide=wide))
    for b in states:
        if b.opened_at is None:
            continue
        out.print(Text(f"{b.name} {b.state}: opened {when(b.opened_at)} by {b.opened_failures} failure(s); "
                       f"reopens {when(b.reopen_at)} (in {b.reopen_in_s or 0:.1f}s); "
                       f"{b.deferred} message(s) deferred on it"))
        for f in b.opened_by:
            out.print(Text(f"  {when(f.at)}  {f.error}"))


@breakers_app.command("reset")
def breakers_reset(name: Annotated[str, typer.Argument(help="The dependency, as listed (host:port), or its start.",
                                                     metavar="DEPENDENCY", show_default=False)]) -> None:
    """Close one breaker now, whatever its state."""
    from mesh.broker.breaker import Breakers

    c = client()
    name = resolve(c, c.keys.breakers, name, "breakers", zset=False)
    if not Breakers(c.settings, c.redis).reset(name):
        fail(f"no breaker named {name!r}; `mesh breakers` lists them", EXIT_INPUT)
    out.print(Text(f"breaker {name} closed"))


ops_app = typer.Typer(help="Operations: the health and metrics server.", no_args_is_help=True,
                      rich_markup_mode=MARKUP)
app.add_typer(ops_app, name="ops")


@ops_app.command("serve", epilog="Example: `mesh ops serve --host 0.0.0.0 --port 9464`, then "
                 "`curl localhost:9464/readyz`")
def ops_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.", metavar="ADDRESS")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).", metavar="PORT")] = 9464,
) -> None:
    """Serve /metrics (Prometheus), /healthz and /readyz until Ctrl-C or SIGTERM.

    Guarded for an open port: MESH_OPS_REQUEST_TIMEOUT_S, MESH_OPS_KEEP_ALIVE_S and
    MESH_OPS_MAX_CONNECTIONS bound what slow or idle clients can hold."""
    import contextlib
    import signal
    import sys

    from mesh.ops.logs import setup_logging
    from mesh.ops.server import OpsServer

    setup_logging()
    try:
        server = OpsServer(MeshClient(settings()), host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_INPUT)
    err.print(f"serving /metrics, /healthz, /readyz on http://{host}:{server.port}")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: a stop asked for exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()


@app.command(epilog="Example: `mesh demo --timeout 120`")
def demo(
    goal: Annotated[str, typer.Option(help="The goal the sample job pursues.", metavar="TEXT")] = (
        "Find out how failures are classified and how dead letters are replayed, "
        "then write a note for the on-call team"
    ),
    timeout: Annotated[float, typer.Option(help="How long to wait for the job.", metavar="SECONDS")] = 60.0,
) -> None:
    """Run a sample job through real workers and show it as it happens.

    Starts two worker processes, submits the job, prints each step's state changes and the
    result, then stops the workers. Without a reachable Redis it starts a private one for the
    run (its data goes with it)."""
    from mesh.ops.demo import run_demo

    raise typer.Exit(run_demo(goal, timeout, out))


app.add_typer(dlq_app, name="dlq")
app.add_typer(pipeline_app, name="pipeline")
approvals_cli.register(app)
register_jobctl(app)  # mesh cancel, mesh rerun
effects_cli.register(app)  # mesh verify, mesh settle


def main() -> None:
    # The objects the imports made (modules, models, schemas) live until the process exits: moved
    # out of the collector's sight, neither the command's collections nor the interpreter's
    # teardown walk them again. A sixth of a short command's CPU time went there.
    gc.freeze()
    invoke()


def invoke(args: list[str] | None = None, prog_name: str | None = None) -> None:
    """The command line without the process's set-up: ``args`` (default ``sys.argv[1:]``) as one
    ``mesh`` command, ending in ``SystemExit`` with its exit code. :func:`main` runs it; the tests
    call it in-process (tests/conftest.py's ``cli`` fixture), where a process per command cost more
    than the command."""
    plain_help()
    try:
        app(args=args, prog_name=prog_name)
    except MeshError as exc:
        _stop(str(exc), EXIT_INPUT)
    except redis.exceptions.NoPermissionError as exc:
        # A user held by ACL rules that lack a command: say so, not a traceback.
        _stop(f"Redis refused a command to this user: {exc}. The rules a mesh user needs: "
              "`python -m mesh.broker.acl NAMESPACE` (docs/reference/acl.md)", EXIT_INPUT)


def _stop(message: str, code: int) -> None:
    """:func:`fail` outside the typer app, whose ``Exit`` nothing is left to catch."""
    try:
        fail(message, code)
    except typer.Exit as exit_:
        raise SystemExit(exit_.exit_code) from None


if __name__ == "__main__":
    main()
