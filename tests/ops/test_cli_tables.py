"""Output that can be used as input: the real ``mesh`` command at 80 (and 200) columns prints ids, keys,
classes, breaker names and trace ids whole, as blocks when a table would not fit, and takes a unique
start of an id back (git-style); an ambiguous start lists the candidates and exits 2."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from conftest import flat

from mesh.broker import MeshClient, job_id_for
from mesh.broker.breaker import Breakers
from mesh.broker.outbox import encode
from mesh.contracts import Brownout, State
from mesh.dlq import DeadLetter, DeadLetterStore
from mesh.dlq.entry import Attempt
from tests.httpserver import RecordingServer

#: Two dead letters whose ids start alike (the first 9 characters), and a long error.
TWINS = ("ffff0000-1111-4222-8333-000000000001", "ffff0000-2222-4222-8333-000000000002")
LONG_ERROR = ("the order service answered 422 Unprocessable Entity: field items[0].qty must be a positive "
              "integer, field customer.email is not a valid address, and the request id was req-7f3a9c")


def put(client: MeshClient, entry_id: str, key: str, failure_class: str, error: str) -> DeadLetter:
    """A dead letter of a one-message job (`mesh send`) as the settle script writes it, with the id
    chosen by the test: its replay re-creates the job record, which the test never wrote."""
    from dramatiq.message import Message

    at = time.time()
    envelope = {"key": key, "job_id": job_id_for(key), "step_id": "executor", "agent": "executor",
                "trace_id": "0" * 32, "deadline": at + 600, "hops": [], "attempt": 1, "schema_version": 1,
                "replay_of": None, "payload": {"tool": "note", "args": {"title": key}}}
    entry = DeadLetter(entry_id=entry_id, queue="executor", agent="executor", failure_class=failure_class,
                       error=error, envelope=envelope, key=key, job_id=envelope["job_id"],
                       trace_id=envelope["trace_id"], attempts=(Attempt(attempt=1, outcome="dead_lettered", at=at),),
                       worker="w", dead_lettered_at=at)
    raw = encode(Message(queue_name="executor", actor_name="executor", args=(envelope,), kwargs={}, options={},
                         message_id=entry_id))
    assert DeadLetterStore(client.redis, client.keys).put(entry, raw)
    return entry


def http_post(url: str) -> dict[str, Any]:
    return {"tool": "http_post", "args": {"url": url, "json": {"order": 7}}}


@pytest.fixture
def rejected(client: MeshClient, make_settings, start_worker) -> tuple[Any, str]:
    """A one-step job whose http_post got a 400 from a loopback server: dead-lettered for real.
    Yields its reference and the server's host:port."""
    with RecordingServer(lambda n, _: (400, {"error": "bad order"})) as server:
        ref = client.send("executor", http_post(server.url("/orders")), key="order-7")
        start_worker(make_settings(http_allow=server.host_port), ("executor",))
        assert client.wait(ref.id, timeout_s=20).state is State.DEAD_LETTERED
        return ref, server.host_port


def raising(exc: Exception) -> Any:
    def call() -> None:
        raise exc
    return call


def blocks(text: str) -> list[dict[str, str]]:
    """The vertical layout read back: one dict per block, continuation lines joined to their field."""
    out: list[dict[str, str]] = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        name = ""
        for line in block.splitlines():
            if m := re.match(r"^(\S[^:]*):\s+(.*)$", line):
                name, fields[m.group(1)] = m.group(1), m.group(2)
            else:
                fields[name] += " " + line.strip()
        out.append(fields)
    return out


