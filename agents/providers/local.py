"""The offline, deterministic provider: a rule-based planner, a keyword researcher over a local corpus,
and ``complete`` answering with a synthetic but valid instance of the output model (a stand-in for
tests and demos, see :mod:`.synthetic`)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from mesh.contracts import ActionStep, Finding, Findings, Plan, ResearchStep

from ..tool_loop import Message, ModelTurn, ToolDef, ToolRequest
from .meter import Meter
from .synthetic import synthesize, synthesize_json

M = TypeVar("M", bound=BaseModel)

ACTION_VERBS = frozenset(
    {"file", "create", "write", "record", "note", "save", "post", "send", "notify", "open", "log", "publish"}
)
QUESTION_WORDS = frozenset({"how", "what", "why", "which", "when", "where", "who", "whether"})
_CLAUSES = re.compile(
    r"[.;!?]+(?=\s|$)|\n+|,?\s+and then\s+|,?\s+then\s+|,\s+and\s+"
    r"|\s+and\s+(?=(?:" + "|".join(sorted(ACTION_VERBS | QUESTION_WORDS)) + r")\b)",
    re.IGNORECASE,
)
_URL = re.compile(r"https?://[^\s,;]+")
_WORD = re.compile(r"[a-z][a-z0-9_-]+")
STOPWORDS = frozenset(
    (
        "the a an and or of to in on for with what how why when which is are be it its this that "
        "does do about from into by as at can will should would then there their them they we our "
        "you your find out tell explain describe work works "
    ).split()
)


def stem(word: str) -> str:
    """Just enough stemming that 'failures', 'failure' and 'failed' meet."""
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)] + repl
    return word


def tokens(text: str) -> list[str]:
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 2]


@dataclass(frozen=True)
class Section:
    source: str
    title: str
    text: str


class LocalProvider:
    """Deterministic: the same goal always yields the same plan, the same question the same findings."""

    name = "local"

    def __init__(self, corpus: Path | None = None, *, meter: Meter | None = None) -> None:
        self.corpus = corpus
        self._meter = meter or Meter()

    def complete(self, prompt: str, output: type[M], *, system: str | None = None, model: str | None = None) -> M:
        """A valid ``output`` built from its schema and the prompt's words, the same for the same prompt
        (a stand-in, not a model). Tokens are counted as words: the prompt's and the system prompt's in,
        the answer's JSON out; they count against the job's budget like a real model's."""
        with self._meter.call(model or self.name) as call:
            self._meter.admit()
            answer = synthesize(output, prompt)
            spent_in = len(prompt.split()) + len((system or "").split())
            self._meter.charge(call, spent_in, len(json.dumps(answer.model_dump(mode="json")).split()))
            return answer

    async def acomplete(self, prompt: str, output: type[M], *, system: str | None = None,
                        model: str | None = None) -> M:
        """:meth:`complete`, awaitable (it does no I/O but its metering: nothing to wait for)."""
        return self.complete(prompt, output, system=system, model=model)

    def turn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
             system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn:
        """One turn of a tool loop, deterministic: the first asks for one call of each offered tool
        (args synthesized from its schema and the prompt), the next answers ``output`` synthesized
        from the prompt. Tokens are counted as words, as :meth:`complete` counts them."""
        with self._meter.call(model or self.name) as call:
            call.turn = turn
            self._meter.admit()
            prompt = str(messages[0].get("content") or "") if messages else ""
            called = any(m["role"] == "tool" for m in messages)
            spent_in = sum(len(str(m.get("content") or "").split()) for m in messages) + len((system or "").split())
            if tools and not called:
                calls = tuple(ToolRequest(f"local-{turn}-{n}", t.name, json.dumps(_args(t, prompt)))
                              for n, t in enumerate(tools, 1))
                call.tools = [c.name for c in calls]
                spent_out = sum(len(c.arguments.split()) for c in calls)
                self._meter.charge(call, spent_in, spent_out)
                return ModelTurn(None, calls, spent_in, spent_out)
            content = json.dumps(synthesize(output, prompt).model_dump(mode="json"))
            self._meter.charge(call, spent_in, len(content.split()))
            return ModelTurn(content, (), spent_in, len(content.split()))

    async def aturn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
                    system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn:
        """:meth:`turn`, awaitable."""
        return self.turn(messages, tools, output, system=system, model=model, turn=turn)

    def plan(self, goal: str, *, timeout_s: float | None = None) -> Plan:
        research: list[ResearchStep] = []
        actions: list[ActionStep] = []
        for clause in (c.strip(" ,") for c in _CLAUSES.split(goal)):
            if not clause:
                continue
            first = clause.split()[0].lower()
            if first in ACTION_VERBS:
                actions.append(self._action(f"a{len(actions) + 1}", clause))
            else:
                research.append(ResearchStep(step_id=f"r{len(research) + 1}", question=clause))
        if not research:
            research.append(ResearchStep(step_id="r1", question=goal.strip()))
        if not actions:
            actions.append(ActionStep(step_id="a1", tool="note", args={"title": goal.strip()[:200]},
                                      use_findings=True))
        return Plan(goal=goal, steps=(*research, *actions))

    @staticmethod
    def _action(step_id: str, clause: str) -> ActionStep:
        url = _URL.search(clause)
        if url:
            return ActionStep(step_id=step_id, tool="http_post", args={"url": url.group(0), "json": {"text": clause}},
                              use_findings=True)
        return ActionStep(step_id=step_id, tool="note", args={"title": clause[:200]}, use_findings=True)

    def research(self, question: str, *, timeout_s: float | None = None) -> Findings:
        terms = Counter(tokens(question))
        scored = []
        for section in self.sections:
            counts = Counter(tokens(section.title + " " + section.text))
            score = sum(counts[t] * self.idf.get(t, 0.0) * (1 + math.log(n)) for t, n in terms.items())
            if score > 0:
                scored.append((score, section.source, section))
        scored.sort(key=lambda s: (-s[0], s[1]))
        found = tuple(Finding(text=_excerpt(s.text, terms), source=s.source) for _, _, s in scored[:3])
        if not found:
            return Findings(question=question, summary=f"Nothing in the local corpus answers: {question}")
        cited = ", ".join(f.source for f in found)
        return Findings(question=question, summary=f"{len(found)} passages answer '{question}' ({cited}).",
                        findings=found)

    @cached_property
    def sections(self) -> list[Section]:
        out: list[Section] = []
        for name, text in sorted(self._documents()):
            title, body = "", list[str]()
            for line in [*text.splitlines(), "## "]:
                if line.startswith("## "):
                    if title and "".join(body).strip():
                        out.append(Section(f"corpus/{name}#{_slug(title)}", title, " ".join(body).strip()))
                    title, body = line[3:].strip(), []
                elif not line.startswith("# "):
                    body.append(line.strip())
        return out

    @cached_property
    def idf(self) -> dict[str, float]:
        df: Counter[str] = Counter()
        for section in self.sections:
            df.update(set(tokens(section.title + " " + section.text)))
        n = len(self.sections)
        return {t: math.log(1 + n / c) for t, c in df.items()}

    def _documents(self) -> list[tuple[str, str]]:
        if self.corpus is not None:
            return [(p.name, p.read_text()) for p in self.corpus.glob("*.md")]
        root = resources.files("mesh.agents").joinpath("corpus")
        return [(p.name, p.read_text()) for p in root.iterdir() if p.name.endswith(".md")]


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _excerpt(text: str, terms: Counter[str], limit: int = 320) -> str:
    """The sentence that mentions most of the question's terms, with what follows it up to ``limit``."""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    best = max(range(len(sentences)), key=lambda i: (sum(t in sentences[i].lower() for t in terms), -i))
    excerpt = " ".join(sentences[best:])
    return excerpt if len(excerpt) <= limit else excerpt[: limit - 1].rsplit(" ", 1)[0] + "…"


def _args(tool: ToolDef, prompt: str) -> object:
    """Args for a call of ``tool``: made from its args model, or from the schema its source presented
    (an MCP tool's ``inputSchema``)."""
    if tool.schema is not None:
        return synthesize_json(tool.schema, prompt)
    return synthesize(tool.args, prompt).model_dump(mode="json", by_alias=True)
