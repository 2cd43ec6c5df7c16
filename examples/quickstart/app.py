"""The README's app: two agents, a tool, and a pipeline that chains them."""

from __future__ import annotations

from pydantic import BaseModel

from mesh import App, Context, Pipeline, ToolContext

app = App("quickstart")


class Topic(BaseModel):
    topic: str


class Draft(BaseModel):
    text: str


class Review(BaseModel):
    text: str
    words: int


@app.tool(effect=False)                                 # a tool: typed args, traced, breaker-guarded
def count_words(ctx: ToolContext, args: Draft) -> int:
    return len(args.text.split())


@app.agent                                              # an agent: (ctx, input model) -> output model
def writer(ctx: Context, topic: Topic) -> Draft:
    return Draft(text=f"Three facts about {topic.topic}.")


@app.agent(tools=[count_words])                         # tools, steps and sends take the declared objects
def editor(ctx: Context, draft: Draft) -> Review:
    return Review(text=draft.text, words=ctx.call(count_words, draft))  # typed: count_words returns an int


app.pipeline(Pipeline("article").step(writer).step(editor, depends_on=[writer]))
