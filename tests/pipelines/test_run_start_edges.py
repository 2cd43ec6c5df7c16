"""The edges of a run's start by one script call (broker/scripts/run.lua): many root messages on one
queue, a stored version Redis lost, the same key from many clients at once, records that are not
what the key expects, a key shared with ``send()``, two versions raced with ``replace=False``, and
the root messages' lanes; against a real Redis."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import redis_client
from pydantic import BaseModel

from mesh import App
from mesh.agents.pipelines import Pipeline, check, load_pipeline
from mesh.broker import MeshClient, NotReplicated, trace
from mesh.broker.client import job_id_for
from mesh.broker.connection import acl_rules
from mesh.broker.keys import Keys
from mesh.broker.pipelines import PipelineConflict
from mesh.contracts import KeyConflict
from tests.broker.deployed import private_redis
from tests.pipelines.agents import app

ISSUE_FILE = Path(__file__).parent / "multi-agent-orchestration.skill.yaml"


def ready(mesh: MeshClient, queue: str) -> int:
    return int(mesh.queues([queue])[queue]["ready"])


def written(rclient: redis.Redis, namespace: str) -> set[str]:
    """Every key of ``namespace``: the fleet-wide ones and every shard's."""
    return {k.decode() for pattern in Keys(namespace).patterns for k in rclient.scan_iter(match=pattern, count=1000)}


def test_more_root_messages_on_one_queue_than_one_lua_call_takes_are_all_sent(mesh: MeshClient,
                                                                             rclient: redis.Redis) -> None:
    """16 for_each roots of 256 items (MESH_MAX_FAN_OUT's default) on one agent: 4,096 messages, more
    bodies than one HSET of the script may take (Lua's stack); a failure there would leave the record
    and its trace without a message, and the key's next run would return that job, never sent."""
    build = Pipeline("wide")
    for i in range(16):
        build = build.step(f"fetch{i}", agent="fetch", for_each="input.sources",
                           input={"url": "item.url", "score": "item.score"})
    spec = check(build.build(), app)
    sources = [{"url": f"https://example.invalid/{i}", "score": i} for i in range(256)]
    ref = mesh.run(spec, {"goal": "g", "sources": sources}, key="wide")
    queue = mesh.target("fetch").queue
    assert ready(mesh, queue) == 16 * 256
    assert rclient.hlen(mesh.keys.messages(queue)) == 16 * 256
    record = mesh.status(ref.id)
    assert sum(1 for s in record.steps.values() if s.parent is not None and s.sent_at is not None) == 16 * 256


def test_a_version_the_client_stored_but_redis_lost_is_stored_again_by_its_next_run(mesh: MeshClient,
                                                                                  rclient: redis.Redis) -> None:
    """The client notes the versions it stored and sends no spec for them again; when Redis lost the
    name's hash (a restart without persistence, an eviction), a run must not start a job whose spec a
    worker cannot load."""
    spec = load_pipeline(ISSUE_FILE, app)
    mesh.run(spec, {"goal": "a"})
    rclient.delete(mesh.keys.pipeline(spec.name), mesh.keys.pipelines)
    ref = mesh.run(spec, {"goal": "b"}, key="after-loss")
    assert mesh.pipelines.get(spec.name, spec.digest())[0] == spec.digest()  # what a worker loads
    assert mesh.pipelines.versions(spec.name)[0] == spec.digest()
    assert mesh.pipelines.names() == [spec.name]
    assert mesh.status(ref.id).pipeline_digest == spec.digest()
    # another version newest, this one's JSON lost (its field only): found too
    other = load_pipeline(ISSUE_FILE.read_text().replace("ttl_minutes: 60", "ttl_minutes: 90") + "\n", app)
    mesh.run(other, {"goal": "c"})
    rclient.hdel(mesh.keys.pipeline(spec.name), spec.digest())
    mesh.run(spec, {"goal": "d"})
    assert mesh.pipelines.get(spec.name, spec.digest())[0] == spec.digest()
    assert mesh.pipelines.versions(spec.name)[0] == spec.digest()


def test_a_version_redis_lost_is_stored_again_by_a_run_through_the_transaction(mesh: MeshClient,
                                                                             rclient: redis.Redis) -> None:
    """A root step that sleeps: the run goes through the WATCH/MULTI transaction, which did the same
    (only the newest digest written for a version the client stored)."""
    spec = (Pipeline("nap").step("nap", sleep="1h").step("researcher", depends_on=["nap"]).build())
    mesh.run(spec, {"goal": "a"})
    rclient.delete(mesh.keys.pipeline(spec.name))
    ref = mesh.run(spec, {"goal": "b"})
    assert mesh.pipelines.get(spec.name, spec.digest())[0] == spec.digest()
    assert [w.step.step_id for w in mesh.waits() if w.job_id == ref.id] == ["nap"]


