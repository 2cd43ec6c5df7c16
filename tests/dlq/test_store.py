"""The DLQ store's Python API over real Redis: filters by agent, class and time, counts, stats, the
batched walk used by replay/drain/purge, and drain of 100,000 entries in bounded memory."""

from __future__ import annotations

import os
import random
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import orjson
import pytest
from dramatiq.message import Message

from mesh.broker.outbox import encode
from mesh.dlq import Audit, DeadLetter, DeadLetterStore, Filter, drain
from mesh.dlq.entry import Attempt
from tests.dlq.bulk import agent_of, class_of, generate, nth_id

MB = 1024 * 1024


def dead_letter(*, agent: str | None = "executor", failure_class: str = "permanent", at: float,
                entry_id: str | None = None, error: str = "127.0.0.1:9 answered 400") -> DeadLetter:
    """A dead letter as the settle script would have written it, dead-lettered at ``at``."""
    key = f"key-{uuid.uuid4().hex}"
    envelope = {"key": key, "job_id": f"job-{uuid.uuid4().hex}", "step_id": agent or "executor",
                "agent": agent or "executor", "trace_id": uuid.uuid4().hex, "deadline": at + 600, "hops": [],
                "attempt": 1, "schema_version": 1, "replay_of": None,
                "payload": {"tool": "note", "args": {"title": "t"}}}
    return DeadLetter(entry_id=entry_id or str(uuid.uuid4()), queue=agent or "executor", agent=agent,
                      failure_class=failure_class, error=error, traceback="Traceback ...\nPermanentFailure: x\n",
                      envelope=envelope, key=key, job_id=envelope["job_id"], trace_id=envelope["trace_id"],
                      attempts=(Attempt(attempt=1, outcome="dead_lettered", failure_class=failure_class,
                                        error=error, at=at, worker="w"),),
                      worker="host:1:abcdef12", host="host", dead_lettered_at=at)


def raw_of(entry: DeadLetter) -> bytes:
    """The message bytes an entry was dead-lettered from (deterministic per entry)."""
    return encode(Message(queue_name=entry.queue, actor_name=entry.agent or "executor", args=(entry.envelope,),
                          kwargs={}, options={}, message_id=entry.entry_id,
                          message_timestamp=int(entry.dead_lettered_at * 1000)))


def put_all(store: DeadLetterStore, entries: list[DeadLetter]) -> None:
    for entry in entries:
        assert store.put(entry, raw_of(entry))


def ids(entries: list[DeadLetter]) -> list[str]:
    return [e.entry_id for e in entries]


def test_store_entries_count_and_stats_select_by_agent_class_and_time(rclient, client):
    store = DeadLetterStore(rclient, client.keys)
    t0 = 1_700_000_000.0
    # (agent, class, seconds after t0); inserted out of time order on purpose
    layout = [("executor", "permanent", 50), ("planner", "invalid_input", 10), ("executor", "timeout", 30),
              ("researcher", "permanent", 20), (None, "invalid_input", 40), ("executor", "permanent", 60),
              ("planner", "permanent", 0)]
    made = [dead_letter(agent=a, failure_class=c, at=t0 + dt) for a, c, dt in layout]
    put_all(store, made)
    by_time = sorted(made, key=lambda e: e.dead_lettered_at)
    newest_first = by_time[::-1]

    assert store.count() == 7
    assert ids(store.entries(Filter(), limit=100)) == ids(newest_first)
    assert ids(store.newest(limit=3)) == ids(newest_first[:3])
    assert ids(store.entries(Filter(), limit=2)) == ids(newest_first[:2])

    def chosen(flt: Filter) -> list[str]:
        return ids([e for e in newest_first if (flt.agent is None or (e.agent or "-") == flt.agent)
                    and (flt.failure_class is None or e.failure_class == flt.failure_class)
                    and (flt.since is None or e.dead_lettered_at >= flt.since)
                    and (flt.until is None or e.dead_lettered_at <= flt.until)])

    filters = [Filter(agent="executor"), Filter(agent="planner"), Filter(agent="-"), Filter(agent="nobody"),
               Filter(failure_class="permanent"), Filter(failure_class="invalid_input"),
               Filter(failure_class="deadline"), Filter(agent="executor", failure_class="permanent"),
               Filter(agent="planner", failure_class="invalid_input"),
               Filter(since=t0 + 20), Filter(until=t0 + 20), Filter(since=t0 + 20, until=t0 + 40),
               Filter(since=t0 + 20.5, until=t0 + 39.5), Filter(since=t0 + 100), Filter(until=t0 - 1),
               Filter(agent="executor", since=t0 + 35), Filter(failure_class="permanent", until=t0 + 25),
               Filter(agent="executor", failure_class="permanent", since=t0 + 55)]
    for flt in filters:
        expected = chosen(flt)
        assert ids(store.entries(flt, limit=100)) == expected, flt
        assert ids(store.entries(flt, limit=1)) == expected[:1], flt
        if flt.exact:
            assert store.count(flt) == len(expected), flt
        else:  # agent and class together: an upper bound from the class index
            assert store.count(flt) >= len(expected), flt

    # the entries come back exactly as put
    assert {e.entry_id: e for e in store.entries(Filter(), limit=100)} == {e.entry_id: e for e in made}
    for e in made:
        assert store.get(e.entry_id) == e
        assert store.raw(e.entry_id) == raw_of(e)
        loaded = store.load(e.entry_id)
        assert loaded is not None and loaded.entry == e and loaded.raw == raw_of(e)
    assert store.get("no-such-id") is None and store.raw("no-such-id") is None and store.load("no-such-id") is None

    stats = store.stats()
    assert stats == {"total": 7, "by_agent": {"executor": 3, "planner": 2, "researcher": 1, "-": 1},
                     "by_class": {"permanent": 4, "invalid_input": 2, "timeout": 1},
                     "oldest_at": t0, "newest_at": t0 + 60}


