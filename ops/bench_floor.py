"""``mesh bench``'s floor: what a one-step job's writes cost Redis when nothing but those writes runs.

A real step costs Redis several times what raw dramatiq's message does. How much of that is the
writes the mesh keeps a job with, and how much the way it sends them? Here each write is run by a
purpose-built Lua script from the bench process alone, batched as the mesh batches them (sends of
100 jobs, fetches of 16, step writes of 4), with nothing else: no worker, no counters, no lanes, no
generic command list. Variants, each timed on its own (``INFO commandstats`` and ``INFO cpu``
deltas, as the rest of the bench), in rounds so that a machine's load moves them alike:

    writes    what every guarantee needs: the record written at the send, the pick-up and the
              success; the claim taken at the fetch and stored done at the success; the message
              pushed, fetched with its body and settled (SREM from the worker's acks, HDEL)
    +trace    and the trace stream of the job: an event with each record write (XADD), and the
              stream's expiry set at the success (PEXPIRE)
    +indexes  and the running index (ZADD at the pick-up, ZREM at the success) and the compaction
              queue (ZADD at the success)
    +checks   and the fenced compare-and-set's reads: each step write reads its claim and record
              (MGET) before it writes
    all       the four together: what the real step writes, less what only the real code does

The keys live in the bench's namespace (``{ns}:floor:...``, one slot on a cluster) and are deleted
after each run. The record and trace event are of a one-step job's size (``RECORD_BYTES``,
``EVENT_BYTES``). These figures are a floor for the real step's (the bench's ``step``), not a cost
of it: read them beside raw dramatiq's per message from the same run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import redis

from mesh.broker.keys import Keys

#: A one-step job's record and trace event, in bytes, as the bench's echo agent writes them.
RECORD_BYTES, EVENT_BYTES = 870, 260
#: Batches, as the mesh sends them: jobs per send_many chunk, messages per fetch, writes per step.lua call.
SEND_BATCH, FETCH_BATCH, WRITE_BATCH = 100, 16, 4
#: The variants, in the order run and reported: (name, trace, indexes, checks).
VARIANTS = (("writes", False, False, False), ("+trace", True, False, False), ("+indexes", False, True, False),
            ("+checks", False, False, True), ("all", True, True, True))
TTL_S = 604_800


@dataclass(frozen=True)
class _Scripts:
    send: Any
    fetch: Any
    pick_up: Any
    success: Any


def _scripts(client: redis.Redis, trace: bool, indexes: bool, checks: bool) -> _Scripts:
    """The variant's four scripts. ARGV[1] is the key prefix (``{ns}:floor``); the send and the step
    writes take the trace event next, then (job id, record) pairs; KEYS[1] routes the call on a cluster."""
    xadd = "redis.call('xadd', p .. ':trace:' .. id, 'MAXLEN', '~', 2000, '*', 'e', ARGV[2])\n" if trace else ""
    check = ("local got = redis.call('mget', p .. ':claim:' .. id, p .. ':job:' .. id)\n"
             "if not got[1] or not got[2] then return redis.error_reply('floor: ' .. id .. ' lost') end\n"
             if checks else "")
    each = "local p = ARGV[1]\nfor i = 3, #ARGV, 2 do\nlocal id = ARGV[i]\n"
    send = each + xadd + f"""redis.call('set', p .. ':job:' .. id, ARGV[i + 1], 'NX', 'EX', {TTL_S})
redis.call('hset', p .. ':msgs', id, ARGV[i + 1])
redis.call('rpush', p .. ':queue', id)
end"""
    fetch = f"""local p = ARGV[1]
local ids = redis.call('lpop', p .. ':queue', {FETCH_BATCH})
if not ids then return {{}} end
local data = redis.call('hmget', p .. ':msgs', unpack(ids))
redis.call('sadd', p .. ':acks', unpack(ids))
for i = 1, #ids do
    redis.call('set', p .. ':claim:' .. ids[i], 'claimed|1|0|worker|', 'NX', 'EX', {TTL_S})
end
return data"""
    pick_up = each + check + xadd + ("redis.call('zadd', p .. ':running', 1, id)\n" if indexes else "") + f"""
