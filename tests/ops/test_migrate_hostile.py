"""``mesh migrate`` against hostile key names: the part after ``NS:`` may be any bytes (not UTF-8,
spaces, line breaks, braces, glob characters); each moves as it is, and is shown on one line."""

from __future__ import annotations

import json

import redis

from mesh.broker import layout

#: The part after ``NS:`` of keys an older mesh (or anything sharing its Redis) may hold.
HOSTILE = [b"bin\xff\xfe", b"sp ace", b"nl\nx", b"br{ac}e", b"gl*?[]\\", b"job:\xc3\xa9t\xc3\xa9"]


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
