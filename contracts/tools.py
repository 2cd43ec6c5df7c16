"""Arguments of the executor's tools: checked at send time and again before the tool runs."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .envelope import Frozen


class NoteArgs(Frozen):
    """``note``: write a note to the mesh's note store (a local effect the demo can read back)."""

    title: str = Field(min_length=1, max_length=200)
    body: str = Field(default="", max_length=20_000)
    findings: list[dict[str, Any]] = Field(default_factory=list)


class HttpPostArgs(Frozen):
    """``http_post``: POST JSON to an allow-listed host:port."""

    url: str = Field(pattern=r"^https?://[^\s/]+(/.*)?$", max_length=2000)
    json_body: dict[str, Any] = Field(default_factory=dict, alias="json")
    findings: list[dict[str, Any]] = Field(default_factory=list)
    #: Where the POST's effect can be seen: a GET that must answer 2xx with the request's
    #: Idempotency-Key or the receipt's effect id in its body. None: the call shows ``unverified``.
    verify_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/.*)?$", max_length=2000)


TOOL_ARGS: dict[str, type[Frozen]] = {"note": NoteArgs, "http_post": HttpPostArgs}
