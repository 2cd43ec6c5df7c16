"""The console's actions, each through the function its CLI command uses, recorded as the user who
asked: a dead letter's replay and purge (the DLQ's audit log names them), an approval's decision
(the step's ``approvers:`` enforced, the decision's ``by``), a breaker's reset and a limit's set or
reset (their audit streams name them)."""

from __future__ import annotations

import itertools
import logging
from typing import Any

from mesh.broker import MeshClient
from mesh.broker.approvals import ApprovalError, check_approver
from mesh.broker.breaker import Breakers
from mesh.contracts import State
from mesh.dlq import Audit, DeadLetterShards, Filter, Replayer, ReplayReport
from mesh.dlq import purge as purge_entries

logger = logging.getLogger(__name__)


class Refused(Exception):
    """An action that did not happen, with why (shown to the user)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def replay(c: MeshClient, entry_id: str, user: str) -> str:
    """``mesh dlq replay ID``: the entry back on its queue; returns the job it went on as."""
    store = DeadLetterShards.of(c.redis, c.settings).store_of(entry_id)  # the shard holding it
    stored = store.load(entry_id)
    if stored is None:
        raise Refused(f"no dead letter {entry_id} (replayed or removed meanwhile)", 404)
    replayer = Replayer(store, c.settings, Audit(c.redis, store.keys, who=user))
    report = replayer.replay(replayer.entries([entry_id]))
    if entry_id not in report.replayed:
        raise Refused(f"not replayed: {report.skipped.get(entry_id, 'no longer in the DLQ')}")
    logger.info("dead letter replayed", extra={"entry_id": entry_id, "by": user})
    return stored.entry.job_id or ""


def purge(c: MeshClient, entry_id: str, user: str) -> None:
    """``mesh dlq purge ID --yes``: the entry deleted for good, with an audit record."""
    store = DeadLetterShards.of(c.redis, c.settings).store_of(entry_id)
    if not purge_entries(store, ids=[entry_id], audit=Audit(c.redis, store.keys, who=user)):
        raise Refused(f"no dead letter {entry_id} (replayed or removed meanwhile)", 404)
    logger.info("dead letter purged", extra={"entry_id": entry_id, "by": user})


#: Entries one press of a filter's replay or purge takes at most (about a second and a half of
#: work): the request ends in bounded time, the page says how many more match, and pressing again
#: goes on with them.
BULK_MAX = 1_000


def replay_filter(c: MeshClient, flt: Filter, user: str) -> tuple[int, dict[str, str]]:
    """``mesh dlq replay`` with filters (``--yes``), its first BULK_MAX entries: (entries replayed,
    entry -> why one was skipped). A shard at a time, BULK_MAX of them all."""
    report = ReplayReport(dry_run=False)
    for store in DeadLetterShards.of(c.redis, c.settings).stores:
        left = BULK_MAX - len(report.replayed) - len(report.skipped)
        if left <= 0:
            break
        replayer = Replayer(store, c.settings, Audit(c.redis, store.keys, who=user))
        report.add(replayer.replay(itertools.islice(replayer.entries(None, flt), left)))
    logger.info("dead letters replayed", extra={"replayed": len(report.replayed), "by": user})
    return len(report.replayed), report.skipped


def purge_filter(c: MeshClient, flt: Filter, user: str) -> int:
    """``mesh dlq purge`` with filters (``--yes``), its first BULK_MAX entries: how many were deleted."""
    n = 0
    for store in DeadLetterShards.of(c.redis, c.settings).stores:  # a shard at a time, BULK_MAX of them all
        ids: list[str] = []
        for batch in store.iter(flt):
            ids += [s.entry.entry_id for s in batch]
            if len(ids) >= BULK_MAX - n:
                break
        n += purge_entries(store, ids=ids[:BULK_MAX - n], audit=Audit(c.redis, store.keys, who=user)) if ids else 0
        if n >= BULK_MAX:
            break
    logger.info("dead letters purged", extra={"purged": n, "by": user})
    return n


def decide(c: MeshClient, job_id: str, step_id: str, user: str, *, approve: bool, note: str) -> None:
    """``mesh approve`` / ``mesh deny`` as ``user``, who must be among the step's ``approvers``."""
    record = _record(c, job_id)
    step = record.steps.get(step_id) if record is not None else None
    if step is None or step.state is not State.AWAITING_APPROVAL or step.approval is None:
        raise Refused(f"step {step_id} of job {job_id} does not wait for an approval", 404)
    try:
        check_approver(step.approval, user)
    except ApprovalError as exc:
        raise Refused(str(exc), 403) from exc
    if not approve and not note.strip():
        raise Refused("a denial needs a reason", 400)
    try:
        if approve:
            c.approve(job_id, step_id, note=note.strip() or None, by=user)
        else:
            c.deny(job_id, step_id, reason=note.strip(), by=user)
    except ApprovalError as exc:
        raise Refused(str(exc)) from exc