def test_empty_store_has_zero_counts_and_no_oldest_or_newest(rclient, client):
    store = DeadLetterStore(rclient, client.keys)
    assert store.count() == 0
    assert store.entries(Filter(agent="executor", failure_class="permanent")) == []
    assert store.stats() == {"total": 0, "by_agent": {}, "by_class": {}, "oldest_at": None, "newest_at": None}
    assert list(store.iter(Filter())) == []


def test_entries_of_agent_and_class_together_page_past_more_than_a_batch_of_other_agents(rclient, client):
    store = DeadLetterStore(rclient, client.keys)
    t0 = 1_700_000_000.0
    # the 5 planner entries are the oldest; 700 newer executor entries of the same class come first
    planner = [dead_letter(agent="planner", at=t0 + i) for i in range(5)]
    executor = [dead_letter(agent="executor", at=t0 + 10 + i) for i in range(700)]
    put_all(store, planner + executor)

    flt = Filter(agent="planner", failure_class="permanent")
    assert ids(store.entries(flt, limit=50)) == ids(planner[::-1])
    assert ids(store.entries(flt, limit=2)) == ids(planner[::-1][:2])
    walked = [s.entry.entry_id for batch in store.iter(flt) for s in batch]
    assert walked == ids(planner)
    assert store.count() == 705


def test_iter_removing_hands_out_each_entry_once_oldest_first_and_skips_those_kept(rclient, client):
    store = DeadLetterStore(rclient, client.keys)
    t0 = 1_700_000_000.0
    made = [dead_letter(agent="executor", at=t0 + i) for i in range(23)]
    put_all(store, made)

    handed: list[str] = []
    kept: list[str] = []
    for batch in store.iter(Filter(), batch=4):
        assert 0 < len(batch) <= 4
        for n, s in enumerate(batch):
            handed.append(s.entry.entry_id)
            if n % 2:
                kept.append(s.entry.entry_id)
        store.remove([s.entry for n, s in enumerate(batch) if not n % 2])

    assert handed == ids(made)  # every entry once, oldest first, none handed twice
    assert sorted(ids(store.entries(Filter(), limit=100))) == sorted(kept)
    assert store.count(Filter(agent="executor")) == store.count(Filter(failure_class="permanent")) == len(kept)

    # a walk without removing hands out everything left, once
    assert [s.entry.entry_id for b in store.iter(Filter(), batch=3) for s in b] == [i for i in ids(made) if i in kept]


WALK_N = 1_201  # not a multiple of any batch size


@pytest.mark.parametrize("flt", [Filter(), Filter(agent="planner"), Filter(failure_class="timeout"),
                                 Filter(agent="planner", failure_class="timeout")], ids=repr)
@pytest.mark.parametrize("per_ms", [1, 7, WALK_N], ids=lambda n: f"{n}_per_ms")
@pytest.mark.parametrize("group", [1, 200, 333, None], ids=lambda g: f"removes_by_{g}")
def test_walk_hands_out_each_entry_once_however_its_consumer_groups_removals(rclient, client, flt, per_ms, group):
    """A consumer that removes what it was handed in groups of its own (the replayer flushes every
    200 while the walk reads 500), or removes nothing, still gets every matching entry exactly once,
    oldest first; entries dead-lettered in the same millisecond included."""
    store = DeadLetterStore(rclient, client.keys)
    generate(rclient, client.keys, WALK_N, 1_700_000_000.0, per_ms=per_ms)
    expected = [nth_id(i) for i in range(WALK_N) if matches(flt, i)]

    handed: list[str] = []
    pending: list[DeadLetter] = []
    for batch in store.iter(flt):
        for s in batch:
            handed.append(s.entry.entry_id)
            if group is not None:
                pending.append(s.entry)
                if len(pending) >= group:
                    store.remove(pending)
                    pending = []
    store.remove(pending)

    assert handed == expected
    left = {i.decode() for i in rclient.zrange(client.keys.dlq, 0, -1)}
    assert left == {nth_id(i) for i in range(WALK_N)} - (set() if group is None else set(expected))


