"""``note``: writes a note to Redis once per message key, and can read it back.

A note is the user's data, not the mesh's bookkeeping: it is kept MESH_NOTE_RETENTION_S after it is
written (a TTL set with it; the retention sweep tidies the ``notes`` index), not as long as its job.
"""

from __future__ import annotations

import time
from typing import Any

from mesh.contracts import Receipt, dumps, loads
from mesh.contracts.tools import NoteArgs

from .base import ToolContext, effect_id


def write_note(ctx: ToolContext, args: NoteArgs) -> Receipt:
    note_id = effect_id(ctx.key)
    written_at = time.time()
    note = {"note_id": note_id, "title": args.title, "body": args.body, "findings": args.findings,
            "key": ctx.key, "job_id": ctx.job_id, "trace_id": ctx.trace_id, "written_at": written_at}
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.set(ctx.keys.note(note_id), dumps(note), nx=True, px=max(1, int(ctx.settings.note_retention_s * 1000)))
    pipe.zadd(ctx.keys.notes, {note_id: written_at}, nx=True)
    created, _ = pipe.execute()
    return Receipt(tool="note", effect_id=note_id, detail={"title": args.title, "created": bool(created)})


def read_note(client: Any, keys: Any, note_id: str) -> dict[str, Any] | None:
    data = client.get(keys.note(note_id))
    return None if data is None else loads(data)
