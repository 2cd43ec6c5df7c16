"""The expression evaluator's own process: a loop reading ``[cel, values]`` frames on stdin and
answering ``{"ok": value}`` / ``{"error": why}`` / ``{"limit": why}`` frames on stdout.

It runs as a script (``python -I evaluator_main.py MEMORY_BYTES MAX_RESULT_BYTES TIMEOUT_MS``),
importing only ``cel`` and ``orjson``, under an address-space limit: an expression that allocates
without bound aborts this process, one that recurses past the Rust stack segfaults it, one that
loops is killed by the parent at its time limit (or by its CPU limit, if the parent is gone). The
worker that asked loses nothing but the answer. A frame is a 4-byte big-endian length and that many
bytes of JSON.
"""

from __future__ import annotations

import math
import resource
import struct
import sys
import types
from typing import Any

import orjson


def import_cel() -> Any:
    """The ``cel`` package without its REPL: ``cel/__init__.py`` imports ``cel.cli`` (typer, rich,
    prompt_toolkit, pygments: some 250 modules and 0.16 s of CPU, in every process that compiles or
    evaluates an expression) for the ``cel`` command only. A placeholder stands in for ``cel.cli``
    while the package loads and is taken away after, so an ``import cel.cli`` later still gets the
    real one."""
    if "cel" in sys.modules:
        return sys.modules["cel"]
    placeholder = sys.modules["cel.cli"] = types.ModuleType("cel.cli")
    try:
        import cel
    finally:
        if sys.modules.get("cel.cli") is placeholder:
            del sys.modules["cel.cli"]
    if getattr(cel, "cli", None) is placeholder:
        del cel.cli
    return cel


cel = import_cel()

#: Compiled programs kept, by CEL text (a worker evaluates the same few expressions many times).
_CACHE_SIZE = 512


def _read(stream: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _bound_cpu(timeout_ms: int) -> None:
    """Let the next evaluation use at most about ``timeout_ms`` of CPU (RLIMIT_CPU, whole seconds).

    The parent kills this process at the time limit, but a parent that is itself killed (SIGKILL,
    the OOM killer) cannot: the kernel's SIGXCPU then ends an evaluation no one waits for, where it
    would have run on for hours. The limit counts this process's whole life, so it moves forward
    before each evaluation; a second of slack keeps it behind the parent's own clock."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    soft = math.ceil(used + timeout_ms / 1000) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))


def _answer(text: str, values: dict[str, Any], programs: dict[str, Any], max_result: int) -> dict[str, Any]:
    program = programs.get(text)
    if program is None:
        if len(programs) >= _CACHE_SIZE:
            programs.clear()
        program = programs[text] = cel.compile(text)
    try:
        result = program.execute(values)
    except MemoryError:
        raise
    except Exception as exc:  # CEL's own errors: also ZeroDivision, Overflow, IndexError ([][0])
        return {"error": str(exc)}
    data = orjson.dumps(result, default=str, option=orjson.OPT_NON_STR_KEYS)
    if len(data) > max_result:
        return {"limit": f"its value is {len(data)} bytes, over MESH_EXPR_MAX_RESULT_BYTES ({max_result})"}
    return {"ok": orjson.Fragment(data)}


def main() -> None:
    memory, max_result, timeout_ms = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    programs: dict[str, Any] = {}
    stdout.write(b"R")  # ready: imports done, limits set
    stdout.flush()
    while True:
        try:
            (size,) = struct.unpack(">I", _read(stdin, 4))
            text, values = orjson.loads(_read(stdin, size))
        except EOFError:
            return  # the parent went away
        _bound_cpu(timeout_ms)
        try:
            reply = orjson.dumps(_answer(text, values, programs, max_result))
        except MemoryError:
            reply = orjson.dumps({"limit": "it ran out of memory (MESH_EXPR_MEMORY_MB)"})
        stdout.write(struct.pack(">I", len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    main()
