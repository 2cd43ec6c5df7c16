"""The tool loop: ``ctx.model.run(prompt, tools=[...], output=Model)``, the model picks the tools.

    answer = ctx.model.run(f"Refund order {order.id} if it qualifies", tools=[lookup, refund],
                           output=Decision, max_turns=6)

Each turn asks the model with the conversation so far and the offered tools (each declared tool's
name, description and args JSON schema). A turn that asks for tool calls has each one made through
``ctx.call`` (declared tools only, args validated, breaker, classification, deadline, secrets,
tracing, the effect ledger and verification) and its result sent back; a turn without calls is the
final answer, validated as ``output`` (an invalid one is sent back with its errors, at most
``repairs`` times).

Durable: every model turn and every tool call is checkpointed on the step (``turn-3``,
``turn-3/call-1`` under ``<key>``; :mod:`mesh.broker.transcript`) once it completed; the tool of
a call is given ``<key>/turn-3/call-1`` as its key (its ``Idempotency-Key``: each call its own,
the same on a re-run). A re-run of the
step (a worker killed mid-loop, its message redelivered) replays them: the model is not asked again
for a recorded turn, a recorded call is not made again and its recorded result goes back to the
model; an effectful one is met again in the effect ledger, which answers from its record (so the
ledger's numbering and the step's verdict stay whole). A call that returned but whose checkpoint was
never written is asked of ``ctx.call`` again: the ledger answers an effectful one from its record.

Bounded: ``max_turns`` (exceeded: InvalidOutput), the job's token budget (the provider's meter,
BudgetExceeded), the step's deadline (DeadlineExceeded before a turn, the provider's request cut to
it). A call the model invents (a tool not offered, args that are not JSON or break the tool's
model) is answered to the model as an error ``mistakes`` times; one more ends the step
InvalidOutput. A call of a destructive tool (``@app.tool(destructive=True)``) is made only once a
person approved exactly it (CallNeedsApproval parks the step until then; the approved step runs
again from its checkpoints). When the loop itself fails (InvalidOutput) its checkpoints are cleared: a retry
starts the conversation over, its effectful calls still answered by the ledger (the step's other loops keep
theirs). A re-run whose prompt changed starts that loop's conversation over too (``loop_restarted``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from mesh.contracts import ConfigError, DeadlineExceeded, FailureClass, InvalidOutput, MeshError, ToolRefused

from .effects import as_json

if TYPE_CHECKING:
    from .app import Tool, ToolSpec

M = TypeVar("M", bound=BaseModel)

#: The longest tool result sent back to the model (characters); longer ones are cut, and say so.
RESULT_LIMIT = 16_000
#: Invented calls answered to the model as errors before the step ends ``invalid_output``.
MISTAKES = 2
#: What a tool's name may hold as the model APIs take it (OpenAI's and Anthropic's tool names).
WIRE_NAME = re.compile(r"[^A-Za-z0-9_-]")
#: Invalid final answers sent back with their errors before the step ends ``invalid_output``.
REPAIRS = 2


class CallNeedsApproval(MeshError):
    """A call of a destructive tool (``@app.tool(destructive=True)``) that the model asked for and no
    person approved yet: the worker parks the step (``awaiting_approval``) asking for exactly this
    call (``call``: tool and args; ``hash``), and once approved the step runs again from its
    checkpoints, the call made then. Outside a pipeline's step nothing can wait: refused (permanent)."""

    failure_class = FailureClass.PERMANENT

    def __init__(self, message: str, *, call: dict[str, Any], hash: str) -> None:
        super().__init__(message, tool=call.get("tool"), hash=hash)
        self.call = call
        self.hash = hash


@dataclass(frozen=True)
class ToolDef:
    """A tool as the model is shown it: its name, description and args model (as JSON schema)."""

    name: str
    description: str
    args: type[BaseModel]
    #: The args' JSON schema when the tool's source gives it (an MCP server's pinned inputSchema).
    schema: dict[str, Any] | None = None

    @cached_property
    def parameters(self) -> dict[str, Any]:
        """The args' JSON schema, by their wire names."""
        return self.schema if self.schema is not None else self.args.model_json_schema(by_alias=True)


