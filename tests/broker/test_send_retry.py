"""A send whose reply is lost with its connection is sent again (the client retries a dropped
connection, MESH_REDIS_RETRIES): Redis ran the first one, so the second must write nothing more. A
TCP relay in front of the real Redis forwards the enqueue script's call, lets Redis answer, then closes
the client's side without passing the answer on: the client sees the connection dropped mid-reply and
sends the same call again."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from mesh.broker import MeshClient
from mesh.broker.connection import NotReplicated
from mesh.broker.settings import MeshSettings

NOTE = {"tool": "note", "args": {"title": "t"}}


class Relay:
    """Forwards 127.0.0.1:port to a Redis. ``cut(n)``: the next ``n`` replies to an EVALSHA (of a
    connection that sent one) are swallowed and that connection closed, once Redis has answered."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        self.cut_done = 0
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection(self.upstream)
            self.sockets += [near, far]
            sent = {"evalsha": False}
            threading.Thread(target=self._pump, args=(near, far, sent, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near, sent, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, sent: dict[str, bool], outbound: bool) -> None:
        try:
            while data := src.recv(65536):
                if outbound and b"EVALSHA" in data.upper():
                    sent["evalsha"] = True
                if not outbound and sent["evalsha"]:
                    sent["evalsha"] = False
                    with self.lock:
                        cut = self.cuts > 0
                        if cut:
                            self.cuts -= 1
                            self.cut_done += 1
                    if cut:  # Redis ran the call: its answer never reaches the client
                        for s in (src, dst):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                            s.close()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


pytestmark = pytest.mark.no_cluster("the client reaches Redis through a TCP relay in front of one server; a cluster "
                                    "client connects to each node at the address CLUSTER SLOTS names, around the relay")


@pytest.fixture
def relay(redis_url: str) -> Iterator[Relay]:
    parts = urlsplit(redis_url)
    r = Relay(parts.hostname or "127.0.0.1", parts.port or 6379)
    yield r
    r.close()


def _written(client: MeshClient, queue: str) -> dict[str, Any]:
    r, every = client.redis, client.shards.keys  # every shard's (MESH_SHARDS)
    return {"ready": [i.decode() for keys in every for i in r.lrange(keys.queue(queue), 0, -1)],
            "bodies": sorted(k.decode() for keys in every for k in r.hkeys(keys.messages(queue)))}


@pytest.mark.parametrize("key", [None, "a-key"], ids=["fresh-key", "given-key"])
def test_a_send_retried_after_its_reply_was_lost_is_written_once(relay: Relay, make_settings: Any, key: str | None):
    settings: MeshSettings = make_settings(redis_url=f"redis://127.0.0.1:{relay.port}/0")
    sender = MeshClient(settings)
    sender.send("executor", NOTE)  # the script loaded, the connection made
    queue = sender.target("executor").queue
    before = _written(sender, queue)
    relay.cuts = 1
    ref = sender.send("executor", NOTE, key=key)
    assert relay.cut_done == 1  # the first call's answer was lost, and the send went again
    after = _written(sender, queue)
    new = [i for i in after["ready"] if i not in before["ready"]]
    assert len(new) == 1, after["ready"]  # before: the message pushed twice (once a call)
    assert len(after["bodies"]) == len(before["bodies"]) + 1
    events = sender.redis.xrange(sender.keys_of(ref.id).trace(ref.id))
    assert len(events) == 1  # one ``enqueued`` event, not one a call
    sender.redis.close()


def test_a_batch_retried_after_its_reply_was_lost_is_written_once(relay: Relay, make_settings: Any):
    settings: MeshSettings = make_settings(redis_url=f"redis://127.0.0.1:{relay.port}/0")
    sender = MeshClient(settings)
    sender.send("executor", NOTE)
    queue = sender.target("executor").queue
    before = _written(sender, queue)
    relay.cuts = 1
    refs = sender.send_many("executor", [(NOTE, None), (NOTE, "k1"), ({**NOTE, "args": {"title": "u"}}, "k2")])
    assert relay.cut_done == 1
    after = _written(sender, queue)
    assert len(after["ready"]) == len(before["ready"]) + 3, after["ready"]
    assert len(set(after["ready"])) == len(after["ready"])
    assert [len(sender.redis.xrange(sender.keys_of(ref.id).trace(ref.id))) for ref in refs] == [1, 1, 1]
    sender.redis.close()


def test_a_send_retried_while_waiting_for_replicas_is_written_once(relay: Relay, make_settings: Any):
    # MESH_REDIS_WAIT_REPLICAS: the script and WAIT go as one pipeline, retried whole.
    settings: MeshSettings = make_settings(redis_url=f"redis://127.0.0.1:{relay.port}/0",
                                           redis_wait_replicas=1, redis_wait_timeout_ms=10)
    sender = MeshClient(settings)
    with pytest.raises(NotReplicated):  # no replica here: the send is written, and says so
        sender.send("executor", NOTE)
    queue = sender.target("executor").queue
    before = _written(sender, queue)
    relay.cuts = 1
    with pytest.raises(NotReplicated) as caught:
        sender.send("executor", NOTE, key="replicated")
    assert relay.cut_done == 1
    after = _written(sender, queue)
    assert len(after["ready"]) == len(before["ready"]) + 1, after["ready"]
    sent = caught.value.refs[0].id
    assert len(sender.redis.xrange(sender.keys_of(sent).trace(sent))) == 1
    sender.redis.close()


def test_the_relay_passes_answers_on_when_not_cut(relay: Relay, make_settings: Any):
    sender = MeshClient(make_settings(redis_url=f"redis://127.0.0.1:{relay.port}/0"))
    ref = sender.send("executor", NOTE, key="plain")
    assert sender.status(ref.id).key == "plain"
    assert redis.Redis(port=relay.port).ping()
    sender.redis.close()
