"""``mesh submit``, ``run``, ``send``, ``status``, ``jobs`` and ``trace``: send work to the mesh and follow
the jobs it makes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.text import Text

from mesh.broker import JobNotFound, JobRef, MeshClient, WaitTimeout
from mesh.broker.pipelines import PipelineConflict
from mesh.contracts import (
    PRIORITIES,
    TERMINAL,
    ContractError,
    JobRecord,
    KeyConflict,
    MeshError,
    Priority,
    State,
    UnknownAgent,
)
from mesh.ops.console import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_TIMEOUT,
    Column,
    JsonFlag,
    Listing,
    WaitFlag,
    WaitTimeoutS,
    WideFlag,
    client,
    emit_json,
    err,
    fail,
    out,
    resolve,
    when,
    wrapped,
)
from mesh.ops.jobctl_cli import lines as jobctl_lines
from mesh.ops.pipeline_cli import AppPath, refuse_replacing, registration, resolve_pipeline, say_registration

#: States only a step takes: a job is never in them (settle derives a job's state from its steps).
STEP_ONLY = frozenset({State.SKIPPED, State.NOT_RUN})

PriorityOpt = Annotated[str, typer.Option("--priority", help="The place in the agents' queues: high (fetched "
                                          "first), normal or low (each lower level still gets one fetch in "
                                          "eight).", metavar="high|normal|low")]


def _priority(given: str) -> Priority:
    if given not in PRIORITIES:
        raise typer.BadParameter(f"{given!r}: give high, normal or low", param_hint="--priority")
    return given


def submit(
    goal: Annotated[str, typer.Argument(help="What the mesh should do, in plain words.", metavar="GOAL",
                                        show_default=False)],
    key: Annotated[str | None, typer.Option(help="Idempotency key: the same key and goal are the same job; the "
                                            "same key with another goal is refused.", metavar="KEY")] = None,
    wait: WaitFlag = False,
    timeout: WaitTimeoutS = 60.0,
    as_json: JsonFlag = False,
    priority: PriorityOpt = "normal",
) -> None:
    """Submit a goal to the whole pipeline: planner, researchers, executor.

    Prints the job id (with --wait, the finished job). A job still unfinished when --wait gives up
    exits 4, naming the agents no live worker serves."""
    c = client()
    try:
        ref = c.submit(goal, key=key, priority=_priority(priority))
    except ContractError as exc:
        fail(str(exc), EXIT_INPUT)
    _sent(c, ref, wait, timeout, as_json)


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
    priority: PriorityOpt = "normal",
) -> None:
    """Run a declared pipeline: record the job with every step, send the root steps.

    A file or module:attribute is loaded and checked against --app's agents, then registered by
    name and content digest (said on stderr; refused, exit 2, when another version of the name is
    registered, unless --register); a name runs the app's pipeline of that name, else the newest
    registered version. Prints the job id (with --wait, the finished job; exit 1 if it halted or
    failed)."""
    level = _priority(priority)
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
    try:  # refused in the run's own transaction too: another run may register its version meanwhile
        ref = c.run(spec or pipeline, data, key=key, replace=register or spec is None, priority=level)
    except PipelineConflict as exc:
        refuse_replacing(exc.context["pipeline"], exc.latest, exc.context["digest"], pipeline)
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


def send(
    agent: Annotated[str, typer.Argument(help="planner, researcher, executor, or an agent its workers published "
                                          "(mesh agents).", metavar="AGENT", show_default=False)],
    payload: Annotated[str | None, typer.Option(help="The agent's input as JSON.", metavar="JSON")] = None,
    file: Annotated[Path | None, typer.Option(help='JSONL, one {"key": ..., "payload": ...} per line.',
                                              metavar="FILE")] = None,
    key: Annotated[str | None, typer.Option(help="Idempotency key (with --payload).", metavar="KEY")] = None,
    as_json: JsonFlag = False,
    priority: PriorityOpt = "normal",
) -> None:
    """Send messages straight to one agent.

    Every payload is checked first, against the built-in contract or the input schema the agent's
    workers published; on any error nothing is sent."""
    if (payload is None) == (file is None):
        fail("give exactly one of --payload or --file", EXIT_INPUT)
    level = _priority(priority)
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
        refs = c.send_many(agent, items, priority=level)
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
            out.print(f"{r.id}  key={r.key}", highlight=False, markup=False)
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
    """The job id ``given`` is, or is the unique start of (``job-`` may be left out), in any shard."""
    from mesh.broker.shard_readers import every

    return resolve(c, [k.jobs for k in every(c.settings)], given, "jobs", alias="job-")


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
        if expired(c.redis, c.keys_of(candidate), candidate):
            count = c.settings.job_retention_count
            fail(f"job {candidate} expired: records are kept MESH_JOB_RETENTION_S={c.settings.job_retention_s:g}s "
                 "after a job ends, and only the newest " + (f"MESH_JOB_RETENTION_COUNT={count}" if count else
                                                             "MESH_JOB_RETENTION_COUNT (where set)")
                 + " of each agent or pipeline", EXIT_INPUT)
    fail(f"no job {given}" + ("" if len(candidates) == 1 else f" (nor a job of key {given!r})"), EXIT_INPUT)


def _deployment(c: MeshClient, as_json: bool) -> None:
    from mesh.broker.clock import server_ms
    from mesh.broker.connection import describe
    from mesh.broker.shard_readers import every, live_members, zcard

    server = describe(c.settings, c.redis)
    since = server_ms(c.redis) - c.settings.heartbeat_timeout_s * 1000
    keys = every(c.settings)  # workers and dead letters of every shard
    overview = {"redis": server, "namespace": c.settings.namespace,
                "workers": live_members(c.redis, keys, lambda k: k.heartbeats, since),
                "dlq": zcard(c.redis, keys, lambda k: k.dlq)}
    if as_json:
        emit_json(overview)
        return
    via = f", Sentinel service {server['sentinel']} via {', '.join(server['sentinels'])}" if "sentinel" in server \
        else ", Redis Cluster" if "cluster" in server else ""
    tls = ", TLS" if server["tls"] else ""
    said = f"{server.get('address', '?')} db {server['db']}, {server.get('role', '?')}{tls}{via}"
    # wrapped between words under its label (a Sentinel's or a cluster's nodes run past 80 columns)
    lines = wrapped(said, out.size.width - 11)
    for i, line in enumerate(lines):
        out.print(Text(f"{'' if i else 'redis:':<11}{line}"))
    out.print(Text(f"namespace: {overview['namespace']}"))
    out.print(Text(f"workers:   {overview['workers']} live"))
    out.print(Text(f"dlq:       {overview['dlq']} entries"))


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
    from mesh.broker.shard_readers import every

    c = client()
    page = list_jobs(c.redis, every(c.settings), query)  # the newest of every shard
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
    rows: list[tuple[str | Text, ...]] = [(Text(r.job_id), str(r.state), when(r.created_at), Text(r.key),
                                           str(len(r.steps))) for r in page.jobs]
    if wide:  # what --json has besides: the agents of its steps, when it last changed, its error
        columns += [Column("agents", wrap=True), Column("updated"), Column("error", wrap=True)]
        rows = [(*row, Text(", ".join(sorted({s.agent for s in r.steps.values()}))), when(r.updated_at),
                 Text(r.error or "-")) for row, r in zip(rows, page.jobs, strict=True)]
    out.print(Listing(columns, rows, wide=wide))


def _show(record: JobRecord, as_json: bool, stuck: dict[str, float] | None = None, *, wide: bool = False,
          c: MeshClient | None = None, extra: dict[str, Any] | None = None) -> None:
    from mesh.ops import dag

    stuck = stuck or {}
    nodes = dag.load(c, record) if record.pipeline and c is not None else None
    if as_json:
        # the history (its trace once compacted) is mesh trace's to show, in the events' own shape
        emit_json({**record.model_dump(mode="json", exclude={"history"}), "stuck": stuck,
                   **({"dag": dag.as_json(nodes)} if nodes is not None else {}), **(extra or {})})
        return
    width = out.size.width
    head = Text.assemble(f"job {record.job_id}  ", (str(record.state), "bold"))
    trace = f"trace {record.trace_id}"
    if head.cell_len + 2 + len(trace) > width:  # the view fits the width: the trace id on a line of its own
        out.print(head)
        out.print(Text(trace))
    else:
        out.print(Text.assemble(head, f"  {trace}"))
    if record.goal:
        for line in _labelled("goal:", record.goal, width):
            out.print(line)
    if record.pipeline:
        out.print(Text(f"pipeline: {record.pipeline} ({(record.pipeline_digest or '')[:12]})"))
    if record.error:
        for line in _labelled("error:", record.error, width, "red"):
            out.print(line)
    if record.tokens_in or record.tokens_out:
        out.print(Text(f"model tokens: {record.tokens_in} in, {record.tokens_out} out"))
    for line in jobctl_lines(record):  # why it undoes its effects; the reruns it is of, or has
        for part in wrapped(line.plain, width, "  ") or [""]:
            out.print(Text(part))
    if nodes is None:
        out.print(steps_table(record, stuck, wide=wide))
        return
    for drawn in dag.draw(record, nodes, stuck, width=width):
        out.print(drawn)


def _labelled(label: str, text: str, width: int, style: str = "") -> list[Text]:
    """``label`` and ``text`` in lines of at most ``width`` columns, broken between words (a word longer
    than a line stays whole), the lines after the first indented under the text."""
    lines = wrapped(f"{label} {text}", width, " " * (len(label) + 1)) or [label]
    return [Text.assemble((label, style), lines[0].removeprefix(label)), *(Text(rest) for rest in lines[1:])]


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
        detail = step.error or _summary(step.result, whole=wide) or ""
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
                State.AWAITING_APPROVAL: "yellow", State.WAITING: "yellow", State.CANCELLED: "dim",
                State.COMPENSATING: "yellow", State.COMPENSATED: "cyan"}


def _summary(result: dict[str, Any] | None, *, whole: bool = False) -> str:
    """A step's result in a few words: its first 90 characters unless ``whole`` (--wide)."""
    cut = None if whole else 90
    if not result:
        return ""
    if "steps" in result:
        return f"{len(result['steps'])} steps"
    if "summary" in result:
        return str(result["summary"])[:cut]
    if "effect_id" in result:
        return f"{result.get('tool')} effect {result['effect_id']}"
    return str(result)[:cut]