@dataclass(frozen=True)
class ToolRequest:
    """A tool call the model asked for: its id (echoed with the result), the tool, the args' JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ModelTurn:
    """What the model answered in one turn: tool calls to make, or (none) its final text."""

    content: str | None
    calls: tuple[ToolRequest, ...] = ()
    tokens_in: int = 0
    tokens_out: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"content": self.content, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.calls]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelTurn:
        calls = tuple(ToolRequest(str(c["id"]), str(c["name"]), str(c["arguments"])) for c in data.get("calls") or ())
        return cls(data.get("content"), calls, int(data.get("tokens_in") or 0), int(data.get("tokens_out") or 0))


#: The conversation as the loop keeps it, whatever the wire format: ``{"role": "user", "content"}``,
#: ``{"role": "assistant", "content", "calls": [{"id", "name", "arguments"}]}`` and
#: ``{"role": "tool", "id", "name", "content"}``. Each provider speaks it in its own format.
Message = dict[str, Any]


class ToolCalling(Protocol):
    """A provider that lets the model call tools: one turn of the conversation, metered, cut to the
    deadline and breaker-guarded as its ``complete`` is."""

    name: str

    def turn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
             system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn: ...

    async def aturn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
                    system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn: ...


class Checkpoints(Protocol):
    """Where a loop's turns and calls are kept (:class:`mesh.broker.transcript.Transcript`)."""

    def load(self) -> dict[str, dict[str, Any]]: ...

    def put(self, field: str, value: dict[str, Any]) -> dict[str, Any]: ...

    def clear(self) -> None: ...

    def forget(self, fields: Sequence[str]) -> None: ...


@dataclass
class MemoryCheckpoints:
    """Checkpoints in this process (a test's context): the same first-write-wins rule."""

    fields: dict[str, dict[str, Any]] = field(default_factory=dict)

    def load(self) -> dict[str, dict[str, Any]]:
        return dict(self.fields)

    def put(self, field: str, value: dict[str, Any]) -> dict[str, Any]:
        return self.fields.setdefault(field, value)

    def clear(self) -> None:
        self.fields.clear()

    def forget(self, fields: Sequence[str]) -> None:
        for name in fields:
            self.fields.pop(name, None)


class LoopHost(Protocol):
    """What the loop needs of the step's context (:class:`~mesh.agents.context.Context`)."""

    key: str
    #: Whether effectful calls go through an effect ledger (a recorded one is met there again).
    _ledger: bool
    #: The key the tool of the call being made is given (None: the message's key).
    _call_key: str | None
    #: How many tool loops this attempt started: the second and later keep their checkpoints apart.
    _loops: int

    def deadline_left_s(self) -> float: ...

    def _loop_tools(self, tools: Sequence[Tool[Any, Any] | str] | None) -> list[ToolSpec]: ...

    def _describe(self, spec: ToolSpec) -> tuple[str, dict[str, Any] | None, bool]: ...

    def _checkpoints(self) -> Checkpoints: ...

    def _loop_event(self, kind: str, **fields: Any) -> None: ...

    def _approve(self, spec: ToolSpec, args: BaseModel) -> None: ...


@dataclass(frozen=True)
class Ask:
    """The loop needs the model's turn ``turn``."""

    turn: int


@dataclass(frozen=True)
class Call:
    """The loop needs tool call ``n`` of turn ``turn`` made through ``ctx.call``; ``recorded``: it was
    made by an earlier attempt (an effectful one is met again in the ledger), this is its result."""

    turn: int
    n: int
    request: ToolRequest
    spec: ToolSpec
    args: BaseModel
    recorded: str | None = None
    #: The loop's own part of the labels ("" for a step's first loop, ``run-2/`` for its second).
    run: str = ""

    @property
    def label(self) -> str:
        return f"{self.run}turn-{self.turn}/call-{self.n}"


