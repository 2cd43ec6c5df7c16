"""A pipeline job drawn as its DAG: steps in dependency order, each with its state, what it waits for
and, for a gated step, the gate and the values it saw.

``mesh status`` prints :func:`draw`; ``mesh trace`` orders its steps by :func:`dag`; both put
:func:`as_json` in their ``--json``. The lines fit the terminal's width: free text (gates, errors,
outputs) wraps under its step, ids and values are never cut."""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass
from typing import Any

import orjson
from rich.cells import cell_len
from rich.text import Text

from mesh.contracts import GateCheck, JobRecord, MeshError, State, StepRecord, items_of
from mesh.contracts.jobs import compensations, undo_id

STATE_STYLE = {State.SUCCEEDED: "green", State.HALTED: "red", State.DEAD_LETTERED: "red", State.SKIPPED: "dim",
               State.NOT_RUN: "dim", State.AWAITING_APPROVAL: "yellow", State.WAITING: "yellow", State.FAILED: "yellow",
               State.CANCELLED: "dim", State.COMPENSATING: "yellow", State.COMPENSATED: "cyan"}


@dataclass(frozen=True)
class Node:
    """One step of the DAG: its record, the steps it depends on and its depth (longest path from a root)."""

    step: StepRecord
    depends_on: tuple[str, ...]
    depth: int


def dag(record: JobRecord, spec_json: dict[str, Any] | None) -> list[Node]:
    """``record``'s steps in the spec's DAG order with their dependencies, each ``for_each`` step's
    items right after it, one level deeper, then the job's compensations (``undo:<step>``) in the order
    they were sent; without the spec (no longer stored), the steps in record order, with none known."""
    if spec_json is None:
        return [Node(s, (), 0) for s in record.steps.values()]
    from mesh.agents.pipelines.engine import spec_from_json
    from mesh.agents.pipelines.validate import order

    spec = spec_from_json(spec_json)
    depth: dict[str, int] = {}
    nodes = []
    for sid in order(spec):
        deps = spec.step(sid).depends_on
        depth[sid] = 1 + max((depth[d] for d in deps), default=-1)
        if sid in record.steps:
            nodes.append(Node(record.steps[sid], tuple(deps), depth[sid]))
            # a for_each step's items, in list order, one level under it
            nodes += [Node(it, (), depth[sid] + 1) for it in items_of(record, sid)]
    undo = sorted(compensations(record), key=lambda c: (c.sent_at is None, c.sent_at or 0.0))
    return nodes + [Node(c, (), 0) for c in undo]


def load(client: Any, record: JobRecord) -> list[Node]:
    """The DAG of a pipeline job, reading the spec it started with (by digest) from ``client.pipelines``."""
    spec_json = None
    if record.pipeline and record.pipeline_digest:
        try:
            _, spec_json = client.pipelines.get(record.pipeline, record.pipeline_digest)
        except MeshError:
            spec_json = None
    return dag(record, spec_json)


def as_json(nodes: list[Node]) -> list[dict[str, Any]]:
    """The DAG for ``--json``: each step's id, agent, dependencies, depth, state, error (for a step that
    did not run, why: ``not_run``, ``skipped``), approval (what it asks, its decision) and gate
    evaluation (and, for a ``for_each`` item, its step as ``parent``)."""
    return [{"step_id": n.step.step_id, "agent": n.step.agent, "depends_on": list(n.depends_on), "depth": n.depth,
             "state": str(n.step.state), "error": n.step.error,
             "gate": n.step.gate.model_dump(mode="json") if n.step.gate else None,
             "approval": n.step.approval.model_dump(mode="json") if n.step.approval else None,
             **({"parent": n.step.parent} if n.step.parent else {}),
             **({"compensates": n.step.compensates} if n.step.compensates else {})}
            for n in nodes]


def value(v: Any) -> str:
    """A value as the expression language writes it: ``0.6``, ``true``, ``"text"``, ``null``."""
    return orjson.dumps(v, default=str).decode()


def approval_line(step: StepRecord) -> str | None:
    """A step's approval as its DAG line shows it: what it waits for and until when (``mesh approve
    JOB STEP``), or the decision (who, when, the note); None for a step without one."""
    a = step.approval
    if a is None:
        return None
    call = f"call {a.hash[:12]}" + (f", ask {a.asks}" if a.asks > 1 else "")
    if step.state is State.AWAITING_APPROVAL:
        expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.asked_at + a.timeout_s))
        who = f"; approvers {', '.join(a.approvers)}" if a.approvers else ""
        return f"waits for a human's approval ({call}) until {expires}, then {a.on_timeout}{who}"
    if a.decision is None:
        return None
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.at)) if a.at else "?"
    return f"{a.decision} by {a.by} at {at} ({call})" + (f": {a.note}" if a.note else "")


def wait_line(step: StepRecord) -> str | None:
    """A step's durable wait as its DAG line shows it: what it waits for and until when (``mesh
    signal JOB EVENT``), or how it ended; None for a step without one."""
    w = step.wait
    if w is None:
        return None
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w.until))
    if step.state is State.WAITING:
        if w.event is None:
            return f"sleeps until {until}"
        return f"waits for {w.describe()} until {until}, then {w.on_timeout}"
    if w.ended is None:
        return None
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w.ended_at)) if w.ended_at else "?"
    how = {"slept": "slept", "event": f"{w.event} came ({w.via})", "timeout": f"timed out waiting for {w.event}"}
    return f"{how.get(w.ended.value, w.ended.value)} at {at}"


