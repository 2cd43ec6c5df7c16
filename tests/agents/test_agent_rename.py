"""An agent name with ``-`` (older versions took one) is refused with what renaming it means for
what a deployment already sent: its messages name the old agent, and only workers declaring it
serve them."""

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
