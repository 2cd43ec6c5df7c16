"""``mesh verify`` and ``mesh settle``: deciding a step whose effect is ``unknown``.

``mesh verify JOB STEP`` runs the verifiers of the step's open effects again; ``mesh settle JOB
STEP --as applied|not-applied --reason T`` records an operator's decision. Either way a step whose
effects happened runs again (its dead letter replayed: the ledger answers its calls, nothing is
called twice) and its success moves the job on through the worker's own settlement; a step whose
effect did not happen is dead-lettered and the job moves on as after any lost step (see
:mod:`mesh.agents.verify`). Both are audited: the ledger, the step record, the job's trace and
the ``{ns}:effects.audit`` stream say who, when and why.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer
from rich.text import Text

from mesh.broker import trace
from mesh.broker.client import MeshClient
from mesh.broker.trace import operator
from mesh.contracts import JobRecord, LeaseLost
from mesh.ops import console as base
from mesh.ops.pipeline_cli import AppPath

Job = Annotated[str, typer.Argument(help="The job id or its start, or the key it was sent with (as in mesh status).",
                                    metavar="JOB_ID|KEY", show_default=False)]
Step = Annotated[str, typer.Argument(help="The step id whose effect is unknown (as mesh status lists it).",
                                     metavar="STEP", show_default=False)]
#: A decision refused by the ledger: an attempt of the step (a newer fencing token) owns its calls now.
_TAKEN_OVER = ("step {step} runs again meanwhile (its ledger is held by a newer attempt): nothing was decided "
               "for the calls it holds; see mesh status, and decide again if it ends unknown")

By = Annotated[str | None, typer.Option("--by", help="Who decides (default: user@host).", show_default=False)]


def verify(job: Job, step: Step, app_path: AppPath = None, by: By = None, as_json: base.JsonFlag = False) -> None:
    """Check an unknown step's effects again with its tools' verifiers.

    Verified: the step runs again, its calls answered from the ledger (none is made twice), and
    the job moves on. Refuted: the step is dead-lettered (permanent). Still undecided: nothing
    moves; exit 1. Tools come from --app (default: the built-in ones)."""
    c, app = base.client(), base.app_for(app_path)
    record = _record(c, job)
    try:
        result = verify_step(c, app, record, step, by or operator())
    except Undecided as exc:
        base.fail(str(exc), exc.code)
    _report(result, as_json)
    if result["verdict"] != "verified":
        raise typer.Exit(base.EXIT_FAILED)


def settle(job: Job, step: Step,
           as_: Annotated[str, typer.Option("--as", help="applied (it happened) or not-applied (it did not).",
                                            metavar="applied|not-applied", show_default=False)],
           reason: Annotated[str, typer.Option("--reason", help="Why: kept on the step, in the trace and the "
                                               "audit stream.", show_default=False)],
           by: By = None, app_path: AppPath = None, as_json: base.JsonFlag = False) -> None:
    """Decide an unknown step's effect by hand, audited (who, when, why).

    applied: the step runs again, its calls answered from the ledger, and the job moves on.
    not-applied: the step is dead-lettered (permanent); `mesh dlq replay` calls again."""
    if as_ not in ("applied", "not-applied"):
        raise typer.BadParameter(f"{as_!r}: give applied or not-applied", param_hint="--as")
    if not reason.strip():
        raise typer.BadParameter("say why the effect is settled so", param_hint="--reason")
    c, app = base.client(), base.app_for(app_path)
    record = _record(c, job)
    try:
        result = settle_step(c, app, record, step, applied=as_ == "applied", reason=reason, by=by or operator())
    except Undecided as exc:
        base.fail(str(exc), exc.code)
    _report(result, as_json)


class Undecided(Exception):
    """Nothing was decided (or the decision could not move the step): why, and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def verify_step(c: MeshClient, app: Any, record: JobRecord, step: str, who: str) -> dict[str, Any]:
    """``mesh verify``: the step's verifiers run again; the step moves as they decide. What ``--json``
    prints (``verdict``: ``verified`` when the effects happened). Raises Undecided."""
    from mesh.agents.verify import CannotDecide, verified_event
    from mesh.agents.verify import verify as run_checks

    _replayable(c, record, step)
    with httpx.Client() as http:
        try:
            decision = run_checks(c, app, record, step, http)
        except CannotDecide as exc:
            raise Undecided(str(exc), base.EXIT_INPUT) from exc
        except LeaseLost as exc:
            raise Undecided(_TAKEN_OVER.format(step=step), base.EXIT_FAILED) from exc
    trace.emit(c.redis, c.keys_of(record.job_id), verified_event(record, decision, who))
    moved = _move(c, app, record, decision)
    result: dict[str, Any] = decision.as_json() | {"by": who, **moved}
    return result