def gate_line(gate: GateCheck) -> str:
    """``gate coder.confidence >= 0.85 saw coder.confidence=0.6 → false``."""
    seen = ", ".join(f"{k}={value(v)}" for k, v in gate.values.items())
    return f"gate {gate.expr}" + (f" saw {seen}" if seen else "") + f" → {'true' if gate.passed else 'false'}"


def draw(record: JobRecord, nodes: list[Node], stuck: dict[str, float] | None = None, *,
         width: int = 80) -> list[Text]:
    """The DAG as an indented tree, one step per line (``└─ coder  succeeded  ← researcher``), then its
    gate, error, output or why it was not sent, wrapped under it to ``width``."""
    stuck = stuck or {}
    lines: list[Text] = []
    for node in nodes:
        step, lead = node.step, "   " * max(0, node.depth - 1)
        branch = lead + ("└─ " if node.depth else "")
        state = Text(shown_state(step), style=STATE_STYLE.get(step.state, ""))
        if step.step_id in stuck:
            state = Text(f"stuck ({stuck[step.step_id]:.0f}s without progress)", style="red")
        head = Text.assemble((branch, "dim"), (step.step_id, "bold"), "  ", state)
        indent = " " * (len(branch) + 2)
        for part in _facts(step, node.depends_on):
            if head.cell_len + 2 + cell_len(part) > width:  # the facts that do not fit go on under it
                lines.append(head)
                head = Text(indent + part)
            else:
                head.append(f"  {part}")
        lines.append(head)
        room = max(20, width - len(indent))
        for text, style in _details(record, step):
            if text.startswith("out: "):  # an output can be long: two lines of it say enough here
                text = textwrap.shorten(text, 2 * room, placeholder=" …")
            for chunk in textwrap.wrap(text, room, break_long_words=False, break_on_hyphens=False):
                lines.append(Text(indent + chunk, style=style))
    return lines


def _facts(step: StepRecord, deps: tuple[str, ...]) -> list[str]:
    """The short facts on a step's line: its agent (when not its id), attempt, duration, tokens, dependencies."""
    facts = [f"agent {step.agent}"] if step.agent != step.step_id else []
    if step.attempt > 1:
        facts.append(f"attempt {step.attempt}")
    if step.finished_at and step.started_at:
        facts.append(f"{step.finished_at - step.started_at:.2f}s")
    if step.tokens_in or step.tokens_out:
        facts.append(f"tokens {step.tokens_in}/{step.tokens_out}")
    if deps:
        facts.append("← " + ", ".join(deps))
    if step.compensates:
        facts.append(f"undoes {step.compensates}")
    return facts


def shown_state(step: StepRecord) -> str:
    """A step's state as the console prints it: a succeeded step with effects says whether they are
    proven (``succeeded (verified)``) or only the tool's word (``succeeded (unverified)``)."""
    if step.state is State.SUCCEEDED and step.effect is not None:
        return f"{step.state} ({step.effect})"
    return str(step.state)


def settled_line(step: StepRecord) -> str:
    """An operator's settlement of the step's effect: ``settled applied by ops@host at 12:03:04: why``."""
    s = step.settlement
    assert s is not None
    return (f"settled {'applied' if s.applied else 'not applied'} by {s.by} at "
            f"{time.strftime('%H:%M:%S', time.localtime(s.at))}: {s.reason}")


def _details(record: JobRecord, step: StepRecord) -> list[tuple[str, str]]:
    """The free-text lines under a step, with their style."""
    out: list[tuple[str, str]] = []
    if step.gate is not None:
        out.append((gate_line(step.gate), "" if step.gate.passed else "red"))
    if step.error and step.failure_class != "gate" and not (step.gate and not step.gate.passed):
        out.append((step.error, "red" if step.state in (State.DEAD_LETTERED, State.HALTED) else
                    "dim" if step.state is State.NOT_RUN else ""))
    if step.state is State.QUEUED and step.sent_at is None and not step.compensates:  # (written before not_run)
        out.append(("not sent: the job halted" if record.state is State.HALTED else "waits for its dependencies",
                    "dim"))
    line = approval_line(step)
    if line is not None:
        out.append((line, "yellow" if step.state is State.AWAITING_APPROVAL else ""))
    line = wait_line(step)
    if line is not None:
        out.append((line, "yellow" if step.state is State.WAITING else ""))
    undo = record.steps.get(undo_id(step.step_id))
    if undo is not None:
        out.append((f"compensation {undo.step_id}: {undo.state}", "cyan" if undo.state is State.SUCCEEDED else
                    "red" if undo.state in (State.DEAD_LETTERED, State.UNKNOWN) else "yellow"))
    if step.compensates and step.state is State.QUEUED and step.sent_at is None:
        out.append(("waits: compensations run one at a time, last completed step first", "dim"))
    if step.settlement is not None:
        out.append((settled_line(step), "yellow"))
    if step.result:
        out.append(("out: " + ", ".join(f"{k}={value(v)}" for k, v in step.result.items()), "dim"))
    return out
