"""A tool loop's checkpoints in Redis: the first write of a field wins, and a loop whose prompt
changed forgets its own fields (and only those) so its new conversation can be written."""

from __future__ import annotations

import redis

from mesh.broker.keys import Keys
from mesh.broker.settings import MeshSettings
from mesh.broker.transcript import Transcript


def test_forgotten_checkpoints_can_be_written_again_and_the_others_stay(settings: MeshSettings,
                                                                          rclient: redis.Redis) -> None:
    transcript = Transcript(rclient, Keys(settings.namespace, settings.shard), "job-1", "step", 60)
    for field in ("turn-1", "turn-1/call-1", "run-2/turn-1"):
        transcript.put(field, {"content": "old"})
    assert transcript.put("turn-1", {"content": "new"}) == {"content": "old"}  # the first write wins
    transcript.forget(["turn-1", "turn-1/call-1"])
    assert transcript.put("turn-1", {"content": "new"}) == {"content": "new"}
    assert transcript.load() == {"turn-1": {"content": "new"}, "run-2/turn-1": {"content": "old"}}
    transcript.forget([])
    transcript.clear()