def settle_step(c: MeshClient, app: Any, record: JobRecord, step: str, *, applied: bool, reason: str,
                by: str) -> dict[str, Any]:
    """``mesh settle``: the operator's decision recorded, audited, and the step moved by it. Raises
    Undecided."""
    from mesh.agents.verify import CannotDecide, settle_by_hand

    if applied:
        _replayable(c, record, step)
    try:
        decision = settle_by_hand(c, record, step, applied=applied, reason=reason, by=by)
    except CannotDecide as exc:
        raise Undecided(str(exc), base.EXIT_INPUT) from exc
    except LeaseLost as exc:
        raise Undecided(_TAKEN_OVER.format(step=step), base.EXIT_FAILED) from exc
    moved = _move(c, app, c.status(record.job_id), decision)
    result: dict[str, Any] = decision.as_json() | {"by": by, **moved}
    return result


def _record(c: MeshClient, given: str) -> JobRecord:
    """The job ``given`` names, as ``mesh status`` finds it (an id, its start, or a key)."""
    from mesh.ops.jobs_cli import find_job

    record, candidates = find_job(c, given)
    if record is not None:
        return record
    base.fail(f"no job {given}" + ("" if len(candidates) == 1 else f" (nor a job of key {given!r})"), base.EXIT_INPUT)


def _move(c: MeshClient, app: Any, record: JobRecord, decision: Any) -> dict[str, Any]:
    """Move the step as ``decision`` says: replay its dead letter (it happened) or dead-letter it."""
    from mesh.agents.verify import lose

    if decision.happened:
        return {"moved": "replayed", **_replay(c, record, decision.step_id)}
    if decision.verdict.value in ("refuted", "not_applied"):
        after = lose(c, app, record, decision)
        return {"moved": "dead_lettered", "job_state": str(after.state)}
    return {"moved": None, "job_state": str(record.state)}


#: How far the clocks of a worker (the step's times) and Redis (the DLQ's) may be apart.
_SKEW_S = 300
#: How long after the DLQ began indexing entries by job a worker of an older mesh may still write
#: entries without that index (a rolling deploy): those are looked for by agent and time.
_OLDER_WORKERS_S = 86_400


def _dead_letter(c: MeshClient, record: JobRecord, step_id: str) -> list[Any]:
    """The dead letters the unknown step left (newest last); none when the step is not the job's.

    From the job's index in the DLQ (``{ns}:dlq.job:{job_id}``): its cost is the job's dead
    letters, whatever the size of the DLQ. An entry written before that index was kept (by an older
    mesh) is looked for among the agent's entries from the step's start to when the index began
    (and a day after, for the older workers of a rolling deploy): none once the step started later."""
    from mesh.dlq import DeadLetterStore
    from mesh.dlq.store import Filter

    step = record.steps.get(step_id)
    if step is None:
        return []
    store = DeadLetterStore(c.redis, c.keys_of(record.job_id))  # the job's shard keeps its dead letters
    found = [s for s in store.of_job(record.job_id) if s.entry.key == step.key]
    if found:
        return found
    since, began = (step.started_at or step.created_at) - _SKEW_S, store.indexed_since()
    until = None if began is None else began + _OLDER_WORKERS_S
    if until is not None and since > until:
        return []
    return [s for batch in store.iter(Filter(agent=step.agent, since=since, until=until)) for s in batch
            if s.entry.job_id == record.job_id and s.entry.key == step.key]