def test_the_same_key_and_input_from_many_clients_at_once_is_one_job_sent_once(
        settings: Any, redis_url: str, rclient: redis.Redis) -> None:
    spec = load_pipeline(ISSUE_FILE, app)
    clients = [MeshClient(settings, client=redis_client(redis_url), app=app) for _ in range(8)]
    refs: list[Any] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(clients))

    def run(client: MeshClient) -> None:
        start.wait()
        try:
            refs.append(client.run(spec, {"goal": "same"}, key="shared"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {r.id for r in refs} == {job_id_for("shared")}
    mesh = clients[0]
    assert rclient.zcard(mesh.keys.jobs) == 1
    [root] = [s for s in mesh.status(job_id_for("shared")).steps.values() if s.sent_at is not None]
    queue = mesh.target(root.agent).queue
    assert ready(mesh, queue) == 1 and rclient.hlen(mesh.keys.messages(queue)) == 1
    enqueued = [e for e in trace.read(rclient, mesh.keys, job_id_for("shared")) if e.get("event") == "enqueued"]
    assert len(enqueued) == 1
    for c in clients:
        c.redis.close()


@pytest.mark.parametrize("stored", [b"not json", b"7", "hash"])
def test_a_key_whose_record_is_not_a_record_is_refused_and_nothing_is_written(
        mesh: MeshClient, rclient: redis.Redis, namespace: str, stored: Any) -> None:
    spec = load_pipeline(ISSUE_FILE, app)
    key = mesh.keys.job(job_id_for("odd"))
    if stored == "hash":
        rclient.hset(key, "a", "b")
    else:
        rclient.set(key, stored)
    before = written(rclient, namespace)
    with pytest.raises((redis.ResponseError, ValueError)):
        mesh.run(spec, {"goal": "a"}, key="odd")
    # on a shard >= 1 the spec's registration is a call of its own made first (StartRun): it may stay;
    # the namespace's shard count is recorded by the client's first enqueue, before the run is refused
    registered = {mesh.keys.pipelines, mesh.keys.pipeline(spec.name)} if mesh.keys.shard else set()
    assert written(rclient, namespace) - registered - {mesh.keys.shard_count} == before


def test_a_record_without_a_payload_hash_is_the_keys_job(mesh: MeshClient, rclient: redis.Redis,
                                                        namespace: str) -> None:
    """As the transaction did (and enqueue.lua does): a record bound to no input is the key's job."""
    spec = load_pipeline(ISSUE_FILE, app)
    ref = mesh.run(spec, {"goal": "a"}, key="unbound")
    key = mesh.keys.job(ref.id)
    rclient.set(key, rclient.get(key).replace(b'"payload_hash":', b'"unbound_hash":', 1))
    before = written(rclient, namespace)
    assert mesh.run(spec, {"goal": "other"}, key="unbound").id == ref.id
    assert written(rclient, namespace) == before


def test_a_key_sent_with_send_and_run_is_one_job_and_the_other_is_refused(mesh: MeshClient,
                                                                          rclient: redis.Redis) -> None:
    spec = load_pipeline(ISSUE_FILE, app)
    sent = mesh.send("researcher", {"goal": "a"}, key="both")
    record = rclient.get(mesh.keys.job(sent.id))
    with pytest.raises(KeyConflict):
        mesh.run(spec, {"goal": "a"}, key="both")
    assert rclient.get(mesh.keys.job(sent.id)) == record
    ran = mesh.run(spec, {"goal": "a"}, key="run-first")
    with pytest.raises(KeyConflict):
        mesh.send("researcher", {"goal": "a"}, key="run-first")
    assert mesh.status(ran.id).pipeline == spec.name


def test_two_versions_raced_with_replace_false_one_runs_the_other_writes_nothing(
        settings: Any, redis_url: str, rclient: redis.Redis) -> None:
    first = load_pipeline(ISSUE_FILE, app)
    second = load_pipeline(ISSUE_FILE.read_text().replace("ttl_minutes: 60", "ttl_minutes: 90") + "\n", app)
    for attempt in range(10):
        clients = [MeshClient(settings, client=redis_client(redis_url), app=app) for _ in range(2)]
        outcome: dict[str, Any] = {}
        start = threading.Barrier(2)

        def run(client: MeshClient, spec: Any, key: str, outcome: dict[str, Any] = outcome,
                start: threading.Barrier = start) -> None:
            start.wait()
            try:
                outcome[key] = client.run(spec, {"goal": key}, key=key, replace=False)
            except PipelineConflict as exc:
                outcome[key] = exc

        name = f"race-{attempt}"
        specs = [first.model_copy(update={"name": name}), second.model_copy(update={"name": name})]
        keys = [f"{name}-a", f"{name}-b"]
        threads = [threading.Thread(target=run, args=(c, s, k)) for c, s, k in zip(clients, specs, keys, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [k for k in keys if not isinstance(outcome[k], PipelineConflict)]
        assert len(won) == 1, outcome
        lost = next(k for k in keys if k not in won)
        winner = specs[keys.index(won[0])]
        latest, versions = clients[0].pipelines.versions(name)
        assert (latest, set(versions)) == (winner.digest(), {winner.digest()})
        assert rclient.get(clients[0].keys.job(job_id_for(lost))) is None
        assert not rclient.exists(clients[0].keys.trace(job_id_for(lost)))
        for c in clients:
            c.redis.close()


def test_root_messages_go_on_their_lanes_by_priority_and_a_unicode_key_is_kept(mesh: MeshClient,
                                                                                 rclient: redis.Redis) -> None:
    spec = check(Pipeline("lanes").step("high", agent="researcher", priority="high")
                 .step("low", agent="scout", priority="low").step("plain", agent="jot").build(), app)
    ref = mesh.run(spec, {"goal": "ü✓"}, key="ключ")
    for agent, lane in (("researcher", ".high"), ("scout", ".low"), ("jot", "")):
        queue = mesh.target(agent).queue
        assert rclient.llen(mesh.keys.queue(queue) + lane) == 1, (agent, lane)
        assert rclient.llen(mesh.keys.wake(queue)) == 1
    assert mesh.pipelines.names() == ["lanes"]
    assert mesh.status(ref.id).key == "ключ"


class Ask(BaseModel):
    tenant: str
    text: str


class Answer(BaseModel):
    text: str


def test_root_messages_with_a_flow_key_wait_in_their_flows_lane(settings: Any, rclient: redis.Redis) -> None:
    keyed = App("flowing")

    @keyed.agent(concurrency={"max": 4, "key": "input.tenant"})
    def answer(ctx: object, ask: Ask) -> Answer:
        return Answer(text=ask.text)

    keyed.pipeline("""
name: asks
steps:
  - id: first
    agent: answer
  - id: second
    agent: answer
    priority: high
""")
    mesh = MeshClient(settings, client=rclient, app=keyed)
    mesh.run("asks", {"tenant": "çé-✓", "text": "hi"})
    queue = mesh.keys.queue(mesh.target("answer").queue)
    assert rclient.llen(f"{queue}.flow:normal:çé-✓") == 1 and rclient.llen(f"{queue}.flow:high:çé-✓") == 1
    assert rclient.zrange(f"{queue}.flows:normal", 0, -1) == ["çé-✓".encode()]
    assert rclient.zrange(f"{queue}.flows:high", 0, -1) == ["çé-✓".encode()]
    assert rclient.hmget(f"{queue}.sched", "n:normal", "n:high") == [b"1", b"1"]
    assert rclient.hget(mesh.keys.stats, f"lanes:{mesh.target('answer').queue}") == b"1"
    assert rclient.llen(queue) == 0 and rclient.llen(mesh.keys.wake(mesh.target("answer").queue)) == 2


@contextmanager
def acl_user(tmp_path: Path, make_settings: Any, password: str) -> Iterator[tuple[redis.Redis, str]]:
    """A private redis-server with a user ``mesh`` held to ``acl_rules()`` of the test's namespace: its
    admin client, and the URL that logs in as that user."""
    admin_password = f"admin-{uuid.uuid4().hex}"
    server = private_redis(tmp_path / "redis", ("--requirepass", admin_password),
                           url=f"redis://:{admin_password}@127.0.0.1:{{port}}/0")
    admin = redis.Redis.from_url(server.url)
    try:
        namespace = make_settings().namespace
        admin.execute_command("ACL", "SETUSER", "mesh", "reset", "on", f">{password}", *acl_rules(namespace))
        yield admin, f"redis://mesh:{password}@127.0.0.1:{server.port}/0"
    finally:
        admin.close()
        server.stop()


@pytest.mark.slow
def test_a_run_under_the_acl_user_of_acl_rules_is_refused_no_command(tmp_path: Path, make_settings: Any) -> None:
    """run.lua under a Redis user held to ``acl_rules()``: every command it calls (the first run of a
    version: HSETNX, SADD; a lost version: HEXISTS; a conflict: GET, DEL; the wake-up's LTRIM past the
    cap) is allowed, as is the transaction a sleeping root still goes through."""
    with acl_user(tmp_path, make_settings, "pw-run") as (admin, url):
        admin.execute_command("ACL", "LOG", "RESET")
        mesh = MeshClient(make_settings(redis_url=url), app=app)
        spec = load_pipeline(ISSUE_FILE, app)
        other = load_pipeline(ISSUE_FILE.read_text().replace("ttl_minutes: 60", "ttl_minutes: 90") + "\n", app)
        ref = mesh.run(spec, {"goal": "a"}, key="acl")
        assert mesh.run(spec, {"goal": "a"}, key="acl").id == ref.id
        with pytest.raises(KeyConflict):
            mesh.run(spec, {"goal": "b"}, key="acl")
        mesh.run(other, {"goal": "c"})
        with pytest.raises(PipelineConflict):
            mesh.run(spec, {"goal": "d"}, key="refused", replace=False)  # created, then deleted
        admin.delete(mesh.keys.pipeline(spec.name))
        for goal in range(70):  # past the wake-up cap (64): LTRIM
            mesh.run(spec, {"goal": f"g{goal}"})
        mesh.run(other, {"goal": "e"})  # HEXISTS: another version newest
        nap = Pipeline("nap").step("nap", sleep="1h").step("researcher", depends_on=["nap"]).build()
        mesh.run(nap, {"goal": "f"})
        assert admin.execute_command("ACL", "LOG") == []
        assert admin.get(mesh.keys.job(job_id_for("refused"))) is None
        mesh.redis.close()


@pytest.mark.slow
def test_a_run_and_a_send_waiting_for_replicas_under_the_acl_user_are_not_refused(tmp_path: Path,
                                                                                 make_settings: Any) -> None:
    """MESH_REDIS_WAIT_REPLICAS under the user of ``acl_rules()``: the script and ``WAIT`` go in one
    pipeline (redis-py checks the script with SCRIPT EXISTS first); no replica here, so NotReplicated,
    never NOPERM."""
    with acl_user(tmp_path, make_settings, "pw-wait") as (admin, url):
        mesh = MeshClient(make_settings(redis_url=url, redis_wait_replicas=1, redis_wait_timeout_ms=10), app=app)
        spec = load_pipeline(ISSUE_FILE, app)
        nap = Pipeline("nap").step("nap", sleep="1h").step("researcher", depends_on=["nap"]).build()
        for start in (lambda: mesh.run(spec, {"goal": "a"}, key="run"), lambda: mesh.run(nap, {"goal": "a"}),
                      lambda: mesh.send("researcher", {"goal": "a"}, key="send")):
            with pytest.raises(NotReplicated):
                start()
        assert admin.get(mesh.keys.job(job_id_for("run"))) is not None
        assert admin.execute_command("ACL", "LOG") == []
        mesh.redis.close()


def test_a_run_of_500_root_steps_sends_each_once(mesh: MeshClient, rclient: redis.Redis) -> None:
    agents = ("researcher", "scout", "jot")
    build = Pipeline("many-roots")
    for i in range(500):
        build = build.step(f"r{i}", agent=agents[i % 3])
    spec = check(build.build(), app)
    ref = mesh.run(spec, {"goal": "g"}, key="many")
    assert mesh.run(spec, {"goal": "g"}, key="many").id == ref.id
    counts = {a: 500 // 3 + (1 if i < 500 % 3 else 0) for i, a in enumerate(agents)}
    for agent, n in counts.items():
        queue = mesh.target(agent).queue
        assert ready(mesh, queue) == n and rclient.hlen(mesh.keys.messages(queue)) == n
    enqueued = [e for e in trace.read(rclient, mesh.keys, ref.id) if e.get("event") == "enqueued"]
    assert len(enqueued) == 500


def test_an_input_near_the_message_limit_is_sent_whole(mesh: MeshClient, rclient: redis.Redis) -> None:
    spec = load_pipeline(ISSUE_FILE, app)
    goal = "ü" * ((mesh.settings.max_message_bytes - 16 * 1024) // 2)
    ref = mesh.run(spec, {"goal": goal}, key="big")
    [root] = [s for s in mesh.status(ref.id).steps.values() if s.sent_at is not None]
    queue = mesh.target(root.agent).queue
    [body] = rclient.hvals(mesh.keys.messages(queue))
    assert goal.encode() in body and len(body) <= mesh.settings.max_message_bytes
    assert mesh.status(ref.id).pipeline_input == {"goal": goal}