def matches(flt: Filter, i: int) -> bool:
    """Whether the ``i``-th generated entry is one ``flt`` selects."""
    return (flt.agent in (None, agent_of(i))) and (flt.failure_class in (None, class_of(i)))


def test_walk_takes_only_what_was_in_the_dlq_when_it_started_and_skips_none_removed_meanwhile(rclient, client):
    """Entries dead-lettered during a walk (later, or in the same millisecond as the newest one) are not
    handed out; entries another process removes meanwhile are simply not handed out, and the walk
    neither skips nor repeats any other."""
    store = DeadLetterStore(rclient, client.keys)
    n = 1_201
    generate(rclient, client.keys, n, 1_700_000_000.0, per_ms=3)
    newest_ms = rclient.zrange(client.keys.dlq, -1, -1, withscores=True)[0][1]
    rng = random.Random(11)
    removed_elsewhere: set[str] = set()
    handed: list[str] = []
    for number, batch in enumerate(store.iter(Filter(), batch=50)):
        handed += [s.entry.entry_id for s in batch]
        # another process removes some entries, handed out or not, and new ones fail meanwhile
        gone = [store.get(nth_id(i)) for i in rng.sample(range(n), 15)]
        store.remove([e for e in gone if e is not None and e.entry_id not in removed_elsewhere])
        removed_elsewhere |= {e.entry_id for e in gone if e is not None and e.entry_id not in handed}
        # in the newest entry's millisecond (an id that sorts after it), or 5 ms later
        late = dead_letter(at=(newest_ms + 0.5 + number % 2 * 5) / 1000, entry_id=f"z-late-{number}")
        assert store.put(late, raw_of(late))

    assert len(handed) == len(set(handed))
    assert set(handed) | removed_elsewhere == {nth_id(i) for i in range(n)}
    assert not set(handed) & removed_elsewhere
    assert handed == sorted(handed)  # ids sort as generated: oldest first


@pytest.mark.parametrize("removes", [True, False])
def test_walk_of_entries_of_one_millisecond_goes_in_id_byte_order_as_redis_ranks_them(rclient, client, removes):
    """Ties are ranked by the bytes of the id, whatever the server's locale would say."""
    store = DeadLetterStore(rclient, client.keys)
    names = ["-z", "A", "Z", "_a", "a", "a-b", "aB", "ab", "a\u00e9", "\u00e9", "z", "0", "a b"]
    random.Random(3).shuffle(names)
    for name in names:
        entry = dead_letter(at=1_700_000_000.5, entry_id=name)
        assert store.put(entry, raw_of(entry))
    handed = []
    for batch in store.iter(Filter(), batch=2):
        handed += [s.entry.entry_id for s in batch]
        if removes:
            store.remove([s.entry for s in batch])
    assert handed == sorted(names, key=str.encode)


def test_put_writes_once_per_id_and_indexes_an_entry_without_agent_under_dash(rclient, client):
    store = DeadLetterStore(rclient, client.keys)
    keys = client.keys
    entry = dead_letter(agent=None, failure_class="invalid_input", at=1_700_000_000.25)
    assert store.put(entry, b"\xff raw") is True
    assert store.put(entry.model_copy(update={"error": "changed"}), b"other") is False
    assert store.get(entry.entry_id) == entry and store.raw(entry.entry_id) == b"\xff raw"
    assert rclient.zscore(keys.dlq, entry.entry_id) == 1_700_000_000_250
    assert rclient.zscore(keys.dlq_by_agent("-"), entry.entry_id) == 1_700_000_000_250
    assert rclient.zscore(keys.dlq_by_class("invalid_input"), entry.entry_id) == 1_700_000_000_250
    assert rclient.smembers(keys.dlq_agents) == {b"-"}
    assert rclient.hget(keys.dead_letter(entry.entry_id), "agent") == b"-"
    assert rclient.hget(keys.dead_letter(entry.entry_id), "class") == b"invalid_input"

    store.remove([entry])
    assert store.count() == 0 and store.get(entry.entry_id) is None
    for key in (keys.dlq, keys.dlq_by_agent("-"), keys.dlq_by_class("invalid_input")):
        assert rclient.zcard(key) == 0


# -- scale -------------------------------------------------------------------------------------