def _replayable(c: MeshClient, record: JobRecord, step_id: str) -> None:
    """Before anything is decided: the step's dead letter is there and a replay of it would go through
    once its effects are decided as having happened, else exit 1 with nothing written (deciding
    first would leave the ledger settled and the step stuck, since a settled effect is not open)."""
    from mesh.agents.verify import CannotDecide, unknown_step
    from mesh.dlq import DeadLetterStore
    from mesh.dlq.audit import Audit
    from mesh.dlq.replay import Replayer

    try:
        unknown_step(record, step_id)
    except CannotDecide as exc:  # said by the command itself, with its own exit code
        raise Undecided(str(exc), base.EXIT_INPUT) from exc
    found = _dead_letter(c, record, step_id)
    if not found:
        raise Undecided(f"step {step_id}'s dead letter is gone (drained or purged), so it cannot run again with "
                        "its calls answered from the ledger; nothing was decided. `mesh settle --as not-applied` "
                        "still applies, or `mesh rerun`", base.EXIT_FAILED)

    class Assumed(Replayer):  # the dry run as it will be once the effects are decided as having happened
        def _decided(self, job_id: str, step: str) -> bool:
            return (job_id, step) == (record.job_id, step_id)

    keys = c.keys_of(record.job_id)
    report = Assumed(DeadLetterStore(c.redis, keys), c.settings, Audit(c.redis, keys)).replay(
        found[-1:], dry_run=True)
    if report.skipped:
        raise Undecided(f"step {step_id}'s dead letter could not be replayed, so nothing was decided: "
                        f"{'; '.join(report.skipped.values())}", base.EXIT_FAILED)


def _replay(c: MeshClient, record: JobRecord, step_id: str) -> dict[str, Any]:
    """Replay the dead letter the unknown step left: the step runs again, its ledger answering its calls."""
    from mesh.dlq import DeadLetterStore
    from mesh.dlq.audit import Audit
    from mesh.dlq.replay import Replayer

    store = DeadLetterStore(c.redis, c.keys_of(record.job_id))
    found = _dead_letter(c, record, step_id)
    if not found:
        raise Undecided(f"step {step_id}'s effect is decided, but its dead letter is gone (drained or purged): it "
                        "cannot run again from here; run the job again", base.EXIT_FAILED)
    report = Replayer(store, c.settings, Audit(c.redis, store.keys),
                      decided=frozenset({(record.job_id, step_id)})).replay(found[-1:])
    if report.skipped:
        raise Undecided(f"step {step_id}'s effect is decided, but its replay was refused: "
                        f"{'; '.join(report.skipped.values())}", base.EXIT_FAILED)
    return {"dead_letter": found[-1].entry.entry_id}


def _report(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        base.emit_json(data)
        return
    said = f"step {data['step_id']} of job {data['job_id']}:"
    verdict = f"{data['verdict']}" + (f" (by {data['by']})" if data.get("by") else "")
    # the job id alone takes 36 columns: the verdict and who reached it on a line of their own when need be
    for line in base.fitted([said, verdict], " "):
        base.out.print(Text(line))
    for effect in data["effects"]:
        line = f"  {effect['tool']} call #{effect['call']}: {effect['verdict']}"
        # a tool name and a reason are data: printed as they are, never read as rich markup
        base.out.print(line + (f": {effect['reason']}" if effect["reason"] else ""), markup=False)
    if data["verdict"] == "unknown" and data.get("reason") and not data["effects"]:
        base.out.print(f"  {data['reason']}", markup=False)
    moved = {"replayed": "the step runs again; its calls are answered from the ledger",
             "dead_lettered": f"the step is dead-lettered; job {data.get('job_state')}"}.get(data.get("moved") or "")
    base.out.print(f"  {moved or 'nothing moved: mesh settle decides by hand'}")


def register(app: typer.Typer) -> None:
    """Add ``verify`` and ``settle`` to the ``mesh`` command."""
    app.command("verify", epilog="Example: `mesh verify job-5f0c post`, `mesh verify order-7 executor --json`")(verify)
    app.command("settle", epilog="Example: `mesh settle order-7 executor --as applied --reason \"seen in the "
                                 "billing console\"`")(settle)
