"""A client's sends go on one connection it keeps from the client's pool (connection.HeldConnection):
checked before each send as the pool checks a connection it hands out, left to the pool while another
thread sends on it, and given back to the pool when the client goes."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest
import redis

from mesh.broker import MeshClient
from mesh.broker.connection import connect
from mesh.broker.settings import MeshSettings

NOTE = {"tool": "note", "args": {"title": "t"}}


def _id_of(conn: Any) -> int:
    conn.send_command("CLIENT", "ID")
    return int(conn.read_response())


def test_a_send_after_the_server_closed_the_kept_connection_goes_on_a_new_one(settings: MeshSettings):
    client = connect(settings, retries=False)  # nothing is sent twice: the check before the send must see it
    killer = redis.Redis.from_url(settings.redis_url)
    try:
        sender = MeshClient(settings, client=client)
        sender.send("executor", NOTE)
        [conn] = sender._enqueue.held._box
        killer.execute_command("CLIENT", "KILL", "ID", _id_of(conn))
        ref = sender.send("executor", NOTE, key="after-kill")
        assert sender.status(ref.id).key == "after-kill"
        assert sender._enqueue.held._box == [conn]  # the same connection object, connected again
    finally:
        killer.close()
        client.close()


def test_threads_sending_at_once_each_get_a_connection_and_every_send_is_written(client: MeshClient):
    errors: list[BaseException] = []
    refs: list[Any] = []

    def send(t: int) -> None:
        try:
            refs.extend(client.send("executor", NOTE, key=f"thread-{t}-{i}") for i in range(50))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(refs) == 200 and all(client.redis.exists(client.keys.job(ref.id)) for ref in refs)


def test_the_kept_connection_goes_back_to_the_pool_when_the_client_goes(settings: MeshSettings,
                                                                        rclient: redis.Redis):
    pool = rclient.connection_pool
    for _ in range(5):  # clients made and dropped on one shared Redis client keep no connection of it
        sender = MeshClient(settings, client=rclient)
        sender.send("executor", NOTE)
        assert len(pool._in_use_connections) == 1
        del sender
        gc.collect()
        assert len(pool._in_use_connections) == 0


@pytest.mark.parametrize("pool", ["capped", "blocking"])
def test_a_client_on_a_pool_of_one_connection_does_more_than_send(settings: MeshSettings, redis_url: str,
                                                                  pool: str):
    # The kept connection was the pool's only one: every command but a send found none free
    # (MaxConnectionsError at once, or "No connection available" after the blocking pool's timeout).
    made = redis.ConnectionPool.from_url(redis_url, max_connections=1) if pool == "capped" \
        else redis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=1)
    rclient = redis.Redis(connection_pool=made)
    try:
        sender = MeshClient(settings, client=rclient)
        ref = sender.send("executor", NOTE, key="one-connection")
        assert sender.status(ref.id).key == "one-connection"
        assert sender.send("executor", NOTE, key="again").key == "again"
        assert sender._enqueue.held is None  # nothing kept: the pool's connection is everyone's
    finally:
        rclient.close()