def trace_(job_id: Annotated[str, typer.Argument(
               help="The job id (from `mesh submit` or `mesh jobs`) or its start, or the key it was sent with, "
                    "e.g. order-7.", metavar="JOB_ID|KEY", show_default=False)],
           follow: Annotated[bool, typer.Option("--follow", "-f", help="Print each event as it happens, one a "
                                                "line (with --json, one JSON object a line), until the job ends.")
                             ] = False,
           after: Annotated[str | None, typer.Option(
               "--after", metavar="EVENT_ID", show_default=False,
               help="With --follow: start after this event id (an \"id\" that --follow --json printed), to go "
                    "on where an earlier follow stopped.")] = None,
           as_json: JsonFlag = False) -> None:
    """A job's timeline, step by step, with offsets and durations.

    Every step's events in order: enqueued, picked up, tool calls, deferrals, failures, dead
    letters, duplicates, success. With --follow, the events so far and then each as it happens,
    until the job ends (Ctrl-C stops following; the job goes on); with --after, only those after
    that event."""
    from mesh.broker import trace
    from mesh.ops import dag
    from mesh.ops.timeline import by_step, render

    if after is not None and not follow:
        raise typer.BadParameter("goes with --follow (mesh trace JOB --follow --after EVENT_ID)",
                                 param_hint="--after")
    if after is not None and not EVENT_ID.fullmatch(after):
        raise typer.BadParameter(f"{after!r} is not an event id: give one as --follow --json prints it "
                                 "(\"id\", e.g. 1733500000000-0)", param_hint="--after")
    c = client()
    given, candidates = job_id, _job_candidates(c, job_id)
    if follow:
        _follow(c, given, candidates, as_json, after or "0")
        return
    for job_id in candidates:
        keys = c.keys_of(job_id)  # the job's shard
        events = trace.read(c.redis, keys, job_id)
        record = c.jobs_of(job_id).get(job_id)
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
    for line in render(record, events, nodes, width=out.size.width):
        out.print(line)  # soft-wrapped: a long line stays whole, never cropped at the terminal's width


