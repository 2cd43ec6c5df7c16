"""Structured logs: one JSON object per line, or a readable line when attached to a terminal."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from mesh.broker.redact import redact, redact_value
from mesh.ops.escape import escape

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        # Masked before serialising, never in the JSON text: a secret holding a quote is escaped
        # in the line, and masking the text could cut a number or a key in half.
        out.update({k: redact_value(v) for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out, default=lambda v: redact(str(v))).decode()


class ReadableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        # A terminal reads this: control characters from data (keys, errors) are shown escaped.
        return escape(redact(line))


def setup_logging(level: str = "INFO", *, json_lines: bool | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    json_lines = not sys.stderr.isatty() if json_lines is None else json_lines
    handler.setFormatter(JsonFormatter() if json_lines else ReadableFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("dramatiq").setLevel(max(logging.WARNING, root.level))
    # dramatiq warns "Message ... was skipped" for every duplicate and deferral; the Idempotency
    # middleware logs those itself, with the key and trace id.
    logging.getLogger("dramatiq.worker.WorkerThread").setLevel(logging.ERROR)
