"""``mesh dlq``: inspect, replay, drain, load and purge the dead-letter queue."""

from __future__ import annotations

import base64
import math
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from mesh.ops import console as base

dlq_app = typer.Typer(help="The dead-letter queue: list, show, stats, replay, drain, load, purge.",
                      no_args_is_help=True, rich_markup_mode=base.MARKUP,
                      epilog="Examples: `mesh dlq list --agent executor --since 2h`, "
                             "`mesh dlq replay --class rate_limited --yes`, `mesh dlq drain --to dlq.jsonl --yes`")

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str | None, *, now: float | None = None) -> float | None:
    """``15m``/``2h``/``3d`` ago, UNIX seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None:
        return None
    now = time.time() if now is None else now
    if m := _RELATIVE.match(value.strip()):
        return _finite(now - float(m.group(1)) * _UNIT_S[m.group(2)], value)
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return _finite(seconds, value)
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a time: use 15m, 2h, 3d (ago), UNIX seconds or ISO 8601") from None
    if when.tzinfo is None:
        from datetime import UTC

        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _finite(seconds: float, value: str) -> float:
    """``seconds``, unless its milliseconds (what the DLQ's indexes are scored by) are not a finite
    number: ``1e308`` passes as seconds and overflows as milliseconds, ``1e400d`` ago is infinite."""
    if not math.isfinite(seconds * 1000):
        raise typer.BadParameter(f"{value!r} is not a time: use 15m, 2h, 3d (ago), UNIX seconds or ISO 8601")
    return seconds


Agent = Annotated[str | None, typer.Option("--agent", metavar="AGENT", help="Only entries of this agent.")]
Class = Annotated[str | None, typer.Option("--class", metavar="CLASS",
                                           help="Only entries of this failure class, e.g. rate_limited.")]
Since = Annotated[str | None, typer.Option(metavar="TIME", help="Dead-lettered at or after: 15m, 2h, 3d (ago), "
                                           "UNIX seconds, ISO 8601.")]
Until = Annotated[str | None, typer.Option(metavar="TIME",
                                           help="Dead-lettered at or before (same forms as --since).")]
Yes = Annotated[bool, typer.Option("--yes", help="Do it without asking.")]
Grep = Annotated[str | None, typer.Option("--grep", help="Only entries whose error contains this text (any case), "
                                          "e.g. --grep 'answered 400'.")]
KeyGlob = Annotated[str | None, typer.Option("--key", help="Only entries whose message key matches this glob, "
                                             "e.g. --key 'order-*'.")]
Dependency = Annotated[str | None, typer.Option("--dependency", help="Only entries whose failure names this "
                                                "dependency, e.g. --dependency 127.0.0.1:18777.")]


def _filter(agent: str | None, failure_class: str | None, since: str | None, until: str | None,
            grep: str | None = None, key: str | None = None, dependency: str | None = None) -> Any:
    from mesh.contracts import FailureClass
    from mesh.dlq import Filter

    if failure_class is not None and failure_class not in set(FailureClass):
        base.fail(f"unknown failure class {failure_class!r}; classes are {', '.join(FailureClass)}", base.EXIT_INPUT)
    if agent is not None:
        _check_agent(agent)
    now = _server_now(since, until)
    return Filter(agent=agent, failure_class=failure_class, since=parse_time(since, now=now),
                  until=parse_time(until, now=now), grep=grep, key=key, dependency=dependency)


def _server_now(*values: str | None) -> float | None:
    """The Redis server's time (s) when a value is relative (``15m``): dead letters are timed on that
    clock (the settle script's TIME), so "the last 15 minutes" must be too, whatever this host's says."""
    if not any(v is not None and _RELATIVE.match(v.strip()) for v in values):
        return None
    return base.client().clock.now_s()


def _check_agent(agent: str) -> None:
    """A misspelt --agent is an error (exit 2, naming the known agents), not an empty result: known are
    the built-in agents, the published ones and every agent that ever had a dead letter."""
    from mesh.contracts import CONTRACTS
    from mesh.dlq import DeadLetterShards

    c = base.client()
    known = dict.fromkeys([*CONTRACTS, *c.registry.agents(), *DeadLetterShards.of(c.redis, c.settings).agents()])
    if agent not in known:
        base.fail(f"unknown agent {agent!r}; agents are {', '.join(a for a in known if a != '-')}", base.EXIT_INPUT)


def _selection(ids: list[str] | None, all_: bool, agent: str | None, failure_class: str | None,
               since: str | None, until: str | None, grep: str | None = None, key: str | None = None,
               dependency: str | None = None) -> Any:
    """The filter of a bulk command that takes exactly one of: entry ids, --all, or filters."""
    has_filter = any(v is not None for v in (agent, failure_class, since, until, grep, key, dependency))
    if bool(ids) + all_ + has_filter != 1:
        base.fail("give entry ids, or --all, or filters (--agent/--class/--since/--until/--grep/--key/--dependency)",
                  base.EXIT_INPUT)
    return _filter(agent, failure_class, since, until, grep, key, dependency)


def _upto(ids: list[str] | None, flt: Any) -> str:
    """"up to " when the count is an index's, an upper bound for a filter checked on each entry."""
    return "" if ids or flt.exact else "up to "


def _store() -> Any:
    """The client, and the DLQ of every shard (:class:`~mesh.dlq.DeadLetterShards`)."""
    from mesh.dlq import DeadLetterShards

    c = base.client()
    return c, DeadLetterShards.of(c.redis, c.settings)


def _resolve(c: Any, given: str) -> str:
    """The entry id ``given`` is, or is the unique start of, in any shard's DLQ (exits 2 listing them
    when it starts several)."""
    from mesh.broker.shard_readers import every

    return base.resolve(c, [k.dlq for k in every(c.settings)], given, "dead letters")



def _confirm(yes: bool, what: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        base.fail(f"{what}: add --yes to confirm (no terminal to ask on)", base.EXIT_INPUT)
    if not typer.confirm(f"{what}?"):
        raise typer.Exit(base.EXIT_INPUT)


@contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr (only on a terminal, never with --json); yields an advance(n) callable."""
    if not enabled or not base.err.is_terminal:
        yield lambda n: None
        return
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=base.err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@dlq_app.command("list")
def list_(agent: Agent = None, failure_class: Class = None, since: Since = None, until: Until = None,
          grep: Grep = None, key: KeyGlob = None, dependency: Dependency = None,
          limit: Annotated[int, typer.Option(min=1, metavar="N", help="At most this many, newest first.")] = 50,
          wide: base.WideFlag = False, as_json: base.JsonFlag = False) -> None:
    """Dead letters, newest first, by agent, class and time, error text, key and dependency."""
    flt = _filter(agent, failure_class, since, until, grep, key, dependency)
    _, store = _store()
    entries = store.entries(flt, limit=limit)
    if as_json:
        base.emit_json([e.model_dump(mode="json") for e in entries])
        return
    if not entries:
        base.out.print("the dead-letter queue has no such entries")
        return
    columns: tuple[base.Column, ...] = (
        base.Column("id", key=True), base.Column("dead-lettered"), base.Column("agent", key=True),
        base.Column("class", key=True), base.Column("key", key=True), base.Column("attempts", justify="right"),
        base.Column("error", wrap=True))
    rows: list[tuple[str, ...]] = [(e.entry_id, base.when(e.dead_lettered_at), e.agent or "-", e.failure_class,
                                    e.key or "-", str(len(e.attempts)), e.error) for e in entries]
    if wide:  # the job (mesh status) and the trace (your tracing backend) each entry belongs to
        columns = (*columns[:-1], base.Column("job", key=True), base.Column("trace", key=True), columns[-1])
        rows = [(*row[:-1], e.job_id or "-", e.trace_id or "-", row[-1]) for row, e in zip(rows, entries, strict=True)]
    base.out.print(base.Listing(columns, rows, wide=wide))


@dlq_app.command()
def show(entry_id: Annotated[str, typer.Argument(help="The entry id (from `mesh dlq list`), or its start.",
                                                metavar="ID", show_default=False)],
         as_json: base.JsonFlag = False) -> None:
    """Everything an entry keeps, the payload as sent and its audit records included.

    An entry replayed since (its whole id) shows as replayed: what it was, when and by whom it was
    replayed, and the message and job it went on as, for MESH_DLQ_RETENTION_S (else
    MESH_DEDUP_TTL_S) after the replay."""
    from mesh.contracts import loads
    from mesh.dlq import Audit
    from mesh.dlq.replay import replayed

    c, dlq = _store()
    entry_id = _resolve(c, entry_id)
    store = dlq.store_of(entry_id)  # the shard holding it (its audit records and tombstone too)
    stored = store.load(entry_id)
    if stored is None:
        tomb = replayed(c.redis, store.keys, entry_id)
        if tomb is None:
            base.fail(f"no dead letter {entry_id!r}", base.EXIT_INPUT)
        _show_replayed(tomb, Audit(c.redis, store.keys).records(entry_id), as_json)
        return
    try:
        message: Any = loads(stored.raw)
    except ValueError:
        message = None
    item = {**stored.entry.model_dump(mode="json"),
            "message": message, "raw": None if message is not None else stored.raw.decode("utf-8", "replace"),
            "raw_b64": base64.b64encode(stored.raw).decode(),
            "audit": Audit(c.redis, store.keys).records(entry_id)}
    if as_json:
        base.emit_json(item)
        return
    e = stored.entry
    for name in ("entry_id", "agent", "queue", "failure_class", "error", "key", "job_id", "trace_id", "worker", "host",
                 "replay_count", "replay_of"):
        base.out.print(Text.assemble((f"{name}: ", "bold"), str(getattr(e, name))))
    base.out.print(Text.assemble(("dead_lettered_at: ", "bold"), base.when(e.dead_lettered_at)))
    for a in e.attempts:  # on one line when it fits, else the worker, then the error, on lines of their own
        said = [f"  attempt {a.attempt}: {a.outcome} {a.failure_class or ''} at {base.when(a.at)}", f"on {a.worker}:",
                *([a.error] if a.error else [])]
        for line in base.fitted(said, " ", indent="    "):
            base.out.print(Text(line))
    payload = e.envelope.get("payload") if e.envelope else None
    base.out.print(Text.assemble(("payload: ", "bold"), orjson.dumps(payload).decode() if payload is not None
                                 else item["raw"] or "-"))
    if e.traceback:
        base.out.print(Text(e.traceback.rstrip()))


def _show_replayed(tomb: dict[str, Any], audit: list[dict[str, Any]], as_json: bool) -> None:
    """A replayed entry, from its tombstone: what it was, and where it went."""
    if as_json:
        base.emit_json({**tomb, "state": "replayed", "audit": audit})
        return
    base.out.print(Text.assemble(("entry_id: ", "bold"), tomb["entry_id"]))
    base.out.print(Text.assemble(("state: ", "bold"), "replayed (no longer in the DLQ)"))
    for name in ("agent", "failure_class", "error", "key", "replay_of"):
        base.out.print(Text.assemble((f"{name}: ", "bold"), str(tomb.get(name))))
    base.out.print(Text.assemble(("dead_lettered_at: ", "bold"), base.when(tomb.get("dead_lettered_at"))))
    base.out.print(Text.assemble(("replayed_at: ", "bold"), base.when(tomb.get("replayed_at")),
                                 f" by {tomb.get('replayed_by')}"))
    version = f", contract version {tomb['to_version']}" if tomb.get("to_version") is not None else ""
    base.out.print(Text.assemble(("message_id: ", "bold"), str(tomb.get("message_id"))))
    base.out.print(Text.assemble(("queue: ", "bold"), f"{tomb.get('queue')} (replay {tomb.get('replay_count')}"
                                 f"{version})"))
    base.out.print(Text.assemble(("job_id: ", "bold"), str(tomb.get("job_id"))))


@dlq_app.command()
def stats(wide: base.WideFlag = False, as_json: base.JsonFlag = False) -> None:
    """Counts by agent and class, with the oldest and newest entry's time."""
    _, store = _store()
    s = store.stats()
    if as_json:
        base.emit_json(s)
        return
    base.out.print(f"{s['total']} dead letters; oldest {base.when(s['oldest_at'])}, newest {base.when(s['newest_at'])}")
    for title, counts in (("agent", s["by_agent"]), ("class", s["by_class"])):
        base.out.print(base.Listing((base.Column(title, key=True), base.Column("entries", justify="right")),
                                    [(name, str(n)) for name, n in sorted(counts.items())], wide=wide))


@dlq_app.command()
def replay(
    ids: Annotated[list[str] | None, typer.Argument(help="Entry ids (or their starts); or --all, or filters.",
                                                    metavar="ID", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every entry.")] = False,
    agent: Agent = None, failure_class: Class = None, since: Since = None, until: Until = None,
    grep: Grep = None, key: KeyGlob = None, dependency: Dependency = None,
    rate: Annotated[float | None, typer.Option(min=0.001, metavar="N",
                                               help="At most this many entries per second.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Change nothing; report what would move.")] = False,
    to_version: Annotated[int | None, typer.Option(
        "--to-version", min=1, metavar="N",
        help="Send each message to contract version N of its agent (the version its workers publish now), "
             "if its payload fits N's input; entries that do not fit are skipped.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Replay --all or the filtered entries without asking "
                                      "(entries named by id never ask).")] = False,
    as_json: base.JsonFlag = False,
) -> None:
    """Re-enqueue entries: original key, fresh attempts and deadline.

    Each copy records the entry it replays (replay_of), in the DLQ's audit log and in its job's
    trace; an entry leaves the DLQ only once its copy is enqueued. A one-message job whose record
    expired gets it back; a pipeline step whose job expired is skipped (--dry-run says so too).
    After a rolling deploy, --to-version sends messages stamped with a retired contract version to
    the current one. Entries named by id replay at once; --all and filters ask first (without a
    terminal to ask on, they need --yes)."""
    from mesh.dlq.replay import replay_shards

    flt = _selection(ids, all_, agent, failure_class, since, until, grep, key, dependency)
    c, store = _store()
    ids = [_resolve(c, i) for i in ids] if ids else ids
    total = len(ids) if ids else store.count(flt)
    if not dry_run and not ids:  # entries named one by one are already chosen: no question to ask
        _confirm(yes, f"replay {_upto(ids, flt)}{total} dead letter(s)")
    with _progress(total, "replaying", not as_json and not dry_run) as advance:  # a shard at a time
        report = replay_shards(store, c.settings, ids=ids or None, flt=None if ids else flt, to_version=to_version,
                               dry_run=dry_run, rate=rate, progress=advance)
    if ids:
        for missing in set(ids) - set(report.replayed) - set(report.skipped):
            report.skipped[missing] = "no such entry"
    result = {"dry_run": dry_run, "replayed": len(report.replayed), "skipped": report.skipped,
              "by_agent": report.by_agent, "by_class": report.by_class, "ids": report.replayed,
              "errors": report.errors}
    if as_json:
        base.emit_json(result)
    else:
        verb = "would replay" if dry_run else "replayed"
        said = [f"{verb} {len(report.replayed)} dead letter(s)", *(f"{n} of class {k}" for k, n
                                                                 in sorted(report.by_class.items()))]
        # a part per class, ";" after each but the last: as many classes as fit on a line
        for line in base.fitted([f"{part};" for part in said[:-1]] + said[-1:], " "):
            base.out.print(Text(line))
        for entry_id, reason in report.skipped.items():
            base.err.print(Text(f"skipped {entry_id}: {reason}"))
        for error in report.errors:
            base.err.print(Text(f"error: Redis refused {error} (the entries were replayed)"))
    if report.skipped or report.errors:
        raise typer.Exit(base.EXIT_FAILED)


@dlq_app.command()
def drain(
    to: Annotated[Path, typer.Option("--to", metavar="FILE", help="JSONL file to append the entries to.",
                                     show_default=False)],
    agent: Agent = None, failure_class: Class = None, since: Since = None, until: Until = None,
    grep: Grep = None, key: KeyGlob = None, dependency: Dependency = None,
    yes: Yes = False, as_json: base.JsonFlag = False,
) -> None:
    """Export entries to a JSONL file and remove them from the DLQ.

    Each batch is written and fsynced before it is removed; `mesh dlq load` puts them back."""
    from mesh.dlq import drain as drain_entries

    flt = _filter(agent, failure_class, since, until, grep, key, dependency)
    _, store = _store()
    total = store.count(flt)
    _confirm(yes, f"drain {_upto(None, flt)}{total} dead letter(s) to {to}")
    try:
        to.open("ab").close()
    except OSError as exc:
        base.fail(f"cannot write {to}: {exc.strerror or exc} (nothing was drained)", base.EXIT_INPUT)
    with _progress(total, "draining", not as_json) as advance:
        n = drain_entries(store, to, flt, progress=advance)
    if as_json:
        base.emit_json({"drained": n, "file": str(to)})
    else:
        base.out.print(Text(f"drained {n} dead letter(s) to {to}"))


@dlq_app.command()
def load(file: Annotated[Path, typer.Argument(help="A file written by `mesh dlq drain`.", metavar="FILE",
                                              show_default=False)],
         as_json: base.JsonFlag = False) -> None:
    """Put drained entries back into the DLQ.

    Ids are preserved; an entry already in the DLQ is not added twice."""
    from mesh.dlq import ExportFileError
    from mesh.dlq import load as load_entries
    from mesh.dlq.checks import Limits

    if not file.is_file():
        base.fail(f"no file {file}", base.EXIT_INPUT)
    c, store = _store()
    try:
        report = load_entries(store, file, limits=Limits.of(c.settings))
    except ExportFileError as exc:
        base.fail(f"{exc} (nothing was loaded)", base.EXIT_INPUT)
    if as_json:
        base.emit_json({"loaded": report.loaded, "already_present": report.already_present})
    else:
        base.out.print(f"loaded {report.loaded} dead letter(s); {report.already_present} already in the DLQ")


@dlq_app.command()
def purge(
    ids: Annotated[list[str] | None, typer.Argument(help="Entry ids (or their starts); or --all, or filters.",
                                                    metavar="ID", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every entry.")] = False,
    agent: Agent = None, failure_class: Class = None, since: Since = None, until: Until = None,
    grep: Grep = None, key: KeyGlob = None, dependency: Dependency = None,
    yes: Yes = False, as_json: base.JsonFlag = False,
) -> None:
    """Delete entries for good. Refuses without --yes."""
    from mesh.dlq import purge as purge_entries

    flt = _selection(ids, all_, agent, failure_class, since, until, grep, key, dependency)
    if not yes:
        base.fail("purge deletes dead letters for good: add --yes (or drain them to a file instead)",
                  base.EXIT_INPUT)
    c, store = _store()
    ids = [_resolve(c, i) for i in ids] if ids else ids
    n = purge_entries(store, None if ids else flt, ids=ids or None)
    if as_json:
        base.emit_json({"purged": n})
    else:
        base.out.print(f"purged {n} dead letter(s)")
