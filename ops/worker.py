"""Running agents: one worker process, or a supervisor of several."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

from dramatiq import Worker

from mesh.agents.runtime import AgentRuntime, declare_agents
from mesh.broker.mesh_broker import build_broker
from mesh.broker.settings import MeshSettings
from mesh.ops.sweeper import Sweeper

logger = logging.getLogger(__name__)

#: How long an idle consumer waits between polls of an empty queue (ms).
IDLE_POLL_MS = 100


def start_worker(settings: MeshSettings, agents: list[str], threads: int) -> Worker:
    """Build the broker, declare ``agents`` on it and start consuming their queues in this process."""
    broker = build_broker(settings)
    broker.add_middleware(Sweeper(settings, broker.records))  # retention, on its own schedule
    runtime = AgentRuntime.from_settings(settings, broker.records)
    declare_agents(broker, runtime, agents)
    worker = Worker(broker, queues=set(agents), worker_threads=threads, worker_timeout=IDLE_POLL_MS)
    if settings.prefetch:
        worker.queue_prefetch = settings.prefetch
    broker.emit_after("process_boot")  # as dramatiq's CLI does: starts TimeLimit's timer thread
    worker.start()
    return worker


def run_worker(settings: MeshSettings, agents: list[str], threads: int) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully: in-memory messages go back to their queues."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = start_worker(settings, agents, threads)
    logger.info("worker started", extra={"agents": ",".join(agents), "threads": threads, "pid": os.getpid(),
                                         "namespace": settings.namespace})
    stop.wait()
    logger.info("worker stopping", extra={"pid": os.getpid()})
    worker.stop(timeout=30_000)
    worker.broker.close()
    return 0


def supervise(agents: list[str], processes: int, threads: int) -> int:
    """Start ``processes`` worker processes and forward SIGTERM/SIGINT to them."""
    cmd = [sys.executable, "-m", "mesh.ops.cli", "worker", "--agents", ",".join(agents),
           "--processes", "1", "--threads", str(threads)]
    children = [subprocess.Popen(cmd) for _ in range(processes)]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
