"""``mesh trace``: a job's timeline as a tree of steps, each with its events in order.

The tree is drawn as whole lines (never cropped or wrapped at the terminal's width), so trace ids,
job ids and errors stay whole and can be copied; its header fits the terminal's width, a line per part
when one line would not (see :func:`header`)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rich.text import Text

from mesh.contracts import JobRecord, State
from mesh.ops.console import fitted
from mesh.ops.dag import STATE_STYLE, gate_line
from mesh.ops.dag import Node as DagNode

#: How each event reads on one line, from its fields.
_DETAIL = {
    "enqueued": lambda e: f"on {e.get('queue', '?')}" + (f" by {e['by']}" if e.get("by") else ""),
    "picked_up": lambda e: f"attempt {e.get('attempt')} (token {e.get('token')}) by {e.get('worker')}",
    "progress": lambda e: f"#{e.get('progress')}: {e.get('note', '')}",
    "tool_call": lambda e: f"{e.get('tool')} → {e.get('dependency')} {_outcome(e)} in {e.get('duration_s', 0):.3f}s"
                           + (f" (token {e['token']})" if e.get("token") is not None else ""),
    "fenced": lambda e: f"{e.get('call')} refused: token {e.get('token')}'s lease was lost to another owner",
    "model_call": lambda e: f"{e.get('model')}: {e.get('tokens_in')} tokens in, {e.get('tokens_out')} out, "
                            f"{e.get('repairs')} repair(s), {e.get('outcome')}" + _turn(e),
    "tool_replayed": lambda e: f"{e.get('call')} {e.get('tool')}: its recorded result replayed, not called again"
                               + (" (the effect ledger answers)" if e.get("effect") else ""),
    "tool_refused": lambda e: f"{e.get('call')} {e.get('tool')}: {e.get('reason', '')} (answered to the model)",
    "loop_restarted": lambda e: f"{e.get('run')}: {e.get('reason', '')}; {e.get('forgotten')} checkpoint(s) "
                                "forgotten, the conversation started over",
    "deferred": lambda e: f"{e.get('failure_class') or e.get('reason', '')} until {_clock(e.get('until'))}: "
                          f"{e.get('error', e.get('reason', ''))}",
    "failed": lambda e: f"{e.get('failure_class')}, retry at {_clock(e.get('until'))}: {e.get('error', '')}",
    "dead_lettered": lambda e: f"{e.get('failure_class')} → {e.get('state')}: {e.get('error', '')}",
    "duplicate": lambda e: "acked without running (already done)",
    "succeeded": lambda e: ("with the stored output of another job's step under its key (not run)"
                            if e.get("shared") else f"in {e.get('duration_s', 0):.3f}s"),
    "stuck": lambda e: f"no progress for {e.get('idle_s')}s while holding its claim",
    "halted": lambda e: str(e.get("reason", "")),
    "skipped": lambda e: str(e.get("reason", "")),
    "awaiting_approval": lambda e: "parked before it runs: waits for a human's approval"
                                   + (f" of call {e['hash'][:12]}" if e.get("hash") else "")
                                   + (f" for {e['timeout']}, then {e.get('on_timeout')}" if e.get("timeout") else "")
                                   + (f" (asked again: {e['asked_again']})" if e.get("asked_again") else ""),
    "waiting": lambda e: f"waits for {e.get('waits_for')} until {e.get('until')}"
                         + (f", then {e['on_timeout']}" if e.get("on_timeout") else ""),
    "slept": lambda e: "its sleep ended",
    "resumed": lambda e: f"{e.get('name')} came by {e.get('via')} ({e.get('event_id')})",
    "wait_timed_out": lambda e: str(e.get("reason", "")),
    "approved": lambda e: _decision(e),
    "denied": lambda e: _decision(e),
    "approval_expired": lambda e: f"nobody decided in time (call {str(e.get('hash', ''))[:12]})",
    "approval_warning": lambda e: f"expires in {e.get('expires_in')}, undecided",
    "replayed": lambda e: f"dead letter {e.get('entry_id')} replayed by {e.get('by')} as message "
                          f"{e.get('message_id')}" + (f" to version {e['to_version']}" if e.get("to_version") else "")
                          + (" (record recreated)" if e.get("recreated_record") else ""),
    "effect": lambda e: f"{e.get('tool')} call #{e.get('call')}: {e.get('verdict')}"
                        + (f": {e['reason']}" if e.get("reason") else ""),
    "verified": lambda e: f"mesh verify by {e.get('by')}: {e.get('verdict')}"
                          + (f": {e['reason']}" if e.get("reason") else ""),
    "settled": lambda e: f"mesh settle by {e.get('by')}: {e.get('verdict')}: {e.get('reason', '')}",
    "joined": lambda e: _join(e),
    "join_failed": lambda e: _join(e),
    "compensating": lambda e: f"{e.get('cause')}: {e.get('reason', '')}",
    "cancelled": lambda e: ("ended after the job was cancelled: its output is not used" if e.get("step_id")
                            else "by an operator" + (f": {e['reason']}" if e.get("reason") else "")),
    "compensation_sent": lambda e: f"undoes {e.get('compensates')}",
    "compensation_skipped": lambda e: str(e.get("reason", "")),
    "compensation_failed": lambda e: str(e.get("reason", "")),
    "not_run": lambda e: f"acked without running: {e.get('reason', '')}",
    "rerun": lambda e: f"rerun of {e.get('rerun_of')} from step {e.get('rerun_from')}",
    "compacted": lambda e: _compacted(e),
}
_STYLE = {"tool_refused": "yellow", "compensating": "yellow", "cancelled": "yellow", "compensation_sent": "cyan",
          "compensation_skipped": "dim", "compensation_failed": "red", "not_run": "dim", "compacted": "dim",
          "fenced": "yellow", "failed": "yellow", "deferred": "yellow", "dead_lettered": "red", "stuck": "red",
          "succeeded": "green", "halted": "red", "skipped": "dim", "awaiting_approval": "yellow", "join_failed": "red",
          "waiting": "yellow", "slept": "green", "resumed": "green", "wait_timed_out": "red",
          "settled": "yellow", "verified": "yellow",
          "approved": "green", "denied": "red", "approval_expired": "red", "approval_warning": "yellow"}


def _turn(event: dict[str, Any]) -> str:
    """``, turn 3 asked lookup, refund, in 0.412s`` (a tool loop's turn), or the duration alone."""
    out = ""
    if event.get("turn") is not None:
        tools = event.get("tools") or []
        out += f", turn {event['turn']} " + (f"asked {', '.join(map(str, tools))}" if tools else "answered")
    if event.get("duration_s") is not None:
        out += f" in {event['duration_s']:.3f}s"
    return out


def _decision(event: dict[str, Any]) -> str:
    """``by ana (call 3f2a…): looks fine``."""
    return (f"by {event.get('by')} (call {str(event.get('hash', ''))[:12]})"
            + (f": {event['note']}" if event.get("note") else ""))


def _compacted(event: dict[str, Any]) -> str:
    """What compaction kept of the trace once the job ended, and what it only counted or cut."""
    counted = [f"{n} {kind}" + (f" of {step}" if step else "")
               for step, kinds in (event.get("summarised") or {}).items() for kind, n in kinds.items()]
    return (f"once the job ended: {event.get('kept')} events kept whole"
            + (f"; summarised (counted, not kept): {', '.join(counted)}" if counted else ", none summarised")
            + (f"; {event['cut_values']} long value{'' if event['cut_values'] == 1 else 's'} cut (kept as "
               "their size and SHA-256 when not text)" if event.get("cut_values") else ""))


def _join(event: dict[str, Any]) -> str:
    """A join's decision: ``revised: 20 succeeded, 16 needed (min_success 0.8) → succeeded``."""
    failed = event.get("failed") or []
    return (("revised: " if event.get("revised") else "")
            + f"{event.get('succeeded')} succeeded, {event.get('need', event.get('needed'))} needed"
            + (f" ({event['rule']})" if event.get("rule") else "")
            + (f", {len(failed)} failed" if failed else "") + f" → {event.get('outcome', 'succeeded')}")


def _outcome(event: dict[str, Any]) -> str:
    """A tool call's status or whole error, without the dependency the line already names."""
    if event.get("status") is not None:
        return str(event["status"])
    error, dependency = str(event.get("error") or ""), str(event.get("dependency") or "")
    return error[len(dependency):].lstrip(" :") if dependency and error.startswith(dependency) else error


def _clock(ts: float | None) -> str:
    return "-" if not ts else datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def by_step(events: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events grouped per step, each group in time order; steps in the order they first appear."""
    out: dict[str, list[dict[str, Any]]] = {}
    for ev in sorted(events, key=lambda e: e.get("at", 0)):
        out.setdefault(str(ev.get("step_id")), []).append(ev)
    return out


@dataclass
class _Node:
    label: Text
    children: list[_Node] = field(default_factory=list)
    #: What follows the label on its line when that fits the width, else on a line of its own under it
    #: (a step's offset and duration).
    tail: str = ""

    def add(self, label: Text, tail: str = "") -> _Node:
        self.children.append(node := _Node(label, tail=tail))
        return node


def render(record: JobRecord | None, events: list[dict[str, Any]], dag: list[DagNode] | None = None,
           width: int = 80) -> list[Text]:
    """The job (its header in lines of ``width`` columns, see :func:`header`), then each step (indented
    under the step that sent it) with its events and offsets from the job's first event; one Text per
    line, to print without wrapping. A pipeline's job (``dag``) lists its steps in DAG order instead,
    see :func:`_pipeline`."""
    start = min((e.get("at", 0) for e in events), default=0)
    head = header(record, events, width)
    tree = _Node(head[-1])
    steps = by_step(events)
    _events(tree, steps.pop("None", []), start)  # the job's own: compensating, cancelled, rerun
    if record is not None and dag is not None:
        _pipeline(tree, record, dag, steps, start)
        return [*head[:-1], *_lines(tree, width)]
    nodes: dict[str, _Node] = {}
    for step_id, evs in steps.items():
        agent = evs[0].get("agent", "?")
        first, last = evs[0].get("at", start), evs[-1].get("at", start)
        state = str(record.steps[step_id].state) if record and step_id in record.steps else ""
        label = Text.assemble((f"{step_id}", "bold"), f" {agent} {state}")
        parent = _parent(step_id, agent, nodes, tree)
        node = parent.add(label, f"+{first - start:.3f}s, {last - first:.3f}s from first to last event")
        nodes[step_id] = node
        _events(node, evs, start)
    return [*head[:-1], *_lines(tree, width)]


def header(record: JobRecord | None, events: list[dict[str, Any]], width: int = 80) -> list[Text]:
    """``job ID STATE  trace TRACE_ID  (why it undoes its effects)`` on one line when it fits ``width``;
    else each part starts a line of its own (the job and its state, then the trace id), and a long
    why is wrapped between words, so every value stays whole and can be copied."""
    if record is None:
        return [Text(f"job (no record)  {len(events)} events")]
    parts = [f"job {record.job_id} {record.state}", f"trace {record.trace_id}"]
    lines: list[str] = []
    if record.unwind is not None:  # why it undoes its effects, with its state
        why = record.unwind.reason
        why = f"({why if why.startswith(record.unwind.cause) else f'{record.unwind.cause}: {why}'})"
        if len(why) > width:  # a long reason: wrapped on lines of its own, after the ids
            lines = textwrap.wrap(why, width, subsequent_indent=" ", break_long_words=False,
                                  break_on_hyphens=False)
        else:
            parts.append(why)
    return [Text(line) for line in [*fitted(parts, width=width), *lines]]


def _events(node: _Node, evs: list[dict[str, Any]], start: float) -> None:
    for ev in evs:
        kind = ev.get("event", "?")
        detail = _DETAIL.get(kind, lambda e: "")(ev)
        column = f"{kind:<14}" if len(kind) < 14 else f"{kind} "  # a long kind is never run into its detail
        node.add(Text.assemble(f"+{ev.get('at', start) - start:8.3f}s ", (column, _STYLE.get(kind, "")), detail))


def _pipeline(tree: _Node, record: JobRecord, dag: list[DagNode], steps: dict[str, list[dict[str, Any]]],
              start: float) -> None:
    """Each step of the DAG in order (``← dependencies``), even one that never ran: its gate
    evaluation (the values it saw), then its events (halted, skipped and awaiting approval among them);
    a ``for_each`` step's items under it."""
    made: dict[str, _Node] = {}
    for item in dag:
        rec, evs = item.step, steps.get(item.step.step_id, [])
        label = Text.assemble((rec.step_id, "bold"), f" {rec.agent} " if rec.agent != rec.step_id else " ",
                              (str(rec.state), STATE_STYLE.get(rec.state, "")))
        if item.depends_on:
            label.append(f"  ← {', '.join(item.depends_on)}")
        tail = ""
        if evs:
            first, last = evs[0].get("at", start), evs[-1].get("at", start)
            tail = f"+{first - start:.3f}s, {last - first:.3f}s from first to last event"
        elif rec.state is State.NOT_RUN:
            label.append(f"  {rec.error or 'not sent'}", "dim")
        elif rec.sent_at is None and rec.state is State.QUEUED:
            label.append("  not sent" + (": the job halted" if record.state is State.HALTED else ""), "dim")
        node = made[rec.step_id] = made.get(rec.parent or "", tree).add(label, tail)
        if rec.gate is not None:
            node.add(Text.assemble(("gate".ljust(10), "red" if not rec.gate.passed else "green"),
                                   gate_line(rec.gate).removeprefix("gate ")))
        _events(node, evs, start)


def _lines(node: _Node, width: int = 80, lead: str = "", last: bool = True, top: bool = True) -> Iterator[Text]:
    """The tree's lines; a node's tail after its label when the line fits ``width``, else on a line of
    its own under the label (the tree's rules drawn through it), so fixed text never runs past it."""
    label = node.label if top else Text.assemble((lead + ("└── " if last else "├── "), "dim"), node.label)
    inner = "" if top else lead + ("    " if last else "│   ")
    if node.tail and label.cell_len + 2 + len(node.tail) <= width:
        label = Text.assemble(label, f"  {node.tail}")
    elif node.tail:
        yield label
        label = Text.assemble((inner + ("│   " if node.children else "    "), "dim"), node.tail)
    yield label
    for i, child in enumerate(node.children):
        yield from _lines(child, width, inner, i == len(node.children) - 1, top=False)


def _parent(step_id: str, agent: str, nodes: dict[str, _Node], root: _Node) -> _Node:
    # The pipeline's shape: the plan sends research, research fans in to actions.
    if agent == "researcher" and "plan" in nodes:
        return nodes["plan"]
    if agent == "executor":
        research = [n for s, n in nodes.items() if s.startswith("r")]
        return research[-1] if research else nodes.get("plan", root)
    return root


def event_line(ev: dict[str, Any]) -> Text:
    """One event on a line of its own, as ``mesh trace --follow`` prints it while the job runs:
    ``12:03:04.512  research  picked_up      attempt 1 (token 3) by host:812``."""
    kind = str(ev.get("event", "?"))
    step = "job" if ev.get("step_id") is None else str(ev["step_id"])
    column = f"{kind:<14}" if len(kind) < 14 else f"{kind} "
    return Text.assemble((_clock(ev.get("at")), "dim"), "  ", (step, "bold"), "  ", (column, _STYLE.get(kind, "")),
                         _DETAIL.get(kind, lambda e: "")(ev))
