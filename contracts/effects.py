"""What the mesh knows about an effect: the ledger entry of one effectful tool call, its verdict,
and an operator's settlement of it.

An effectful call (``@app.tool(effect=True)``) leaves a small record on its step, written in three
stages: the **intent** before the call goes out (tool, args and their hash, key, fencing token),
the **outcome** once the tool answered, and the **verdict** once it was checked:

    verified      the tool's verifier saw the effect (read the note back, GET the resource)
    refuted       the verifier saw that it did not happen: the step fails (permanent)
    unknown       the check could not be made or could not decide, or the call went out and its
                  outcome was never written and there is no verifier: the step is ``unknown``
    unverified    the tool said ok and has no verifier: done, by its own word
    failed        the tool answered an error that says nothing was applied: a retry calls again
    applied       an operator settled it by hand (``mesh settle --as applied``)
    not_applied   an operator settled it by hand (``mesh settle --as not-applied``)

The ledger itself lives in Redis (:mod:`mesh.broker.ledger`); a step record keeps the summary
(:attr:`StepRecord.effect`) and the operator's settlement, if any.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import ConfigDict, Field

from .envelope import Frozen


class Verdict(StrEnum):
    VERIFIED = "verified"
    REFUTED = "refuted"
    UNKNOWN = "unknown"
    UNVERIFIED = "unverified"
    FAILED = "failed"
    APPLIED = "applied"
    NOT_APPLIED = "not_applied"


#: Verdicts that say the effect happened: a re-run of the step returns the recorded outcome.
HAPPENED = frozenset({Verdict.VERIFIED, Verdict.UNVERIFIED, Verdict.APPLIED})
#: Verdicts that say it did not: a re-run of the step calls the tool again.
NOT_HAPPENED = frozenset({Verdict.REFUTED, Verdict.FAILED, Verdict.NOT_APPLIED})
#: How a step's calls sum up, worst first: one unknown call makes the step's effect unknown.
RANK = (Verdict.UNKNOWN, Verdict.REFUTED, Verdict.UNVERIFIED, Verdict.APPLIED, Verdict.VERIFIED)


def summary(verdicts: list[Verdict]) -> Verdict | None:
    """The verdict a step shows for its effectful calls: the worst of them (None: it made none)."""
    for verdict in RANK:
        if verdict in verdicts:
            return verdict
    return None


class Settlement(Frozen):
    """An operator's decision on an effect the mesh could not prove: who, when, why."""

    model_config = ConfigDict(frozen=True, extra="allow")

    applied: bool
    by: str
    reason: str
    at: float = Field(default_factory=time.time)


class EffectEntry(Frozen):
    """The ledger's record of the ``n``-th effectful call of a step (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="allow")  # a newer release's fields are kept

    n: int
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    args_hash: str
    key: str
    #: The fencing token of the attempt that owns the entry: the call's, or that of the attempt that
    #: took a dead owner's call over to settle it. A write under a lower token is refused.
    token: int
    intent_at: float
    #: The tool's result (JSON) once it returned; None: no outcome was written.
    outcome: Any = None
    outcome_at: float | None = None
    #: The tool's error, when it raised.
    error: str | None = None
    verdict: Verdict | None = None
    verdict_at: float | None = None
    #: Why the verdict (what the verifier said, or the operator's reason).
    reason: str | None = None
    #: Who settled it by hand (``mesh settle``); None: the mesh decided.
    by: str | None = None

    @property
    def open(self) -> bool:
        """Whether nobody knows yet if the effect happened (an intent without a decided verdict)."""
        return self.verdict is None or self.verdict is Verdict.UNKNOWN
