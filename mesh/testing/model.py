"""``TestModel``: a model provider whose answers the test writes, that records every prompt and
counts tokens, and fails on demand with the mesh's failure classes.

    model = TestModel({Route: [{"queue": "billing", "confidence": 0.9}]})   # answers per output model
    model = TestModel([Route(queue="billing", confidence=0.9), Summary(summary="...")])  # in order
    model = TestModel(lambda p: Summary(summary=p.prompt[:40]))              # a function of the prompt
    model = TestModel(fail=["rate_limited", Brownout("down", dependency="model")])  # the next calls fail
    model = TestModel({Answer: [calls(("lookup", {"id": "A1"})), {"text": "..."}]})  # a tool loop's turns

An output model nothing scripts gets the local provider's synthetic answer (valid, deterministic).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from pydantic import BaseModel, ValidationError

from mesh.agents import tool_loop
from mesh.agents.providers.local import LocalProvider
from mesh.agents.providers.meter import Meter
from mesh.agents.providers.synthetic import synthesize
from mesh.agents.tool_loop import Message, ModelTurn, ToolDef, ToolRequest
from mesh.contracts import (
    Brownout,
    BudgetExceeded,
    ConfigError,
    DependencyTimeout,
    FailureClass,
    Findings,
    InvalidOutput,
    MeshError,
    PermanentFailure,
    Plan,
    RateLimited,
)

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Prompt:
    """One ``complete`` the model was asked: what a test asserts on."""

    prompt: str
    system: str | None
    output: type[BaseModel]
    model: str | None


Answer = Union[BaseModel, Mapping[str, Any], ModelTurn]  # noqa: UP007  (a runtime alias: the | of a Mapping alias fails)
#: What a TestModel answers with: per output model a list (taken in order), one list for every call
#: in order, or a function of the :class:`Prompt`.
Script = Union[Mapping[type[BaseModel], Sequence[Answer]], Sequence[Answer], Callable[[Prompt], Answer]]  # noqa: UP007
#: A failure to raise: an exception, or a failure class (``"rate_limited"``, ``"timeout"``, ``"brownout"``).
Failure = Union[BaseException, FailureClass, str]  # noqa: UP007


class ScriptExhausted(AssertionError):
    """The model was asked more times than the test scripted answers for: the handler called it
    more often than the test expected."""


class TestModel:
    """A :class:`~mesh.agents.providers.base.ModelProvider` for tests. ``outputs``: the scripted
    answers (see the module); ``fail``: failures the next calls raise, in order, before any answer;
    ``token_budget``: tokens the model may spend before it raises ``BudgetExceeded`` (as a job's
    budget does). Tokens are counted as words, as the local provider does: the prompt's and the
    system prompt's in, the answer's JSON out. Thread-safe: a worker's threads may share it."""

    __test__ = False  # not a pytest test class

    def __init__(self, outputs: Script | None = None, *, fail: Iterable[Failure] = (),
                 token_budget: int | None = None, name: str = "test") -> None:
        self.name = name
        self.outputs = outputs
        self.token_budget = token_budget
        #: Every ``complete`` asked, in order (also those that failed).
        self.prompts: list[Prompt] = []
        self.tokens_in = 0
        self.tokens_out = 0
        #: Counts tokens against the running job's budget when a worker uses the model (``TestMesh``).
        self.meter = Meter()
        self._fail: deque[BaseException] = deque(failure(f, name) for f in fail)
        self._taken: dict[Any, int] = {}
        self._lock = threading.Lock()
        self._local = LocalProvider()
        #: The TestContext this model was last given to: whose ``call`` its :meth:`run` uses.
        self.context: Any = None

    @property
    def tokens(self) -> int:
        """Tokens spent so far, in and out."""
        return self.tokens_in + self.tokens_out

    def fail_next(self, *failures: Failure) -> None:
        """The next calls raise ``failures``, in order (after those already queued)."""
        with self._lock:
            self._fail.extend(failure(f, self.name) for f in failures)

    async def acomplete(self, prompt: str, output: type[M], *, system: str | None = None,
                        model: str | None = None) -> M:
        """:meth:`complete` for an ``async def`` handler (``await ctx.model.complete(...)``)."""
        return self.complete(prompt, output, system=system, model=model)

    def complete(self, prompt: str, output: type[M], *, system: str | None = None, model: str | None = None) -> M:
        """The next scripted answer for ``output`` (validated: InvalidOutput when it does not fit)."""
        asked = Prompt(prompt, system, output, model)
        with self.meter.call(model or self.name) as call:
            self.meter.admit()
            with self._lock:
                self.prompts.append(asked)
                if self.token_budget is not None and self.tokens >= self.token_budget:
                    raise BudgetExceeded(f"the test model spent {self.tokens} of its {self.token_budget} tokens",
                                         used=self.tokens, budget=self.token_budget)
                if self._fail:
                    raise self._fail.popleft()
                raw = self._next(asked)
            answer = _validated(output, raw)
            spent_in = len(prompt.split()) + len((system or "").split())
            spent_out = len(json.dumps(answer.model_dump(mode="json")).split())
            with self._lock:
                self.tokens_in += spent_in
                self.tokens_out += spent_out
                used = self.tokens
            self.meter.charge(call, spent_in, spent_out)
            if self.token_budget is not None and used > self.token_budget:
                raise BudgetExceeded(f"the test model spent {used} of its {self.token_budget} tokens: "
                                     "its answer is not used", used=used, budget=self.token_budget)
            return answer

    def turn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
             system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn:
        """One turn of a tool loop (``ctx.model.run``): the next scripted answer for ``output``, which
        is either tool calls (:func:`~mesh.testing.calls`) or the final answer. Its prompt is the
        turn's last message (the user's prompt, or the last tool result)."""
        asked = Prompt(str(messages[-1].get("content") or "") if messages else "", system, output, model)
        with self.meter.call(model or self.name) as metered:
            metered.turn = turn
            self.meter.admit()
            with self._lock:
                self.prompts.append(asked)
                if self._fail:
                    raise self._fail.popleft()
                raw = self._next(asked)
            if isinstance(raw, ModelTurn):
                answer, text = raw, " ".join(c.arguments for c in raw.calls)
                metered.tools = [c.name for c in raw.calls]
            else:
                text = json.dumps(_validated(output, raw).model_dump(mode="json"))
                answer = ModelTurn(text)
            spent_in = sum(len(str(m.get("content") or "").split()) for m in messages) + len((system or "").split())
            with self._lock:
                self.tokens_in += spent_in
                self.tokens_out += len(text.split())
            self.meter.charge(metered, spent_in, len(text.split()))
            return answer

    async def aturn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
                    system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn:
        """:meth:`turn`, awaitable."""
        return self.turn(messages, tools, output, system=system, model=model, turn=turn)

    def run(self, prompt: str, *, output: type[M], tools: Sequence[Any] | None = None, max_turns: int = 10,
            system: str | None = None, model: str | None = None) -> M:
        """``ctx.model.run`` of the :class:`~mesh.testing.TestContext` made with this model: the tool
        loop, its turns scripted, its calls through that context's ``call``."""
        context = self.context
        if context is None:
            raise ConfigError("TestModel.run is ctx.model.run of a TestContext: give the model to one "
                              "(TestContext(app, agent, model=model))")
        return tool_loop.run(context, self, lambda spec, args: context.call(spec.name, args), prompt, tools=tools,
                             output=output, max_turns=max_turns, system=system, model=model)

    def plan(self, goal: str, *, timeout_s: float | None = None) -> Plan:
        """A scripted ``Plan`` when the script has one, else the local provider's plan."""
        return self.complete(goal, Plan) if self._scripts(Plan) else self._local.plan(goal)

    def research(self, question: str, *, timeout_s: float | None = None) -> Findings:
        """Scripted ``Findings`` when the script has them, else the local provider's."""
        return self.complete(question, Findings) if self._scripts(Findings) else self._local.research(question)

    def _scripts(self, output: type[BaseModel]) -> bool:
        return (isinstance(self.outputs, Mapping) and output in self.outputs) or callable(self.outputs) or (
            isinstance(self.outputs, Sequence) and bool(self.outputs))

    def _next(self, asked: Prompt) -> Any:
        script = self.outputs
        if script is None:
            return synthesize(asked.output, asked.prompt)
        if callable(script) and not isinstance(script, Mapping | Sequence):
            return script(asked)
        if isinstance(script, Mapping):
            if asked.output not in script:
                return synthesize(asked.output, asked.prompt)
            answers, slot = script[asked.output], asked.output
        else:
            answers, slot = script, None
        n = self._taken.get(slot, 0)
        if n >= len(answers):
            what = f"{asked.output.__name__} answers" if slot is not None else "answers"
            raise ScriptExhausted(f"the test model was asked for answer {n + 1} and has {len(answers)} {what} "
                                  f"(prompt: {asked.prompt[:80]!r})")
        self._taken[slot] = n + 1
        return answers[n]


