"""One side of the approval race (tests/pipelines/test_approval_faults.py): for each job listed in
``{ns}:test.race.jobs``, say ready, wait for the go both sides get from one RPUSH, then decide
(``approve`` or ``deny``, the first argument) and write what happened to ``{ns}:test.race.out:{i}``."""

from __future__ import annotations

import sys

import orjson

from mesh import MeshClient
from mesh.broker.approvals import AlreadyDecided
from mesh.broker.keys import prefix
from tests.pipelines.agents import app


def main(role: str) -> None:
    c = MeshClient(app=app)
    ns = c.settings.namespace
    jobs = [j.decode() for j in c.redis.lrange(f"{prefix(ns)}:test.race.jobs", 0, -1)]
    for i, job in enumerate(jobs):
        c.redis.rpush(f"{prefix(ns)}:test.race.ready:{i}", role)
        if c.redis.blpop([f"{prefix(ns)}:test.race.go:{i}"], timeout=60) is None:
            raise SystemExit(f"round {i}: no go within 60 s")
        try:
            if role == "approve":
                c.approve(job, "researcher", by=role, note="race")
            else:
                c.deny(job, "researcher", reason="race", by=role)
            outcome: dict[str, object] = {"won": True}
        except AlreadyDecided as exc:
            outcome = {"won": False, "winner": exc.decision, "by": exc.by}
        c.redis.hset(f"{prefix(ns)}:test.race.out:{i}", role, orjson.dumps(outcome))


if __name__ == "__main__":
    main(sys.argv[1])
