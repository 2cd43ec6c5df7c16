"""``mesh cancel`` and ``mesh rerun``: stop a job (its effects undone), run a pipeline's job again from a step."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.cells import cell_len
from rich.text import Text

from mesh.broker import JobNotFound, MeshClient
from mesh.contracts import ConfigError, JobRecord, State
from mesh.contracts.jobs import compensations
from mesh.ops.console import EXIT_INPUT, JsonFlag, WaitFlag, WaitTimeoutS, client, emit_json, fail, out, wrapped

Job = Annotated[str, typer.Argument(
    help="The job id (from `mesh submit` or `mesh jobs`) or its start, or the key it was sent with, e.g. order-7.",
    metavar="JOB_ID|KEY", show_default=False)]


def _record(c: MeshClient, given: str) -> JobRecord:
    """The job ``given`` names, as `mesh status` finds it (an id, its unique start, or a key)."""
    from mesh.ops.jobs_cli import find_job

    record, _ = find_job(c, given)
    if record is not None:
        return record
    fail(f"no job {given}", EXIT_INPUT)
    raise AssertionError  # fail exits


def cancel(job: Job, reason: Annotated[str | None, typer.Option(
               help="Why: kept on the job (its error) and in its trace.", metavar="TEXT")] = None,
           as_json: JsonFlag = False) -> None:
    """Cancel a job: no new step is sent, running steps see `ctx.cancelled` within one lease renewal
    (what they return is recorded `cancelled`, never `succeeded`), steps awaiting approval are
    withdrawn, and the compensations of the steps that succeeded run, last completed first.

    The job ends `cancelled`, or `compensated` once its compensations ran. Cancelling a job that is
    already cancelled, undoing its effects, or succeeded changes nothing (exit 0)."""
    from mesh.agents.pipelines import jobctl

    c = client()
    record = _record(c, job)
    try:
        record, changed = jobctl.cancel(c, record.job_id, reason)
    except JobNotFound:
        fail(f"no job {job}", EXIT_INPUT)
    undo = [s.step_id for s in compensations(record)]
    if as_json:
        emit_json({"job_id": record.job_id, "state": str(record.state), "cancelled": changed,
                   "reason": record.unwind.reason if record.unwind else None, "compensations": undo})
        return
    if not changed:
        why = f"({record.unwind.reason})" if record.unwind else ""
        line = f"job {record.job_id} is {record.state}{f' {why}' if why else ''}: nothing to cancel"
        if cell_len(line) <= out.size.width:
            out.print(Text(line))
            return
        # the job id alone takes 36 columns: why it was cancelled after, wrapped between words
        out.print(Text(f"job {record.job_id} is {record.state}: nothing to cancel"))
        for said in wrapped(why, indent=" "):
            out.print(Text(said))
        return
    running = [s.step_id for s in record.steps.values() if s.state is State.RUNNING and s.compensates is None]
    out.print(Text(f"job {record.job_id} cancelled: {record.state}"))
    if running:
        out.print(Text(f"  running, told to stop: {', '.join(running)}"))
    if undo:
        out.print(Text(f"  compensations: {', '.join(undo)}"))


def rerun(job: Job,
          from_step: Annotated[str, typer.Option("--from", help="The step to run again, with everything downstream.",
                                                 metavar="STEP", show_default=False)],
          key: Annotated[str | None, typer.Option(help="The new job's key (default: <old key>/rerun/<n>).",
                                                  metavar="KEY")] = None,
          wait: WaitFlag = False, timeout: WaitTimeoutS = 60.0, as_json: JsonFlag = False) -> None:
    """Run a pipeline's job again from a step: the same spec digest and input; the outputs of the
    steps upstream of STEP are reused, STEP and everything downstream run again under new keys (a new
    effect by intent). The new job's `rerun_of` names the old one; the old one lists it in `reruns`.

    Prints the new job's id (with --wait, the finished job; exit 1 if it did not succeed)."""
    from mesh.ops.jobs_cli import _sent

    c = client()
    record = _record(c, job)
    try:
        ref = c.rerun(record.job_id, from_step, key=key)
    except ConfigError as exc:
        fail(f"{exc} (nothing was sent)", EXIT_INPUT)
    _sent(c, ref, wait, timeout, as_json)


def lines(record: JobRecord) -> list[Text]:
    """What `mesh status` says of a job's control: why it undoes its effects (cause, since when) and its
    compensations' progress; the job it reruns, and its reruns."""
    out_: list[Text] = []
    if record.unwind is not None:
        undo = compensations(record)
        done = sum(c.state is State.SUCCEEDED for c in undo)
        progress = f"; compensations {done} of {len(undo)} done" if undo else ""
        why = record.unwind.reason  # "cancelled: <reason>" names its cause already
        why = why if why.startswith(record.unwind.cause) else f"{record.unwind.cause}: {why}"
        out_.append(Text(f"{why}{progress}"))
    if record.rerun_of:
        out_.append(Text(f"rerun of {record.rerun_of} from step {record.rerun_from}"))
    if record.reruns:
        out_.append(Text(f"reruns: {', '.join(record.reruns)}"))
    return out_


def register(app: typer.Typer) -> None:
    """Add ``cancel`` and ``rerun`` to the ``mesh`` command."""
    app.command(epilog="Examples: `mesh cancel job-5f0c --reason 'wrong customer'`, `mesh cancel order-7`")(cancel)
    app.command(epilog="Example: `mesh rerun job-5f0c --from review --wait`")(rerun)