def calls(*asked: tuple[str, Mapping[str, Any] | str]) -> ModelTurn:
    """A scripted tool-loop turn asking for tool calls, each ``(tool, args)`` (a str is the args' JSON
    text as a model sent it, broken or not): ``TestModel({Answer: [calls(("lookup", {...})), {...}]})``."""
    made = tuple(ToolRequest(f"test-call-{n}", name, args if isinstance(args, str) else json.dumps(dict(args)))
                 for n, (name, args) in enumerate(asked, 1))
    return ModelTurn(None, made)


def failure(given: Failure, dependency: str = "model") -> BaseException:
    """The exception a failure stands for: itself, or the mesh's class for a failure class name."""
    if isinstance(given, BaseException):
        return given
    kind = FailureClass(given)
    if kind is FailureClass.RATE_LIMITED:
        return RateLimited(f"{dependency} is rate limited", retry_after_s=0.05, dependency=dependency)
    if kind is FailureClass.TIMEOUT:
        return DependencyTimeout(f"{dependency} did not answer in time", dependency=dependency)
    if kind is FailureClass.BROWNOUT:
        return Brownout(f"{dependency} is unavailable", dependency=dependency)
    if kind is FailureClass.INVALID_OUTPUT:
        return InvalidOutput(f"{dependency} answered no valid output")
    if kind is FailureClass.PERMANENT:
        return PermanentFailure(f"{dependency} refused the request")
    return MeshError(f"{dependency} failed ({kind})")


def _validated(output: type[M], raw: Any) -> M:
    if isinstance(raw, output):
        return raw
    try:
        data = raw.model_dump(mode="json") if isinstance(raw, BaseModel) else raw
        return output.model_validate(data)
    except ValidationError as exc:
        raise InvalidOutput(f"the scripted answer is not a valid {output.__name__}: {exc.error_count()} error(s)",
                            agent=output.__name__) from None
