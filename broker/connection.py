"""Every Redis connection the mesh opens, made from settings in one place.

``MESH_REDIS_URL`` takes four forms:

- ``redis://[[user]:password@]host[:port][/db]``: plain TCP, with AUTH (an ACL user, or the
  ``default`` user when only a password is given);
- ``rediss://...``: the same over TLS; ``MESH_REDIS_CA_FILE`` names the CA bundle that signed the
  server's certificate (default: the system's), ``MESH_REDIS_CERT_FILE`` and ``MESH_REDIS_KEY_FILE``
  a client certificate for servers that ask for one (``tls-auth-clients yes``);
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``: the master that
  Redis Sentinel names ``service`` (the sentinels' default port is 26379). The URL's credentials
  are the master's; sentinels that require a password of their own get
  ``MESH_REDIS_SENTINEL_PASSWORD``;
- ``redis+cluster://[[user]:password@]host:port[,host:port...]/``: a Redis Cluster, any of its nodes
  as the seeds the client learns the others from (``rediss+cluster://``: over TLS, with the TLS
  settings above). A cluster has database 0 only. A command goes to the primary that owns its keys'
  slot; a script, a transaction or a command of several keys must keep its keys in one slot.

Two kinds of client are made (see :func:`connect`): with redis-py's automatic retry of a failed
command, for commands that are safe to re-send, and without it, for the broker's fetches.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import hiredis
import redis
import redis.cluster
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.connection import Encoder, HiredisRespSerializer, PythonRespSerializer
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from mesh.contracts import ConfigError, MeshError

from .keys import prefix

if TYPE_CHECKING:
    from .settings import MeshSettings

SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster", "rediss+cluster")
SENTINEL_PORT = 26379
#: The settings that say how to reach Redis (the rest say what to do there).
SETTINGS = ("redis_url", "redis_ca_file", "redis_cert_file", "redis_key_file", "redis_sentinel_password")
#: What a masked password reads as.
MASKED = "***"


@dataclass(frozen=True)
class RedisAddress:
    """``MESH_REDIS_URL`` taken apart. ``hosts``: the server, or the sentinels."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None
    service: str | None = None

    @property
    def sentinel(self) -> bool:
        return self.scheme == "redis+sentinel"

    @property
    def cluster(self) -> bool:
        return self.scheme.endswith("+cluster")

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")


def parse_url(url: str) -> RedisAddress:
    """``url`` taken apart; ConfigError (naming the URL with its password masked, and cut short when
    long) when it is not one of the forms above."""
    try:
        return _parse(url)
    except ValueError as exc:
        raise ConfigError(f"MESH_REDIS_URL {_clipped(masked_url(url))!r}: {exc}") from None


#: The most seeds a cluster URL may name: the client tries them one after the other, each for up to
#: its connect and read timeouts, before it calls the cluster unreachable.
MAX_SEEDS = 64
#: The longest input an error message repeats; a longer one is cut, with its length said.
SHOWN_CHARS = 120
#: The highest database number Redis takes (SELECT's argument is a 32-bit integer).
MAX_DB = 2**31 - 1


