"""An agent queue's lanes: its ready messages wait by priority and flow key, and a fetch serves
higher priorities first (each lower level still one fetch in eight) and flows round robin. The
scripts do the serving (``scripts/lanes_lib.lua``, which says how); Python stages messages into
their lanes inside a transaction and counts what waits."""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
import redis

from mesh.contracts import PRIORITIES

from .keys import Keys

LIB = resources.files("mesh.broker").joinpath("scripts/lanes_lib.lua").read_text()

#: Counts a queue's ready messages per priority, and its flows with ready work, in a few commands
#: per queue however many flows it has.
_DEPTH_LUA = LIB + """
local out = {}
for i, base in ipairs(KEYS) do
    local row = {}
    local waiting = redis.call("hmget", base .. ".sched", "n:high", "n:normal", "n:low")
    for l, level in ipairs(LANE_LEVELS) do
        local ring = lane_ring(base, level)
        row[#row + 1] = redis.call("llen", lane_plain(base, level)) + (tonumber(waiting[l]) or 0)
        row[#row + 1] = redis.call("zcard", ring) - (redis.call("zscore", ring, "") and 1 or 0)
    end
    out[i] = row
end
return out
"""


def lanes_field(queue: str) -> str:
    """The field of the stats hash set while ``queue``'s other lanes may have work (lanes_lib.lua)."""
    return f"lanes:{queue}"


def of(envelope: Any) -> tuple[str, str | None]:
    """The priority and flow key (as JSON escapes it; None: none) of a message's envelope, as the
    scripts read them from the encoded message (lanes_lib.lua ``lane_of``)."""
    if not isinstance(envelope, dict):
        return "normal", None
    priority = envelope.get("priority")
    flow = envelope.get("flow_key")
    text = orjson.dumps(flow)[1:-1].decode() if isinstance(flow, str) and flow else None
    return (priority if priority in ("high", "low") else "normal"), text


def push(pipe: Any, keys: Keys, queue: str, rid: str, envelope: Any) -> None:
    """Stage the push of message ``rid`` (its envelope: ``envelope``) at the tail of its lane of
    ``queue``: what the scripts' ``lane_push`` does, for a transaction."""
    priority, flow = of(envelope)
    if flow is None:
        pipe.rpush(keys.lane(queue, priority), rid)
        if priority == "normal":
            return
    else:
        pipe.rpush(keys.flow(queue, priority, flow), rid)
        pipe.zadd(keys.flows(queue, priority), {flow: 0}, nx=True)
        pipe.hincrby(keys.sched(queue), f"n:{priority}", 1)
    pipe.hset(keys.stats, lanes_field(queue), 1)


def depth(client: redis.Redis, keys: Keys, queues: list[str]) -> dict[str, dict[str, Any]]:
    """Per queue: ``ready`` (every lane), ``by_priority`` (ready per priority) and ``flows`` (flow
    keys with ready work), read in one script call."""
    if not queues:
        return {}
    rows: list[list[int]] = client.eval(_DEPTH_LUA, len(queues), *(keys.queue(q) for q in queues))
    out = {}
    for queue, row in zip(queues, rows, strict=True):
        by = {p: int(row[2 * i]) for i, p in enumerate(PRIORITIES)}
        flows = sum(int(row[2 * i + 1]) for i in range(len(PRIORITIES)))
        out[queue] = {"ready": sum(by.values()), "by_priority": by, "flows": flows}
    return out
