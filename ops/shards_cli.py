"""``mesh shards``: where a namespace's jobs live: each shard's hash tag, slot, primary (on a Redis
Cluster), and the jobs and dead letters it holds (broker/shards.py)."""

from __future__ import annotations

from typing import Any

import typer
from redis.crc import key_slot

from mesh.broker.connection import is_cluster
from mesh.broker.shards import Shards
from mesh.ops.console import Column, JsonFlag, Listing, WideFlag, client, emit_json, out


def shards(wide: WideFlag = False, as_json: JsonFlag = False) -> None:
    """Each shard of the namespace (MESH_SHARD, MESH_SHARDS): its hash tag and slot, the primary that holds it
    on a Redis Cluster, and the jobs (kept records) and dead letters in it; ``fleet`` is the fleet-wide keys'.

    On a cluster, shards on one primary share its capacity: ``primaries`` (in ``--json``) counts the shards each
    holds; ``recorded`` is the count the namespace's first worker or client recorded (``first+count``; null
    before any)."""
    c = client()
    placed = Shards.of(c.settings)
    recorded = c.redis.get(placed.home.shard_count)
    recorded = recorded.decode() if isinstance(recorded, bytes) else recorded
    rows: list[dict[str, Any]] = []
    counts = c.redis.pipeline(transaction=False) if not is_cluster(c.redis) else None
    for keys in placed.keys:
        tag = keys.prefix
        row: dict[str, Any] = {"shard": keys.shard, "tag": tag, "slot": key_slot(tag[1:-1].encode()),
                               "primary": _primary(c.redis, keys.jobs)}
        if counts is not None:
            counts.zcard(keys.jobs)
            counts.zcard(keys.dlq)
        else:
            row["jobs"], row["dead_letters"] = int(c.redis.zcard(keys.jobs)), int(c.redis.zcard(keys.dlq))
        rows.append(row)
    if counts is not None:
        found = counts.execute()
        for n, row in enumerate(rows):
            row["jobs"], row["dead_letters"] = int(found[2 * n]), int(found[2 * n + 1])
    fleet = placed.home.fleet
    fleet_row = {"tag": fleet, "slot": key_slot(fleet[1:-1].encode()), "primary": _primary(c.redis, placed.home.layout)}
    by_primary: dict[str, int] = {}
    for row in rows:
        by_primary[row["primary"]] = by_primary.get(row["primary"], 0) + 1
    if as_json:
        emit_json({"namespace": placed.namespace, "count": placed.count, "recorded": recorded, "shards": rows,
                   "fleet": fleet_row, "primaries": by_primary if is_cluster(c.redis) else {}})
        return
    columns = (Column("shard", key=True), Column("tag"), Column("slot", justify="right"), Column("primary"),
               Column("jobs", justify="right"), Column("dead letters", justify="right"))
    table = [(str(r["shard"]), r["tag"], str(r["slot"]), r["primary"] or "-", str(r["jobs"]), str(r["dead_letters"]))
             for r in rows]
    table.append(("fleet", fleet_row["tag"], str(fleet_row["slot"]), fleet_row["primary"] or "-", "", ""))
    out.print(Listing(columns, table, wide=wide))
    if recorded is not None and recorded != placed.recorded:
        first, _, count = recorded.partition("+")
        out.print(f"The namespace's workers recorded {count} shard(s) from {first}; these settings say "
                  f"{placed.count} from {placed.first} (MESH_SHARD, MESH_SHARDS): the counts above are not theirs.",
                  soft_wrap=False)


def _primary(redis_client: Any, key: str) -> str:
    """The ``host:port`` of the primary holding ``key`` on a cluster; ``""`` on a single Redis."""
    if not is_cluster(redis_client):
        return ""
    return str(redis_client.get_node_from_key(key).name)


def register(app: typer.Typer) -> None:
    """Add ``shards`` to the ``mesh`` command."""
    app.command(epilog="Examples: `mesh shards`, `mesh shards --json`")(shards)
