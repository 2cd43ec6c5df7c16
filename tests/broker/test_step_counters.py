"""A step's success counters (``{ns}:outcomes``, ``{ns}:hist:{agent}``) added up in the worker process and
written once per MESH_COUNTER_FLUSH_S and when it stops, not with each step's write: real worker
processes stopped (SIGTERM) and killed (SIGKILL), real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import pytest
from conftest import ROOT, mesh_env, wait_for

from mesh.broker import MeshClient
from mesh.broker.keys import Keys
from mesh.broker.observe import Counters
from mesh.contracts import State

STEPS = 5


def _note(i: int) -> dict[str, object]:
    return {"tool": "note", "args": {"title": f"counted {i}"}}


def _counts(client: MeshClient) -> tuple[int, int]:
    """Successes counted for the executor, and handler runs in its histogram."""
    succeeded = int(client.redis.hget(client.keys.outcomes, "executor:succeeded") or 0)
    hist = client.redis.hgetall(client.keys.histogram("executor"))
    return succeeded, sum(int(n) for field, n in hist.items() if field != b"sum")


def _run(client: MeshClient) -> None:
    refs = client.send_many("executor", [(_note(i), f"counted-{i}") for i in range(STEPS)])
    for ref in refs:
        assert client.wait(ref.id, timeout_s=60).state is State.SUCCEEDED


@pytest.mark.slow
def test_a_stopped_worker_writes_the_counts_it_held_and_its_steps_wrote_none(make_settings, worker_process,
                                                                              rclient):
    client = MeshClient(make_settings(), client=rclient)
    proc = worker_process("--agents", "executor", "--threads", "2", MESH_COUNTER_FLUSH_S="60")
    _run(client)
    # The steps' writes added no counter (a minute's interval has not passed): the process holds them.
    assert _counts(client) == (0, 0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert _counts(client) == (STEPS, STEPS)  # written once, whole, when it stopped


@pytest.mark.slow
@pytest.mark.parametrize("flush_s", ["0", "60"])
def test_a_killed_worker_loses_the_counts_it_held_unless_each_write_carries_them(make_settings, worker_process,
                                                                                 rclient, flush_s):
    client = MeshClient(make_settings(), client=rclient)
    proc = worker_process("--agents", "executor", "--threads", "2", MESH_COUNTER_FLUSH_S=flush_s)
    _run(client)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    # 0: each success's write added its counts with its record, exact across a kill; else what the
    # process held since its last write (all of it, within a minute) went with it.
    assert _counts(client) == ((STEPS, STEPS) if flush_s == "0" else (0, 0))


@pytest.mark.slow
def test_counts_are_written_every_interval_and_a_batch_sent_again_is_not_added_twice(make_settings, worker_process,
                                                                                      rclient):
    settings = make_settings()
    client = MeshClient(settings, client=rclient)
    worker_process("--agents", "executor", "--threads", "2", MESH_COUNTER_FLUSH_S="0.2")
    _run(client)
    wait_for(lambda: _counts(client) == (STEPS, STEPS))  # by the running worker, at its interval

    # A batch whose answer was lost is sent again with its number: it lands once.
    keys = Keys(settings.namespace, settings.shard)
    counters = Counters(rclient, keys, 60)
    counters.hincrby(keys.outcomes, "executor:succeeded", 3)
    counters.hincrbyfloat(keys.histogram("executor"), "sum", 0.5)
    counters.flush()
    again = [1, 60, "i", keys.outcomes, "executor:succeeded", "3"]
    assert counters._script(keys=[counters.keys.prefix, counters.flushed_key], args=again) == 0
    assert _counts(client) == (STEPS + 3, STEPS)
    assert 0 < rclient.ttl(counters.flushed_key) <= 24 * 3600
    counters.close()


def _in_child(body: Callable[[], bool]) -> int:
    """Run ``body`` in a child forked from this process; its exit status: 0 when it returned True."""
    with warnings.catch_warnings():  # forking a process with threads (the counters' own)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if body() else 1)
        except BaseException:
            os._exit(2)
    return os.waitpid(pid, 0)[1]


def test_counters_held_across_a_fork_are_written_once_and_both_processes_batches_land(settings, rclient):
    # A process that forks after it built its counters (a preloading server, multiprocessing's 'fork'):
    # the child shared the parent's batch key and numbers (the one writing second had its batch refused
    # as already written: its counts lost) and the parent's held counts (written by both: twice).
    keys = Keys(settings.namespace, settings.shard)
    counters = Counters(rclient, keys, 60)
    counters.hincrby(keys.outcomes, "forked:succeeded", 1)  # held at the fork: the parent's to write

    def child() -> bool:
        counters.hincrby(keys.outcomes, "forked:succeeded", 100)
        counters.flush()
        return True

    assert _in_child(child) == 0
    counters.hincrby(keys.outcomes, "forked:succeeded", 10)
    counters.flush()
    assert int(rclient.hget(keys.outcomes, "forked:succeeded") or 0) == 111
    counters.close()


def test_a_forked_childs_counters_are_written_by_its_own_thread(settings, rclient):
    # The parent's writing thread is not carried over by the fork: the child's counts waited for a
    # close that a child (a server's worker process) may never call.
    keys = Keys(settings.namespace, settings.shard)
    counters = Counters(rclient, keys, 0.05)
    counters.hincrby(keys.outcomes, "forked:succeeded", 1)  # the parent's thread starts
    wait_for(lambda: rclient.hget(keys.outcomes, "forked:succeeded") == b"1")

    def child() -> bool:
        counters.hincrby(keys.outcomes, "forked:succeeded", 100)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if int(rclient.hget(keys.outcomes, "forked:succeeded") or 0) == 101:
                return True
            time.sleep(0.02)
        return False

    assert _in_child(child) == 0
    counters.close()


#: A process serving the executor in-process (``start_worker``), which ends without stopping its worker
#: once its jobs succeeded, as an app's own script or a test's in-process worker may.
_EXITS_WITHOUT_STOP = """
import sys
from mesh.broker import MeshClient
from mesh.broker.settings import MeshSettings
from mesh.contracts import State
from mesh.ops.worker import start_worker

