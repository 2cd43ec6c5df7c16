"""Unique prefixes, git-style: a command that takes an id (a dead letter, a job, a breaker) also takes
the start of one, as long as only one id starts so.

The ids live as members of a set or a zset (``{ns}:dlq``, ``{ns}:jobs``, ``{ns}:breakers``). An exact
id costs one ZSCORE/SISMEMBER; a prefix is matched with ZSCAN/SSCAN ``MATCH prefix*`` (the glob
characters of the prefix escaped). With several shards (MESH_SHARDS) each shard has its set: an id is
looked for in all of them. The zsets are scored by time, so ZRANGEBYLEX cannot read them;
a lex index would be one more key to write on every dead letter and job and keep in step with
purge, drain and retention. The scan walks the set on the server in batches, never all at once, and
stops as soon as more candidates than :data:`MAX_CANDIDATES` are found.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import redis

#: An ambiguous prefix lists at most this many of the ids it matches.
MAX_CANDIDATES = 10
_GLOB = re.compile(r"([*?\[\]\\])")


class AmbiguousPrefix(Exception):
    """More than one id starts with ``prefix``; ``candidates`` holds some of them (``more``: and others)."""

    def __init__(self, prefix: str, candidates: list[str], more: bool) -> None:
        super().__init__(f"{prefix!r} is ambiguous: {len(candidates)}{'+' if more else ''} ids start with it")
        self.prefix, self.candidates, self.more = prefix, candidates, more


def matching(client: redis.Redis, key: str | Sequence[str], prefix: str, *, zset: bool,
             limit: int = MAX_CANDIDATES + 1) -> list[str]:
    """Members of the set or zset ``key`` (or of any of the keys, one per shard) that start with
    ``prefix``, at most ``limit``, sorted."""
    pattern = _GLOB.sub(r"\\\1", prefix) + "*"
    found: dict[str, None] = {}  # a scan may return a member twice
    for one in [key] if isinstance(key, str) else key:
        members = (m for m, _ in client.zscan_iter(one, match=pattern, count=1000)) if zset else \
            client.sscan_iter(one, match=pattern, count=1000)
        for member in members:
            found[member.decode() if isinstance(member, bytes) else str(member)] = None
            if len(found) >= limit:
                return sorted(found)
    return sorted(found)


def resolve(client: redis.Redis, key: str | Sequence[str], given: str, *, zset: bool, alias: str = "") -> str:
    """The id ``given`` names: itself when it is one (or matches none: the caller reports it missing),
    else the one id starting with it, or with ``alias + given`` (a job id without its ``job-``).
    Raises :class:`AmbiguousPrefix` when several do."""
    if not given or _member(client, key, given, zset=zset):
        return given
    for prefix in (given, alias + given) if alias and not given.startswith(alias) else (given,):
        found = matching(client, key, prefix, zset=zset)
        if len(found) == 1:
            return found[0]
        if found:
            raise AmbiguousPrefix(given, found[:MAX_CANDIDATES], len(found) > MAX_CANDIDATES)
    return given


def _member(client: redis.Redis, key: str | Sequence[str], member: str, *, zset: bool) -> bool:
    if not isinstance(key, str):
        return any(_member(client, one, member, zset=zset) for one in key)
    return (client.zscore(key, member) is not None) if zset else bool(client.sismember(key, member))