redis.call('set', p .. ':job:' .. id, ARGV[i + 1], 'EX', {TTL_S})
end"""
    success = (each + check + xadd
               + (f"redis.call('pexpire', p .. ':trace:' .. id, {TTL_S * 1000})\n" if trace else "")
               + ("redis.call('zrem', p .. ':running', id)\nredis.call('zadd', p .. ':compact', 1, id)\n"
                  if indexes else "")
               + f"""redis.call('set', p .. ':job:' .. id, ARGV[i + 1], 'EX', {TTL_S})
redis.call('set', p .. ':claim:' .. id, 'done|1|0||result', 'EX', {TTL_S})
redis.call('srem', p .. ':acks', id)
redis.call('hdel', p .. ':msgs', id)
end""")
    scripts = [client.register_script(s) for s in (send, fetch, pick_up, success)]
    for script in scripts:  # loaded before the runs, so no run counts a NOSCRIPT and a SCRIPT LOAD
        client.script_load(script.script)
    return _Scripts(*scripts)


def _run(client: redis.Redis, ns: str, scripts: _Scripts, jobs: int) -> Any:
    """One variant over ``jobs`` jobs: its Run (commands and Redis CPU from the bench's stopwatch)."""
    from mesh.ops.bench import _Stopwatch

    prefix = f"{Keys(ns).prefix}:floor"
    route = [prefix]
    record, event = "r" * RECORD_BYTES, "e" * EVENT_BYTES
    ids = [f"j{i}" for i in range(jobs)]

    def batches(n: int) -> list[list[str]]:
        return [[prefix, event, *(x for job in ids[c:c + n] for x in (job, record))] for c in range(0, jobs, n)]

    sends, writes = batches(SEND_BATCH), batches(WRITE_BATCH)
    watch = _Stopwatch(client, ns)
    for args in sends:
        scripts.send(keys=route, args=args)
    for _ in range(0, jobs, FETCH_BATCH):
        scripts.fetch(keys=route, args=[prefix])
    for args in writes:
        scripts.pick_up(keys=route, args=args)
    for args in writes:
        scripts.success(keys=route, args=args)
    run = watch.stop(jobs)
    _clean(client, prefix, jobs)
    return run


#: Deletes a run's keys: ARGV[1] the prefix, ARGV[2] the number of jobs (ids j0, j1, ...). A script, not a
#: pipeline of DEL: a cluster client's pipeline takes one key a DEL, and these keys share the call's slot.
_CLEAN = """local p, n = ARGV[1], tonumber(ARGV[2])
for i = 0, n - 1, 1000 do
    local names = {}
    for j = i, math.min(n, i + 1000) - 1 do
        names[#names + 1] = p .. ':job:j' .. j
        names[#names + 1] = p .. ':claim:j' .. j
        names[#names + 1] = p .. ':trace:j' .. j
    end
    redis.call('del', unpack(names))
end
redis.call('del', p .. ':queue', p .. ':msgs', p .. ':acks', p .. ':running', p .. ':compact')
return 1"""


def _clean(client: redis.Redis, prefix: str, jobs: int) -> None:
    client.eval(_CLEAN, 1, prefix, prefix, jobs)


def floor(client: redis.Redis, ns: str, jobs: int, rounds: int = 3, raw_redis_cpu_us: float | None = None
          ) -> dict[str, Any]:
    """Each variant's commands and Redis CPU per job: medians over ``rounds`` interleaved runs, the
    least CPU figure (the run least disturbed by the machine's other work) and, given raw dramatiq's
    Redis CPU per message in the same bench (``raw_redis_cpu_us``), the median's ratio to it."""
    made = {name: _scripts(client, *flags) for name, *flags in VARIANTS}
    runs: dict[str, list[Any]] = {name: [] for name in made}
    for _ in range(rounds):
        for name, scripts in made.items():
            runs[name].append(_run(client, ns, scripts, jobs))
    variants = []
    for name, got in runs.items():
        cpu = statistics.median(r.cpu_us()["redis"] for r in got)
        variants.append({"name": name, "redis_commands_per_job": statistics.median(r.commands_per for r in got),
                         "redis_cpu_us_per_job": cpu,
                         "redis_cpu_us_per_job_least": min(r.cpu_us()["redis"] for r in got),
                         "vs_raw_redis_cpu": cpu / raw_redis_cpu_us if raw_redis_cpu_us else None})
    return {"jobs": jobs, "rounds": rounds, "record_bytes": RECORD_BYTES, "event_bytes": EVENT_BYTES,
            "raw_redis_cpu_us": raw_redis_cpu_us, "variants": variants}