def test_dlq_list_at_80_columns_prints_blocks_with_whole_ids_class_and_error_that_paste_back(
        cli, client, rejected):
    ref, host_port = rejected
    put(client, TWINS[0], "twin-1", "invalid_input", LONG_ERROR)
    put(client, TWINS[1], "twin-2", "invalid_input", "short")

    res = cli("dlq", "list", COLUMNS="80")
    assert res.returncode == 0, res.stderr
    assert max(map(len, res.stdout.splitlines())) <= 80, res.stdout
    listed = {b["key"]: b for b in blocks(res.stdout)}
    assert set(listed) == {"order-7", "twin-1", "twin-2"}, res.stdout
    assert [listed[k]["id"] for k in ("twin-1", "twin-2")] == list(TWINS)
    assert listed["twin-1"]["class"] == "invalid_input" and listed["twin-1"]["error"] == LONG_ERROR
    assert listed["order-7"]["class"] == "permanent" and f"{host_port} answered 400" in listed["order-7"]["error"]

    # The printed id pastes back whole, and so do its first 8 characters.
    printed = listed["order-7"]["id"]
    shown = cli("dlq", "show", printed, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["job_id"] == ref.id
    by_prefix = cli("dlq", "show", printed[:8])
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert f"entry_id: {printed}" in by_prefix.stdout

    # An ambiguous start lists the candidates, whole, and exits 2; a start of nothing is "no such".
    ambiguous = cli("dlq", "show", "ffff0000")
    assert ambiguous.returncode == 2
    assert "'ffff0000' is the start of several dead letters" in flat(ambiguous.stderr)
    assert [line.strip() for line in ambiguous.stderr.splitlines()[1:]] == list(TWINS)
    missing = cli("dlq", "show", "0123abcd")
    assert missing.returncode == 2 and "no dead letter '0123abcd'" in flat(missing.stderr)

    # replay and purge take starts too.
    assert cli("dlq", "replay", "ffff0000", "--yes").returncode == 2
    purged = cli("dlq", "purge", "ffff0000-2", "--yes", "--json")
    assert (purged.returncode, json.loads(purged.stdout)) == (0, {"purged": 1})
    replayed = cli("dlq", "replay", "ffff0000", "--yes", "--json")  # now unique
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["ids"] == [TWINS[0]]


def test_dlq_list_at_200_columns_is_a_table_and_wide_forces_it_at_80_with_every_value_whole(cli, client):
    put(client, TWINS[0], "twin-1", "invalid_input", "field items[0].qty must be a positive integer")
    wide_screen = cli("dlq", "list", COLUMNS="200")
    assert wide_screen.returncode == 0, wide_screen.stderr
    [row] = [line for line in wide_screen.stdout.splitlines() if TWINS[0] in line]
    assert row.startswith("│") and all(v in row for v in ("twin-1", "invalid_input", "positive integer"))
    assert "id:" not in wide_screen.stdout

    forced = cli("dlq", "list", "--wide", COLUMNS="80")
    assert forced.returncode == 0, forced.stderr
    [row] = [line for line in forced.stdout.splitlines() if TWINS[0] in line]
    assert row.startswith("│") and "invalid_input" in row and "positive integer" in row


def test_breakers_print_whole_names_and_reset_takes_a_printed_name_or_its_start(cli, settings, rclient):
    names = ("127.0.0.1:18777", "127.0.0.1:18778", "orders.internal.example:8443")
    breakers = Breakers(settings, rclient)
    for name in names:
        with pytest.raises(Brownout):
            breakers.call(name, raising(Brownout(f"{name} answered 503: the upstream pool is exhausted, try again "
                                                 "later", dependency=name)))

    res = cli("breakers", COLUMNS="80")
    assert res.returncode == 0, res.stderr
    assert max(map(len, res.stdout.splitlines())) <= 80, res.stdout
    listed = [b["dependency"] for b in blocks(res.stdout)]
    assert listed == sorted(names)
    assert all("the upstream pool is exhausted, try again later" in b["last error"] for b in blocks(res.stdout))

    ambiguous = cli("breakers", "reset", "127.0.0.1:1877")
    assert ambiguous.returncode == 2
    assert [line.strip() for line in ambiguous.stderr.splitlines()[1:]] == list(names[:2])
    assert cli("breakers", "reset", "nowhere").returncode == 2

    assert cli("breakers", "reset", listed[0]).stdout.strip() == f"breaker {listed[0]} closed"
    assert cli("breakers", "reset", "orders").stdout.strip() == "breaker orders.internal.example:8443 closed"


def test_status_and_trace_take_a_job_id_start_and_trace_keeps_whole_lines_at_80_columns(cli, client, rejected):
    ref, host_port = rejected
    other = client.submit("another job, so that job- alone is ambiguous")

    res = cli("trace", ref.id[:12], COLUMNS="80")
    assert res.returncode == 0, res.stderr
    assert f"trace {ref.trace_id}" in res.stdout and len(ref.trace_id) == 32
    [call] = [line for line in res.stdout.splitlines() if "tool_call" in line]
    # the whole error, with the snippet of the body the dependency answered
    assert call.count(host_port) == 1 and f"http_post → {host_port} answered 400: " in call and " in " in call, call

    for given in (ref.id[:10], ref.id.removeprefix("job-")[:8]):
        status = cli("status", given, COLUMNS="80")
        assert status.returncode == 0, status.stderr
        # 80 columns: the trace id on a line of its own (the header's one line is 95 characters)
        assert status.stdout.startswith(f"job {ref.id}  dead_lettered\ntrace {ref.trace_id}\n")
        assert max(map(len, status.stdout.splitlines())) <= 80, status.stdout
        assert cli("status", given, COLUMNS="120").stdout.startswith(f"job {ref.id}  dead_lettered  trace ")
        assert re.search(r"^step: +executor$", status.stdout, re.MULTILINE), status.stdout  # a block per step

    ambiguous = cli("status", "job-")
    assert ambiguous.returncode == 2
    assert sorted(line.strip() for line in ambiguous.stderr.splitlines()[1:]) == sorted((ref.id, other.id))
    assert cli("trace", "job-").returncode == 2
    missing = cli("status", "job-nothing")
    assert missing.returncode == 2 and "no job job-nothing" in flat(missing.stderr)
