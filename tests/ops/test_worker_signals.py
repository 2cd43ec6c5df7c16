"""``mesh worker`` stops on a SIGTERM whichever of its threads the kernel hands it to: Python runs a
signal's handler in the main thread only, once that thread runs Python again, and the main thread waited
with no end. The signal is sent to one thread with ``tgkill``, as the kernel may pick any thread that
does not block it for a signal sent to the process."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for, wait_started


def tgkill(pid: int, tid: int, sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def threads_of(pid: int) -> list[int]:
    return sorted(int(p.name) for p in Path(f"/proc/{pid}/task").iterdir())


@pytest.mark.slow  # a worker process
def test_a_sigterm_given_to_a_thread_that_is_not_the_main_one_stops_the_worker(worker_process: Any) -> None:
    worker = worker_process("--app", "tests.apps.greeter:app", "--threads", "2")
    wait_started(worker)
    others = wait_for(lambda: [tid for tid in threads_of(worker.pid) if tid != worker.pid], timeout_s=15)
    tgkill(worker.pid, others[-1], signal.SIGTERM)
    assert worker.wait(15) == 0
    assert "worker stopping" in worker.log_path.read_text()
