"""What a done claim keeps of the output of the attempt that finished its key, and how a duplicate
reads it back.

A claim lives for the dedup window (MESH_DEDUP_TTL_S, 7 days), far longer than most jobs' records
(MESH_JOB_RETENTION_S), so what it holds is paid for every key for that long. It keeps the output
itself while the output is small (its JSON up to MESH_CLAIM_RESULT_BYTES); beyond that it keeps a
reference: ``@`` and the JSON ``{"job_id", "step_id", "sha256", "bytes"}`` naming the step whose
record holds the output, and its digest. (A JSON object never starts with ``@``.)

A duplicate that needs the output (a step of another job sharing the key, or a re-send of a job
whose record expired) gets it from the claim, or through the reference from that step's record
while it is kept and still holds the same output (its digest matches). When neither holds it any
more, the duplicate is told so plainly (:attr:`Stored.gone`), and nothing is run again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import redis

from mesh.contracts import dumps, loads

from .keys import Keys

#: Marks a reference in place of the output.
REF = b"@"


def encode(result: dict[str, Any] | None, envelope: dict[str, Any], limit: int, shard: int | None = None) -> bytes:
    """The claim's result for ``result``, the output of the step ``envelope`` names: the output's JSON
    when it is at most ``limit`` bytes, else a reference to that step's record with its digest.
    ``shard``: the shard of that step's job, named in the reference (a claim kept in another shard: a
    key shared across shards, broker/shared_claims.py); None: the claim's own shard."""
    data = dumps(result or {})
    if len(data) <= limit:
        return data
    ref = {"job_id": envelope.get("job_id"), "step_id": envelope.get("step_id"),
           "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return REF + dumps(ref if shard is None else {**ref, "shard": shard})


def whole(result: dict[str, Any] | None) -> bytes:
    """The claim's result for ``result`` kept whole, whatever its size: for a claim written before the
    record that would hold the output (a key shared across shards, broker/shared_claims.py), which a
    reference could name before the output is there, or after a crash, never."""
    return dumps(result or {})


@dataclass(frozen=True)
class Stored:
    """A done key's output as a duplicate reads it: ``output``, or None and why (``gone``)."""

    output: dict[str, Any] | None
    gone: str | None = None


def resolve(client: redis.Redis, keys: Keys, key: str, raw: bytes | None) -> Stored:
    """The output a done claim's result ``raw`` stands for (read through its reference when it is one).
    ``keys``: the claim's shard's, where the referenced step's job is read unless the reference names
    its shard."""
    if not raw:
        return Stored({})
    if not raw.startswith(REF):
        return Stored(loads(raw))
    ref = loads(raw[len(REF):])
    if isinstance(ref.get("shard"), int):
        keys = Keys(keys.namespace, ref["shard"])
    data: Any = client.get(keys.job(str(ref.get("job_id"))))
    step = (loads(data).get("steps") or {}).get(ref.get("step_id")) if data is not None else None
    result = step.get("result") if isinstance(step, dict) else None
    if isinstance(result, dict) and hashlib.sha256(dumps(result)).hexdigest() == ref.get("sha256"):
        return Stored(result)
    where = (f"job {ref.get('job_id')}'s record, where step {ref.get('step_id')} kept it, has expired "
             "(MESH_JOB_RETENTION_S)" if data is None else
             f"step {ref.get('step_id')} of job {ref.get('job_id')} no longer holds it")
    return Stored(None, f"key {key} is done (its effect happened) but its output is no longer kept: the "
                        f"claim keeps only its digest ({ref.get('bytes')} bytes, over MESH_CLAIM_RESULT_BYTES; "
                        f"sha256 {str(ref.get('sha256'))[:16]}...) and {where}. Nothing was run again; "
                        "send it with a new key to run it again")
