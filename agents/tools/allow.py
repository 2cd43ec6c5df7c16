"""MESH_HTTP_ALLOW: which ``host:port`` a tool may reach, and the one address it connects to.

Rules (see README, "Limits"):

- Hosts are compared in one normal form: lower case, no trailing dot; an IPv6 literal in its
  compressed form (``[0:0::1]`` is ``[::1]``); an IPv4-mapped IPv6 address as its IPv4 address.
- A host whose last label is a number (``2130706433``, ``0x7f.1``, ``127.1``, ``127.000.000.001``)
  must be a plain dotted quad (``127.0.0.1``); any other spelling is refused, never guessed at:
  resolvers disagree on what it means. Zone ids (``fe80::1%eth0``) are refused.
- A name is resolved once per call (through an injectable resolver) and the request connects to
  the address that was checked, so a second lookup cannot send it elsewhere (DNS rebinding). A
  name may reach a public address; a loopback, private, link-local or otherwise non-global one
  only when that address with the port is itself in MESH_HTTP_ALLOW.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from mesh.contracts import Brownout, ConfigError, ToolRefused

#: ``(host, port) -> addresses``: how names are resolved; injectable so tests need no DNS.
Resolver = Callable[[str, int], list[str]]

_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_DOTTED_QUAD = re.compile(r"^(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}$")


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``getaddrinfo`` gives ``host``, in its order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def normal_host(host: str) -> str:
    """``host`` in the one form hosts are compared in; ValueError for a spelling that is refused."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("no host")
    if ":" in host:
        if "%" in host:
            raise ValueError(f"IPv6 zone ids are not allowed: {host}")
        address = ipaddress.IPv6Address(host)  # ValueError when it is none
        return str(address.ipv4_mapped) if address.ipv4_mapped else str(address)
    numeric = _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1])
    if numeric and (not _DOTTED_QUAD.match(host) or any(int(p) > 255 for p in host.split("."))):
        raise ValueError(f"numeric host {host!r} is not a plain dotted-quad IPv4 address; "
                             "write the address as a.b.c.d")
    return host


def host_key(host: str, port: int) -> str:
    """``host:port`` as MESH_HTTP_ALLOW lists it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_allowlist(entries: Iterable[str]) -> frozenset[str]:
    """MESH_HTTP_ALLOW's ``host:port`` entries in normal form; ConfigError names a bad one. Asked
    on every tool call (the list, and a tool's own ``allow=``), so each list is parsed once."""
    listed = tuple(entries)
    try:
        return _parsed(listed)
    except TypeError:  # an unhashable entry (a tool's own allow= gave one): parsed, not cached
        return _parsed.__wrapped__(listed)


@functools.lru_cache(maxsize=256)
def _parsed(entries: tuple[str, ...]) -> frozenset[str]:
    out = set()
    for entry in entries:
        try:
            parts = urlsplit(f"//{entry}")
            if parts.port is None:
                raise ValueError("no port")
            out.add(host_key(normal_host(parts.hostname or ""), parts.port))
        except ValueError as exc:
            raise ConfigError(f"MESH_HTTP_ALLOW entry {entry!r} is not host:port: {exc}") from None
    return frozenset(out)


@dataclass(frozen=True)
class Pinned:
    """Where a request goes: the allowed ``host:port`` and the one address it connects to."""

    scheme: str
    host: str
    port: int
    address: str

    @property
    def dependency(self) -> str:
        return host_key(self.host, self.port)

    def url(self, url: str) -> str:
        """``url`` with its host replaced by the pinned address (the name goes in ``Host`` and SNI)."""
        parts = urlsplit(url)
        netloc = f"{host_key(self.address, self.port)}"
        return parts._replace(netloc=netloc).geturl()


def pin(url: str, allow: frozenset[str], resolve: Resolver, *, listed_in: str = "MESH_HTTP_ALLOW") -> Pinned:
    """Check ``url`` against ``allow`` (normal form) and pick the address to connect to; ToolRefused
    says why when it may not be reached, naming the list as ``listed_in``."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = normal_host(parts.hostname or "")
    except ValueError as exc:  # a non-numeric port, an odd numeric host: no retry can cure it
        raise ToolRefused(f"{url} refused: {exc}", url=url) from None
    if parts.username is not None or parts.password is not None:
        raise ToolRefused(f"{url} refused: credentials in the URL are not allowed", url=url)
    dependency = host_key(host, port)
    if dependency not in allow:
        raise ToolRefused(f"{dependency} refused: not in {listed_in}", dependency=dependency)
    try:
        ipaddress.ip_address(host)
        return Pinned(parts.scheme, host, port, host)
    except ValueError:
        pass  # a name
    try:
        found = resolve(host, port)
    except OSError as exc:  # DNS down or the name gone: like a dependency that is down
        raise Brownout(f"{dependency} unreachable: {host} does not resolve: {exc}", dependency=dependency) from None
    for address in found:
        try:
            ip = normal_host(address)
        except ValueError:
            continue
        if ipaddress.ip_address(ip).is_global or host_key(ip, port) in allow:
            return Pinned(parts.scheme, host, port, ip)
    raise ToolRefused(f"{dependency} refused: {host} resolves to {', '.join(found) or 'nothing'}, and a name "
                      f"may reach a non-public address only when that address:port is in {listed_in}",
                      dependency=dependency, addresses=found)
