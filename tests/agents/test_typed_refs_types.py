"""A type checker sees the declared agents' and tools' types at the call site: mypy (the project's
settings) passes the typed forms with the types asserted below, and flags each misuse marked
``# error: CODE`` on its line (a wrong model sent, a wrong tool args, reading the wrong output)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DECLARED = '''
from typing import Any, assert_type

from pydantic import BaseModel

from mesh import Agent, App, AsyncContext, Context, JobRecord, JobRef, MeshClient, Pipeline, Tool, ToolContext

app = App("typed")


class Incoming(BaseModel):
    text: str


class Classified(BaseModel):
    label: str


class Hook(BaseModel):
    url: str


class Receipt(BaseModel):
    status: int


class Other(BaseModel):
    n: int


@app.tool(effect=False)
def post_hook(ctx: ToolContext, args: Hook) -> Receipt:
    return Receipt(status=200)


@app.agent(version=2, tools=[post_hook])
def classify(ctx: Context, msg: Incoming) -> Classified:
    receipt = ctx.call(post_hook, Hook(url="https://example.com"))
    assert_type(receipt, Receipt)
    assert_type(ctx.call(post_hook, {"url": "https://example.com"}), Receipt)
    assert_type(ctx.call("post_hook", {"url": "https://example.com"}), Any)  # by name: as before
    return Classified(label=msg.text)


@app.agent
def notify(ctx: Context, c: Classified) -> Receipt:
    return Receipt(status=1)


@app.tool(effect=False)
async def apost(ctx: ToolContext, args: Hook) -> Receipt:
    return Receipt(status=202)


@app.agent(tools=[post_hook, apost])
async def anotify(ctx: AsyncContext, c: Classified) -> Receipt:
    assert_type(await ctx.call(post_hook, Hook(url="https://example.com")), Receipt)
    assert_type(await ctx.call(apost, Hook(url="https://example.com")), Receipt)  # an async tool: its result
    assert_type(await ctx.call("apost", {"url": "https://example.com"}), Any)
    return Receipt(status=1)


@app.agent(tools=[apost])
def snotify(ctx: Context, c: Classified) -> Receipt:
    return ctx.call(apost, Hook(url="https://example.com"))  # a sync handler gets an async tool's result


@app.agent(name="loose", output=Classified)  # a handler returning a dict: declared, typed Any
def loose(ctx: Context, msg: Incoming) -> dict[str, Any]:
    return {"label": msg.text}


@app.agent(input=Incoming, output=Classified)
def untyped(ctx, msg):  # unannotated: typed Any
    return msg
'''

GOOD = DECLARED + '''

def use(client: MeshClient, record: JobRecord) -> None:
    assert_type(classify, Agent[Incoming, Classified])
    assert_type(post_hook, Tool[Hook, Receipt])
    assert_type(notify, Agent[Classified, Receipt])
    assert_type(loose, Agent[Any, Any])
    assert_type(untyped, Agent[Any, Any])
    assert_type(client.send(loose, {"text": "x"}), JobRef[Any])
    assert_type(classify(Context.__new__(Context), Incoming(text="x")), Classified)  # still the function
    ref = client.send(classify, Incoming(text="x"))
    assert_type(ref, JobRef[Classified])
    assert_type(ref.result(timeout_s=5), Classified)
    assert_type(client.send(classify, {"text": "x"}), JobRef[Classified])
    assert_type(client.send("classify", Incoming(text="x")), JobRef[Any])
    assert_type(client.send_many(classify, [(Incoming(text="x"), None)]), list[JobRef[Classified]])
    assert_type(client.run("pipe", Incoming(text="x")).result(), JobRecord)
    assert_type(record.output(classify), Classified)
    assert_type(record.output("notify", Receipt), Receipt)
    assert_type(record.output(classify, Other), Other)
    assert_type(record.output("notify"), dict[str, Any])
    Pipeline("p").step(classify).step(notify, depends_on=[classify]).build()


async def use_async(client: MeshClient, ctx: AsyncContext, record: JobRecord) -> None:
    assert_type(anotify, Agent[Classified, Receipt])  # an async agent is typed by its models as well
    assert_type(client.send(anotify, Classified(label="x")).result(), Receipt)
    assert_type(record.output(anotify), Receipt)
    assert_type(await anotify(ctx, Classified(label="x")), Receipt)  # awaited, with an AsyncContext
    Pipeline("q").step(classify).step(anotify, depends_on=[classify]).build()
'''

BAD = DECLARED + '''

def misuse(client: MeshClient, ctx: Context, record: JobRecord) -> None:
    client.send(classify, Other(n=1))  # error: misc
    client.send(classify, Classified(label="x"))  # error: misc
    ctx.call(post_hook, Incoming(text="x"))  # error: misc
    label: str = client.send(notify, Classified(label="x")).result().label  # error: attr-defined
    count: int = record.output(classify).label  # error: assignment
    classify(ctx, Other(n=1))  # error: call-overload
    client.send(anotify, Incoming(text="x"))  # error: misc
'''


def _mypy(tmp_path: Path, source: str) -> list[str]:
    (tmp_path / "typed_usage.py").write_text(source, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(ROOT / ".mypy_cache" / "typed-refs"), "--no-error-summary",
                           "--show-error-codes", str(tmp_path / "typed_usage.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert not done.stderr, done.stderr
    return done.stdout.splitlines()


def test_the_typed_forms_type_check_with_the_types_a_reader_expects(tmp_path: Path) -> None:
    errors = _mypy(tmp_path, GOOD)
    assert errors == [], "\n".join(errors)


def test_a_misuse_is_a_type_error_on_its_line(tmp_path: Path) -> None:
    lines = BAD.split("\n")
    expected = {(n, m.group(1)) for n, line in enumerate(lines, 1) if (m := re.search(r"# error: ([\w-]+)$", line))}
    said = _mypy(tmp_path, BAD)
    found = {(int(m.group(1)), m.group(2)) for line in said
             if (m := re.match(r"^.*?typed_usage\.py:(\d+): error: .*\[([\w-]+)\]$", line))}
    assert len(expected) == 7
    # Each misuse is flagged on its line with its code (a wrong tool args may add a second message,
    # for the overload of async tools), and nothing else is.
    assert expected <= found, "\n".join(said)
    assert {n for n, _ in found} == {n for n, _ in expected}, "\n".join(said)
    # The model mismatch is named: mypy cannot find one input model the agent and the payload agree on.
    assert 'Cannot infer value of type parameter "In" of "send"' in said[0]
