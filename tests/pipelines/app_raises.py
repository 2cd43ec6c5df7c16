"""An app module whose import fails with an error of its own (not an ImportError)."""

from __future__ import annotations

raise RuntimeError("MY_APP_TOKEN is not set")