def verify(c: MeshClient, job_id: str, step_id: str, user: str) -> str:
    """``mesh verify JOB STEP`` as ``user``, with the tools of the server's app (the built-in ones
    unless its client has one): the verdict."""
    from mesh.ops.effects_cli import Undecided, verify_step

    record = _unknown(c, job_id, step_id)
    try:
        verdict = str(verify_step(c, _app(c), record, step_id, user)["verdict"])
    except Undecided as exc:
        raise Refused(str(exc)) from exc
    logger.info("effect verified", extra={"job_id": job_id, "step_id": step_id, "verdict": verdict, "by": user})
    return verdict


def settle(c: MeshClient, job_id: str, step_id: str, user: str, *, applied: bool, reason: str) -> None:
    """``mesh settle JOB STEP --as applied|not-applied --reason R`` as ``user``."""
    from mesh.ops.effects_cli import Undecided, settle_step

    if not reason.strip():
        raise Refused("say why the effect is settled so", 400)
    record = _unknown(c, job_id, step_id)
    try:
        settle_step(c, _app(c), record, step_id, applied=applied, reason=reason.strip(), by=user)
    except Undecided as exc:
        raise Refused(str(exc)) from exc
    logger.info("effect settled", extra={"job_id": job_id, "step_id": step_id, "applied": applied, "by": user})


def _unknown(c: MeshClient, job_id: str, step_id: str) -> Any:
    record = _record(c, job_id)
    step = record.steps.get(step_id) if record is not None else None
    if record is None or step is None or step.state is not State.UNKNOWN:
        raise Refused(f"step {step_id} of job {job_id} is not unknown (nothing to decide)", 404)
    return record


def _record(c: MeshClient, job_id: str) -> Any:
    """The job's record, read in its shard."""
    return c.jobs_of(job_id).get(job_id)


def _app(c: MeshClient) -> Any:
    from mesh.agents.builtin import app as builtin

    return c.app if c.app is not None else builtin


def reset_breaker(c: MeshClient, name: str, user: str) -> None:
    """``mesh breakers reset NAME --by USER``: closed, and audited naming the user."""
    if not Breakers(c.settings, c.redis).reset(name, by=user):
        raise Refused(f"no breaker named {name}", 404)
    logger.info("breaker reset", extra={"dependency": name, "by": user})


def set_limit(c: MeshClient, name: str, user: str, *, requests: str, tokens: str, max: str) -> str:
    """``mesh limits set NAME [--requests R] [--tokens T] [--max N]`` (empty fields are not given):
    the limit set; a value the command refuses is refused with its message."""
    from mesh.ops.limits_cli import set_limit as set_one

    if max.strip() and not (max.strip().isascii() and max.strip().isdigit()):
        raise Refused(f"--max is a whole number of messages, not {max.strip()[:40]!r}", 400)
    try:
        limit, value = set_one(c, name, requests=requests.strip() or None, tokens=tokens.strip() or None,
                               max=int(max) if max.strip() else None, by=user)
    except ValueError as exc:
        raise Refused(str(exc), 400) from exc
    logger.info("limit set", extra={"limit": limit, "value": value, "by": user})
    return limit


def reset_limit(c: MeshClient, name: str, user: str) -> str:
    """``mesh limits reset NAME``: the limit reset to its declaration."""
    from mesh.ops.limits_cli import reset_limit as reset_one

    try:
        limit = reset_one(c, name, by=user)
    except ValueError as exc:
        raise Refused(str(exc), 409) from exc
    logger.info("limit reset", extra={"limit": limit, "by": user})
    return limit
