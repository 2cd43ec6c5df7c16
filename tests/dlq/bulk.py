"""Many dead letters written fast: straight into the layout the settle script writes, in big
pipelines, so tests can fill the DLQ with 10,000 or 100,000 entries in seconds."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from mesh.broker.client import job_id_for

AGENTS = ("planner", "researcher", "executor")
CLASSES = ("permanent", "invalid_input", "deadline", "timeout")
TRACEBACK = "".join(f'  File "/srv/mesh/agents/module_{i}.py", line {10 * i}, in handler\n    step_{i}()\n'
                    for i in range(4))


def nth_id(i: int) -> str:
    """The id of the ``i``-th generated entry (ids sort in the order they were generated)."""
    return f"e{i:07d}-{uuid.UUID(int=i)}"


def agent_of(i: int) -> str:
    return AGENTS[i % 3]


def class_of(i: int) -> str:
    return CLASSES[i % 4]


def generate(rclient: Any, keys: Any, n: int, t0: float, chunk: int = 5_000, *, per_ms: int = 1) -> dict[str, Any]:
    """Write ``n`` replayable entries (each a one-message job's, as ``mesh send`` makes them, whose record
    has expired), ``per_ms`` of them dead-lettered in each millisecond from ``t0``
    (more than one gives entries with equal scores, as a burst of dead letters does)."""
    by_agent: dict[str, int] = {}
    by_class: dict[str, int] = {}
    for start in range(0, n, chunk):
        pipe = rclient.pipeline(transaction=False)
        everything: dict[str, int] = {}
        agent_index: dict[str, dict[str, int]] = {a: {} for a in AGENTS}
        class_index: dict[str, dict[str, int]] = {c: {} for c in CLASSES}
        for i in range(start, min(start + chunk, n)):
            agent, failure_class = agent_of(i), class_of(i)
            eid = nth_id(i)
            at_ms = int(t0 * 1000) + i // per_ms
            key = f"order-{i:07d}"
            envelope = {"key": key, "job_id": job_id_for(key), "step_id": agent, "agent": agent,
                        "trace_id": f"{i + 1:032x}", "deadline": at_ms / 1000 + 600, "hops": [], "attempt": 1,
                        "schema_version": 1, "replay_of": None,
                        "payload": {"tool": "http_post", "args": {"url": "http://127.0.0.1:1/hook",
                                                                  "json": {"order": i, "note": "x" * 40}}}}
            entry = {"entry_id": eid, "queue": agent, "agent": agent, "failure_class": failure_class,
                     "error": f"127.0.0.1:1 answered 400 for order {i}", "traceback": TRACEBACK + "PermanentFailure\n",
                     "envelope": envelope, "key": key, "job_id": envelope["job_id"], "trace_id": envelope["trace_id"],
                     "attempts": [{"attempt": 1, "outcome": "dead_lettered", "failure_class": failure_class,
                                   "error": "answered 400", "at": at_ms / 1000, "worker": "host:1:abcdef12"}],
                     "worker": "host:1:abcdef12", "host": "host", "dead_lettered_at": at_ms / 1000,
                     "replay_count": 0, "replay_of": None}
            raw = orjson.dumps({"queue_name": agent, "actor_name": agent, "args": [envelope], "kwargs": {},
                                "options": {}, "message_id": eid, "message_timestamp": at_ms})
            pipe.hset(keys.dead_letter(eid),
                      mapping={"entry": orjson.dumps(entry), "raw": raw, "agent": agent, "class": failure_class})
            everything[eid] = at_ms
            agent_index[agent][eid] = at_ms
            class_index[failure_class][eid] = at_ms
            pipe.zadd(keys.dlq_by_job(envelope["job_id"]), {eid: at_ms})
            by_agent[agent] = by_agent.get(agent, 0) + 1
            by_class[failure_class] = by_class.get(failure_class, 0) + 1
        pipe.zadd(keys.dlq, everything)
        for agent, members in agent_index.items():
            if members:
                pipe.zadd(keys.dlq_by_agent(agent), members)
        for failure_class, members in class_index.items():
            if members:
                pipe.zadd(keys.dlq_by_class(failure_class), members)
        pipe.execute()
    rclient.sadd(keys.dlq_agents, *AGENTS)
    rclient.set(keys.dlq_jobs_since, int(t0 * 1000), nx=True)
    return {"by_agent": by_agent, "by_class": by_class}
