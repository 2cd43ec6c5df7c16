"""The console decides an unknown effect through `mesh settle`'s and `mesh verify`'s functions, as its
logged-in user: the settlement names them, and a job whose effect is settled applied moves on."""

from __future__ import annotations

import httpx
import pytest

from mesh import MeshClient
from mesh.contracts import State
from mesh.contracts.effects import Verdict
from tests.agents.test_effects import effects_worker, unknown_job  # noqa: F401  (a fixture)
from tests.apps.effects import app
from tests.httpserver import RecordingServer
from tests.ops.test_console import PASSWORDS, console, csrf_of, login, users_file  # noqa: F401  (a fixture)


@pytest.mark.slow
def test_an_unknown_effect_is_verified_again_then_settled_applied_from_the_job_page_as_the_user(
        make_settings, effects_worker, rclient, users_file):  # noqa: F811
    with RecordingServer() as server:
        settings = make_settings(http_allow=f"{server.host_port},127.0.0.1:1", console_users_file=str(users_file))
        mesh = MeshClient(settings, client=rclient, app=app)
        effects_worker(settings)
        ref, _ = unknown_job(mesh, server, "console-settle")
        with console(mesh) as (base, _), httpx.Client(base_url=base) as http:
            login(http, "bo", PASSWORDS["bo"])
            page = http.get(f"/jobs/{ref.id}")
            assert "Verify again" in page.text and "Settle: applied" in page.text
            token = csrf_of(page.text)
            still = http.post(f"/jobs/{ref.id}/steps/post/verify", data={"csrf": token})
            assert still.status_code == 303  # the verifier is still unreachable: checked, undecided
            assert mesh.status(ref.id).steps["post"].state is State.UNKNOWN
            assert http.post(f"/jobs/{ref.id}/steps/post/settle",
                             data={"csrf": token, "as": "applied", "reason": ""}).status_code == 400
            done = http.post(f"/jobs/{ref.id}/steps/post/settle",
                             data={"csrf": token, "as": "applied", "reason": "order 7 is in the orders db"})
            assert done.status_code == 303 and done.headers["location"].endswith("done=settled")
            record = mesh.wait(ref.id, timeout_s=30)
            again = http.post(f"/jobs/{ref.id}/steps/post/settle",
                              data={"csrf": token, "as": "applied", "reason": "twice"})
            assert again.status_code == 404  # nothing unknown is left to decide
    assert record.state is State.SUCCEEDED, record
    post = record.steps["post"]
    assert post.effect is Verdict.APPLIED and post.settlement is not None and post.settlement.by == "bo"
    assert len(server.requests) == 1  # answered from the ledger, never posted again
