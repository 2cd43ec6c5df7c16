"""``mesh.testing``: test an app's agents, tools and pipelines the way the mesh runs them.

    from mesh.testing import TestContext, TestModel, run_pipeline

    model = TestModel({Route: [{"queue": "billing", "confidence": 0.9}]})
    ctx = TestContext(app, triage, model=model)             # a Context for the handler, called directly
    assert triage(ctx, ticket).queue == "billing"
    assert ctx.progress_notes == ["routed to billing (0.90)"] and len(model.prompts) == 1

    record = run_pipeline(app, "support", ticket_input, model=model,  # a whole pipeline, in-process,
                          tools={file_ticket: receipt}, approve={"file": True})  # on a real Redis

- :class:`TestContext`: a ``Context`` with fixed ids, a deadline on a :class:`TestClock`, its
  ``progress`` notes and tool ``calls`` kept, ``cancelled`` settable, fake or real tools;
- :class:`CallNeedsApproval`: what a ``TestContext(..., approve_calls=False)`` raises where a worker
  would park a step on a destructive call of its tool loop;
- :class:`TestModel`: a model provider with scripted answers, its prompts and tokens kept, failing
  on demand with the mesh's failure classes;
- :class:`TestMesh` and :func:`run_pipeline`: the app on an in-process worker in a namespace of its
  own, approvals decided from the test and timers moved by :meth:`TestMesh.advance`.

See the guide, docs/guides/testing.md.
"""

from __future__ import annotations

from mesh.agents.tool_loop import CallNeedsApproval

from .clock import TestClock
from .context import TestContext, ToolCall
from .inprocess import TestMesh, run_pipeline
from .model import Prompt, ScriptExhausted, TestModel, calls

__all__ = ["CallNeedsApproval", "Prompt", "ScriptExhausted", "TestClock", "TestContext", "TestMesh", "TestModel",
           "ToolCall", "calls", "run_pipeline"]
