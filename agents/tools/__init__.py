"""The built-in tools, declared on the built-in app (:mod:`mesh.agents.builtin`) like any user tool."""

from __future__ import annotations

from .base import ToolContext, effect_id
from .http import asend_request, host_port, send_request
from .http_post import ahttp_post, http_post, verify_post
from .note import read_note, verify_note, write_note

__all__ = ["ToolContext", "ahttp_post", "asend_request", "effect_id", "host_port", "http_post", "read_note",
           "send_request", "verify_note", "verify_post", "write_note"]
