"""The three agents: each takes its typed input and returns its typed output."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dramatiq.middleware import TimeLimitExceeded

from mesh.broker.idempotency import current_lease
from mesh.contracts import (
    DependencyTimeout,
    Envelope,
    Findings,
    LeaseLost,
    Plan,
    PlannerInput,
    Receipt,
    ResearchInput,
    ToolCall,
    ToolRefused,
)

from .tools import TOOLS, ToolContext

if TYPE_CHECKING:
    from .runtime import AgentRuntime, Handler


def planner(rt: AgentRuntime, env: Envelope, task: PlannerInput) -> Plan:
    plan = rt.provider.plan(task.goal, timeout_s=env.remaining_s())
    rt.progress(env, f"{rt.provider.name} answered with {len(plan.steps)} steps")
    return plan


def researcher(rt: AgentRuntime, env: Envelope, task: ResearchInput) -> Findings:
    findings = rt.provider.research(task.question, timeout_s=env.remaining_s())
    rt.progress(env, f"{rt.provider.name} answered with {len(findings.findings)} findings")
    return findings


def executor(rt: AgentRuntime, env: Envelope, call: ToolCall) -> Receipt:
    spec = TOOLS.get(call.tool)
    if spec is None:
        raise ToolRefused(f"no tool named {call.tool!r}", tool=call.tool)
    lease = current_lease()
    assert lease is not None, "the runtime runs handlers only under a claim"
    ctx = ToolContext(key=env.key, job_id=env.job_id, trace_id=env.trace_id, fencing_token=lease.token,
                      deadline=env.deadline, breakers=rt.breakers,
                      settings=rt.settings, redis=rt.redis, keys=rt.keys, http=rt.http)
    args = call.typed_args()
    if lease.lost:
        # Renewal found the key taken over: the new owner carries the work, this attempt acts no more.
        raise LeaseLost(lease.key, lease.token)
    started = time.monotonic()
    outcome: dict[str, Any] = {}
    try:
        receipt = spec.run(ctx, args)
        if spec.effect:
            lease.effects += 1
        outcome = {"status": receipt.detail.get("status")}
        return receipt
    except TimeLimitExceeded as exc:
        # Stopped mid-call: the tool may have acted. The effect cannot be proven either way.
        outcome = {"error": "time limit"}
        raise DependencyTimeout(f"{call.tool} hit its time limit; its effect is unknown", tool=call.tool,
                                effect_unknown=True) from exc
    except Exception as exc:
        outcome = {"error": str(exc)}
        raise
    finally:
        if outcome:  # not when interrupted otherwise (a shutdown): the attempt is abandoned, not traced
            rt.tool_call(env, call.tool, spec.dependency(args), time.monotonic() - started, **outcome)


HANDLERS: dict[str, Handler] = {"planner": planner, "researcher": researcher, "executor": executor}
AGENTS = tuple(HANDLERS)
