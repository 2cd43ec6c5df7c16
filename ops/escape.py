"""Control characters never reach the operator's terminal from data.

Ids, keys, agent names, error texts and payloads come from producers, dependencies and DLQ files:
an ESC sequence in any of them could recolour, move the cursor, retitle or (on some terminals)
answer back when ``mesh`` prints it. Everything ``mesh`` prints through its consoles
(:data:`mesh.ops.console.out` / ``err``) passes :class:`EscapeControls`, which shows each control
character as its Python escape (``\\x1b``, ``\\u202e``) while rich's own styling and cursor codes
still work; ``--json`` output escapes the ones JSON leaves raw. Newlines and tabs are kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderHook
from rich.segment import Segment

#: C0 but tab and newline, DEL, C1, and the bidirectional overrides and isolates (which reorder
#: what follows them on screen).
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
#: What JSON (RFC 8259) does not escape itself: DEL, C1, the bidi controls.
JSON_RAW = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control character (but tab and newline) written as its escape."""
    return CONTROL.sub(_shown, text)


def escape_json(text: str) -> str:
    """JSON text with the control characters JSON leaves raw written as ``\\uXXXX`` escapes (the
    same string once parsed)."""
    return JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class _Escaped:
    """A renderable whose text segments have their control characters escaped; rich's own control
    segments (cursor moves, used by progress bars) pass as they are."""

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        for segment in console.render(self.renderable, options):
            if segment.control:
                yield segment
            else:
                yield Segment(escape(segment.text), segment.style)


class EscapeControls(RenderHook):
    """A render hook (``console.push_render_hook``) that escapes every printed text's control characters."""

    def process_renderables(self, renderables: list[Any]) -> list[Any]:
        return [_Escaped(r) for r in renderables]


def install(consoles: Iterable[Console]) -> None:
    for console in consoles:
        console.push_render_hook(EscapeControls())
