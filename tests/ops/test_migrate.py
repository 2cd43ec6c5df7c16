"""``mesh migrate`` and the layout guard over real Redis: data a real worker and client wrote in the
older key layout (``NS:rest``) moves to ``{NS}:rest`` with its type, value and TTL; a run killed
midway is finished by the next; conflicts are reported, never overwritten; live workers refuse it;
a worker refuses a namespace holding unmigrated data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import ROOT, mesh_env, push_raw, wait_for

from mesh.broker import MeshSettings, layout
from mesh.contracts import ConfigError, State
from mesh.dlq import DeadLetterStore
from mesh.ops.console import when
from tests.httpserver import RecordingServer

#: On the suite's Redis, the older key layout's tests: skipped on a cluster (as tests/broker/test_layout_guard.py).
OLDER_LAYOUT = pytest.mark.no_cluster("the older key layout never ran on a Redis Cluster (its scripts' keys "
                                      "spanned slots): the mesh does not look for it there and mesh migrate "
                                      "refuses one (broker/layout.py)")


def note(title: str) -> dict[str, Any]:
    return {"tool": "note", "args": {"title": title}}


def old_keys(r: redis.Redis, ns: str) -> list[str]:
    return sorted(k.decode() for k in r.scan_iter(match=f"{ns}:*", count=1000))


def new_keys(r: redis.Redis, ns: str) -> list[str]:
    return sorted(k.decode() for k in r.scan_iter(match=f"{{{ns}}}:*", count=1000))


def snapshot(r: redis.Redis, keys: list[str]) -> dict[str, tuple[str, int, bytes]]:
    """Each key's type, expiry (PEXPIRETIME, ms; -1 none) and serialized value (DUMP: the value and its
    encoding)."""
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
        pipe.execute_command("PEXPIRETIME", key)
        pipe.dump(key)
    got = pipe.execute()
    return {key: (got[3 * i].decode(), got[3 * i + 1], got[3 * i + 2]) for i, key in enumerate(keys)}


@pytest.fixture
def cleanup(rclient: redis.Redis, namespace: str) -> Iterator[list[str]]:
    """Namespaces whose keys in either layout are deleted at teardown (this test's, and more it adds)."""
    spaces = [namespace]
    yield spaces
    for ns in spaces:
        keys = old_keys(rclient, ns) + new_keys(rclient, ns)
        for i in range(0, len(keys), 500):
            rclient.delete(*keys[i:i + 500])


@OLDER_LAYOUT
@pytest.mark.slow
def test_data_a_worker_and_a_client_wrote_moves_with_type_ttl_and_value(
        client, make_settings, start_worker, cli, rclient, namespace, cleanup, monkeypatch):
    from mesh.ops.worker import sign_off

    with RecordingServer(lambda n, req: (500, {"error": "down"})) as server:
        # a retry's backoff of two minutes: the failed call waits on the delayed queue
        settings = make_settings(http_allow=server.host_port, max_retries=3, retry_min_backoff_ms=120_000,
                                 retry_max_backoff_ms=120_000)
        done = client.send("executor", note("done"), key="done-1")
        retried = client.send("executor", {"tool": "http_post", "args": {"url": server.url(), "json": {}}},
                              key="retry-1")
        poison = push_raw(client, "executor", b"\xff not json")
        worker = start_worker(settings, ("executor",))
        assert client.wait(done.id, timeout_s=20).state is State.SUCCEEDED
        store = DeadLetterStore(client.redis, client.keys)
        wait_for(lambda: store.count() == 1)
        wait_for(lambda: client.queues(["executor"])["executor"] == {"ready": 0, "delayed": 1, "in_flight": 0})
        worker.stop(timeout=10_000)
        assert sign_off(worker.broker)
    queued = [client.send("executor", note(f"queued-{i}"), key=f"queued-{i}") for i in range(3)]
    duplicate = client.send("executor", note("done"), key="done-1")  # the done key's duplicate, queued
    # keys of namespaces whose names extend this one's: never matched by NS:*
    others = [f"{namespace}.x", f"{namespace}x"]
    cleanup.extend(others)
    for other in others:
        rclient.set(f"{other}:job:1", "other", px=600_000)
    downgrade(rclient, namespace)  # as an older mesh wrote them
    ns = namespace
    assert rclient.ttl(f"{ns}:job:{done.id}") > 0  # an ended job's record expires
    assert rclient.ttl(f"{ns}:claim:done-1") > 0  # so does its claim, after the dedup window

    before = old_keys(rclient, namespace)
    kinds = {layout.kind(k[len(namespace) + 1:]) for k in before}
    assert {"job", "jobs", "trace", "claim", "dlq", "executor", "stats", "registry"} <= kinds, kinds
    assert rclient.hlen(f"{ns}:executor.DQ.msgs") == 1
    assert rclient.exists(f"{ns}:claim:done-1", f"{ns}:dlq:{poison}") == 2
    # no value names a key of the layout (which would have to be rewritten): the namespace's prefix
    # appears in none of them
    values = snapshot(rclient, before)
    dumped = {key: b"".join(_members(rclient, key, kind)) for key, (kind, _, _) in values.items()}
    assert [key for key, data in dumped.items() if f"{namespace}:".encode() in data] == []

    # the worker refuses the namespace
    with pytest.raises(ConfigError, match=f"namespace {namespace} holds data in the key layout of an older mesh"):
        start_worker(settings, ("executor",))

    dry = cli("migrate", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    counted = json.loads(dry.stdout)
    assert counted["moved"] == len(before) and counted["conflicts"] == [] and not counted["marked"]
    assert old_keys(rclient, namespace) == before

    result = cli("migrate", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["moved"] == len(before) and report["by_kind"] == counted["by_kind"] and report["marked"]
    assert old_keys(rclient, namespace) == []
    moved = snapshot(rclient, [f"{{{namespace}}}:{k[len(namespace) + 1:]}" for k in before])
    for old, new in zip(values, moved, strict=True):
        assert moved[new] == values[old], old  # its type, value and expiry to the millisecond
    assert rclient.get(layout.marker(namespace)) == b"2"
    assert set(new_keys(rclient, namespace)) == {*moved, layout.marker(namespace)}
    for other in others:
        assert rclient.get(f"{other}:job:1") == b"other" and rclient.pttl(f"{other}:job:1") > 0
        assert new_keys(rclient, other) == []
    assert {queued[0].id, duplicate.id, retried.id} <= {k.rpartition(":")[2] for k in moved if ":job:" in k}

    # migrated and marked: the worker's check passes, and a second run has nothing to do
    layout.check_layout(rclient, namespace)
    again = cli("migrate")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def _members(r: redis.Redis, key: str, kind: str) -> list[bytes]:
    """Every string a key's value holds: members, fields, values, stream entries."""
    if kind == "string":
        return [r.get(key) or b""]
    if kind == "hash":
        return [b for pair in r.hgetall(key).items() for b in pair]
    if kind == "list":
        return list(r.lrange(key, 0, -1))
    if kind == "set":
        return list(r.smembers(key))
    if kind == "zset":
        return list(r.zrange(key, 0, -1))
    if kind == "stream":
        return [repr(r.xrange(key)).encode()]
    raise AssertionError(f"{key}: unexpected type {kind}")


@OLDER_LAYOUT
def test_a_conflict_is_reported_never_overwritten_and_the_namespace_stays_unmarked(cli, rclient, namespace, cleanup):
    ns = namespace
    rclient.set(f"{ns}:job:a", "old a")
    rclient.set(f"{ns}:job:b", "old b")
    rclient.hset(f"{ns}:stats", "fence", 7)
    rclient.set(f"{{{ns}}}:job:b", "new b")

    dry = cli("migrate", "--dry-run", "--json")
    assert dry.returncode == 1 and json.loads(dry.stdout)["conflicts"] == [
        {"key": f"{ns}:job:b", "new_key": f"{{{ns}}}:job:b"}]
    result = cli("migrate")
    assert result.returncode == 1
    assert f"{ns}:job:b -> {{{ns}}}:job:b" in result.stderr and "nothing was overwritten" in result.stderr
    assert "run `mesh migrate` again" in result.stderr
    assert rclient.get(f"{{{ns}}}:job:b") == b"new b" and rclient.get(f"{ns}:job:b") == b"old b"
    assert rclient.get(f"{{{ns}}}:job:a") == b"old a"
    # the keys the guard looks for wait for the conflicts' end: the namespace is still refused
    assert rclient.hget(f"{ns}:stats", "fence") == b"7" and not rclient.exists(f"{{{ns}}}:stats")
    assert not rclient.exists(layout.marker(ns))
    with pytest.raises(ConfigError, match="run `mesh migrate`"):
        layout.check_layout(rclient, ns)  # still unmarked: a worker refuses it

    rclient.delete(f"{{{ns}}}:job:b")  # resolved: the old copy is the one to keep
    again = cli("migrate")
    assert again.returncode == 0, again.stderr
    assert rclient.get(f"{{{ns}}}:job:b") == b"old b" and old_keys(rclient, ns) == []
    assert rclient.hget(f"{{{ns}}}:stats", "fence") == b"7"
    assert rclient.get(layout.marker(ns)) == b"2"
    layout.check_layout(rclient, ns)


@OLDER_LAYOUT
def test_the_summary_fits_80_columns_the_layout_on_a_line_of_its_own(cli, rclient, namespace, cleanup):
    ns = namespace  # test-<12 hex>: its name twice runs past 80 columns on one line
    rclient.set(f"{ns}:job:a", "a")
    dry = cli("migrate", "--dry-run", COLUMNS="80")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert max(map(len, lines)) <= 80, dry.stdout
    assert lines[:2] == [f"would move 1 key(s) of namespace {ns}", f"to the layout {{{ns}}}:..."], lines
    moved = cli("migrate", COLUMNS="80")
    assert moved.returncode == 0, moved.stderr
    assert max(map(len, moved.stdout.splitlines())) <= 80, moved.stdout
    assert moved.stdout.splitlines()[:2] == [f"moved 1 key(s) of namespace {ns}", f"to the layout {{{ns}}}:..."]
    nothing = cli("migrate", COLUMNS="80")
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stdout.splitlines() == [f"nothing to do: namespace {ns} holds no key of the older layout"]


@OLDER_LAYOUT
@pytest.mark.parametrize("heartbeats", ["{ns}:__heartbeats__", "{{{ns}}}:__heartbeats__"], ids=["old", "new"])
def test_live_workers_refuse_the_migration_unless_forced(cli, rclient, namespace, cleanup, heartbeats):
    ns = namespace
    rclient.set(f"{ns}:job:a", "a")
    seconds, micros = rclient.time()
    now_ms = seconds * 1000 + micros // 1000
    key = heartbeats.format(ns=ns)
    rclient.zadd(key, {"w-dead": now_ms - 60_000, "w1": now_ms - 2_000, "w2": now_ms})

    refused = cli("migrate")
    assert refused.returncode == 2
    assert f"2 worker(s) alive on namespace {ns}" in refused.stderr and "--force" in refused.stderr
    assert f"heartbeating since {when((now_ms - 2_000) / 1000)} or earlier" in refused.stderr  # w1's
    assert "MESH_HEARTBEAT_TIMEOUT_S=15" in refused.stderr
    assert rclient.get(f"{ns}:job:a") == b"a" and not rclient.exists(layout.marker(ns))
    assert cli("migrate", "--dry-run").returncode == 0  # counting moves nothing: allowed

    forced = cli("migrate", "--force")
    assert forced.returncode == 0, forced.stderr
    assert rclient.get(f"{{{ns}}}:job:a") == b"a" and rclient.get(layout.marker(ns)) == b"2"


@OLDER_LAYOUT
def test_the_worker_refuses_a_namespace_holding_unmigrated_data(settings, rclient, namespace, cleanup, monkeypatch,
                                                                 capsys):
    """``mesh worker`` exits 2 with the message, before it starts anything (run in this process)."""
    from mesh.ops.cli import invoke

    ns = namespace
    layout.check_layout(rclient, ns)  # a new namespace: nothing to refuse
    rclient.hset(f"{ns}:registry.agents", "executor", "{}")  # what any worker that ever ran left
    for name, value in mesh_env(settings).items():
        monkeypatch.setenv(name, value)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as exit_:
            invoke(["worker", "--agents", "executor"], prog_name="mesh")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert exit_.value.code == 2
    assert (f"namespace {ns} holds data in the key layout of an older mesh: stop its workers and run "
            "`mesh migrate`") in " ".join(capsys.readouterr().err.split())
    assert rclient.exists(f"{ns}:__heartbeats__", f"{{{ns}}}:__heartbeats__") == 0  # it never started

    rclient.set(layout.marker(ns), layout.VERSION)  # migrated (its stray old keys left for the operator)
    layout.check_layout(rclient, ns)


KEYS = 50_000


@pytest.mark.slow
def test_a_migration_killed_midway_is_finished_by_the_next_run(tmp_path):
    """50,000 keys, ``mesh migrate`` SIGKILLed once it renamed some: run again, every key is under its
    new name once, with its value and TTL, and no conflict."""
    from mesh.ops.local_redis import PrivateRedis, redis_binary

    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server binary")
    server = PrivateRedis(binary, port=6410, folder=tmp_path / "redis")
    try:
        r = redis.Redis.from_url(server.url)
        ns = "killed"
        pipe = r.pipeline(transaction=False)
        for i in range(KEYS):
            if i % 10 == 0:
                pipe.set(f"{ns}:claim:k{i}", i, ex=3600)
            else:
                pipe.set(f"{ns}:job:{i}", i)
        pipe.hset(f"{ns}:stats", "fence", KEYS)
        pipe.execute()
        env = mesh_env(MeshSettings(redis_url=server.url, namespace=ns))
        command = [sys.executable, "-m", "mesh.ops.cli", "migrate", "--json"]

        def renames() -> int:
            return int(r.info("commandstats").get("cmdstat_renamenx", {}).get("calls", 0))

        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: renames() > 0 or proc.poll() is not None, timeout_s=60, interval_s=0.001)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        left = len(old_keys(r, ns))
        assert 0 < left < KEYS + 1, left  # stopped midway
        assert len(new_keys(r, ns)) == KEYS + 1 - left and not r.exists(layout.marker(ns))
        print(f"killed after {KEYS + 1 - left} of {KEYS + 1} keys moved")
        with pytest.raises(ConfigError):  # its stats hash moves last: the namespace is still refused
            layout.check_layout(r, ns)

        started = time.monotonic()
        again = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        report = json.loads(again.stdout)
        assert report["moved"] == left and report["conflicts"] == [] and report["marked"], report
        assert time.monotonic() - started < 60
        assert old_keys(r, ns) == []
        moved = new_keys(r, ns)
        assert len(moved) == KEYS + 3  # every key, the stats hash, the marker and the one shard recorded
        pipe = r.pipeline(transaction=False)
        for i in range(KEYS):
            name = f"{{{ns}}}:claim:k{i}" if i % 10 == 0 else f"{{{ns}}}:job:{i}"
            pipe.get(name)
            pipe.ttl(name)
        got = pipe.execute()
        for i in range(KEYS):
            assert got[2 * i] == str(i).encode(), i
            assert (3500 < got[2 * i + 1] <= 3600) if i % 10 == 0 else got[2 * i + 1] == -1, i
        r.close()
    finally:
        server.stop()


def downgrade(r: redis.Redis, ns: str) -> int:
    """Put a namespace's keys back in the older layout (``{NS}:rest`` -> ``NS:rest``), as an older mesh
    wrote them; the number renamed."""
    keys = new_keys(r, ns)
    for key in keys:
        assert r.renamenx(key, f"{ns}:{key[len(ns) + 3:]}")
    return len(keys)


@OLDER_LAYOUT
@pytest.mark.slow
def test_an_upgraded_namespace_is_served_queued_delayed_dead_lettered_and_done_work_alike(
        client, make_settings, start_worker, cli, rclient, namespace, cleanup):
    """Data of an older mesh (this mesh's keys renamed back to the older layout): the worker refuses
    it; once migrated, a worker serves every piece of it."""
    from mesh.ops.worker import sign_off

    with RecordingServer(lambda n, req: (500, {"error": "down"}) if n == 1 else (200, {"ok": True})) as flaky, \
            RecordingServer() as blocked:
        first = make_settings(http_allow=flaky.host_port, max_retries=3, retry_min_backoff_ms=5_000,
                              retry_max_backoff_ms=5_000)
        done = client.send("executor", note("done"), key="done-1")
        delayed = client.send("executor", {"tool": "http_post", "args": {"url": flaky.url(), "json": {}}},
                              key="retry-1")
        dead = client.send("executor", {"tool": "http_post", "args": {"url": blocked.url(), "json": {}}},
                           key="dead-1")  # its host not allowed yet: dead-lettered
        worker = start_worker(first, ("executor",))
        assert client.wait(done.id, timeout_s=20).state is State.SUCCEEDED
        assert client.wait(dead.id, timeout_s=20).state is State.DEAD_LETTERED
        wait_for(lambda: client.queues(["executor"])["executor"] == {"ready": 0, "delayed": 1, "in_flight": 0})
        worker.stop(timeout=10_000)
        assert sign_off(worker.broker)
        assert len(flaky.requests) == 1
        queued = client.send("executor", note("queued"), key="queued-1")
        duplicate = client.send("executor", note("done"), key="done-1")
        assert downgrade(rclient, namespace) > 10 and new_keys(rclient, namespace) == []

        second = make_settings(http_allow=f"{flaky.host_port},{blocked.host_port}")
        with pytest.raises(ConfigError, match="run `mesh migrate`"):
            start_worker(second, ("executor",))
        assert cli("migrate").returncode == 0
        assert old_keys(rclient, namespace) == []

        start_worker(second, ("executor",))
        assert client.wait(queued.id, timeout_s=20).state is State.SUCCEEDED
        assert client.wait(delayed.id, timeout_s=30).state is State.SUCCEEDED  # its retry, due after the move
        assert len(flaky.requests) == 2
        wait_for(lambda: client.status(duplicate.id).state is not State.QUEUED)
        assert client.redis.zcard(client.keys.notes) == 2  # "done" and "queued": the duplicate ran nothing
        store = DeadLetterStore(client.redis, client.keys)
        (entry_id,) = [i.decode() for i in store.client.zrange(store.keys.dlq, 0, -1)]
        replayed = cli("dlq", "replay", entry_id, "--yes")
        assert replayed.returncode == 0, replayed.stderr
        wait_for(lambda: len(blocked.requests) == 1, timeout_s=20)
    assert old_keys(rclient, namespace) == []


@OLDER_LAYOUT
def test_a_migration_on_a_shard_other_than_0_is_refused_and_moves_nothing(cli, rclient, namespace, cleanup):
    rclient.set(f"{namespace}:job:a", "a")
    refused = cli("migrate", MESH_SHARD="2")
    assert refused.returncode == 2
    assert "to shard 0's" in refused.stderr and "not to shard 2: unset MESH_SHARD" in refused.stderr
    assert rclient.get(f"{namespace}:job:a") == b"a" and not rclient.exists(layout.marker(namespace))


@OLDER_LAYOUT
def test_a_migration_with_several_shards_is_refused_and_a_migrated_namespace_keeps_its_one_shard(
        cli, rclient, namespace, cleanup):
    """An older mesh's jobs move to shard 0's keys ({NS}:...), where a namespace of several shards keeps
    none: with MESH_SHARDS=3 the migration moved them and said "workers may start", and workers of 3
    shards started, never read shard 0, and the moved jobs were neither run nor found (mesh status)."""
    from mesh.broker.shards import Shards, check_shards

    rclient.set(f"{namespace}:job:a", "a")
    refused = cli("migrate", MESH_SHARDS="3")
    assert refused.returncode == 2, refused.stdout
    assert "MESH_SHARDS=3" in refused.stderr and "MESH_SHARDS=1" in refused.stderr
    assert rclient.get(f"{namespace}:job:a") == b"a" and not rclient.exists(layout.marker(namespace))

    moved = cli("migrate", MESH_SHARDS="1")
    assert moved.returncode == 0, moved.stderr
    assert rclient.get(Shards(namespace).home.shard_count) == b"0+1"  # the older mesh's one shard, recorded
    with pytest.raises(ConfigError, match=r"over 1 shard\(s\).*MESH_SHARDS=3"):
        check_shards(rclient, Shards(namespace, 0, 3))  # a worker of 3 shards refuses to start
