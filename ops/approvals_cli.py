"""``mesh approvals``, ``mesh approve``, ``mesh deny``: the pipeline steps waiting for a person, and
the decision on one. The first decision wins; a later one is told which won (exit 5), and one after
the timeout is refused (exit 6)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
import typer
from rich.cells import cell_len
from rich.text import Text

from mesh.broker import JobNotFound
from mesh.broker.approvals import AlreadyDecided, ApprovalError, ApprovalExpired, Pending
from mesh.contracts import JobRecord
from mesh.contracts.approvals import show_duration
from mesh.ops import console as base

JobArg = Annotated[str, typer.Argument(help="The job id or its start, or the key it was sent with.",
                                       metavar="JOB_ID|KEY", show_default=False)]
StepArg = Annotated[str, typer.Argument(help="The step waiting (as `mesh approvals` lists it).", metavar="STEP",
                                        show_default=False)]
ByOpt = Annotated[str | None, typer.Option("--by", help="Who decides; default user@host. Advisory here: the "
                                           "step's approvers are enforced where users are authenticated.")]
#: How much of a waiting step's input a table row shows, in terminal cells (--json and `mesh status`
#: give all of it).
INPUT_CELLS = 120
#: The input's lines, in cells: under a block's ``expires: `` label they end within 80 columns.
INPUT_LINE_CELLS = 70


def approvals(wide: base.WideFlag = False, as_json: base.JsonFlag = False) -> None:
    """Pipeline steps waiting for a person's approval, oldest first.

    Per step: the job, the step, the exact call asked for (its rendered input, shortened here; its
    hash in --json), since when it waits and when it expires (what happens then: deny or escalate).
    Decide with `mesh approve JOB STEP` or `mesh deny JOB STEP --reason TEXT`."""
    from mesh.broker.shard_readers import every, pending_approvals

    c = base.client()
    waiting = pending_approvals(c.redis, every(c.settings))  # every shard's, oldest first
    if as_json:
        base.emit_json([p.as_json() for p in waiting])
        return
    if not waiting:
        base.out.print("nothing waits for approval")
        return
    base.out.print(table(waiting, wide=wide))


def table(waiting: list[Pending], *, wide: bool = False) -> base.Listing:
    """One row per waiting step; the job id and step are inputs (mesh approve JOB STEP), printed whole."""
    now = time.time()
    columns: tuple[base.Column, ...] = (base.Column("job", key=True), base.Column("step", key=True),
                                        base.Column("since"), base.Column("expires"), base.Column("input", wrap=True))
    if wide:  # who may decide; and the call asked for whole, not shortened
        columns = (*columns[:-1], base.Column("approvers", wrap=True), columns[-1])
    rows = []
    for p in waiting:
        shown = shown_input(p.step.input, whole=wide)
        expires = "now" if p.expires_at is None else (
            f"in {show_duration(p.expires_at - now)} ({p.approval.on_timeout})")
        who = (", ".join(p.approval.approvers) or "anyone",) if wide else ()
        rows.append((p.job_id, p.step.step_id, f"{show_duration(now - p.asked_at)} ago", expires, *who, shown))
    return base.Listing(columns, rows, wide=wide)


def shown_input(payload: Any, *, whole: bool = False) -> str:
    """A waiting step's input as its row shows it: compact JSON cut to :data:`INPUT_CELLS` cells (a
    wide character takes two; ``whole``, for --wide: not cut), in lines of :data:`INPUT_LINE_CELLS`
    cells, since JSON without spaces would not wrap and a block would run past 80 columns."""
    text = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS).decode()
    cut = not whole and cell_len(text) > INPUT_CELLS
    lines: list[str] = []
    line: list[str] = []
    used = total = 0
    for ch in text:
        width = cell_len(ch)
        if cut and total + width > INPUT_CELLS - 3:
            break
        if used + width > INPUT_LINE_CELLS:
            lines.append("".join(line))
            line, used = [], 0
        line.append(ch)
        used += width
        total += width
    if cut:
        if used + 3 > INPUT_LINE_CELLS:
            lines.append("".join(line))
            line = []
        line.append("...")
    lines.append("".join(line))
    return "\n".join(lines)


def approve(job_id: JobArg, step_id: StepArg,
            note: Annotated[str | None, typer.Option("--note", help="Why, kept with the decision.")] = None,
            by: ByOpt = None, as_json: base.JsonFlag = False) -> None:
    """Approve the exact call a waiting step asks for: it is sent to its agent.

    Exit codes: 5 another decision came first (it is named), 6 the approval expired, 2 no such job
    or the step does not wait."""
    _decide(job_id, lambda c, job: c.approve(job, step_id, note=note, by=by), as_json)


def deny(job_id: JobArg, step_id: StepArg,
         reason: Annotated[str, typer.Option("--reason", help="Why, kept with the decision.",
                                             show_default=False)],
         by: ByOpt = None, as_json: base.JsonFlag = False) -> None:
    """Deny a waiting step: its on_false applies (halt_pipeline halts the job the way a false
    gate does; continue skips the step and its dependents go on).

    Exit codes: 5 another decision came first (it is named), 6 the approval expired, 2 no such job
    or the step does not wait."""
    _decide(job_id, lambda c, job: c.deny(job, step_id, reason=reason, by=by), as_json)


def _decide(given: str, call: Any, as_json: bool) -> None:
    from mesh.ops.jobs_cli import _job_candidates

    c = base.client()
    for job in _job_candidates(c, given):
        try:
            record: JobRecord = call(c, job)
        except JobNotFound:
            continue
        except (AlreadyDecided, ApprovalExpired, ApprovalError) as exc:
            if as_json:
                base.emit_json({"decided": False, "error": exc.message, "code": exc.exit_code, **_context(exc)})
                raise typer.Exit(exc.exit_code) from None
            base.fail(exc.message, exc.exit_code)
        _show(record, as_json)
        return
    base.fail(f"no job {given}", base.EXIT_INPUT)


def _context(exc: ApprovalError) -> dict[str, Any]:
    return {k: v for k, v in exc.context.items() if isinstance(v, str | int | float | list | None)}


def _show(record: JobRecord, as_json: bool) -> None:
    decided = [s for s in record.steps.values() if s.approval is not None and s.approval.decision is not None]
    step = max(decided, key=lambda s: s.approval.at or 0 if s.approval else 0)
    approval = step.approval
    assert approval is not None
    if as_json:
        base.emit_json({"decided": True, "job_id": record.job_id, "step_id": step.step_id,
                        "decision": approval.decision, "by": approval.by, "at": approval.at, "note": approval.note,
                        "hash": approval.hash, "step_state": step.state.value, "job_state": record.state.value})
        return
    # a Text, not markup: the name comes from --by, and "[/red]" in it must print, not raise
    said = f"{approval.decision}: step {step.step_id} of {record.job_id}"
    then = f"by {approval.by}; step {step.state.value}, job {record.state.value}"
    # the job id alone takes 36 columns: who and what it left on a line of their own when need be
    for line in base.fitted([said, then], " ", indent="  "):
        base.out.print(Text(line))


def register(app: typer.Typer) -> None:
    """Add the commands to the ``mesh`` app."""
    app.command("approvals", epilog="Examples: `mesh approvals`, `mesh approvals --json`")(approvals)
    app.command("approve", epilog="Example: `mesh approve job-5f0c deployer --note 'change 4411 ok'`")(approve)
    app.command("deny", epilog="Example: `mesh deny order-7 deployer --reason 'freeze until Monday'`")(deny)