class Loop:
    """One ``ctx.model.run``: the conversation, its checkpoints, what it needs next (see the module).
    Both drivers (:func:`run`, :func:`arun`) move it: :meth:`next`, then :meth:`answered` or :meth:`called`."""

    def __init__(self, host: LoopHost, prompt: str, specs: list[ToolSpec], output: type[BaseModel],
                 max_turns: int, *, mistakes: int = MISTAKES, repairs: int = REPAIRS) -> None:
        if max_turns < 1:
            raise ConfigError(f"max_turns must be at least 1, not {max_turns}")
        self.host, self.output, self.max_turns = host, output, max_turns
        # A step may run several loops, each its own conversation: the first keeps the plain labels
        # (turn-3/call-1), a later one its own (run-2/turn-3/call-1), so none replays another's turns
        # or gives its calls another's keys. The same handler numbers its loops the same on a re-run.
        host._loops += 1
        self.run = "" if host._loops == 1 else f"run-{host._loops}/"
        wire = wire_names([s.name for s in specs])
        self.specs = {wire[s.name]: s for s in specs}
        self.declared = {s.name: s for s in specs}
        described = {s.name: host._describe(s) for s in specs}
        self.defs = [ToolDef(wire[s.name], described[s.name][0], s.args, described[s.name][1]) for s in specs]
        #: The tools whose calls wait for a person's approval (``destructive=True``, an MCP destructiveHint).
        self.destructive = {name for name, (_, _, destructive) in described.items() if destructive}
        self.messages: list[Message] = [{"role": "user", "content": prompt}]
        self.checkpoints = host._checkpoints()
        self.recorded = self.checkpoints.load()
        self.prompt = hashlib.sha256(prompt.encode()).hexdigest()
        self._started_over()
        self.turn = 0
        self.pending: deque[tuple[int, ToolRequest]] = deque()
        self.mistakes, self.mistakes_allowed = 0, mistakes
        self.repairs, self.repairs_allowed = 0, repairs
        self.answer: Any = None
        self.done = False

    def next(self) -> Ask | Call | None:
        """What the loop needs next; None once it has its answer (:attr:`answer`)."""
        while not self.done:
            if self.pending:
                n, request = self.pending.popleft()
                need = self._call(n, request)
                if need is not None:
                    return need
                continue
            self.turn += 1
            if self.turn > self.max_turns:
                raise InvalidOutput(f"the model used its {self.max_turns} turn(s) (max_turns) without a final "
                                    f"answer; last tools asked: {self._last_asked()}", max_turns=self.max_turns)
            recorded = self.recorded.get(f"{self.run}turn-{self.turn}")
            if recorded is not None:
                self._take(ModelTurn.from_json(recorded))
                continue
            if self.host.deadline_left_s() <= 0:
                raise DeadlineExceeded(f"the step's deadline passed before turn {self.turn} of its tool loop")
            return Ask(self.turn)
        return None

    def answered(self, turn: ModelTurn) -> None:
        """The model answered turn :attr:`turn`: checkpoint it (a turn already there wins), then take it."""
        label = f"{self.run}turn-{self.turn}"
        value = {"key": f"{self.host.key}/{label}", **turn.to_json()}
        if self.turn == 1:  # what the conversation answers: a re-run with another prompt starts it over
            value["prompt"] = self.prompt
        self._take(ModelTurn.from_json(self.checkpoints.put(label, value)))

    def called(self, need: Call, result: Any) -> None:
        """Call ``need`` returned ``result``: checkpoint what the model is given, and give it."""
        content = need.recorded if need.recorded is not None else _text(result)
        if need.recorded is None:
            value = {"key": f"{self.host.key}/{need.label}", "tool": need.spec.name, "content": content}
            content = str(self.checkpoints.put(need.label, value)["content"])
        self._reply(need.request, content)

    def _started_over(self) -> None:
        """This loop's checkpoints answer another prompt (the handler changed between attempts, or its
        prompt is not the same on a re-run): forget them and start the conversation over, as a retry
        after InvalidOutput does; its effectful calls are still met in the ledger, which refuses one
        that differs from the call made at its place (EffectUnknown)."""
        first = self.recorded.get(f"{self.run}turn-1")
        if first is None or first.get("prompt", self.prompt) == self.prompt:
            return
        mine = self._mine(self.recorded)
        self.checkpoints.forget(mine)
        self.recorded = {f: v for f, v in self.recorded.items() if f not in mine}
        self.host._loop_event("loop_restarted", run=self.run.rstrip("/") or "run-1", forgotten=len(mine),
                              reason="its checkpoints answer another prompt")

    def failed(self) -> None:
        """The loop ended InvalidOutput: a retry of the step starts its conversation over (the step's
        other loops keep theirs: a retry replays them as they were)."""
        self.checkpoints.forget(self._mine(self.checkpoints.load()))

    def _mine(self, fields: Iterable[str]) -> list[str]:
        """Which of ``fields`` are this loop's checkpoints."""
        return [f for f in fields if (f.startswith(self.run) if self.run else not f.startswith("run-"))]

    def _take(self, turn: ModelTurn) -> None:
        self.messages.append({"role": "assistant", "content": turn.content,
                              "calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in turn.calls]})
        if turn.calls:
            self.pending.extend(enumerate(turn.calls, 1))
            return
        answer, problem = _parsed(turn.content or "", self.output)
        if answer is not None:
            self.answer, self.done = answer, True
            return
        if self.repairs >= self.repairs_allowed:
            raise InvalidOutput(f"invalid {self.output.__name__} answer from the tool loop after {self.repairs} "
                                f"repair(s): {problem}", repairs=self.repairs)
        self.repairs += 1
        self.messages.append({"role": "user", "content": f"Your answer is invalid: {problem}\n"
                                                         "Reply again with the corrected JSON object only."})

    def _call(self, n: int, request: ToolRequest) -> Call | None:
        """Call ``n`` of this turn as ``ctx.call`` makes it; None when answered here (an invented call
        answered as an error, a recorded call of a tool without effect replayed)."""
        spec = self.specs.get(request.name) or self.declared.get(request.name)
        if spec is None:
            self._invented(n, request, f"there is no tool {request.name!r}; the tools are {sorted(self.specs)}")
            return None
        try:
            args = spec.args.model_validate(json.loads(request.arguments or "{}"))
        except (ValueError, RecursionError) as exc:  # not JSON (or nested past the parser), or a ValidationError
            problem = _problem(exc) if isinstance(exc, ValidationError) else f"not JSON: {exc}"
            self._invented(n, request, f"invalid arguments for {spec.name}: {problem}")
            return None
        need = Call(self.turn, n, request, spec, args, run=self.run)
        recorded = self.recorded.get(need.label)
        if recorded is None:
            if spec.name in self.destructive:  # CallNeedsApproval until a person approved exactly this call
                self.host._approve(spec, args)
            return need
        self.host._loop_event("tool_replayed", call=need.label, tool=spec.name, effect=spec.effect)
        if spec.effect and self.host._ledger:  # met again in the ledger: it answers from its record, not made
            return Call(self.turn, n, request, spec, args, recorded=str(recorded["content"]), run=self.run)
        self._reply(request, str(recorded["content"]))
        return None

    def _invented(self, n: int, request: ToolRequest, problem: str) -> None:
        self.mistakes += 1
        self.host._loop_event("tool_refused", call=f"{self.run}turn-{self.turn}/call-{n}",
                              tool=request.name, reason=problem)
        if self.mistakes > self.mistakes_allowed:
            raise InvalidOutput(f"the model kept asking for calls it cannot make ({self.mistakes} in this loop); "
                                f"the last: {problem}", tool=request.name)
        self._reply(request, f"error: {problem}")

    def _reply(self, request: ToolRequest, content: str) -> None:
        self.messages.append({"role": "tool", "id": request.id, "name": request.name, "content": content})

    def _last_asked(self) -> list[str]:
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), None)
        return [c["name"] for c in last["calls"]] if last else []


