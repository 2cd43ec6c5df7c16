"""Pipeline expressions run in a child process, bounded in time, memory and result size.

CEL is evaluated by a Rust extension that holds the GIL and knows no cost limit: an expression that
doubles a string 34 times, or recurses past the Rust stack, takes the whole worker down, and the
message is recovered to take the next one down too. So expressions never run in a worker: one
evaluator process per worker (:mod:`.evaluator_main`, started on first use, under an address-space
limit) answers them over a pipe. An answer not back within ``timeout_ms`` kills it; a death (out
of memory, a segfault) or a value over ``max_result_bytes`` is an :class:`EvaluatorLimit`, and the
step that asked is dead-lettered instead of the worker. The next expression starts a fresh one.

Only the names an expression reads are sent (CEL's own list of its variables).
"""

from __future__ import annotations

import atexit
import os
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from mesh.contracts import MeshError

_MAIN = str(Path(__file__).with_name("evaluator_main.py"))
#: What the evaluator writes once it is ready, and how long it may take to get there.
READY = b"R"
STARTUP_S = 30.0


class EvaluatorLimit(MeshError):
    """An evaluation went past a run-time limit (time, memory, result size) or killed its evaluator."""

    terminal = True


class EvaluatorTimeout(EvaluatorLimit):
    """No answer within MESH_EXPR_TIMEOUT_MS."""


@dataclass(frozen=True)
class ExprLimits:
    """The run-time bounds of one expression's evaluation (MESH_EXPR_*)."""

    timeout_ms: int = 1000
    memory_mb: int = 512
    max_result_bytes: int = 1024 * 1024


class Evaluator:
    """One evaluator process and the lock that gives it one question at a time."""

    def __init__(self, limits: ExprLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def evaluate(self, text: str, values: dict[str, Any]) -> tuple[str, Any]:
        """``("ok", value)`` or ``("error", why)`` (CEL's own error); EvaluatorLimit past a limit."""
        request = orjson.dumps([text, values], default=str, option=orjson.OPT_NON_STR_KEYS)
        with self._lock:
            reply = self._answer(request)
        if "limit" in reply:
            raise EvaluatorLimit(reply["limit"])
        return ("ok", reply["ok"]) if "ok" in reply else ("error", reply["error"])

    def _answer(self, request: bytes) -> dict[str, Any]:
        """The evaluator's reply. A time limit hit while the evaluator spent under half of it on the
        CPU is the machine's doing (a loaded host, a paused process group), not the expression's:
        asked once more, of a fresh evaluator, before the step is dead-lettered for it."""
        for attempt in (1, 2):
            proc = self._started()
            before = _cpu_s(proc.pid)
            try:
                return self._ask(proc, request)
            except EvaluatorTimeout:
                after = _cpu_s(proc.pid)
                self._stop()
                starved = before is not None and after is not None and after - before < self.limits.timeout_ms / 2000
                if attempt == 2 or not starved:
                    raise
            except EvaluatorLimit:
                self._stop()
                raise
        raise AssertionError("unreachable")

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            memory = self.limits.memory_mb * 1024 * 1024
            proc = subprocess.Popen(
                [sys.executable, "-I", _MAIN, str(memory), str(self.limits.max_result_bytes),
                 str(self.limits.timeout_ms)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env={"RUST_BACKTRACE": "0", "PATH": os.environ.get("PATH", "")}, bufsize=0)
            assert proc.stdout is not None
            self._proc = proc
            try:  # its start (an interpreter and two imports) is not the first expression's time
                if _read(proc.stdout, 1, time.monotonic() + STARTUP_S, 0) != READY:
                    raise EOFError
            except (EvaluatorLimit, EOFError):
                self._stop()
                raise EvaluatorLimit(f"the expression evaluator did not start within {STARTUP_S:g}s") from None
        return self._proc

    def _ask(self, proc: subprocess.Popen[bytes], request: bytes) -> dict[str, Any]:
        deadline = time.monotonic() + self.limits.timeout_ms / 1000
        assert proc.stdin is not None and proc.stdout is not None
        try:
            _write(proc.stdin, struct.pack(">I", len(request)) + request, deadline, self.limits.timeout_ms)
            (size,) = struct.unpack(">I", _read(proc.stdout, 4, deadline, self.limits.timeout_ms))
            reply: dict[str, Any] = orjson.loads(_read(proc.stdout, size, deadline, self.limits.timeout_ms))
        except (BrokenPipeError, EOFError):
            raise EvaluatorLimit(_death(proc)) from None
        return reply

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()

    def close(self) -> None:
        with self._lock:
            self._stop()


def _write(stream: IO[bytes], data: bytes, deadline: float, timeout_ms: int) -> None:
    """Write ``data`` by ``deadline``: an evaluator that does not read (stopped, stuck) must not
    block the worker past its limit on a full pipe, holding the lock every other thread waits on."""
    os.set_blocking(stream.fileno(), False)
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [stream], [], left)[1]:
            raise EvaluatorTimeout(f"it ran longer than MESH_EXPR_TIMEOUT_MS ({timeout_ms})")
        try:
            view = view[os.write(stream.fileno(), view):]
        except BlockingIOError:
            continue


def _read(stream: IO[bytes], n: int, deadline: float, timeout_ms: int) -> bytes:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            raise EvaluatorTimeout(f"it ran longer than MESH_EXPR_TIMEOUT_MS ({timeout_ms})")
        chunk = os.read(stream.fileno(), n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _cpu_s(pid: int) -> float | None:
    """CPU seconds process ``pid`` has used (user and system, from /proc), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _death(proc: subprocess.Popen[bytes]) -> str:
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = None
    if code is not None and code < 0:
        return f"it killed its evaluator (signal {-code}: out of memory under MESH_EXPR_MEMORY_MB, or a crash)"
    return f"it killed its evaluator (exit status {code})"


_evaluator: Evaluator | None = None
_configured = ExprLimits()
_global_lock = threading.Lock()


def configure(limits: ExprLimits) -> None:
    """Use ``limits`` from now on in this process (the entry point calls this with its settings)."""
    global _evaluator, _configured
    with _global_lock:
        if _evaluator is not None and _evaluator.limits != limits:
            _evaluator.close()
            _evaluator = None
        _configured = limits


def evaluator() -> Evaluator:
    """This process's evaluator (made on first use)."""
    global _evaluator
    with _global_lock:
        if _evaluator is None:
            _evaluator = Evaluator(_configured)
            atexit.register(_evaluator.close)
        return _evaluator
