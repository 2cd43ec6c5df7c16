"""Who may use the console: users with scrypt password hashes, sessions in a signed cookie, and the
CSRF token every action (a POST) must carry.

A user line is ``name:scrypt$N$r$p$salt$hash`` (salt and hash in URL-safe base64), from
MESH_CONSOLE_USERS_FILE or MESH_CONSOLE_USERS (``mesh ops user add NAME`` writes one). A session
is ``payload.signature``: the payload (user, expiry, CSRF token) in URL-safe base64 JSON, signed
with HMAC-SHA256 under MESH_CONSOLE_SECRET (else a key drawn when the server starts). The CSRF
token lives in the signed session, so a form's copy is checked against a value no other site can
read or set.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from mesh.broker import MeshSettings
from mesh.contracts import ConfigError

#: scrypt's cost: 16 MiB of memory and about 50 ms per hash, so a stolen file is slow to guess.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

#: A user's name: what the audit records and ``approvers:`` lists.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
NAME_MAX = 64

#: The shortest MESH_CONSOLE_SECRET taken: an HMAC key anyone may test guesses against offline.
MIN_SECRET_BYTES = 32

SESSION_COOKIE = "mesh_session"
LOGIN_COOKIE = "mesh_login"


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The stored form of ``password``: ``scrypt$N$r$p$salt$hash``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` hashes to ``stored`` (a malformed ``stored`` matches nothing)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(_unb64(digest)), maxmem=2**26)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, _unb64(digest))


@functools.cache
def _decoy() -> str:
    """A hash an unknown name's password is checked against (made once, so that check costs one scrypt)."""
    return hash_password(secrets.token_urlsafe(16))


