"""``mesh migrate`` against hostile key names: the part after ``NS:`` may be any bytes (not UTF-8,
spaces, line breaks, braces, glob characters); each moves as it is, and is shown on one line."""

from __future__ import annotations

import json

import pytest
import redis

from mesh.broker import layout
from mesh.contracts import ConfigError
from tests.broker import test_redis_auth

#: A redis-server whose default user has a password, and an admin connection to it.
acl_server = test_redis_auth.acl_server

#: On the suite's Redis, the older key layout's tests: skipped on a cluster (as tests/broker/test_layout_guard.py).
OLDER_LAYOUT = pytest.mark.no_cluster("the older key layout never ran on a Redis Cluster (its scripts' keys "
                                      "spanned slots): the mesh does not look for it there and mesh migrate "
                                      "refuses one (broker/layout.py)")

#: The part after ``NS:`` of keys an older mesh (or anything sharing its Redis) may hold.
HOSTILE = [b"bin\xff\xfe", b"sp ace", b"nl\nx", b"br{ac}e", b"gl*?[]\\", b"job:\xc3\xa9t\xc3\xa9"]


@OLDER_LAYOUT
def test_keys_of_any_bytes_move_as_they_are(cli, rclient: redis.Redis, namespace):
    ns = namespace.encode()
    for rest in HOSTILE:
        rclient.set(ns + b":" + rest, rest, px=600_000)
    rclient.hset(ns + b":stats", "fence", 3)

    dry = cli("migrate", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["moved"] == len(HOSTILE) + 1
    result = cli("migrate")
    assert result.returncode == 0, result.stderr
    assert f"moved {len(HOSTILE) + 1} key(s)" in result.stdout
    assert "nl\\nx" in result.stdout and "bin\\xff\\xfe" in result.stdout  # one line each, readable
    new = b"{" + ns + b"}:"
    for rest in HOSTILE:
        assert rclient.get(new + rest) == rest and not rclient.exists(ns + b":" + rest)
        assert rclient.pttl(new + rest) > 0
    assert rclient.get(layout.marker(namespace)) == layout.VERSION.encode()


@OLDER_LAYOUT
def test_a_conflicting_key_of_any_bytes_is_listed_on_one_line(cli, rclient: redis.Redis, namespace):
    ns = namespace.encode()
    rclient.set(ns + b":nl\n\xff", "old", px=600_000)
    rclient.set(b"{" + ns + b"}:nl\n\xff", "new", px=600_000)

    result = cli("migrate", "--json")
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["conflicts"] == [{"key": f"{namespace}:nl\\n\\xff",
                                                       "new_key": f"{{{namespace}}}:nl\\n\\xff"}]
    shown = cli("migrate")
    assert f"  {namespace}:nl\\n\\xff -> {{{namespace}}}:nl\\n\\xff\n" in shown.stderr
    assert rclient.get(ns + b":nl\n\xff") == b"old" and rclient.get(b"{" + ns + b"}:nl\n\xff") == b"new"


@OLDER_LAYOUT
def test_keys_written_under_the_old_names_during_the_run_leave_the_namespace_unmarked(rclient: redis.Redis,
                                                                                      namespace):
    """A sender of the older release still running writes old names behind the scan: they are moved
    too, counted, and the namespace is not marked (a worker would start while they keep coming)."""
    ns = namespace
    for i in range(30):
        rclient.set(f"{ns}:job:{i}", i, px=600_000)
    rclient.zadd(f"{ns}:jobs", {"0": 1})
    late: list[str] = []

    def old_sender(n: int) -> None:  # called after each batch: the older client sends once more
        late.append(f"{ns}:job:late-{len(late)}")
        rclient.set(late[-1], "late", px=600_000)

    done = layout.migrate(rclient, ns, progress=old_sender, batch=10)
    assert done.rewritten >= 1 and not done.marked and not done.conflicts
    assert rclient.exists(f"{ns}:jobs")
    assert not rclient.exists(layout.marker(ns))
    with pytest.raises(ConfigError, match="run `mesh migrate`"):
        layout.check_layout(rclient, ns)  # its lasting keys (jobs) left under their old names
    again = layout.migrate(rclient, ns)  # the sender stopped
    assert again.rewritten == 0 and again.marked
    assert rclient.keys(f"{ns}:*") == [] and rclient.exists(*(f"{{{ns}}}:{k[len(ns) + 1:]}" for k in late)) == len(late)


@OLDER_LAYOUT
def test_mesh_migrate_exits_1_naming_a_writer_of_the_older_release(cli, rclient: redis.Redis, namespace,
                                                                  monkeypatch):
    ns = namespace
    rclient.hset(f"{ns}:stats", "fence", 3)
    rclient.set(f"{ns}:job:a", "a", px=600_000)
    real = layout.migrate

    def with_old_sender(client: redis.Redis, namespace: str, **options: object) -> layout.Migration:
        def old_sender(n: int) -> None:
            rclient.set(f"{ns}:job:late-{rclient.incr(f'{{{ns}}}:test.late')}", "late", px=600_000)
        return real(client, namespace, dry_run=bool(options.get("dry_run")), progress=old_sender)

    monkeypatch.setattr(layout, "migrate", with_old_sender)
    result = cli("migrate", "--json")
    assert result.returncode == 1 and json.loads(result.stdout)["rewritten"] >= 1
    shown = cli("migrate")
    assert shown.returncode == 1
    assert "a worker or client of the older release still writes" in " ".join(shown.stderr.split())


@pytest.mark.slow  # a redis-server of its own, whose users are set
def test_the_acl_user_of_the_mesh_is_told_how_to_migrate_not_handed_its_own_rules(acl_server, make_settings, cli):
    from mesh.broker.connection import acl_rules

    server, admin = acl_server
    ns = make_settings().namespace
    admin.execute_command("ACL", "SETUSER", "mesh", "reset", "on", ">pw-m", *acl_rules(ns))
    admin.hset(f"{ns}:stats", "fence", 3)
    for args in (("migrate",), ("migrate", "--dry-run", "--json")):
        refused = cli(*args, MESH_REDIS_URL=f"redis://mesh:pw-m@127.0.0.1:{server.port}/0")
        assert refused.returncode == 2 and refused.stdout == ""
        said = " ".join(refused.stderr.split())
        assert f"this Redis user may not migrate namespace {ns}" in said and "SCAN" in said, said
        assert "The Redis user" in said and "mesh.broker.acl" not in said
    assert admin.hget(f"{ns}:stats", "fence") == b"3"
