"""``mesh migrate``: move a namespace's data from the key layout of an older mesh (``NS:rest``) to
the hash-tagged one (``{NS}:rest``); see :mod:`mesh.broker.layout` and docs/guides/upgrading.md."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import redis
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mesh.ops import console as base

#: Conflicts printed by name; the rest are counted (--json lists them all).
SHOWN_CONFLICTS = 10


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr (only on a terminal, never with --json); yields an advance(n) callable."""
    if not enabled or not total or not base.err.is_terminal:
        yield lambda n: None
        return
    with Progress(TextColumn("moving"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=base.err, transient=True) as bar:
        task = bar.add_task("moving", total=total)
        yield lambda n: bar.advance(task, n)


def migrate(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count the keys that would move, by kind; "
                                          "move nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Run even while workers heartbeat on the "
                                        "namespace (what they write meanwhile may be lost or conflict).")] = False,
    as_json: base.JsonFlag = False,
) -> None:
    """Move the namespace's keys from the layout of an older mesh (`NS:rest`) to the
    hash-tagged one (`{NS}:rest`), then mark it migrated (`{NS}:layout`).

    Each key is renamed with RENAMENX: its type, value and TTL kept, atomic per key. Stop the
    namespace's workers first: it refuses while one heartbeats (unless --force). Run it again at
    will: a run stopped midway is finished by the next, and a migrated namespace has nothing to
    do. A key whose new name exists already is a conflict, left as it is and never overwritten.

    Before marking, it looks for keys of the older layout once more: any found were written during
    the run by something of the older release still running; they are moved too, and the namespace
    is left unmarked until a run finds none.

    Exit codes: 0 done or nothing to do, 1 conflicts (nothing overwritten; resolve and run
    again) or keys written during the run (stop the writer and run again), 2 refused (workers
    alive) or bad input, 3 Redis unreachable."""
    from mesh.broker import layout

    c = base.client(layout_warning=False)
    ns = c.settings.namespace
    if c.settings.shard:
        base.fail(f"mesh migrate moves namespace {ns}'s keys of the older layout to shard 0's ({{{ns}}}:...), "
                  f"not to shard {c.settings.shard}: unset MESH_SHARD and run again", base.EXIT_INPUT)
    if c.settings.shards > 1:  # shard 0 holds no job of a namespace of several shards: nothing would read them
        base.fail(f"mesh migrate moves namespace {ns}'s keys of the older layout to shard 0's ({{{ns}}}:...), "
                  f"the one shard of an older mesh, and MESH_SHARDS={c.settings.shards} reads none of its jobs "
                  "there: run it with MESH_SHARDS=1, serve the namespace with MESH_SHARDS=1 until it is drained, "
                  "then change the count (docs/design/keys.md, \"Shards\")", base.EXIT_INPUT)
    if not dry_run and not force:
        alive = layout.alive_workers(c.redis, ns, c.settings.heartbeat_timeout_s)
        if alive.count:
            assert alive.newest_ms is not None and alive.oldest_ms is not None
            age = (alive.now_ms - alive.newest_ms) / 1000
            base.fail(f"{alive.count} worker(s) alive on namespace {ns}: heartbeating since "
                      f"{base.when(alive.oldest_ms / 1000)} or earlier, the last {age:.0f}s ago "
                      f"(MESH_HEARTBEAT_TIMEOUT_S={c.settings.heartbeat_timeout_s:g}). Stop them and "
                      "run again, or add --force", base.EXIT_INPUT)
    show = not as_json and not dry_run and base.err.is_terminal
    try:
        total = layout.count_old(c.redis, ns) if show else 0
        with _progress(total, show) as advance:
            done = layout.migrate(c.redis, ns, dry_run=dry_run, progress=advance)
    except redis.exceptions.NoPermissionError as exc:
        base.fail(f"this Redis user may not migrate namespace {ns} ({exc}): `mesh migrate` walks it with SCAN "
                  f"and renames with RENAMENX, keys {ns}:* and {{{ns}}}:*, which the mesh's own user is not "
                  "given. Run it as an administrator's user, or grant them for the duration "
                  "(docs/guides/upgrading.md, \"The Redis user\")", base.EXIT_INPUT)
    if done.total and not dry_run:  # the moved jobs are shard 0's: workers counting otherwise refuse to start
        from mesh.broker.shards import Shards

        c.redis.set(Shards(ns).home.shard_count, Shards(ns).recorded, nx=True)
    if as_json:
        base.emit_json({"namespace": ns, "dry_run": dry_run, "moved": done.total, "by_kind": dict(done.moved),
                        "conflicts": [{"key": old, "new_key": new} for old, new in done.conflicts],
                        "vanished": done.vanished, "rewritten": done.rewritten, "marked": done.marked,
                        "marker": layout.marker(ns)})
    else:
        _print(done, ns)
    if done.conflicts or done.rewritten:
        raise typer.Exit(base.EXIT_FAILED)


def _print(done: Any, ns: str) -> None:
    from mesh.broker import layout

    verb = "would move" if done.dry_run else "moved"
    if not done.total and not done.conflicts:
        marked = [f"(marked: {layout.marker(ns)})"] if done.marked else []
        for line in base.fitted([f"nothing to do: namespace {ns} holds no key of the older layout", *marked], " "):
            base.out.print(line, highlight=False, markup=False)
        return
    for line in base.fitted([f"{verb} {done.total} key(s) of namespace {ns}", f"to the layout {{{ns}}}:..."], " "):
        base.out.print(line, highlight=False, markup=False)
    for name, n in sorted(done.moved.items(), key=lambda item: (-item[1], item[0])):
        base.out.print(f"  {n:>9}  {name}", highlight=False, markup=False)
    if done.vanished:
        base.out.print(f"{done.vanished} key(s) gone before their move (expired, or moved by another run)",
                       highlight=False)
    if done.rewritten and not done.conflicts:
        base.err.print(f"error: {done.rewritten} key(s) of the older layout were written during the run (moved "
                       "too): a worker or client of the older release still writes to the namespace, unseen by "
                       "the new workers. Stop it and run `mesh migrate` again; until then the namespace stays "
                       "unmarked: workers refuse it.", highlight=False, markup=False)
    if done.marked:
        base.out.print(f"marked {layout.marker(ns)} = {layout.VERSION}: workers may start", highlight=False,
                       markup=False)
    if done.conflicts:
        listed = "".join(f"\n  {old} -> {new}" for old, new in done.conflicts[:SHOWN_CONFLICTS])
        more = len(done.conflicts) - SHOWN_CONFLICTS
        listed += f"\n  ... and {more} more (--json lists them)" if more > 0 else ""
        base.err.print(f"error: {len(done.conflicts)} key(s) not moved: their new name exists already, and "
                       f"nothing was overwritten:{listed}\nCompare each pair, delete the copy to drop (DEL; or "
                       "RENAME the old key over the new one to keep it), then run `mesh migrate` again. Until "
                       "then the namespace's lasting keys (stats, jobs, registry, ...) stay where they are and "
                       "it stays unmarked: workers refuse it.", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``migrate`` to the ``mesh`` command."""
    app.command(epilog="Examples: `mesh migrate --dry-run`, `mesh migrate`, `mesh migrate --json`")(migrate)