def parse_users(text: str, where: str) -> dict[str, str]:
    """``name:hash`` lines (or comma-separated pairs): name -> hash. Blank lines and ``#`` comments
    are skipped; anything else malformed is a ConfigError naming ``where`` and the line."""
    users: dict[str, str] = {}
    text = text.removeprefix("\ufeff")  # the byte-order mark some editors start a file with
    for n, raw in enumerate(re.split(r"[\n,]", text), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not NAME.fullmatch(name) or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise ConfigError(f"{where}: entry {n} is not `name:scrypt$...` (write one with `mesh ops user add NAME`)")
        users[name] = stored
    return users


def load_users(settings: MeshSettings) -> dict[str, str]:
    """The console's users from MESH_CONSOLE_USERS_FILE and MESH_CONSOLE_USERS (the latter wins a name)."""
    users: dict[str, str] = {}
    path = settings.console_users_file
    if path is not None:
        try:
            users.update(parse_users(Path(path).read_text(), str(path)))
        except OSError as exc:
            raise ConfigError(f"MESH_CONSOLE_USERS_FILE={path}: {exc.strerror or exc}") from exc
    if settings.console_users is not None:
        users.update(parse_users(settings.console_users.get_secret_value(), "MESH_CONSOLE_USERS"))
    return users


def write_user(path: Path, name: str, password: str) -> bool:
    """Add ``name`` to the users file at ``path`` (created 0600), or replace its hash; True if it was new."""
    if not NAME.fullmatch(name):
        raise ConfigError(f"user name {name!r}: letters, digits and _ . @ - only, at most 64")
    lines = path.read_text().splitlines() if path.exists() else []
    entry = f"{name}:{hash_password(password)}"
    kept = [line for line in lines if line.partition(":")[0].strip() != name]
    path.touch(mode=0o600, exist_ok=True)
    path.write_text("\n".join([*kept, entry]) + "\n")
    return len(kept) == len(lines)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (the address the server binds) is reachable from this machine only."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Access:
    """The console's access rule. With users, each page and action needs one logged in. Without
    users the console is open only when bound to loopback, and each visitor acts as ``local`` (the
    operator running the server, as the CLI names them); bound elsewhere, it is off."""

    users: dict[str, str]
    host: str
    local: str
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    session_s: float = 12 * 3600

    @classmethod
    def of(cls, settings: MeshSettings, host: str, local: str) -> Access:
        secret = settings.console_secret.get_secret_value().encode() if settings.console_secret else None
        if secret is not None and len(secret) < MIN_SECRET_BYTES:  # a short key is guessed from one cookie
            raise ConfigError(f"MESH_CONSOLE_SECRET has {len(secret)} bytes; a session key needs at least "
                              f"{MIN_SECRET_BYTES} (python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        access = cls(load_users(settings), host, local, session_s=settings.console_session_s)
        if secret:
            access.secret = secret
        return access

    def foreign_host(self, host_header: str | None) -> str | None:
        """Why a request naming ``host_header`` is refused, or None. Open without users, the console
        answers only to loopback names: a page asked for under another name is a site whose name
        resolves to this machine (DNS rebinding) reading the console in a local browser."""
        if self.login_needed:
            return None
        try:
            hostname = urlsplit(f"//{host_header or ''}").hostname or ""
        except ValueError:  # "[" without its "]"
            hostname = ""
        if hostname and is_loopback(hostname):
            return None
        return (f"refused: the console was asked for as {(host_header or '')[:100]!r}; without users it "
                "answers only to localhost and loopback addresses\n")

    @property
    def login_needed(self) -> bool:
        return bool(self.users)

    @property
    def off_reason(self) -> str | None:
        """Why the console is off, or None when it serves."""
        if self.users or is_loopback(self.host):
            return None
        return (f"the console is off: it listens on {self.host}, beyond this machine, and no users are "
                "configured; add one with `mesh ops user add NAME` and set MESH_CONSOLE_USERS_FILE "
                "(/metrics, /healthz and /readyz serve as before)")

    def login(self, name: str, password: str) -> bool:
        stored = self.users.get(name)
        if stored is None:
            check_password(password, _decoy())  # one scrypt, as slow as a real check: no name is told apart
            return False
        return check_password(password, stored)

    def session(self, user: str) -> str:
        """A new session cookie's value for ``user``, with a fresh CSRF token."""
        body = _b64(orjson.dumps({"u": user, "x": time.time() + self.session_s, "c": secrets.token_urlsafe(24),
                                  "p": self._password_tag(user)}))
        return f"{body}.{self._sign(body)}"

    def _password_tag(self, user: str) -> str:
        """A digest of the user's password hash: a session made before the password changed is refused."""
        return hashlib.sha256(self.users.get(user, "").encode()).hexdigest()[:16]

    def read_session(self, value: str | None) -> tuple[str, str] | None:
        """(user, CSRF token) of a valid, unexpired session cookie whose user still exists, else None."""
        if not value or "." not in value:
            return None
        body, _, signature = value.rpartition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return None
        try:
            data = orjson.loads(_unb64(body))
        except (ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(data, dict) or float(data.get("x", 0)) < time.time():
            return None
        user = str(data.get("u"))
        if self.login_needed and (user not in self.users or not hmac.compare_digest(
                str(data.get("p", "")).encode(), self._password_tag(user).encode())):
            return None
        if not self.login_needed and user != self.local:
            return None
        return user, str(data.get("c"))

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self.secret, body.encode(), hashlib.sha256).digest())


@dataclass
class Throttle:
    """Failed logins over the last ``window_s``, per user name and per client address: past ``per_name``
    failures for a name, or ``per_address`` from an address, its next tries are refused unchecked until
    the oldest failure leaves the window. A name under attack is locked for at most ``window_s`` at a
    time; what is remembered is bounded by the password checks the server can make in a window."""

    per_name: int = 5
    per_address: int = 20
    window_s: float = 60.0
    failures: dict[str, list[float]] = field(default_factory=dict)

    def wait_s(self, name: str, address: str, now: float | None = None) -> float:
        """Seconds until ``name`` may be tried from ``address`` (0: now)."""
        now = time.monotonic() if now is None else now
        self._forget(now)
        waits = [0.0]
        for key, limit in ((_name_key(name), self.per_name), (f"a:{address}", self.per_address)):
            times = self.failures.get(key, [])
            if len(times) >= limit:
                waits.append(times[-limit] + self.window_s - now)
        return max(waits)

    def failed(self, name: str, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in (_name_key(name), f"a:{address}"):
            self.failures.setdefault(key, []).append(now)

    def _forget(self, now: float) -> None:
        for key in list(self.failures):
            kept = [t for t in self.failures[key] if t > now - self.window_s]
            if kept:
                self.failures[key] = kept
            else:
                del self.failures[key]


def _name_key(name: str) -> str:
    """The throttle's key of a tried name: at most a user name's length and one more (a longer name is
    no user's, so the tries at all of them count together), so that what a failure leaves in memory
    is small whatever was posted (a form takes 64 KiB)."""
    return f"n:{name[:NAME_MAX + 1]}"


def session_id(value: str) -> str:
    """A session cookie's name once it is logged out: a digest (the cookie itself is never stored)."""
    return hashlib.sha256(value.encode()).hexdigest()[:32]


def same_token(given: str | None, expected: str | None) -> bool:
    """A constant-time comparison of a form's CSRF token with the session's."""
    # as bytes: compare_digest refuses a str with a character beyond ASCII (a TypeError, not a "no")
    return bool(given) and bool(expected) and hmac.compare_digest(str(given).encode(), str(expected).encode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