N_SCALE = 100_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Highest resident set size of this process while running, sampled every few milliseconds."""

    def __init__(self) -> None:
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak - self.base


@pytest.mark.slow  # 100,000 entries: a scale test, longer than the rest of the fast tier's DLQ tests
def test_drain_of_100k_entries_streams_to_a_file_in_bounded_memory_and_empties_the_dlq(
        rclient, client, tmp_path: Path):
    keys = client.keys
    store = DeadLetterStore(rclient, keys)
    t0 = 1_700_000_000.0
    started = time.monotonic()
    counts = generate(rclient, keys, N_SCALE, t0)  # its time printed below, not asserted (a loaded machine)
    generated_s = time.monotonic() - started

    # reads on 100k entries answer from the indexes
    stats = store.stats()
    assert stats == {"total": N_SCALE, "by_agent": counts["by_agent"], "by_class": counts["by_class"],
                     "oldest_at": t0, "newest_at": t0 + (N_SCALE - 1) / 1000}
    newest_deadline = store.entries(Filter(failure_class="deadline"), limit=50)
    assert len(newest_deadline) == 50 and all(e.failure_class == "deadline" for e in newest_deadline)
    times = [e.dead_lettered_at for e in newest_deadline]
    assert times == sorted(times, reverse=True) and times[0] == t0 + (N_SCALE - 2) / 1000  # i = 99998
    both = store.entries(Filter(agent="planner", failure_class="deadline"), limit=50)
    assert len(both) == 50 and all((e.agent, e.failure_class) == ("planner", "deadline") for e in both)
    assert store.count(Filter(failure_class="permanent")) == counts["by_class"]["permanent"]

    # One drain of everything. Python allocations are traced (tracemalloc) over its first 25,000
    # entries (tracing slows Python down ~5x, so not over all of it); the resident set size is
    # sampled over the remaining 75,000. A drain that held the entries would grow with them: ~37 MB
    # traced at 5,000 entries and ~185 MB at 25,000 when collected in a list first.
    path = tmp_path / "dead.jsonl"
    seen = {"done": 0}
    traced: dict[int, int] = {}
    file_at: dict[int, int] = {}
    sampler: list[RssSampler] = []

    def progress(n: int) -> None:
        seen["done"] += n
        done = seen["done"]
        if tracemalloc.is_tracing():
            for mark in (5_000, 25_000):
                if done >= mark and mark not in traced:
                    traced[mark] = tracemalloc.get_traced_memory()[1]
                    file_at[mark] = path.stat().st_size
            if 25_000 in traced:
                tracemalloc.stop()
                sampler.append(RssSampler())

    tracemalloc.start()
    try:
        drain_started = time.monotonic()
        drained = drain(store, path, audit=Audit(rclient, keys, who="scale-test"), progress=progress)
        drain_s = time.monotonic() - drain_started
    finally:
        tracemalloc.stop()
    rss_growth = sampler[0].stop() if sampler else None
    size = path.stat().st_size
    print(f"\ngenerated {N_SCALE} entries in {generated_s:.1f}s; drained in {drain_s:.1f}s; "
          f"traced peak {traced.get(5_000, 0) / MB:.1f} MB after 5k ({file_at.get(5_000, 0) / MB:.1f} MB written), "
          f"{traced.get(25_000, 0) / MB:.1f} MB after 25k ({file_at.get(25_000, 0) / MB:.1f} MB written); "
          f"RSS growth over the last 75k {(rss_growth or 0) / MB:.1f} MB; file {size / MB:.1f} MB")

    assert drained == N_SCALE
    assert set(traced) == {5_000, 25_000}, "drain reported no progress before it had read everything"
    assert file_at[25_000] > 40 * MB and size > 150 * MB
    assert traced[25_000] < 30 * MB, f"traced peak {traced[25_000] / MB:.1f} MB while writing {file_at[25_000]} B"
    assert traced[25_000] < 1.5 * traced[5_000], traced  # 5x the entries, about the same memory
    assert rss_growth is not None and rss_growth < 64 * MB, f"RSS grew {rss_growth} B over 75k entries"

    with path.open("rb") as f:
        lines = 0
        first = last = b""
        for line in f:
            lines += 1
            first = first or line
            last = line
    assert lines == N_SCALE
    assert orjson.loads(first)["entry"]["entry_id"] == nth_id(0)  # oldest first
    assert orjson.loads(last)["entry"]["entry_id"] == nth_id(N_SCALE - 1)

    assert store.count() == 0
    assert store.stats() == {"total": 0, "by_agent": {}, "by_class": {}, "oldest_at": None, "newest_at": None}
    assert not any(rclient.exists(keys.dead_letter(nth_id(i))) for i in (0, 4_242, N_SCALE - 1))
    assert int(rclient.hget(keys.stats, "dlq_drained")) == N_SCALE
    os.remove(path)