def wire_names(names: Sequence[str]) -> dict[str, str]:
    """Each tool's name as the model is shown it, by declared name: letters, digits, ``_`` and ``-``,
    at most 64 characters, as the OpenAI and Anthropic APIs require (an MCP tool's ``github.search``
    is ``github_search``); a name another tool took already gets a ``-2`` (``-3``, ...) suffix."""
    wire: dict[str, str] = {}
    for name in names:
        base = WIRE_NAME.sub("_", name)[:64]
        candidate, n = base, 1
        while candidate in wire.values():
            n += 1
            candidate = f"{base[:60]}-{n}"
        wire[name] = candidate
    return wire


def tool_calling(provider: Any) -> ToolCalling:
    """``provider`` if it lets the model call tools, else ConfigError naming it."""
    if not callable(getattr(provider, "turn", None)):
        raise ConfigError(f"model provider {getattr(provider, 'name', provider)!r} does not let the model call "
                          "tools (ctx.model.run): it needs turn and aturn (mesh.agents.tool_loop.ToolCalling)")
    return provider


def run(host: LoopHost, provider: Any, call: Callable[[ToolSpec, BaseModel], Any], prompt: str, *,
        tools: Sequence[Tool[Any, Any] | str] | None, output: type[M], max_turns: int, system: str | None,
        model: str | None) -> M:
    """Drive a :class:`Loop` to its answer: model turns from ``provider``, tool calls through ``call``."""
    asking = tool_calling(provider)
    loop = Loop(host, prompt, host._loop_tools(tools), output, max_turns)
    try:
        while (need := loop.next()) is not None:
            if isinstance(need, Ask):
                loop.answered(asking.turn(loop.messages, loop.defs, output, system=system, model=model,
                                          turn=need.turn))
            else:
                host._call_key = f"{host.key}/{need.label}"
                try:
                    loop.called(need, call(need.spec, need.args))
                finally:
                    host._call_key = None
    except InvalidOutput:
        loop.failed()
        raise
    return loop.answer


