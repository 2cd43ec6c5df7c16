"""Python pipelines over the agents of :mod:`tests.pipelines.agents`, named on the command line as
``tests.pipelines.flows:ATTR``: a builder, a built spec, one whose data cannot flow, and an
attribute that is no pipeline."""

from __future__ import annotations

from mesh.agents.pipelines import Pipeline

#: A builder: ``mesh pipeline validate tests.pipelines.flows:review`` builds it.
review = (Pipeline("py-review", input_schema="task")
          .step("researcher")
          .step("coder", depends_on=["researcher"])
          .step("reviewer", depends_on=["coder"], gate="coder.confidence >= 0.85"))

#: A spec, built already.
short = Pipeline("py-short").step("researcher", input={"goal": "input.goal"}).build()

#: The coder is given a field its model does not have (``sumary``) and none it requires.
mistyped = Pipeline("py-mistyped").step("researcher").step("coder", depends_on=["researcher"],
                                                            input={"sumary": "researcher.summary"})

NOT_A_PIPELINE = "review"
