"""The executor's tool registry."""

from __future__ import annotations

from mesh.contracts.tools import HttpPostArgs, NoteArgs

from .base import Tool, ToolContext, ToolSpec, effect_id
from .http_post import host_port, http_post
from .note import read_note, write_note

TOOLS: dict[str, ToolSpec] = {
    "note": ToolSpec("note", NoteArgs, write_note),
    "http_post": ToolSpec("http_post", HttpPostArgs, http_post, lambda args: host_port(args.url)),
}

__all__ = ["TOOLS", "Tool", "ToolContext", "ToolSpec", "effect_id", "read_note"]