async def arun(host: LoopHost, provider: Any, call: Callable[[ToolSpec, BaseModel], Any], prompt: str, *,
               tools: Sequence[Tool[Any, Any] | str] | None, output: type[M], max_turns: int,
               system: str | None, model: str | None) -> M:
    """:func:`run` awaited: the provider's ``aturn``, ``call`` an awaitable (``AsyncContext.call``)."""
    from .event_loop import in_thread

    asking = tool_calling(provider)
    # In a thread of its own: an MCP tool's server is asked for its definition (a session opened, a
    # process started) and the checkpoints are read, neither on the handler's loop.
    loop = await in_thread(lambda: Loop(host, prompt, host._loop_tools(tools), output, max_turns))
    try:
        while (need := loop.next()) is not None:
            if isinstance(need, Ask):
                loop.answered(await asking.aturn(loop.messages, loop.defs, output, system=system, model=model,
                                                 turn=need.turn))
            else:
                host._call_key = f"{host.key}/{need.label}"
                try:
                    loop.called(need, await call(need.spec, need.args))
                finally:
                    host._call_key = None
    except InvalidOutput:
        loop.failed()
        raise
    return loop.answer


def offered(declared: Sequence[str], tools: Sequence[Tool[Any, Any] | str] | None, agent: str) -> list[str]:
    """The names of the tools offered to the model: ``tools`` (each declared by ``agent``, else
    ToolRefused), or every tool ``agent`` declared."""
    names = list(declared) if tools is None else [t if isinstance(t, str) else t.name for t in tools]
    stray = [n for n in names if n not in declared]
    if stray:
        raise ToolRefused(f"agent {agent!r} did not declare tool(s) {stray} offered to the model; it declared "
                          f"{list(declared) or 'none'}", tool=stray[0])
    return names


def answer_prompt(system: str | None, output: type[BaseModel]) -> str:
    """The system prompt of a tool loop: the caller's, then how to answer (``output``'s JSON schema)."""
    schema = json.dumps(output.model_json_schema(), separators=(",", ":"))
    lead = f"{system}\n" if system else ""
    return (f"{lead}Call the tools you need. When you have the answer, reply with one JSON object and nothing "
            f"else; it must match this JSON schema:\n{schema}")


def _text(result: Any) -> str:
    """A tool's result as the model reads it: its JSON (secrets masked), cut to RESULT_LIMIT."""
    value = as_json(result)
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if len(text) > RESULT_LIMIT:
        text = text[:RESULT_LIMIT] + f"... [cut: {len(text)} characters]"
    return text


def _parsed(content: str, output: type[M]) -> tuple[M | None, str]:
    try:
        data = json.loads(content)
    except (ValueError, RecursionError) as exc:
        return None, f"not JSON: {exc}"
    try:
        return output.model_validate(data), ""
    except ValidationError as exc:
        return None, _problem(exc)


def _problem(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors)
