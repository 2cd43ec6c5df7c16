"""A module whose import fails: its app declares a pipeline that does not hold (an unknown agent)."""

from __future__ import annotations

from mesh import App
from mesh.agents.pipelines import Pipeline

app = App("broken")
review = app.pipeline(Pipeline("broken").step("nobody"))
