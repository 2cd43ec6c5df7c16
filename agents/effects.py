"""Effects proven, or ``unknown``: how an effectful tool call goes through the ledger.

A fresh call: the intent is written (:class:`~mesh.broker.ledger.Ledger`), the tool runs, its
outcome is written, and its verifier (``@app.tool(verify=...)``) checks the effect independently:

    verified     the call returns its result
    refuted      EffectRefuted: the step fails (permanent), and a replay may call again
    unknown      EffectUnknown: the step is ``unknown``, its dependents wait, nothing is retried
    no verifier  the call returns its result and shows ``unverified``

A re-run of the step (a redelivery after a crash, a retry, a replay) meets its earlier calls in the
ledger, in order, and never calls blindly again: a call whose effect happened returns the recorded
result; an intent without an outcome (the worker died between the two) is settled by the verifier
(refuted, it never reached its target and is made now), and without one the step is ``unknown``;
a call that did not happen is made again.

:func:`check` is also what ``mesh verify`` runs (:mod:`mesh.ops.effects_cli`).
"""

from __future__ import annotations

import hashlib
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from pydantic import BaseModel

from mesh.broker import redact
from mesh.broker.jobs import Change
from mesh.broker.ledger import Ledger
from mesh.contracts import JobRecord, Receipt, dumps
from mesh.contracts.effects import HAPPENED, NOT_HAPPENED, EffectEntry, Verdict
from mesh.contracts.errors import EffectRefuted, EffectUnknown

from .event_loop import resolve
from .tools.base import ToolContext, effect_id

if TYPE_CHECKING:
    from .app import ToolSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """What a verifier said: the verdict, why, and the result it found (None: it gave none)."""

    verdict: Verdict
    reason: str | None = None
    result: Any = None


def check(spec: ToolSpec, ctx: ToolContext, args: BaseModel, result: Any) -> Check:
    """Run ``spec``'s verifier on the call with ``args`` (``result``: what the tool returned, None
    when no outcome was written). Never raises: a check that fails to run is ``unknown``."""
    if spec.verify is None:
        return Check(Verdict.UNKNOWN, f"tool {spec.name} has no verifier")
    try:
        answer = resolve(spec.verify(ctx, args, result))  # an async def verifier awaited
    except EffectRefuted as exc:
        return Check(Verdict.REFUTED, redact.redact(str(exc)))
    except Exception as exc:
        return Check(Verdict.UNKNOWN, f"the check failed: {redact.redact(str(exc) or type(exc).__name__)}")
    if answer is None:
        return Check(Verdict.UNKNOWN, "the verifier could not decide")
    if answer is False:
        return Check(Verdict.REFUTED, "the verifier found no trace of the effect")
    if isinstance(answer, Verdict):  # UNVERIFIED: the verifier has no check for this call
        return Check(answer, "the verifier has no check for this call" if answer is Verdict.UNVERIFIED else None)
    return Check(Verdict.VERIFIED, None, None if answer is True else answer)


def args_hash(args: dict[str, Any]) -> str:
    """sha256 of the call's canonical JSON args: the same call, the same hash."""
    return hashlib.sha256(dumps(args)).hexdigest()


