"""Which jobs there are: ``mesh jobs``, read from the ``{ns}:jobs`` index newest first, never by a SCAN.

The index orders job ids by creation time, so ``since`` is a range of it. The other filters (state,
agent, key) are facts of the record, which changes state on every write: keeping an index per state
would mean moving ids in every job write's transaction, so they are checked on the records instead.
Records are read in pipelined batches, newest first, only as far as needed to fill ``limit``, and
never more than ``budget`` of them: a filter that matches nothing among the newest ``budget`` jobs
stops there and says so (``JobPage.exhausted`` is False), and ``since`` narrows where it looks.

With several shards (MESH_SHARDS) each shard has its index: they are walked together, newest first
across all of them, so the limit and the budget are those of the whole namespace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import redis

from mesh.contracts import JobRecord, State, loads

from .keys import Keys

#: Records read per round trip.
BATCH = 200
#: Records one listing reads at most (newest first) when its filters are checked on the records.
SCAN_BUDGET = 10_000


@dataclass(frozen=True)
class JobQuery:
    """A listing's filters: ``state`` (the job's), ``agent`` (any step sent to it: a pipeline step
    still waiting for its dependencies is not yet at its agent), ``since`` (created at or
    after, UNIX s), ``key`` (a glob on the job's key, as fnmatch reads it), ``limit`` (at most)."""

    state: State | None = None
    agent: str | None = None
    since: float | None = None
    key: str | None = None
    limit: int = 20

    def matches(self, record: JobRecord) -> bool:
        return ((self.state is None or record.state is self.state)
                and (self.agent is None or any(s.agent == self.agent and s.sent_at is not None
                                               for s in record.steps.values()))
                and (self.key is None or fnmatchcase(record.key, self.key)))


@dataclass
class JobPage:
    """The jobs found, newest first; how many records were read; and whether the budget stopped the
    walk before it filled the limit or reached the oldest job (older jobs were not looked at)."""

    jobs: list[JobRecord] = field(default_factory=list)
    read: int = 0
    cut_by_budget: bool = False


def list_jobs(client: redis.Redis, keys: Keys | Sequence[Keys], query: JobQuery, *, budget: int = SCAN_BUDGET,
              batch: int = BATCH) -> JobPage:
    """The newest jobs ``query`` matches, at most ``query.limit``, reading at most ``budget`` records;
    ``keys``: one shard's, or each shard's (:attr:`~mesh.broker.shards.Shards.keys`)."""
    if not isinstance(keys, Keys):
        if len(keys) != 1:
            return _list_shards(client, keys, query, budget=budget, batch=batch)
        keys = keys[0]
    page = JobPage()
    low = "-inf" if query.since is None else query.since
    offset, seen = 0, set[bytes]()
    while len(page.jobs) < query.limit:
        want = min(batch, budget - page.read)
        if want <= 0:
            page.cut_by_budget = bool(client.zrevrangebyscore(keys.jobs, "+inf", low, start=offset, num=1))
            break
        ids: list[bytes] = client.zrevrangebyscore(keys.jobs, "+inf", low, start=offset, num=want)  # type: ignore[assignment]
        offset += len(ids)
        # A job created meanwhile shifts the offsets by one: what it pushes down is read once only.
        fresh = [i for i in ids if i not in seen]
        seen.update(fresh)
        pipe = client.pipeline(transaction=False)
        for job_id in fresh:
            pipe.get(keys.job(job_id.decode()))
        for data in pipe.execute():
            page.read += 1
            if data is None:  # expired: the retention sweep drops it from the index
                continue
            record = JobRecord.model_validate(loads(data))
            if query.matches(record):
                page.jobs.append(record)
        if len(ids) < want:  # the oldest job in range was read
            break
    page.jobs = page.jobs[:query.limit]
    return page


def _list_shards(client: redis.Redis, shards: Sequence[Keys], query: JobQuery, *, budget: int,
                 batch: int) -> JobPage:
    """:func:`list_jobs` over several shards' indexes, newest first across all of them."""
    from .shard_readers import NewestFirst

    page = JobPage()
    ids = NewestFirst(client, shards, lambda k: k.jobs, lo="-inf" if query.since is None else query.since,
                      batch=batch)
    while len(page.jobs) < query.limit:
        want = min(batch, budget - page.read)
        if want <= 0:
            page.cut_by_budget = ids.more()
            break
        taken = ids.take(want)
        pipe = client.pipeline(transaction=False)
        for keys, job_id in taken:
            pipe.get(keys.job(job_id.decode()))
        for data in pipe.execute() if taken else []:
            page.read += 1
            if data is None:
                continue
            record = JobRecord.model_validate(loads(data))
            if query.matches(record):
                page.jobs.append(record)
        if len(taken) < want:
            break
    page.jobs = page.jobs[:query.limit]
    return page