#: A trace event's id as ``mesh trace --follow --json`` prints it: a stream id (``MS-SEQ``; a compacted
#: job's kept events read as ``0-1``, ``0-2``, ...), or ``0`` for the start.
EVENT_ID = re.compile(r"\d+(-\d+)?")


def _follow(c: MeshClient, given: str, candidates: list[str], as_json: bool, after: str = "0") -> None:
    """``mesh trace --follow [--after EVENT_ID]``: :meth:`MeshClient.events` printed as they come."""
    import contextlib
    import itertools

    from mesh.ops.timeline import event_line

    for job_id in candidates:
        events = c.events(job_id, last_id=after)
        try:
            first = next(events)
        except JobNotFound:
            continue
        except StopIteration:  # an ended job without events
            return
        with contextlib.suppress(KeyboardInterrupt):
            for ev in itertools.chain([first], events):
                _print_event(ev, as_json, event_line)
        return
    _no_job(c, given, candidates)


def _print_event(ev: dict[str, Any], as_json: bool, line: Any) -> None:
    if as_json:
        out.file.write(orjson.dumps(ev).decode() + "\n")
        out.file.flush()
    else:
        out.print(line(ev))


def register(app: typer.Typer) -> None:
    """Add ``submit``, ``run``, ``send``, ``status``, ``jobs`` and ``trace`` to the ``mesh`` command."""
    app.command(epilog="Examples: `mesh submit \"summarise the DLQ runbook\" --wait`, "
                "`mesh submit \"write the release note\" --key release-42`")(submit)
    app.command(epilog="Examples: `mesh run review.yaml --input '{\"goal\": \"add retries\"}' --app myapp --wait`, "
                "`mesh run multi-agent-orchestration --input @task.json --key review-7`")(run)
    app.command(epilog="Examples: `mesh send researcher --payload '{\"question\": \"what is a DLQ?\"}'`, "
                "`mesh send triage --file tickets.jsonl`")(send)
    app.command(epilog="Example: `mesh status job-5f0c` (a unique start of the id is enough), `mesh status order-7`, "
                "or `mesh status` for the deployment")(status)
    app.command()(jobs)
    app.command("trace", epilog="Examples: `mesh trace job-5f0c --json`, `mesh trace order-7`, "
                "`mesh trace order-7 --follow` while it runs, and `mesh trace order-7 --follow --json "
                "--after 1733500000000-0` to go on after the last event a script printed")(trace_)
