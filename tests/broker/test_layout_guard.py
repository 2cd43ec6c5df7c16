"""A client never writes into a namespace holding unmigrated data of the older key layout
(broker/layout.py): its messages would wait in the new layout while the older one's, unseen by the
new workers, hold the namespace's earlier work. Checked once per client, not per send."""

from __future__ import annotations

import html

import httpx
import pytest
import redis
from conftest import ops_server

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline
from mesh.broker import layout
from mesh.contracts import ConfigError

pytestmark = pytest.mark.no_cluster("the older key layout never ran on a Redis Cluster (its scripts' keys spanned "
                                    "slots): the mesh does not look for it there (broker/layout.py)")


def note(title: str) -> dict[str, object]:
    return {"tool": "note", "args": {"title": title}}


def test_a_client_refuses_to_send_into_an_unmigrated_namespace(client: MeshClient, rclient: redis.Redis, namespace):
    rclient.hset(f"{namespace}:stats", "fence", 7)  # what any deployment of an older mesh keeps
    with pytest.raises(ConfigError, match=f"namespace {namespace} holds data in the key layout of an older mesh"):
        client.send("executor", note("a"), key="a")
    with pytest.raises(ConfigError, match="run `mesh migrate`"):
        client.submit("a goal")
    with pytest.raises(ConfigError, match="run `mesh migrate`"):
        client.run(Pipeline("p").step("executor").build(), note("b"))
    # nothing written in the new layout: no fleet-wide key, no shard's
    assert [k for pattern in client.keys.patterns for k in rclient.scan_iter(match=pattern)] == []

    rclient.set(layout.marker(namespace), layout.VERSION)  # migrated: the same client sends
    assert client.status(client.send("executor", note("a"), key="a").id).job_id


def test_the_layout_is_checked_once_per_client(client: MeshClient, rclient: redis.Redis, namespace):
    client.send("executor", note("a"), key="a")
    rclient.hset(f"{namespace}:stats", "fence", 7)  # appears later: this client checked already
    client.send("executor", note("b"), key="b")
    with pytest.raises(ConfigError):
        MeshClient(client.settings, client=rclient).send("executor", note("c"), key="c")  # a new client checks


def test_the_cli_warns_that_an_unmigrated_namespace_is_not_shown(cli, rclient: redis.Redis, namespace):
    rclient.hset(f"{namespace}:stats", "fence", 7)
    for command in (("stats", "--json"), ("status",), ("queues",)):
        shown = cli(*command)
        assert shown.returncode == 0, shown.stderr
        assert (f"warning: namespace {namespace} holds data in the key layout of an older mesh, not shown here"
                in " ".join(shown.stderr.split())), command
    moved = cli("migrate")
    assert moved.returncode == 0 and "warning" not in moved.stderr
    assert "warning" not in cli("stats").stderr


def test_readyz_and_the_console_say_the_namespace_is_unmigrated(client: MeshClient, rclient: redis.Redis,
                                                                 namespace):
    rclient.hset(f"{namespace}:stats", "fence", 7)
    rclient.zadd(client.keys.heartbeats, {"alive": client.clock.now_s() * 1000})  # a worker beats: yet not ready
    with ops_server(client) as base:
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["reason"] == layout.refusal(namespace) and ready.json()["workers"] == 1
        page = html.unescape(httpx.get(f"{base}/", timeout=10).text)
        assert f"namespace {namespace} holds data in the key layout of an older mesh" in page

        rclient.set(layout.marker(namespace), layout.VERSION)  # migrated
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
        assert "key layout of an older mesh" not in httpx.get(f"{base}/", timeout=10).text


def test_lasting_keys_of_the_older_layout_written_after_the_migration_are_counted(rclient: redis.Redis, namespace):
    assert layout.check_layout(rclient, namespace) == 0
    rclient.set(layout.marker(namespace), layout.VERSION)
    assert layout.check_layout(rclient, namespace) == 0
    rclient.hset(f"{namespace}:stats", "fence", 1)  # an older worker still running takes a fencing token
    rclient.zadd(f"{namespace}:__heartbeats__", {"old-worker": 1})
    assert layout.check_layout(rclient, namespace) == 2


@pytest.mark.slow  # starts a worker
def test_a_worker_warns_of_an_older_release_still_writing_after_the_migration(settings, rclient: redis.Redis,
                                                                              namespace, start_worker, caplog):
    rclient.set(layout.marker(namespace), layout.VERSION)
    rclient.hset(f"{namespace}:stats", "fence", 1)
    with caplog.at_level("WARNING", logger="mesh.ops.worker"):
        start_worker(settings, ("executor",))
    warned = [r for r in caplog.records if "older release still runs" in r.getMessage()]
    assert warned and warned[0].old_keys == 1 and warned[0].namespace == namespace
