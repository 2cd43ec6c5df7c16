"""``note``: writes a note to Redis once per message key, and reads it back to verify the write.

A note is the user's data, not the mesh's bookkeeping: it is kept MESH_NOTE_RETENTION_S after it is
written (a TTL set with it; the retention sweep tidies the ``notes`` index), not as long as its job.
"""

from __future__ import annotations

import time
from typing import Any

from mesh.contracts import Receipt, dumps, loads
from mesh.contracts.errors import EffectRefuted
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


def verify_note(ctx: ToolContext, args: NoteArgs, result: Receipt | None) -> Receipt | bool:
    """``note``'s verifier: the note is read back under the key's effect id and must hold what the
    call wrote (its title and body); absent or different, the effect is refuted."""
    note_id = effect_id(ctx.key)
    note = read_note(ctx.redis, ctx.keys, note_id)
    if note is None:
        raise EffectRefuted(f"no note {note_id} to read back (key {ctx.key})")
    if note.get("title") != args.title or note.get("body") != args.body:
        raise EffectRefuted(f"note {note_id} holds another note than this call wrote")
    if result is not None:
        return result
    return Receipt(tool="note", effect_id=note_id, detail={"title": args.title, "created": False})
