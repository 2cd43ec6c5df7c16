"""The console in a real browser: Debian's headless Chromium (``/usr/bin/chromium``; `.ci/run` installs
the package) driven by Playwright for Python, never a downloaded browser. Against a fleet of real
worker processes: log in, load the overview, find a dead-lettered job by its key, replay it through
the confirmation page, and watch the job's page follow it to success. Every page renders without a
console error. Screenshots are kept under ``.pytest_cache/console-shots`` (the test prints where)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT, wait_for

from mesh.broker import MeshClient, MeshSettings
from mesh.contracts import State
from mesh.ops.server import OpsServer
from mesh.ops.web.auth import write_user

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / ".pytest_cache" / "console-shots"

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM.exists(),
                                                  reason="no /usr/bin/chromium: apt-get install chromium")]


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Callable[[Any, str], None]:
    folder = SHOTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"screenshots in {folder}")

    def take(page: Any, name: str) -> None:
        page.screenshot(path=str(folder / f"{name}.png"), full_page=True)

    return take


@pytest.fixture
def fleet(settings: MeshSettings, worker_process: Callable[..., Any], tmp_path: Path) -> Path:
    """Two worker processes serving tests.apps.flaky; its folder has ``broken`` (orders dead-letter)."""
    folder = tmp_path / "flaky"
    folder.mkdir()
    (folder / "broken").touch()
    for _ in range(2):
        worker_process("--app", "tests.apps.flaky:app", "--threads", "2", TEST_FLAKY_DIR=str(folder))
    return folder


class Errors:
    """Console errors and uncaught exceptions of every page a browser page shows."""

    def __init__(self, page: Any) -> None:
        self.seen: list[str] = []
        page.on("console", lambda msg: self.seen.append(f"{page.url}: {msg.text}") if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.seen.append(f"{page.url}: {exc}"))


def test_an_operator_finds_a_dead_lettered_job_by_its_key_replays_it_and_sees_it_succeed(
        settings: MeshSettings, rclient: redis.Redis, fleet: Path, browser: Any, shots: Any, tmp_path: Path) -> None:
    from tests.apps.flaky import app

    users = tmp_path / "users"
    write_user(users, "ana", "ana-password-1")
    client = MeshClient(settings.model_copy(update={"console_users_file": users}), client=rclient, app=app)
    key = "order-<b>4711</b>"  # markup in a key is shown as text
    ref = client.send("flaky_shipper", {"order": "4711"}, key=key)
    for n in range(3):
        client.send("flaky_shipper", {"order": f"other-{n}"}, key=f"order-other-{n}")
    wait_for(lambda: client.status(ref.id).state is State.DEAD_LETTERED, timeout_s=60)

    server = OpsServer(client, "127.0.0.1", 0)
    thread = server.start()
    base = f"http://127.0.0.1:{server.port}"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = Errors(page)
    try:
        page.goto(f"{base}/")
        assert page.url.startswith(f"{base}/login"), "the overview needs a login"
        shots(page, "0-login")
        page.fill("input[name=user]", "ana")
        page.fill("input[name=password]", "ana-password-1")
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/")
        assert page.text_content("#user") == "ana"

        def dead_letters() -> int:
            page.reload()
            return int(page.text_content("#dlq-size") or 0)

        wait_for(lambda: dead_letters() >= 4, timeout_s=30)
        shots(page, "1-overview")

        page.click("header nav >> text=DLQ")
        page.fill("#dlq-key", key)
        page.click("form.filters button[type=submit]")
        rows = page.locator("#dlq-entries tbody tr")
        assert rows.count() == 1 and key in rows.first.inner_text()
        shots(page, "2-dlq-by-key")
        rows.first.locator("a").click()
        assert "closed for stock-taking" in page.inner_text("main")
        shots(page, "3-entry")

        (fleet / "broken").unlink()  # the warehouse is open again
        page.click("#replay")
        shots(page, "4-confirm")
        page.click("#confirm")
        page.wait_for_url(re.compile(rf".*/jobs/{ref.id}.*"))
        playwright_api.expect(page.locator("#job-state")).to_have_text("succeeded", timeout=60_000)
        assert "replayed" in page.inner_text(".timeline")
        shots(page, "5-job-succeeded")
        assert client.status(ref.id).state is State.SUCCEEDED

        for path in ("/", "/jobs", f"/jobs/{ref.id}", "/dlq", "/approvals", "/breakers", "/limits",
                     "/jobs?q=order-other-1", f"/jobs?q={ref.trace_id}"):
            page.goto(f"{base}{path}")
            page.wait_for_load_state("networkidle")
        shots(page, "6-other-job")
        assert errors.seen == []
    finally:
        page.close()
        server.stop()
        thread.join(10)
    if os.environ.get("MESH_DOCS_SHOT"):  # refresh the docs' screenshot: MESH_DOCS_SHOT=1 pytest -k operator
        shutil.copy(SHOTS / "test_an_operator_finds_a_dead_lettered_job_by_its_key_replays_it_and_sees_it_succeed"
                    / "1-overview.png", ROOT / "docs" / "images" / "console-overview.png")


def test_a_job_page_follows_the_job_live_and_shows_its_end(settings: MeshSettings, rclient: redis.Redis,
                                                            fleet: Path, browser: Any, shots: Any) -> None:
    """The page is loaded while the job waits for an approval; the decision and the run that follows
    arrive over the event stream, then the page shows the job succeeded."""
    from mesh.agents.pipelines import Pipeline
    from tests.apps.flaky import app

    (fleet / "broken").unlink()
    client = MeshClient(settings, client=rclient, app=app)  # loopback, no users: the local operator
    ref = client.run(Pipeline("ship").step("flaky_shipper", approval={"timeout": "1h"}).build(), {"order": "live-1"})
    server = OpsServer(client, "127.0.0.1", 0)
    thread = server.start()
    base = f"http://127.0.0.1:{server.port}"
    page = browser.new_page()
    errors = Errors(page)
    try:
        page.goto(f"{base}/jobs/{ref.id}")
        assert page.text_content("#job-state") == "awaiting_approval"
        wait_for(lambda: ref.id in server.console.hub.jobs, timeout_s=10)  # the page follows the job
        client.approve(ref.id, "flaky_shipper", note="ship it", by="ana")
        page.wait_for_selector(".live-events div[data-event=approved]", timeout=30_000)
        shots(page, "job-following")
        playwright_api.expect(page.locator("#job-state")).to_have_text("succeeded", timeout=60_000)
        shots(page, "job-ended")
        assert errors.seen == []
    finally:
        page.close()
        server.stop()
        thread.join(10)


def test_a_job_page_refused_its_stream_says_so_and_follows_once_a_stream_is_free(
        make_settings: Callable[..., MeshSettings], rclient: redis.Redis, browser: Any, shots: Any) -> None:
    """The server holds at most half its connections in event streams and answers 503 past that.
    EventSource gives up for good on an answer that is not a stream; the page said "Reconnecting…"
    and followed nothing, ever, however soon a stream was free again."""
    import threading

    import httpx

    from mesh.agents.pipelines import Pipeline
    from mesh.broker import trace

    client = MeshClient(make_settings(ops_max_connections=6), client=rclient)  # room for three streams
    job_id = client.run(Pipeline("crowd").step("researcher", approval={"timeout": "1h"}).build(),
                        {"question": "q"}).id
    server = OpsServer(client, "127.0.0.1", 0)
    thread = server.start()
    base = f"http://127.0.0.1:{server.port}"
    release = threading.Event()

    def hold() -> None:  # other browsers, following the job in every stream there is room for
        with httpx.Client(base_url=base, timeout=30) as http, http.stream("GET", f"/jobs/{job_id}/events") as answer:
            for _ in answer.iter_lines():
                if release.is_set():
                    return

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(3)]
    for holder in holders:
        holder.start()
    page = browser.new_page()
    try:
        wait_for(lambda: server.console.streams == 3, timeout_s=10)
        page.goto(f"{base}/jobs/{job_id}")
        playwright_api.expect(page.locator("#live-status")).to_contain_text("unavailable", timeout=10_000)
        shots(page, "stream-refused")
        release.set()
        trace.emit(client.redis, client.keys, trace.event("progress", {"job_id": job_id, "step_id": "researcher"},
                                                          progress=1, note="first"))  # wakes the holder to leave
        for holder in holders:
            holder.join(10)
        wait_for(lambda: server.console.streams == 0, timeout_s=10)
        trace.emit(client.redis, client.keys, trace.event("progress", {"job_id": job_id, "step_id": "researcher"},
                                                          progress=2, note="second"))
        page.wait_for_selector(".live-events div[data-event=progress]", timeout=30_000)
        playwright_api.expect(page.locator("#live-status")).to_contain_text("Following the job", timeout=10_000)
        assert page.locator(".live-events div[data-event=progress]").count() == 2  # both, once each
    finally:
        page.close()
        server.stop()
        thread.join(10)