settings = MeshSettings.from_env()
assert settings.namespace == sys.argv[2], settings.namespace  # the test's, from MESH_NAMESPACE
worker = start_worker(settings, ["executor"], 2)
client = MeshClient(settings)
refs = client.send_many("executor", [({"tool": "note", "args": {"title": f"exit {i}"}}, f"exit-{i}-{sys.argv[2]}")
                                     for i in range(int(sys.argv[1]))])
assert all(client.wait(ref.id, timeout_s=60).state is State.SUCCEEDED for ref in refs)
worker.join()  # its threads done with the messages (not stopped): the successes counted
"""


@pytest.mark.slow
def test_a_process_ending_without_stopping_its_worker_writes_the_counts_it_held(settings, rclient):
    # The counts were written by a daemon thread once per interval, and at the worker's stop: a process
    # that ended normally without a stop lost everything since its last interval.
    client = MeshClient(settings, client=rclient)
    done = subprocess.run([sys.executable, "-c", _EXITS_WITHOUT_STOP, str(STEPS), settings.namespace], timeout=120,
                          env=mesh_env(settings, MESH_COUNTER_FLUSH_S="60"), cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert _counts(client) == (STEPS, STEPS)


def test_counts_added_after_a_close_are_written_still(settings, rclient):
    # A step that outlived its worker's stop (past the stop's timeout) counted into closed counters:
    # no thread wrote them again, ever.
    keys = Keys(settings.namespace, settings.shard)
    counters = Counters(rclient, keys, 0.05)
    counters.hincrby(keys.outcomes, "late:succeeded", 1)
    counters.close()
    assert rclient.hget(keys.outcomes, "late:succeeded") == b"1"
    counters.hincrby(keys.outcomes, "late:succeeded", 1)
    wait_for(lambda: rclient.hget(keys.outcomes, "late:succeeded") == b"2")
    counters.close()
