"""Runs one page's Python blocks in one interpreter, so a block sees the names earlier ones made.

Started by the docs test as ``python tests/docs/driver.py``; reads one JSON object per line on
stdin (``{"code": ..., "name": ...}``), runs the code, and answers one JSON line on its real stdout:
``{"ok": bool, "out": what the block printed, "error": the traceback}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback


def main() -> None:
    answer = sys.stdout
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line in sys.stdin:
        request = json.loads(line)
        printed = io.StringIO()
        error = None
        try:
            code = compile(request["code"], request["name"], "exec")
            with contextlib.redirect_stdout(printed):
                exec(code, namespace)
        except BaseException:  # a block's failure is reported, never the driver's end
            error = traceback.format_exc()
        answer.write(json.dumps({"ok": error is None, "out": printed.getvalue(), "error": error}) + "\n")
        answer.flush()


if __name__ == "__main__":
    main()
