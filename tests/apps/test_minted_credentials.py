"""Credentials minted for the call, on a real ``mesh worker --app`` process with real Redis: a loopback
token server issues tokens valid for one call, a loopback dependency accepts each token once. Each
call gets a token of its own (the async tool's minter awaited), a retry mints again, a minter that
fails or returns a token too short to mask refuses the call before the tool runs (``permanent``),
and no token reaches what the mesh keeps or prints."""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

import pytest
from conftest import wait_for

from mesh import MeshClient, State
from mesh.broker.ledger import Ledger
from mesh.contracts.effects import Verdict
from mesh.dlq import DeadLetterStore
from tests.apps.minting import app, caller
from tests.apps.test_ticketing import namespace_values
from tests.httpserver import RecordingServer

CLIENT_SECRET = f"cs-{secrets.token_hex(12)}"
#: ``n`` the token server refuses, and ``n`` it answers with a token too short to mask.
REFUSED, SHORT = -1, 0
#: ``n`` whose first request the dependency answers 503 (the step fails and is retried).
FLAKY = 5
#: ``n`` the dependency rejects (422), its answer naming the token it was sent (the step is dead-lettered).
REJECTED = 9


class Tokens:
    """The token server's and the dependency's shared state: tokens issued, tokens spent."""

    def __init__(self) -> None:
        self.issued: dict[str, dict[str, Any]] = {}
        self.spent: set[str] = set()
        self.answers: list[tuple[int, str, int]] = []  # (n, token, status) as the dependency answered
        self.lock = threading.Lock()

    def mint(self, _n: int, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if request["headers"].get("authorization") != f"Basic {CLIENT_SECRET}":
            return 401, {"error": "bad client secret"}
        ask = request["json"]
        if ask["n"] == REFUSED:
            return 403, {"error": "client not allowed"}
        token = "short" if ask["n"] == SHORT else f"tk-{secrets.token_hex(16)}"
        with self.lock:
            self.issued[token] = ask
        return 200, {"token": token, "expires_at": time.time() + 30}

    def accept(self, _n: int, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        token = request["headers"].get("authorization", "").removeprefix("Bearer ")
        n = request["json"]["n"]
        with self.lock:
            fresh = token in self.issued and token not in self.spent
            self.spent.add(token)  # valid for one call, whatever that call came to
            first_flaky = n == FLAKY and not any(a[0] == FLAKY for a in self.answers)
            status = 401 if not fresh else 503 if first_flaky else 422 if n == REJECTED else 200
            self.answers.append((n, token, status))
        if status == 401:
            return 401, {"error": "token unknown or spent"}
        if status == 422:
            return 422, {"error": f"rejected token {token}"}
        return status, {"accepted": status == 200, "you_sent": token}

    def minted_for(self, n: int) -> list[dict[str, Any]]:
        return [ask for ask in self.issued.values() if ask["n"] == n]


@pytest.mark.slow
def test_each_call_and_each_retry_mints_a_token_of_its_own_a_refused_mint_calls_nothing_and_no_token_is_kept(
        settings, rclient, worker_process, cli, namespace):
    tokens = Tokens()
    mesh = MeshClient(settings, client=rclient, app=app)
    dlq = DeadLetterStore(rclient, mesh.keys)
    with RecordingServer(tokens.mint) as token_server, RecordingServer(tokens.accept) as dependency:
        worker = worker_process("--app", "tests.apps.minting:app", "--threads", "2",
                                MINT_CLIENT_SECRET=CLIENT_SECRET, MINT_TOKEN_URL=token_server.url("/token"),
                                MESH_HTTP_ALLOW=dependency.host_port)
        url = dependency.url("/api")
        refs = {name: mesh.send(caller, {"url": url, "first": first, "second": second})
                for name, first, second in [("two", 1, 2), ("retried", FLAKY, 6), ("refused", REFUSED, 7),
                                            ("short", SHORT, 8), ("rejected", 10, REJECTED)]}
        records = {name: mesh.wait(ref.id, timeout_s=60) for name, ref in refs.items()}
        wait_for(lambda: dlq.count() == 3)

    # Two calls, two tokens, both accepted; the async tool's minter was awaited.
    two = records["two"]
    assert two.state is State.SUCCEEDED, two.error
    [(one, t1, s1), (two_, t2, s2)] = [a for a in tokens.answers if a[0] in (1, 2)]
    assert (one, s1, two_, s2) == (1, 200, 2, 200) and t1 != t2
    assert {(ask["tool"], ask["attempt"]) for ask in tokens.minted_for(1) + tokens.minted_for(2)} == {
        ("call_api", 1), ("acall_api", 1)}
    assert two.result == {"caller": {"answers": [{"accepted": True, "you_sent": "[secret]"}] * 2}}

    # A retry mints again: the first token was spent on the 503, the second attempt's was accepted.
    retried = records["retried"]
    assert retried.state is State.SUCCEEDED, retried.error
    flaky = [a for a in tokens.answers if a[0] == FLAKY]
    assert [status for _, _, status in flaky] == [503, 200] and flaky[0][1] != flaky[1][1]
    assert sorted(ask["attempt"] for ask in tokens.minted_for(FLAKY)) == [1, 2]

    # A minter that fails, or a token too short to mask: refused, permanent, the dependency never called.
    entries = {entry.job_id: entry for entry in dlq.newest()}
    refused, short = entries[refs["refused"].id], entries[refs["short"].id]
    assert records["refused"].state is State.DEAD_LETTERED and records["short"].state is State.DEAD_LETTERED
    assert (refused.failure_class, short.failure_class) == ("permanent", "permanent")
    assert ("tool call_api: its credential minter failed: RuntimeError: token server said 403: client not allowed; "
            "not called") in refused.error
    assert ("tool call_api: the credential minted for tool call_api is 5 characters long; the mesh masks secrets of "
            "8 characters or more and refuses shorter ones; not called") in short.error
    assert not [a for a in tokens.answers if a[0] in (REFUSED, SHORT, 7, 8)]
    assert len(dependency.requests) == 7  # 1, 2, FLAKY twice, 6, 10, REJECTED
    rejected = entries[refs["rejected"].id]
    assert rejected.failure_class == "permanent" and "answered 422: " in rejected.error, rejected.error
    assert "rejected token [secret]" in rejected.error  # the dependency named the token: masked

    # No token reaches Redis (job records, trace, ledger, dead letters), mesh output or the worker's log.
    minted = [t for t in tokens.issued if t != "short"]
    assert len(minted) == 7  # 1, 2, FLAKY twice, 6, 10, REJECTED
    values = namespace_values(rclient, namespace)
    masked = {key.split("}:", 1)[1].split(":")[0] for key, v in values.items() if b"[secret]" in v}  # after the tag
    assert {"ledger", "trace", "job", "dlq"} <= masked  # the echoed tokens were kept there, masked
    assert {k for k, v in values.items() if any(t.encode() in v for t in minted)} == set()
    outputs = [cli(*args) for args in [("status", ref.id, "--json") for ref in refs.values()]
               + [("trace", ref.id, "--json") for ref in refs.values()] + [("dlq", "list", "--json")]]
    for done in outputs:
        assert done.returncode == 0, done.stderr
        assert not [t for t in minted if t in done.stdout + done.stderr], done.args
    assert "[secret]" in "".join(done.stdout for done in outputs)
    log = worker.log_path.read_text()
    assert "with token [secret]" in log  # the tool logged its token: masked
    assert not [t for t in minted if t in log] and CLIENT_SECRET not in log
    assert json.loads(outputs[-1].stdout)


@pytest.mark.slow
def test_a_minter_still_running_at_the_time_limit_fails_the_call_as_not_made_not_unknown(
        settings, rclient, worker_process):
    from tests.apps import slow_minting

    mesh = MeshClient(settings, client=rclient, app=slow_minting.app)
    worker_process("--app", "tests.apps.slow_minting:app")
    ref = mesh.send(slow_minting.payer, {"cents": 5})
    record = mesh.wait(ref.id, timeout_s=60)
    # the tool was never called: its effect is not unknown, the step failed by the time limit
    assert rclient.get(f"{mesh.keys.prefix}:test.paid") is None
    assert record.state is State.DEAD_LETTERED, (record.state, record.error)
    assert "credential minter" in (record.error or ""), record.error
    [entry] = Ledger(rclient, mesh.keys, record.job_id, "payer", 60).entries()
    assert entry.verdict is Verdict.FAILED, entry