def as_json(value: Any) -> Any:
    """A tool's result as the ledger keeps it (masked: a secret never reaches Redis)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        dumps(value)
    except TypeError:
        value = repr(value)
    return redact.redact_value(value)


def typed(spec: ToolSpec, value: Any, *, key: str, verdict: Verdict) -> Any:
    """A recorded result back as the tool's declared return model. A call settled by hand, or verified
    without a result, has none: a tool returning a Receipt gets one naming the effect and its verdict."""
    try:
        model = typing.get_type_hints(spec.run).get("return")
    except Exception:  # an annotation that does not resolve: the JSON as it was kept
        model = None
    if value is None:
        if model is Receipt:
            return Receipt(tool=spec.name, effect_id=effect_id(key), detail={"verdict": verdict.value})
        return None
    if isinstance(model, type) and issubclass(model, BaseModel) and isinstance(value, dict):
        return model.model_validate(value)
    return value


#: ``_decide`` without an outcome to write (None is an outcome: the tool returned None).
_NO_OUTCOME: Any = object()


@dataclass
class EffectCalls:
    """The effectful calls of one attempt of a step, numbered in order, through its ledger."""

    ledger: Ledger
    key: str
    token: int
    #: Traces a verdict: ``(tool, n, verdict, reason)``.
    report: Callable[[str, int, Verdict, str | None], None] = lambda *a: None
    calls: int = 0
    verdicts: list[Verdict] = field(default_factory=list)

    def call(self, spec: ToolSpec, args: BaseModel, ctx: ToolContext, run: Callable[[], Any]) -> Any:
        """Make (or recover) the next effectful call: see the module docstring."""
        self.calls += 1
        n = self.calls
        plain = args.model_dump(mode="json", by_alias=True)
        digest = args_hash(plain)
        entry = self.ledger.get(n)

        def fresh() -> Any:
            made = self.ledger.intent(n, spec.name, redact.redact_value(plain), digest, self.key, self.token)
            return self._make(spec, args, ctx, made, run)

        if entry is not None and entry.verdict not in NOT_HAPPENED:
            return self._recover(spec, args, ctx, entry, digest, fresh)
        return fresh()

    def _make(self, spec: ToolSpec, args: BaseModel, ctx: ToolContext, entry: EffectEntry,
              run: Callable[[], Any]) -> Any:
        """Make the call whose intent ``entry`` is, then record its outcome and verdict."""
        try:
            result = run()
        except Exception as exc:
            return self._failed(spec, args, ctx, entry, exc)
        if spec.verify is None:
            self._decide(entry, Verdict.UNVERIFIED, None, outcome=as_json(result))
            return result
        entry = self._written(lambda: self.ledger.outcome(entry, as_json(result)), entry)
        found = check(spec, ctx, args, result)
        if found.verdict is Verdict.UNVERIFIED:
            self._decide(entry, Verdict.UNVERIFIED, found.reason)
            return result
        return self._settle(spec, entry, found, result)

    def _recover(self, spec: ToolSpec, args: BaseModel, ctx: ToolContext, entry: EffectEntry, digest: str,
                 fresh: Callable[[], Any]) -> Any:
        """Call ``entry.n`` was made by an earlier attempt: its recorded result, or its verifier's word.
        An intent without an outcome that the verifier refutes never reached its target: it is made now
        (``fresh``), the one time it happens."""
        if entry.tool != spec.name or entry.args_hash != digest:
            self.verdicts.append(Verdict.UNKNOWN)
            raise EffectUnknown(f"{spec.name} call #{entry.n} differs from the call #{entry.n} an earlier attempt "
                                f"made ({entry.tool}, args sha256 {entry.args_hash[:12]}) and whose effect is "
                                "not settled: not called; mesh verify or mesh settle decides the earlier one",
                                tool=spec.name)
        if entry.verdict in HAPPENED:
            self.verdicts.append(entry.verdict)
            return typed(spec, entry.outcome, key=entry.key, verdict=entry.verdict)
        # This attempt owns the entry now: a stale owner still running cannot overwrite its verdict.
        # Under this attempt's own token: a stale attempt meeting a newer owner's entry has its
        # writes refused (LeaseLost), never settling (and re-making) a call the newer owner made.
        entry = entry.model_copy(update={"token": self.token})
        recorded = None if entry.outcome_at is None else typed(spec, entry.outcome, key=entry.key,
                                                               verdict=Verdict.UNKNOWN)
        why = ("its call may have gone out and its outcome was never written" if entry.outcome_at is None
               else "its verdict was never written")
        if spec.verify is None:
            return self._settle(spec, entry, Check(Verdict.UNKNOWN, f"{why}; the tool has no verifier"), recorded)
        found = check(spec, ctx, args, recorded)
        if found.verdict is Verdict.UNVERIFIED:
            found = Check(Verdict.UNKNOWN, f"{why}; the verifier has no check for this call")
        if found.verdict is Verdict.REFUTED and entry.outcome_at is None:
            self.ledger.decide(entry, Verdict.REFUTED, found.reason)
            self.report(entry.tool, entry.n, Verdict.REFUTED, f"{found.reason}; it never happened: called now")
            return fresh()
        return self._settle(spec, entry, found, recorded)

    def _failed(self, spec: ToolSpec, args: BaseModel, ctx: ToolContext, entry: EffectEntry, exc: Exception) -> Any:
        """The tool raised: nothing applied (``failed``: a retry calls again), or, when the error says
        the effect may have happened (a timeout after the request went out), the verifier decides."""
        error = redact.redact(str(exc) or type(exc).__name__)
        if not (getattr(exc, "context", None) or {}).get("effect_unknown"):
            self._written(lambda: self.ledger.outcome(entry, error=error, verdict=Verdict.FAILED, reason=error), entry)
            raise exc
        entry = self._written(lambda: self.ledger.outcome(entry, error=error), entry)
        found = check(spec, ctx, args, None) if spec.verify is not None else Check(Verdict.UNKNOWN, error)
        if found.verdict is Verdict.VERIFIED:
            return self._settle(spec, entry, found, None)
        if found.verdict is Verdict.REFUTED:  # it did not happen: the tool's own error routes the step
            self._decide(entry, Verdict.FAILED, found.reason)
            raise exc
        self._decide(entry, Verdict.UNKNOWN, error if found.verdict is Verdict.UNVERIFIED else found.reason or error)
        raise exc

    def _settle(self, spec: ToolSpec, entry: EffectEntry, found: Check, result: Any) -> Any:
        """Record ``found``'s verdict on ``entry`` (and what the verifier found, when the call's own
        outcome was never written); the call's result when verified, else the error."""
        if found.verdict is Verdict.VERIFIED and entry.outcome_at is None and found.result is not None:
            self._decide(entry, found.verdict, found.reason, outcome=as_json(found.result))
        else:
            self._decide(entry, found.verdict, found.reason)
        if found.verdict is Verdict.VERIFIED:
            if result is None and found.result is not None:
                return found.result
            return result if result is not None else typed(spec, None, key=entry.key, verdict=found.verdict)
        if found.verdict is Verdict.REFUTED:
            raise EffectRefuted(f"{spec.name} said ok but its effect is refuted: {found.reason}", tool=spec.name)
        raise EffectUnknown(f"{spec.name}'s effect is unknown: {found.reason}; not called again (mesh verify "
                            "JOB STEP checks again, mesh settle decides by hand)", tool=spec.name)

    def _decide(self, entry: EffectEntry, verdict: Verdict, reason: str | None, *, outcome: Any = _NO_OUTCOME) -> None:
        if outcome is not _NO_OUTCOME:
            self._written(lambda: self.ledger.outcome(entry, outcome, verdict=verdict, reason=reason), entry)
        else:
            self._written(lambda: self.ledger.decide(entry, verdict, reason), entry)
        self.verdicts.append(verdict)
        self.report(entry.tool, entry.n, verdict, reason)

    @staticmethod
    def _written(write: Callable[[], EffectEntry], entry: EffectEntry) -> EffectEntry:
        """A write after the call went out: the mesh's Redis failing here must not turn what the call
        did into a failure of the call. The attempt goes on; its step's own record says how it ended
        (an output Redis refused rides on the redelivery: the handler is not run again), and a re-run
        that finds only the intent asks the verifier, never calls blindly."""
        try:
            return write()
        except redis.RedisError as exc:
            logger.warning("could not write an effect's outcome to its ledger",
                           extra={"tool": entry.tool, "call": entry.n, "error": str(exc)})
            return entry


def with_effect(change: Change, step_id: str, effect: Verdict | None) -> Change:
    """``change`` (a step's success) with the step's effect verdict written on its record, so
    ``mesh status`` tells "done and proven" (``verified``) from "done, by its own word" (``unverified``)."""
    if effect is None:
        return change

    def changed(record: JobRecord) -> tuple[JobRecord, list[Any]]:
        after, messages = change(record)
        step = after.steps.get(step_id)
        if after is record or step is None or step.effect is effect:
            return after, messages
        return after.with_step(step.model_copy(update={"effect": effect})), messages

    return changed
