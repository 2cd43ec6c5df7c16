"""Drain (export and remove), load (put back) and purge (delete), streaming in constant memory.

An exported line is ``{"entry": {...}, "raw_b64": "..."}``; load reads a file as untrusted input
(checks.py says what it refuses). Drain appends a batch to the file,
flushes and fsyncs it, and only then removes that batch from the DLQ: a crash leaves entries at
worst both in the file and in the DLQ, and loading them back is idempotent (ids are preserved and
an id already in the DLQ is skipped).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson
from pydantic import ValidationError

from mesh.contracts import MeshError

from .audit import Audit
from .checks import Limits, Routes, entry_problem, message_body, shown
from .entry import DeadLetter
from .store import DeadLetterShards, DeadLetterStore, Filter, Stored

Progress = Callable[[int], None]


class ExportFileError(MeshError):
    """A line of an export file is not an exported entry."""


@dataclass(frozen=True)
class LoadReport:
    loaded: int
    already_present: int


def line_of(stored: Stored) -> bytes:
    return orjson.dumps({"entry": stored.entry.model_dump(mode="json"),
                         "raw_b64": base64.b64encode(stored.raw).decode()}) + b"\n"


def drain(store: DeadLetterStore | DeadLetterShards, path: Path, flt: Filter | None = None, *,
          audit: Audit | None = None, progress: Progress | None = None) -> int:
    """Append every matching entry to ``path`` (fsynced) and then remove it; returns how many. Of every
    shard, one after the other, given :class:`DeadLetterShards`."""
    where = str(path.resolve())
    n = 0
    with path.open("ab") as f:
        for one, batch in _batches(store, flt or Filter()):
            f.writelines(line_of(s) for s in batch)
            f.flush()
            os.fsync(f.fileno())
            n += _take_out(one, batch, _audit(one, audit), "drain", "dlq_drained", lambda s: {"file": where},
                           progress)
    return n


def _batches(store: DeadLetterStore | DeadLetterShards, flt: Filter) -> Iterator[tuple[DeadLetterStore, list[Stored]]]:
    """The batches of :meth:`DeadLetterStore.iter`, each with the store (the shard) it is of."""
    if isinstance(store, DeadLetterShards):
        yield from store.iter(flt)
        return
    for batch in store.iter(flt):
        yield store, batch


def _audit(store: DeadLetterStore, audit: Audit | None) -> Audit:
    """The audit log of ``store``'s shard, written as ``audit``'s operator (or this process's)."""
    if audit is not None and audit.keys.dlq_audit == store.keys.dlq_audit:
        return audit
    return Audit(store.client, store.keys, who=audit.who if audit is not None else None)


def _take_out(store: DeadLetterStore, batch: list[Stored], audit: Audit, op: str, stat: str,
              detail: Callable[[Stored], dict[str, object]], progress: Progress | None) -> int:
    """Remove ``batch`` from the DLQ with an audit record per entry and the counter, in one MULTI."""
    pipe = store.client.pipeline(transaction=True)
    store.remove([s.entry for s in batch], pipe)
    for s in batch:
        audit.stage(pipe, op, s.entry.entry_id, **detail(s))
    pipe.hincrby(store.keys.stats, stat, len(batch))
    pipe.execute()
    if progress:
        progress(len(batch))
    return len(batch)


def read_export(path: Path, limits: Limits | None = None) -> Iterator[Stored]:
    """The entries of an export file, one line at a time and never more than a line's cap in memory;
    ExportFileError names a bad line."""
    for _, stored in _read(path, limits or Limits()):
        yield stored


def _read(path: Path, limits: Limits) -> Iterator[tuple[int, Stored]]:
    """Each entry of an export file with its line number."""
    with path.open("rb") as f:
        for number, line in enumerate(_lines(f, path, limits.max_line_bytes), 1):
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
                entry = DeadLetter.model_validate(item["entry"])
                raw = base64.b64decode(item["raw_b64"], validate=True)
            except ValidationError as exc:  # before ValueError, its base: name every invalid field
                raise ExportFileError(f"{path}:{number} is not an exported dead letter: {_fields(exc)}",
                                      line=number) from None
            except (ValueError, TypeError, KeyError) as exc:
                raise ExportFileError(f"{path}:{number} is not an exported dead letter: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                                      line=number) from None
            problem = entry_problem(entry, raw, limits)
            if problem:
                raise ExportFileError(f"{path}:{number} is refused: entry {shown(entry.entry_id)}: {problem}",
                                      line=number)
            yield number, Stored(entry, raw)


def _lines(f: BinaryIO, path: Path, cap: int) -> Iterator[bytes]:
    """The file's lines, each read up to ``cap`` bytes (its newline aside): a longer line is refused,
    never read whole."""
    number = 0
    while line := f.readline(cap + 1):
        number += 1
        if len(line) > cap and not line.endswith(b"\n"):
            raise ExportFileError(f"{path}:{number} is refused: the line is over MESH_DLQ_MAX_LINE_BYTES ({cap} "
                                  "bytes); raise it to load this file", line=number)
        yield line


def _fields(exc: ValidationError) -> str:
    """``entry.field: problem; ...`` for every invalid field of an exported entry."""
    return "; ".join(f"entry.{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}"
                     for e in exc.errors(include_url=False, include_input=False))[:500]


def load(store: DeadLetterStore | DeadLetterShards, path: Path, *, limits: Limits | None = None,
         routes: Routes | None = None, audit: Audit | None = None, progress: Progress | None = None) -> LoadReport:
    """Put an export's entries back, ids preserved; an id already in the DLQ is skipped. Given
    :class:`DeadLetterShards`, each goes back to the shard of its job.

    The whole file is checked first, so a bad line loads nothing: each line within ``limits``, and
    each entry whose bytes are a message addressed as a replay would send it (``routes``: the
    deployment's agents and queues, read from its registry by default).
    """
    limits = limits or Limits()
    home = store.home if isinstance(store, DeadLetterShards) else store
    routes = routes or Routes.read(home.client, home.keys)
    for number, stored in _read(path, limits):
        body = message_body(stored.raw)
        problem = routes.problem(stored.entry, body) if body is not None else None
        if problem:
            raise ExportFileError(f"{path}:{number} is refused: entry {shown(stored.entry.entry_id)}: {problem}",
                                  line=number)
    loaded = present = 0
    for stored in read_export(path, limits):
        one = store.for_entry(stored.entry) if isinstance(store, DeadLetterShards) else store
        if one.put(stored.entry, stored.raw):
            loaded += 1
            pipe = one.client.pipeline(transaction=False)
            _audit(one, audit).stage(pipe, "load", stored.entry.entry_id, file=str(path.resolve()))
            pipe.execute()
        else:
            present += 1
        if progress:
            progress(1)
    return LoadReport(loaded, present)


def purge(store: DeadLetterStore | DeadLetterShards, flt: Filter | None = None, ids: list[str] | None = None, *,
          audit: Audit | None = None, progress: Progress | None = None) -> int:
    """Delete matching entries (or the given ids) for good, each with an audit record (a shard at a
    time, given :class:`DeadLetterShards`)."""
    batches: Iterator[tuple[DeadLetterStore, list[Stored]]]
    if ids is not None and isinstance(store, DeadLetterShards):
        found: dict[int, list[Stored]] = {}
        for entry_id in ids:
            one = store.store_of(entry_id)
            stored = one.load(entry_id)
            if stored is not None:
                found.setdefault(store.stores.index(one), []).append(stored)
        batches = iter([(store.stores[i], found[i]) for i in sorted(found)])
    elif ids is not None:
        one = store.home if isinstance(store, DeadLetterShards) else store
        batches = iter([(one, [s for s in map(one.load, ids) if s is not None])])
    else:
        batches = _batches(store, flt or Filter())
    return sum(_take_out(one, batch, _audit(one, audit), "purge", "dlq_purged",
                         lambda s: {"failure_class": s.entry.failure_class, "agent": s.entry.agent}, progress)
               for one, batch in batches if batch)