def _clipped(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _split(rest: str) -> tuple[str | None, str, str]:
    """The part after ``scheme://`` as (userinfo, hosts, path): the userinfo is everything before the
    last ``@`` (an ``@`` is in no host, port, service or database, so a password holding ``@``, ``/``,
    ``?`` or ``#`` that was not percent-encoded is still read whole, never as a host or a path)."""
    userinfo, at, tail = rest.rpartition("@")
    # the hosts end at the path's '/' or, without a path, at a query's '?' (``redis://host?password=...``,
    # as redis-py takes it: a query, never a part of a host name)
    cut = min((i for i in (tail.find("/"), tail.find("?")) if i >= 0), default=len(tail))
    hostlist, path = tail[:cut], tail[cut:].removeprefix("/")
    return (userinfo if at else None), hostlist, path


def _parse(url: str) -> RedisAddress:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(f"the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    scheme = scheme.lower()
    userinfo, hostlist, path = _split(rest)
    if "://" in f"{hostlist}/{path}":
        raise ValueError("one scheme for the whole URL: its hosts are host:port,host:port")
    if _BLANK.search(hostlist) or _BLANK.search(path):
        raise ValueError("it holds a space or a control character (a line break?) outside its password")
    path, _, query = path.partition("?")
    if query:
        raise ValueError("query parameters are not taken; use MESH_* settings")
    username = password = None
    if userinfo is not None:
        user, colon, secret = userinfo.partition(":")
        username = _unquote(user, "user name") or None
        password = _unquote(secret, "password") if colon else None
        if not colon:  # redis-py's reading too: a lone userinfo is the password
            username, password = None, _unquote(user, "password") or None
    default_port = SENTINEL_PORT if scheme == "redis+sentinel" else 6379
    seeds = hostlist.split(",")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"{len(seeds)} hosts; name at most {MAX_SEEDS} (a few of a cluster's nodes are enough: "
                         "the client learns the others from them)")
    hosts = tuple(dict.fromkeys(_host_port(h, default_port) for h in seeds))  # a host named twice: once
    parts = [p for p in path.split("/") if p] if path else []
    service = None
    if scheme == "redis+sentinel":
        if not parts:
            raise ValueError("a Sentinel URL names the master's service: redis+sentinel://host:port,.../service[/db]")
        service, parts = parts[0], parts[1:]
    elif len(hosts) != 1 and not scheme.endswith("+cluster"):
        raise ValueError("several hosts are a Sentinel URL (redis+sentinel://host:port,.../service[/db]) or a "
                         "cluster's (redis+cluster://host:port,.../)")
    if len(parts) > 1:
        raise ValueError(f"unexpected path {_clipped('/' + path)!r}")
    if parts and not _DIGITS.fullmatch(parts[0]):
        raise ValueError(f"the database must be a number, not {_clipped(parts[0])!r}")
    digits = parts[0].lstrip("0") if parts else ""
    db = int(digits) if 0 < len(digits) <= len(str(MAX_DB)) else 0
    if len(digits) > len(str(MAX_DB)) or db > MAX_DB:
        raise ValueError(f"the database must be at most {MAX_DB}")
    if db and scheme.endswith("+cluster"):
        raise ValueError(f"a Redis Cluster has database 0 only, not {db}: drop '/{parts[0]}' from the URL")
    return RedisAddress(scheme, hosts, db, username, password, service)


#: A space or a control character: in no host, port, service or database.
_BLANK = re.compile(r"[\s\x00-\x1f\x7f]")
#: A port or a database: ASCII digits only (``int`` would take " 7", "+7", "7_0" and other scripts' digits).
_DIGITS = re.compile(r"[0-9]+")


def _unquote(text: str, what: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"the {what} is percent-encoded, but its bytes are not UTF-8") from None


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:6379
        host, bracket, port = item[1:].partition("]")
        if not bracket:
            raise ValueError(f"an IPv6 address's '[' is not closed: {_clipped(item)!r}")
        if port and not port.startswith(":"):
            raise ValueError(f"unexpected {_clipped(port)!r} after [{_clipped(host)}]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        if ":" in host:
            raise ValueError(f"an IPv6 address is written in brackets: [{_clipped(host)}]:{_clipped(port)}")
    if not host:
        raise ValueError("a host is missing")
    shown = _clipped(host)
    if not _is_ip(host):
        try:
            host.encode("idna")
        except UnicodeError:
            raise ValueError(f"{shown!r} is not a host name (a name of dot-separated labels of at most 63 "
                             "characters, or an IP address)") from None
    if not port and item.endswith(":"):
        raise ValueError(f"the port of {shown} is missing after ':'")
    if port and not _DIGITS.fullmatch(port):
        raise ValueError(f"the port of {shown} must be a number")
    number = default_port if not port else int(port) if len(port) <= 5 else 0
    if not 0 < number < 65536:
        raise ValueError(f"the port of {shown} is out of range")
    return host, number


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def masked_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: the only way a Redis URL is shown."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        if "@" in url:
            return MASKED
        head, question, query = url.partition("?")
        return f"{head}{question}{_masked_query(query)}"
    userinfo, hostlist, path = _split(rest)
    tail = rest if userinfo is None else rest[len(userinfo) + 1:]
    slash = tail[len(hostlist):len(hostlist) + 1] == "/"
    path, question, query = path.partition("?")
    if question:
        query = _masked_query(query)
    elif userinfo is None:
        return url
    shown = "" if userinfo is None else f"{userinfo.partition(':')[0]}:{MASKED}@" if ":" in userinfo else f"{MASKED}@"
    return f"{scheme}://{shown}{hostlist}{'/' if slash else ''}{path}{question}{query}"


def _masked_query(query: str) -> str:
    """A URL's query with every value masked: redis-py takes a password there (``?password=...``)."""
    return "&".join(name + (f"={MASKED}" if eq else "")
                    for name, eq, _ in (item.partition("=") for item in query.split("&")) if query)


def check(settings: MeshSettings) -> None:
    """ConfigError unless the URL parses and the TLS settings fit it (files exist, only for rediss)."""
    address = parse_url(settings.redis_url)
    files = {"MESH_REDIS_CA_FILE": settings.redis_ca_file, "MESH_REDIS_CERT_FILE": settings.redis_cert_file,
             "MESH_REDIS_KEY_FILE": settings.redis_key_file}
    given = {name: path for name, path in files.items() if path}
    if given and not address.tls:
        verb = "applies" if len(given) == 1 else "apply"
        raise ConfigError(f"{', '.join(given)} {verb} to TLS only, and MESH_REDIS_URL is "
                          f"{address.scheme}://; use rediss://")
    for name, path in given.items():
        if not os.path.isfile(path):
            raise ConfigError(f"{name}: no such file: {path}")
    if bool(settings.redis_cert_file) != bool(settings.redis_key_file):
        raise ConfigError("MESH_REDIS_CERT_FILE and MESH_REDIS_KEY_FILE go together: a client certificate "
                          "needs its key")


def _retry(retries: int) -> dict[str, Any]:
    if not retries:
        return {"retry": Retry(NoBackoff(), 0)}
    return {"retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}


def _tls(settings: MeshSettings) -> dict[str, Any]:
    return {"ssl_ca_certs": settings.redis_ca_file, "ssl_certfile": settings.redis_cert_file,
            "ssl_keyfile": settings.redis_key_file, "ssl_cert_reqs": "required"}


def connect(settings: MeshSettings, *, retries: bool = True, **options: Any) -> redis.Redis:
    """A client of the Redis ``settings`` name. ``retries``: a command that fails on a dropped
    connection or a restarting (failing-over) server is re-sent for a few seconds (MESH_REDIS_RETRIES
    times), for commands safe to re-send (claims, job writes in WATCH/MULTI, reads); without, the error
    surfaces at once.
    ``options``: more redis-py connection arguments (e.g. ``socket_timeout``)."""
    address = parse_url(settings.redis_url)
    if address.cluster:
        return _cluster(settings, address, retries, options)
    kwargs: dict[str, Any] = {"db": address.db, "username": address.username, "password": address.password,
                              **_retry(settings.redis_retries if retries else 0), **options}
    if address.sentinel:
        assert address.service is not None
        sentinel_auth = settings.redis_sentinel_password
        sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
        if sentinel_auth is not None:
            sentinel_kwargs["password"] = sentinel_auth.get_secret_value()
        sentinels = Sentinel(list(address.hosts), sentinel_kwargs=sentinel_kwargs)
        return packing(sentinels.master_for(address.service, **kwargs))
    host, port = address.hosts[0]
    if address.tls:
        kwargs.update(ssl=True, **_tls(settings))
    return packing(redis.Redis(host=host, port=port, **kwargs))


def _cluster(settings: MeshSettings, address: RedisAddress, retries: bool, options: dict[str, Any]) -> Any:
    """A ``RedisCluster`` of the URL's seeds: its retry (a cluster client's own: a command that fails on
    a lost connection or a failing-over slot is sent again, to the slot's owner once the client has
    learnt it) as :func:`_retry`'s; its nodes' clients without one. Unlike the other forms, it connects
    at once (to learn the slots' owners): redis.ConnectionError when no seed answers."""
    retry = _retry(settings.redis_retries if retries else 0)["retry"]
    kwargs: dict[str, Any] = {"username": address.username, "password": address.password, **options}
    if address.tls:
        kwargs.update(ssl=True, **_tls(settings))
    nodes = [redis.cluster.ClusterNode(host, port) for host, port in address.hosts]
    try:  # it asks the seeds for the cluster's layout at once
        return MeshCluster(startup_nodes=nodes, retry=retry, **kwargs)
    except (redis.exceptions.RedisClusterException, redis.RedisError) as exc:
        seeds = ",".join(_shown(host, port) for host, port in address.hosts[:3])
        more = f" and {len(address.hosts) - 3} more" if len(address.hosts) > 3 else ""
        raise redis.ConnectionError(f"Redis Cluster {seeds}{more}: {exc}") from None


class ClusterUnreachable(redis.exceptions.ConnectionError, redis.exceptions.RedisClusterUnreachableError):
    """No node of the cluster answered (a refresh of its map of slots reached none: every node down, or
    this host cut off from them). redis-py's cluster client raises ``RedisClusterUnreachableError``
    there, which is no ``RedisError``; the mesh's clients raise this instead: a ``ConnectionError``, as
    a single server that does not answer raises, which the mesh's handling of a lost Redis takes (a
    lease renewal tried again, a check before an effect deferred, a consumer that reconnects)."""


def reachable(exc: redis.exceptions.RedisClusterUnreachableError) -> ClusterUnreachable:
    """``exc`` as a :class:`ClusterUnreachable` (itself when it is one; raise it ``from exc``)."""
    return exc if isinstance(exc, ClusterUnreachable) else ClusterUnreachable(*exc.args)


#: The commands that run a Lua script (with keys: on the primary of its first key's slot).
SCRIPT_COMMANDS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO"})


def _keyed_script(args: tuple[Any, ...]) -> bool:
    """Whether ``args`` is a script call that declares keys (``EVALSHA sha numkeys key...``)."""
    if len(args) < 4 or not isinstance(args[0], str) or args[0].upper() not in SCRIPT_COMMANDS:
        return False
    try:
        return int(args[2]) > 0
    except (TypeError, ValueError):
        return False


class MeshCluster(redis.cluster.RedisCluster):
    """The cluster client :func:`connect` makes: a ``RedisCluster`` whose pipelines make sure the Redis
    node holds the scripts staged on them before they are sent (:class:`ScriptedPipeline`), as a
    single-node client's pipeline does. It knows the scripts registered on it (``register_script``).
    A command or a pipeline that reaches no node of the cluster raises :class:`ClusterUnreachable`.

    A script called through it (``script(keys=..., args=...)``, ``eval``, ``evalsha``) goes
    :func:`on_slot`'s way, as :func:`run_script`'s calls do: to the primary of its first key's slot,
    waiting out a migration of the slot rather than following the source's ``ASK`` to the target.
    redis-py follows it (``ASKING``, then the call on the target): a script that declares ``{ns}`` (a
    compaction's, a retention sweep's) ran on the target while the keys it reads and writes were still
    on the source, as did the timer loop's and the step counters' scripts while their own keys were
    missing on the source."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The text of every script registered on this client, by its SHA1.
        self.script_texts: dict[str, Any] = {}

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if _keyed_script(args) and "target_nodes" not in kwargs:
                # never where an ASK points: on the slot's primary, once it serves the slot (on_slot)
                return on_slot(self, args[3], lambda node: node.execute_command(*args, **kwargs))
            return super().execute_command(*args, **kwargs)
        except redis.exceptions.RedisClusterUnreachableError as exc:
            raise reachable(exc) from exc

    def register_script(self, script: Any) -> Any:
        registered = super().register_script(script)
        self.script_texts[registered.sha] = registered.script
        return registered

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = ScriptedPipeline
        pipe.scripted_client = self
        if type(pipe._execution_strategy) is redis.cluster.TransactionStrategy:
            pipe._execution_strategy.__class__ = _ReachingTransaction
        return pipe


class ScriptedPipeline(redis.cluster.ClusterPipeline):
    """A cluster pipeline that, before it sends, loads on the primary of their keys' slot the scripts
    of this client staged on it (``script(..., client=pipe)``, EVALSHA) that node does not hold. A
    ``ClusterPipeline`` sends the EVALSHA as it is: a primary that does not hold the script (a replica
    promoted by a failover: SCRIPT LOAD is not replicated) answers NOSCRIPT, and in a transaction the
    other commands of its EXEC ran all the same."""

    scripted_client: MeshCluster

    def execute(self, raise_on_error: bool = True) -> Any:
        load_scripts(self.scripted_client, staged(self))
        try:
            return super().execute(raise_on_error)
        except redis.exceptions.RedisClusterUnreachableError as exc:
            raise reachable(exc) from exc


class _ReachingTransaction(redis.cluster.TransactionStrategy):
    """A cluster pipeline's MULTI/EXEC whose commands sent at once (``WATCH``, a read while it watches,
    ``UNWATCH``: a job write's, ``client.transaction(...)``) raise :class:`ClusterUnreachable` where they
    reach no node, as its ``execute`` does (redis-py raises ``RedisClusterUnreachableError`` there too)."""

    def _immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return super()._immediate_execute_command(*args, **options)
        except redis.exceptions.RedisClusterUnreachableError as exc:
            raise reachable(exc) from exc


def load_scripts(client: MeshCluster, commands: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
    """The scripts ``client`` knows among the EVALSHA of ``commands`` loaded where they will run: on the
    primary of their first key's slot (SCRIPT EXISTS there, then SCRIPT LOAD of those it lacks), or on
    every primary for a script without keys. The node is asked an EXISTS of the key in the same round
    trip: a node that no longer serves the slot (a failover the client has not learnt yet) answers
    MOVED, and the client learns where it went (:func:`on_slot`) and asks there. A node that cannot be
    reached is left to the pipeline, whose own retry finds where the slot went."""
    wanted: dict[Any, dict[str, Any]] = {}
    for args, _options in commands:
        if str(args[0]).upper() != "EVALSHA":
            continue
        sha = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
        text = client.script_texts.get(sha)
        if text is None:
            continue
        key = args[3] if int(args[2]) > 0 else None
        wanted.setdefault(key, {})[sha] = text
    for key, scripts in wanted.items():
        shas = list(scripts)
        if key is None:
            for sha, exists in zip(shas, client.script_exists(*shas), strict=True):
                if not exists:
                    client.script_load(scripts[sha])
            continue

        def load(node: redis.Redis, key: Any = key, shas: list[str] = shas, scripts: dict[str, Any] = scripts) -> None:
            ask = node.pipeline(transaction=False)
            ask.exists(key)  # MOVED from a node that does not serve the slot
            ask.script_exists(*shas)
            _, held = ask.execute()
            for sha, exists in zip(shas, held, strict=True):
                if not exists:
                    node.script_load(scripts[sha])

        try:
            on_slot(client, key, load)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, *SLOT_ERRORS):
            pass


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster's (``redis.cluster.RedisCluster``, or its pipeline)."""
    return _kind_of(client, redis.cluster.RedisCluster)


#: (type, class) -> whether the type is the class or a subclass of it: :func:`_kind_of`'s answers.
_KINDS: dict[tuple[type, type], bool] = {}


def _kind_of(value: Any, cls: type) -> bool:
    """``isinstance(value, cls)``, answered once per type: redis-py's cluster classes are typing
    Protocols, whose ``isinstance`` goes through ``_ProtocolMeta`` each time (a step's write asks
    several times, and its sender once per call)."""
    kind = (value.__class__, cls)
    known = _KINDS.get(kind)
    if known is None:
        known = _KINDS[kind] = isinstance(value, cls)
    return known


#: The errors of a command sent to a node that does not serve its slot (now): nothing was run.
SLOT_ERRORS = (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
               redis.exceptions.ClusterDownError)


def node_client(client: Any, key: Any) -> redis.Redis:
    """The single-node client that serves ``key``: ``client`` itself, or for a cluster the client of
    the primary that owns ``key``'s slot (as ``client`` knows it now)."""
    if not is_cluster(client):
        return client
    return client.get_redis_connection(_slot_node(client, key))


def _slot_node(client: Any, key: Any) -> Any:
    """The primary node of ``key``'s slot, once a refresh of the slots an earlier error asked for is run
    (as the cluster client runs it before a command)."""
    manager = client.nodes_manager
    if manager._refresh_requested:
        try:
            manager._run_requested_refresh(client.retry)
        except redis.exceptions.RedisClusterUnreachableError as exc:
            raise reachable(exc) from exc
    return client.get_node_from_key(key)


def _lost(client: Any, node: Any) -> None:
    """A connection to ``node`` failed: the cluster client reads the slots again before its next command."""
    client.nodes_manager._request_refresh(last_failed_node_name=node.name)


#: How long a call to a slot's primary is tried again while the slot migrates or fails over.
SLOT_WAIT_S = 30.0


def on_slot(client: Any, key: Any, call: Any, timeout_s: float = SLOT_WAIT_S) -> Any:
    """``call(node)`` with :func:`node_client`'s client of ``key``; for a cluster, again (for up to
    ``timeout_s``) when that node did not run it: at once where the client has learnt the slot went
    (MOVED, CLUSTERDOWN, or a failed connection, as often as ``client`` retries: a primary failing over); after
    a pause, on the same node, while the slot migrates (ASK, TRYAGAIN). An ASK is never followed to the
    migration's target: a mesh script declares only its namespace's prefix ``{ns}`` (a key that never
    exists, which the source answers ASK for) and reads and writes keys it does not declare, which the
    target holds only once they are moved; it runs on the source until the slot has moved."""
    if not is_cluster(client):
        return call(client)
    deadline = time.monotonic() + timeout_s
    pause, lost = 0.02, 0
    while True:
        node = None
        try:
            node = _slot_node(client, key)
            return call(client.get_redis_connection(node))
        except redis.exceptions.MovedError:  # (a MovedError is an AskError: first)
            if time.monotonic() > deadline:
                raise
            relearn(client)
        except redis.exceptions.ClusterDownError:  # an election under way: the map may not have changed yet
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(2 * pause, 0.5)
            relearn(client)
        except (redis.exceptions.AskError, redis.exceptions.TryAgainError):
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(2 * pause, 0.5)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            lost += 1  # tried again as often as the client retries (MESH_REDIS_RETRIES), within timeout_s
            if lost > client.retry.get_retries() or time.monotonic() > deadline:
                raise
            if node is not None:
                _lost(client, node)
            time.sleep(pause)
            pause = min(2 * pause, 0.5)
            relearn(client)


def relearn(client: Any, timeout_s: float = 10.0) -> None:
    """A cluster client's map of slots to nodes read again from the cluster: at once, then until every
    slot has a reachable primary or ``timeout_s`` passes (a failover takes the node timeout and an
    election)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.nodes_manager.initialize()
            return
        except (redis.RedisError, redis.exceptions.RedisClusterUnreachableError, OSError) as exc:
            if time.monotonic() > deadline:
                if isinstance(exc, redis.exceptions.RedisClusterUnreachableError):
                    raise reachable(exc) from exc
                raise
            time.sleep(0.1)


def stage_eval(pipe: Any, script: str, numkeys: int, *keys_and_args: Any) -> Any:
    """``EVAL script numkeys keys... args...`` queued on ``pipe`` (sent at once while it watches, before
    ``multi()``): a pipeline's, or a cluster pipeline's, which refuses ``eval()`` itself (redis-py
    blocks it there) but routes an EVAL by its keys as any command."""
    return pipe.execute_command("EVAL", script, numkeys, *keys_and_args)


def staged(pipe: Any) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The commands queued on ``pipe`` and not yet sent, as ``(args, options)``: a pipeline's
    ``command_stack``; a cluster pipeline's queue (its ``command_stack`` stays empty)."""
    if _kind_of(pipe, redis.cluster.ClusterPipeline):
        return [(command.args, command.options) for command in pipe._execution_strategy.command_queue]
    return pipe.command_stack


def primaries(client: Any) -> list[redis.Redis]:
    """The single-node clients of every primary (``[client]`` for one that is not a cluster's)."""
    if not is_cluster(client):
        return [client]
    return [client.get_redis_connection(node) for node in client.get_primaries()]


class Packer:
    """How the client's connections turn a command into bytes: hiredis's ``pack_command`` on the whole
    command at once, when its arguments are all ``str``, ``bytes``, ``int`` or ``float`` (the bytes
    redis-py writes: UTF-8, ``repr`` of a number) and its name is one word; otherwise redis-py's own
    packing (``fallback``), which splits a name of several words and refuses what it refuses. redis-py
    encodes each argument in Python first, and a step's script call carries ~100 of them: that was a
    measurable part of a worker's CPU per step."""

    def __init__(self, fallback: Any) -> None:
        self._fallback = fallback

    def pack(self, *args: Any) -> list[bytes]:
        return _whole(args, self._fallback)


def _whole(args: tuple[Any, ...], fallback: Any) -> list[bytes]:
    """``args`` packed by hiredis at once when it can take them all and the name is one word, else by
    ``fallback`` (redis-py's packing, which refuses a bool or None and raises on a lone surrogate as
    it always did)."""
    name = args[0]
    if isinstance(name, str) and " " not in name:
        try:
            return [hiredis.pack_command(args)]
        except (TypeError, UnicodeError):  # bool, None, bytearray, a lone surrogate: redis-py's answer
            pass
    return fallback(*args)


def packing(client: redis.Redis) -> redis.Redis:
    """``client`` with :class:`Packer` in its pool's connections (those it makes from now on)."""
    if is_cluster(client):
        return client  # its nodes' clients are made as it finds them; run_script packs its own calls
    kwargs = client.connection_pool.connection_kwargs
    encoder = Encoder(kwargs.get("encoding", "utf-8"), kwargs.get("encoding_errors", "strict"),
                      kwargs.get("decode_responses", False))
    if (encoder.encoding, encoder.encoding_errors) != ("utf-8", "strict"):
        return client  # hiredis writes str as strict UTF-8 only
    python = PythonRespSerializer(6000, encoder.encode)  # redis-py's own packers, as a connection builds them
    kwargs["command_packer"] = Packer(HiredisRespSerializer(python.pack, encoder.encode).pack)
    return client


def configured(settings: MeshSettings) -> dict[str, Any]:
    """Which Redis ``settings`` name, as operators read it, without asking it: ``address`` (or, for
    Sentinel, ``sentinel`` and ``sentinels``; for a cluster, ``cluster``: its seeds), ``db`` and ``tls``.
    Never a credential."""
    address = parse_url(settings.redis_url)
    hosts = [_shown(host, port) for host, port in address.hosts]
    out: dict[str, Any] = {"sentinel": address.service, "sentinels": hosts} if address.sentinel \
        else {"cluster": hosts} if address.cluster else {"address": hosts[0]}
    return {**out, "db": address.db, "tls": address.tls}


def where(client: Any) -> dict[str, Any]:
    """Which Redis ``client`` uses now: ``address`` (host:port; for Sentinel the master it names
    now) and ``role`` (``INFO replication``: master or replica; ``unknown`` for a user not allowed
    INFO). For a cluster: ``address`` the primaries now, comma-separated, and ``role`` ``cluster``
    (``CLUSTER INFO``'s ``cluster_state`` unless ok: ``cluster (fail)``). Never a credential. Raises
    redis errors when the server does not answer."""
    if is_cluster(client):
        shown = ",".join(sorted(_shown(node.host, node.port) for node in client.get_primaries()))
        try:
            state = primaries(client)[0].execute_command("CLUSTER INFO").get("cluster_state", "?")
        except redis.exceptions.NoPermissionError:
            state = "ok"  # not the user's to ask: shown as plain "cluster"
        return {"address": shown, "role": "cluster" if state == "ok" else f"cluster ({state})"}
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        host, port = pool.get_master_address()
    else:
        host, port = pool.connection_kwargs.get("host", "?"), pool.connection_kwargs.get("port", "?")
    try:
        role = str(client.info("replication").get("role", "unknown"))
    except redis.exceptions.NoPermissionError:
        role = "unknown"
    return {"address": _shown(host, port), "role": "replica" if role == "slave" else role}


def describe(settings: MeshSettings, client: redis.Redis) -> dict[str, Any]:
    """:func:`configured` and, when the server answers, :func:`where`; else the error, under ``error``."""
    out = configured(settings)
    try:
        out.update(where(client))
    except redis.RedisError as exc:
        out["error"] = str(exc)
    return out


def _shown(host: Any, port: Any) -> str:
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


#: Every command the mesh sends (its Lua scripts' included), for an ACL user that may run nothing
#: else; ``info`` only tells ``mesh status`` and /readyz the server's role and may be left out.
#: Found by running every flow under a user of ``+@all`` and reading ``INFO commandstats``, plus the
#: commands of paths the flows do not take; tests/broker/test_redis_auth.py runs every flow and
#: every ``mesh`` command under it. The one list: a feature that sends a new command adds it here,
#: then regenerates docs/reference/acl.md (``python -m mesh.broker.acl``). On a Redis Cluster the
#: client (redis-py's ``RedisCluster``) asks a node for the map of slots (``cluster|slots``) when it
#: starts and after a failover, and for the server's command table (``command``: which argument of a
#: command is a key) when it starts; it sends ``asking`` on an ASK redirection (a slot being moved).
ACL_COMMANDS = (
    "ping", "info", "select", "cluster|slots", "command", "asking",
    "eval", "evalsha", "script|load", "script|exists", "multi", "exec", "discard", "watch", "unwatch", "wait",
    "get", "getrange", "set", "mget", "del", "exists", "type", "expire", "pexpire", "pexpireat", "persist", "pttl",
    "setrange", "incr", "incrby", "time",
    "hget", "hset", "hsetnx", "hdel", "hexists", "hgetall", "hmget", "hlen", "hincrby", "hincrbyfloat",
    "blpop", "lpop", "lpush", "rpush", "llen", "lindex", "lrange", "ltrim",
    "sadd", "srem", "smembers", "scard", "sismember", "sscan",
    "zadd", "zrem", "zcard", "zcount", "zscore", "zrank", "zrange", "zrevrange", "zrangebyscore", "zrevrangebyscore",
    "zscan",
    "zremrangebyscore", "zremrangebyrank", "zpopmin",
    "xadd", "xrange", "xrevrange", "xtrim", "xread",
)


def acl_rules(namespace: str) -> list[str]:
    """The ACL rules of a user that can run the mesh in ``namespace`` and nothing else: its keys (the
    bare prefix ``{ns}`` too: the scripts get it as their KEYS[1]), no channels, the commands above."""
    tag = prefix(namespace)
    # The older layout's keys (``ns:*``, and ``ns``, the KEYS[1] of its scripts) too, so that the same
    # user can run ``mesh migrate``, which moves them to this layout (broker/keys.py).
    shards = "{" + f"{namespace}:*" + "}"  # the tags of its shards (MESH_SHARD), {ns:N}
    return ["resetkeys", f"~{tag}", f"~{tag}:*", f"~{shards}", f"~{shards}:*", f"~{namespace}", f"~{namespace}:*",
            "resetchannels", "-@all",
            *(f"+{command}" for command in ACL_COMMANDS)]


class NotReplicated(MeshError):
    """An enqueue the primary applied but fewer replicas than MESH_REDIS_WAIT_REPLICAS confirmed in
    time: should the primary fail now, a replica promoted in its place may not have it. Sending it
    again with the same key is safe (the mesh runs a key once). ``refs``: the jobs it sent."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int, refs: list[Any]) -> None:
        super().__init__(f"enqueued on the primary, but {acked} of {wanted} replica(s) confirmed it within "
                         f"{timeout_ms} ms (MESH_REDIS_WAIT_REPLICAS): it may be lost if the primary fails "
                         "now; send it again with the same key", acked=acked, wanted=wanted)
        self.refs = refs


class WaitingPipeline(redis.client.Pipeline):
    """A pipeline of a single-node client (a MULTI/EXEC one with ``transaction``) followed by ``WAIT
    replicas timeout_ms`` on the connection it ran on (WAIT counts the replicas that have the writes of
    the connection it is sent on): ``acked``, its answer, read by :func:`wait_on` with a deadline of its
    own. (A WAIT queued as the pipeline's last command is read with the connection's read timeout,
    redis-py's 5 s by default: a longer MESH_REDIS_WAIT_TIMEOUT_MS failed the call with a TimeoutError,
    and the client's retry sent the pipeline's writes again.)"""

    def __init__(self, client: redis.Redis, replicas: int, timeout_ms: int, *, transaction: bool = False) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, transaction, None)
        self.replicas, self.timeout_ms = replicas, timeout_ms
        self.acked = 0

    def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        result: list[Any] = super()._execute_transaction(connection, commands, raise_on_error)
        self.acked = wait_on(connection, self.replicas, self.timeout_ms)
        return result

    def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        result: list[Any] = super()._execute_pipeline(connection, commands, raise_on_error)
        self.acked = wait_on(connection, self.replicas, self.timeout_ms)
        return result


#: How much longer than its own timeout a WAIT's reply is waited for.
WAIT_READ_SLACK_S = 5.0


def wait_on(connection: Any, replicas: int, timeout_ms: int) -> int:
    """``WAIT replicas timeout_ms`` sent on ``connection`` (the one the writes just went on): how many
    replicas confirmed them. Its reply is read with a deadline of its own (the connection's read timeout
    may be shorter than the WAIT blocks); a WAIT that fails counts none, and the writes, which ran, are
    not sent again (the connection is dropped: its reply may still come). A node that refuses WAIT as a
    replica (a primary demoted by a failover that took the writes before it learnt it: they are dropped
    when it syncs with the new primary) counts none too."""
    try:
        connection.send_command("WAIT", replicas, timeout_ms)
        return int(connection.read_response(timeout=timeout_ms / 1000 + WAIT_READ_SLACK_S))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        connection.disconnect()
        return 0
    except redis.exceptions.ResponseError as exc:
        if "replica" not in str(exc):
            raise
        return 0


class _ReplicatedSlot(_ReachingTransaction):
    """A cluster pipeline's MULTI/EXEC (on the primary of its one slot), followed by ``WAIT`` on the
    connection it ran on, as :class:`WaitingPipeline`."""

    def __init__(self, pipe: Any, replicas: int, timeout_ms: int) -> None:
        super().__init__(pipe)
        self.replicas, self.timeout_ms = replicas, timeout_ms
        self.acked = 0

    def _execute_transaction(self, stack: Any, raise_on_error: bool) -> Any:
        result = super()._execute_transaction(stack, raise_on_error)
        connection = self._transaction_connection
        assert connection is not None
        # the transaction ran: a WAIT that fails is no reason to run it again (the pipeline's retry)
        self.acked = wait_on(connection, self.replicas, self.timeout_ms)
        return result


def transaction(client: redis.Redis, settings: MeshSettings) -> redis.client.Pipeline:
    """A MULTI/EXEC pipeline for an enqueue: with MESH_REDIS_WAIT_REPLICAS, one that WAITs for them
    (check it with :func:`replicated`). On a cluster, a cluster pipeline whose keys must all be in one
    slot (``redis.cluster.CrossSlotTransactionError`` else), run on the primary of that slot."""
    if is_cluster(client):
        pipe: Any = client.pipeline(transaction=True)
        if settings.redis_wait_replicas:
            pipe._execution_strategy = _ReplicatedSlot(pipe, settings.redis_wait_replicas,
                                                       settings.redis_wait_timeout_ms)
        return pipe
    if settings.redis_wait_replicas:
        return WaitingPipeline(client, settings.redis_wait_replicas, settings.redis_wait_timeout_ms,
                               transaction=True)
    return client.pipeline(transaction=True)


def replicated(pipe: redis.client.Pipeline, refs: list[Any]) -> None:
    """NotReplicated when ``pipe`` (from :func:`transaction`) WAITed and fewer replicas confirmed."""
    waited: Any = getattr(pipe, "_execution_strategy", pipe)
    if isinstance(waited, (WaitingPipeline, _ReplicatedSlot)) and waited.acked < waited.replicas:
        raise NotReplicated(waited.acked, waited.replicas, waited.timeout_ms, refs)


def _pack(conn: Any, command: tuple[Any, ...]) -> Any:
    """``command`` (``EVALSHA`` and its arguments) packed as ``conn.send_command`` packs it, in a
    fraction of its time: with redis-py's ``HiredisRespSerializer`` and its default encoding, hiredis
    packs the arguments itself (bytes as they are, str as UTF-8, int and float by ``repr``, as
    redis-py's encoder does); any other argument (a bool, which redis-py refuses, a memoryview) goes
    redis-py's way."""
    packer = conn._command_packer
    encoder = conn.encoder
    if type(packer) is HiredisRespSerializer and encoder.encoding == "utf-8" and encoder.encoding_errors == "strict":
        return _whole(command, packer.pack)
    return packer.pack(*command)  # a client of connect(): its Packer


class HeldConnection:
    """One connection of a pooled client, taken from its pool once and kept for one caller's script
    calls (:func:`run_script`'s ``held``), one call at a time: a checkout and a release of the pool
    each call cost a send a tenth of its client time (the pool's lock, its metrics, its event). Before
    each call it is checked as the pool checks a connection it hands out (connected, nothing unread:
    else it is connected again). A call made while another thread has it, or in a forked child, takes
    a connection of the pool as usual. Given back to the pool when the holder is collected.

    On a cluster (``client`` a ``RedisCluster``), the connection is one of the pool of the node a call's
    keys are on (``take(pool)``): kept while the calls go to that node, given back for one of another
    node's pool when they go elsewhere (the slot moved, or another namespace's)."""

    def __init__(self, client: redis.Redis) -> None:
        self.pool = None if is_cluster(client) else client.connection_pool
        self._lock = threading.Lock()
        #: ``(pool, connection)`` once taken: the connection and the pool it came from, put in and taken out
        #: as one item (an exception raised into the thread between two steps never leaves half of them).
        self._box: list[tuple[Any, Any]] = []
        self._pid = os.getpid()
        weakref.finalize(self, _give_back, self._box, self._pid)

    def take(self, pool: Any = None) -> Any:
        """The connection, ready to send on, for this caller until :meth:`done` (None: another thread
        has it, or this is a forked child: use the pool). ``pool``: the node's, on a cluster."""
        if self._pid != os.getpid() or not self._lock.acquire(blocking=False):
            return None
        try:
            pool = pool or self.pool
            if self._box and self._box[0][0] is not pool:
                _give_back(self._box, self._pid)
            if not self._box:
                self._box.append((pool, pool.get_connection()))
                return self._box[0][1]
            conn = self._box[0][1]
            try:  # as the pool's ensure_connection: connected (can_read connects), nothing unread, not closed
                if conn.can_read():
                    raise redis.exceptions.ConnectionError("connection has data")
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                conn.disconnect()
                conn.connect()
            return conn
        except BaseException:
            self._lock.release()
            raise

    def done(self) -> None:
        self._lock.release()

    def give_back(self) -> None:
        """The connection back to its pool now, unless a caller has it (a later call takes one again)."""
        if self._pid == os.getpid() and self._lock.acquire(blocking=False):
            try:
                _give_back(self._box, self._pid)
            finally:
                self._lock.release()


#: The fewest connections a pool must allow for a caller to keep one of them (redis-py's default cap).
KEEP_MIN_CONNECTIONS = 100


def may_hold(client: Any) -> bool:
    """Whether a :class:`HeldConnection` of ``client`` is worth having: a pooled client's whose pool
    :func:`may_keep` allows, or a cluster's whose nodes' pools it allows (a cluster client makes every
    node's pool alike: a cap or a blocking pool given to it is each node's)."""
    if is_cluster(client):
        return all(may_keep(node.connection_pool) for node in primaries(client))
    return client.connection is None and may_keep(client.connection_pool)


def may_keep(pool: Any) -> bool:
    """Whether a :class:`HeldConnection` may keep a connection of ``pool``: not of a pool that makes
    callers wait for a free connection (``BlockingConnectionPool``) nor of one capped below
    :data:`KEEP_MIN_CONNECTIONS`: their connections are few and meant to be shared (a client on a pool
    of one connection could send, and then do nothing else: every other command found none free)."""
    if isinstance(pool, redis.BlockingConnectionPool):
        return False
    return int(getattr(pool, "max_connections", 0) or 0) >= KEEP_MIN_CONNECTIONS


def _give_back(box: list[tuple[Any, Any]], pid: int) -> None:
    if box and os.getpid() == pid:
        pool, conn = box.pop()
        pool.release(conn)


def run_script(script: Any, keys: list[Any], args: list[Any], held: HeldConnection | None = None) -> Any:
    """Call ``script`` (a redis-py ``Script``) on the client it was registered on, as ``script(keys=...,
    args=...)`` does, in half the client's time: EVALSHA sent on a pooled connection of that client
    (``held``'s when it is free) and its reply read, without redis-py's per-call wrapping. Everything
    else goes redis-py's own way: a script Redis does not hold (loaded, and called again), and a lost
    connection (dropped, then retried only when the client retries: the queue client never re-sends a
    fetch or a settlement).

    On a cluster, sent to the primary that owns ``keys[0]``'s slot (a script's keys are all in one
    slot); a node that no longer serves it (MOVED, ASK, TRYAGAIN, CLUSTERDOWN: nothing was run), or a
    lost connection to it when the client retries, and the call goes :func:`on_slot`'s way, which
    learns where the slot went and sends it there, and waits out a migration of the slot (a script
    without keys goes to any primary: every script of the mesh names at least its namespace's prefix,
    broker/keys.py)."""
    client = script.registered_client
    command = ("EVALSHA", script.sha, len(keys), *keys, *args)
    cluster = is_cluster(client)
    route = keys[0] if keys else None
    if cluster and route is None:
        return script(keys=keys, args=args)  # any node: the cluster client picks one
    if cluster or client.connection is None:  # pooled (a single-connection client is called the usual way)
        node = _slot_node(client, route) if cluster else None
        pool = client.get_redis_connection(node).connection_pool if cluster else client.connection_pool
        try:
            taken = None if held is None else held.take(pool)
            conn: Any = pool.get_connection() if taken is None else taken
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if not cluster:
                raise
            _lost(client, node)  # nothing sent: the cluster client's way, below
        else:
            own = taken is None
            try:
                conn.send_packed_command(_pack(conn, command))
                return conn.read_response()
            except redis.exceptions.NoScriptError:
                pass  # loaded below
            except SLOT_ERRORS:
                if not cluster:
                    raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                conn.disconnect()
                if cluster:
                    _lost(client, node)
                retry = client.retry if cluster else client.get_retry()
                if retry is None or retry.get_retries() <= 0:
                    raise
            except redis.exceptions.ResponseError:
                raise  # the script's own error: the connection is fine
            except BaseException:  # raised into this thread mid-call: what is on the wire is unknown
                conn.disconnect()
                raise
            finally:
                if own:
                    pool.release(conn)
                else:
                    held.done()  # type: ignore[union-attr]
    if cluster:  # to the slot's primary, once it serves the slot (never to a migration's target: on_slot)
        return on_slot(client, route, lambda node: _evalsha(node, script, keys, args))
    return _evalsha(client, script, keys, args)


def _evalsha(client: Any, script: Any, keys: list[Any], args: list[Any]) -> Any:
    try:
        return client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        script.sha = client.script_load(script.script)
        return client.evalsha(script.sha, len(keys), *keys, *args)
