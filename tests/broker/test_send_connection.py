"""A client's sends go on one connection it keeps from the client's pool (connection.HeldConnection):
checked before each send as the pool checks a connection it hands out, left to the pool while another
thread sends on it, and given back to the pool when the client goes."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import close_client, redis_client, wait_for

from mesh.broker import MeshClient, connection, job_id_for
from mesh.broker.connection import HeldConnection, connect, node_client, parse_url, run_script
from mesh.broker.outbox import spare_message_ids
from mesh.broker.settings import MeshSettings
from mesh.broker.shards import Shards
from mesh.contracts import KeyConflict

NOTE = {"tool": "note", "args": {"title": "t"}}


def _id_of(conn: Any) -> int:
    conn.send_command("CLIENT", "ID")
    return int(conn.read_response())


def test_a_send_after_the_server_closed_the_kept_connection_goes_on_a_new_one(settings: MeshSettings):
    client = connect(settings, retries=False)  # nothing is sent twice: the check before the send must see it
    killer = redis_client(settings.redis_url)
    try:
        sender = MeshClient(settings, client=client)
        keys = sender.keys_of(sender.send("executor", NOTE, key="before-kill").id)  # its shard's (MESH_SHARDS)
        [(pool, conn)] = sender._enqueue_on(keys).held._box
        # the server the connection is to (on a cluster, the primary of the shard's slot)
        node_client(killer, keys.jobs).execute_command("CLIENT", "KILL", "ID", _id_of(conn))
        again = next(k for k in (f"after-kill-{n}" for n in range(1000)) if sender.keys_of(job_id_for(k)) == keys)
        ref = sender.send("executor", NOTE, key=again)
        assert sender.status(ref.id).key == again
        assert sender._enqueue_on(keys).held._box == [(pool, conn)]  # the same connection object, connected again
    finally:
        close_client(killer)
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
    assert len(refs) == 200 and all(client.redis.exists(client.keys_of(ref.id).job(ref.id)) for ref in refs)


def test_the_kept_connection_goes_back_to_the_pool_when_the_client_goes(settings: MeshSettings,
                                                                        rclient: redis.Redis):
    # on a cluster, the slot's node's
    pool = node_client(rclient, Shards.of(settings).of_job(job_id_for("kept")).jobs).connection_pool
    for _ in range(5):  # clients made and dropped on one shared Redis client keep no connection of it
        sender = MeshClient(settings, client=rclient)
        sender.send("executor", NOTE, key="kept")
        assert len(pool._in_use_connections) == 1
        del sender
        gc.collect()
        assert len(pool._in_use_connections) == 0


@pytest.mark.parametrize("pool", ["capped", "blocking"])
def test_a_client_on_a_pool_of_one_connection_does_more_than_send(settings: MeshSettings, redis_url: str,
                                                                  pool: str):
    # The kept connection was the pool's only one: every command but a send found none free
    # (MaxConnectionsError at once, or "No connection available" after the blocking pool's timeout).
    blocking = {"connection_pool_class": redis.BlockingConnectionPool, "timeout": 1} if pool == "blocking" else {}
    if parse_url(redis_url).cluster:  # a pool of one connection for each node
        rclient = connect(settings, max_connections=1, **blocking)
    else:
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
        close_client(rclient)


class _Struck(Exception):
    """Raised into the sending thread (as a KeyboardInterrupt or a time limit would be)."""


def test_a_call_interrupted_anywhere_leaves_no_answer_for_the_next_one(settings: MeshSettings):
    # The classic pooled-connection desync: a call interrupted between its command and its answer
    # leaves the answer on the connection, and the next call on it reads that one as its own. Each
    # call here answers its own number; 1,000 exceptions are raised into the caller at random points.
    client = connect(settings)
    echo = client.register_script("return ARGV[1]")
    client.script_load(echo.script)
    held = HeldConnection(client)
    state: dict[str, Any] = {"struck": 0, "wrong": [], "stop": False, "calls": 0, "armed": 0}
    calling = threading.Event()

    def calls() -> None:
        n = 0
        while not state["stop"]:
            n += 1
            calling.set()
            got = run_script(echo, [], [str(n)], held)
            state["calls"] += 1
            if got != str(n).encode():
                state["wrong"].append((n, got))

    def caller() -> None:
        while True:
            try:
                state["armed"] += 1  # inside the try: a strike from here on is caught below
                calls()
                return
            except _Struck:
                state["struck"] += 1

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    rng = random.Random(7)
    try:
        for _ in range(1000):
            # The next strike only once the caller is back inside its try (armed again): one landing in
            # its except block would end the thread, not test the connection.
            wait_for(lambda: state["armed"] > state["struck"] or not thread.is_alive(), timeout_s=10,
                     interval_s=0.0005)
            calling.wait(10)
            for _ in range(rng.randrange(200)):  # a point somewhere in a call
                pass
            before = state["struck"]
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Struck))
            wait_for(lambda before=before: state["struck"] > before or not thread.is_alive(), timeout_s=10,
                     interval_s=0.0005)
        calls_before = state["calls"]
        wait_for(lambda: state["calls"] > calls_before + 10, timeout_s=10)  # calls go on after the last
    finally:
        state["stop"] = True
        thread.join(10)
    assert state["struck"] >= 1000 and not state["wrong"]
    assert not held._lock.locked()
    client.close()


OTHER = {"tool": "note", "args": {"title": "other"}}


def _answers_right(sender: MeshClient, tag: str, n: int) -> int:
    """``n`` sends each answered for itself (a conflict, then a fresh job): how many were not."""
    wrong = 0
    for i in range(n):
        try:
            sender.send("executor", OTHER, key="bound")
            wrong += 1
        except KeyConflict:
            pass
        try:
            sender.send("executor", NOTE, key=f"{tag}-{i}")
        except KeyConflict:
            wrong += 1
    return wrong


def test_a_forked_child_and_its_parent_send_at_once_each_on_its_own_connection(client: MeshClient):
    client.send("executor", NOTE, key="bound")  # the parent's connection kept, then shared by the fork
    children = []
    for c in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's exit code is its count
            code = 100
            try:
                code = min(_answers_right(client, f"child{c}", 100), 99)
            finally:
                os._exit(code)
        children.append(pid)
    wrong = _answers_right(client, "parent", 100)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert wrong == 0 and codes == [0, 0]
    queue = client.target("executor").queue
    assert sum(client.redis.llen(keys.queue(queue)) for keys in client.shards.keys) == 301  # every job's message once


def test_message_ids_made_ahead_are_never_shared_by_threads_or_forked_children():
    spare_message_ids()  # the parent holds ids made ahead when it forks
    per, got, lock = 10_000, [], threading.Lock()

    def make() -> list[str]:
        ids: list[str] = []
        while len(ids) < per:
            ids += spare_message_ids()
        return ids

    def thread() -> None:
        ids = make()
        with lock:
            got.extend(ids)

    children = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child writes its ids to the pipe
            try:
                os.close(read)
                with os.fdopen(write, "w") as out:
                    json.dump(make(), out)
            finally:
                os._exit(0)
        os.close(write)
        children.append((pid, read))
    threads = [threading.Thread(target=thread) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for pid, read in children:
        with os.fdopen(read) as source:
            got.extend(json.load(source))
        os.waitpid(pid, 0)
    assert len(got) == 100_000 and len(set(got)) == len(got)


def _run_struck_at(line: int, call: Callable[[], Any]) -> int:
    """``call()``, with :class:`_Struck` raised into it at the ``line``-th line run of the kept connection's
    code (as an exception raised into the thread from outside, a time limit, lands between two lines;
    0: none raised): how many such lines it ran."""
    traced = {HeldConnection.take.__code__, HeldConnection.done.__code__, HeldConnection.give_back.__code__,
              connection._give_back.__code__, run_script.__code__}
    seen = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal seen
        if event == "line":
            seen += 1
            if seen == line:
                raise _Struck  # raised in the traced frame, at this line
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code in traced else None)
    try:
        call()
    except _Struck:
        pass
    finally:
        sys.settrace(None)
    return seen


def _action(what: str, script: Any, held: HeldConnection) -> Callable[[], Any]:
    if what == "call":
        return lambda: run_script(script, [], ["1"], held)
    return held.give_back


def test_a_call_struck_at_any_line_leaves_the_kept_connection_whole(settings: MeshSettings):
    # An exception raised into a settling thread (a time limit) between the two steps of taking or giving
    # back the connection left the connection kept without its pool: every later call that found the kept
    # connection free failed (IndexError), each settlement and fetch of the worker for good.
    client = connect(settings, retries=False)
    echo = client.register_script("return ARGV[1]")
    client.script_load(echo.script)
    try:
        for before in ("none", "a call", "a call given back"):
            def fresh(before: str = before) -> HeldConnection:
                held = HeldConnection(client)
                if before != "none":
                    assert run_script(echo, [], ["0"], held) == b"0"
                return held

            for what in ("call", "give back"):
                held = fresh()
                lines = _run_struck_at(0, _action(what, echo, held))
                assert lines > 0
                for line in range(1, lines + 1):
                    held = fresh()
                    if before == "a call given back":
                        held.give_back()
                    _run_struck_at(line, _action(what, echo, held))
                    for n in (2, 3):  # the next calls answer, the second on the connection kept by the first
                        assert run_script(echo, [], [str(n)], held) == str(n).encode(), (before, what, line)
    finally:
        client.close()
