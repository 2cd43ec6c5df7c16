"""The dead-letter queue: the single home of messages the mesh could not resolve, and the
operations that bring them back or take them out.

    from mesh.dlq import DeadLetterStore, Filter, Replayer, drain, load, purge

    store = DeadLetterStore(redis_client, Keys(namespace))
    store.entries(Filter(failure_class="permanent"), limit=20)
    Replayer(store, settings).replay(Replayer(store, settings).entries(flt=Filter(agent="executor")))
    drain(store, Path("dead.jsonl")); load(store, Path("dead.jsonl"))
"""

from __future__ import annotations

from .audit import Audit
from .entry import Attempt, DeadLetter
from .export import ExportFileError, LoadReport, drain, load, purge, read_export
from .replay import NotReplayable, Replayer, ReplayReport, replay_message
from .store import DeadLetterShards, DeadLetterStore, Filter, Stored

__all__ = ["Attempt", "Audit", "DeadLetter", "DeadLetterShards", "DeadLetterStore", "ExportFileError", "Filter",
           "LoadReport", "NotReplayable", "ReplayReport", "Replayer", "Stored", "drain", "load", "purge", "read_export",
           "replay_message"]
