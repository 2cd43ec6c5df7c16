"""An agent's declaration refused, saying why: a name with ``-`` (older versions took one), with what
renaming it means for what a deployment already sent (its messages name the old agent, and only
workers declaring it serve them); attempts that are no whole count."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from mesh import App, ConfigError, Context


class Q(BaseModel):
    text: str


def test_a_dashed_agent_name_is_refused_saying_its_queued_messages_keep_the_old_name() -> None:
    mine = App("mine")
    with pytest.raises(ConfigError) as caught:
        @mine.agent(name="web-search")
        def search(ctx: Context, q: Q) -> Q:
            return q
    said = str(caught.value)
    assert "\n" not in said and "write 'web_search'" in said
    assert said.endswith("Messages already sent to 'web-search' (on its queue, in the dead-letter queue) name it and "
                         "are served only by workers that declare it: drain them with the version that does (mesh "
                         "queues, mesh dlq list) before renaming the agent")
    with pytest.raises(ConfigError) as other:
        @mine.agent(name="Search")
        def search2(ctx: Context, q: Q) -> Q:
            return q
    assert "Messages already sent" not in str(other.value)  # no older version took that one either


@pytest.mark.parametrize(("given", "says"), [
    ({"max_retries": -1}, "agent 'counted': max_retries=-1 counts the retries after the first attempt: it is at "
                          "least 0 (0 never retries)"),
    ({"max_attempts": 2.5}, "agent 'counted': max_attempts=2.5 is a count: a whole number"),
    ({"max_attempts": True}, "agent 'counted': max_attempts=True is a count: a whole number"),
])
def test_an_agents_attempts_are_a_whole_count_or_its_declaration_is_refused(given: dict[str, object],
                                                                            says: str) -> None:
    mine = App("mine")
    with pytest.raises(ConfigError) as caught:
        mine.agent(name="counted", **given)(lambda ctx, q: q)  # type: ignore[call-overload]
    assert str(caught.value) == says
    assert "counted" not in mine.agents
