"""Every code block of the documentation (every ``.md`` under docs/, and README.md) runs, so a page
cannot drift from the code: Python blocks are executed (their printed output compared with the
``text`` block that follows), console examples are run against real ``mesh worker`` processes in a
namespace of their own and their output compared, shell blocks must exit 0, YAML/JSON/TOML must
parse, and excerpts must match the files they quote. A block that cannot run carries
``<!-- docs: skip (reason) -->``; the run reports how many did. The markers are described in
tests/docs/blocks.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import close_client, mesh_env, redis_client, wait_for

from mesh.broker import MeshSettings
from mesh.broker.keys import Keys
from tests.docs import blocks
from tests.docs.blocks import Block

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
KNOWN_MARKERS = {"skip", "file", "excerpt", "worker", "pytest"}
WORKER_LINE = re.compile(r"^mesh worker\b(.*?)&\s*$")
RUNNABLE = blocks.PYTHON | blocks.CONSOLE | blocks.SHELL


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _runs(page: Path) -> bool:
    return any(b.lang in RUNNABLE and b.marker("skip") is None for b in blocks.parse(page))


def _kind(block: Block, before: Block | None) -> str:
    """How the inventory counts a block: skipped, checked (against a file), run, output (what the
    Python block before it prints, compared), or text (a diagram, output shown for reading)."""
    if block.lang == "text" and not block.markers and before is not None and before.lang in blocks.PYTHON:
        return "output"
    if block.marker("skip") is not None:
        return "skipped"
    if block.marker("excerpt") is not None:
        return "checked"
    if block.lang in RUNNABLE or block.lang in blocks.DATA:
        return "run"
    return "text"


@pytest.fixture(scope="module", autouse=True)
def inventory(request: pytest.FixtureRequest) -> Iterator[None]:
    """At the end, print how many blocks run, are checked against files, are skipped (and why)."""
    yield
    counts: Counter[str] = Counter()
    skipped: list[str] = []
    for page in PAGES:
        page_blocks = blocks.parse(page)
        for n, block in enumerate(page_blocks):
            counts[_kind(block, page_blocks[n - 1] if n else None)] += 1
            if block.marker("skip") is not None:
                skipped.append(f"  {_rel(block.path)}:{block.line} {block.marker('skip')}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\ndocs blocks in {len(PAGES)} pages: {counts['run']} run, {counts['output']} outputs "
                            f"compared with what the Python before them printed, {counts['checked']} checked "
                            f"against the files they quote, "
                            f"{counts['skipped']} skipped, {counts['text']} text (diagrams, sample output)")
        for line in skipped:
            reporter.write_line(line)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_block_is_runnable_or_marked_and_quotes_match(page: Path) -> None:
    """Fast, no Redis: every block has a language the check knows (or is marked), every marker is
    known and skips say why, and quoted files match what the page shows."""
    for block in blocks.parse(page):
        for kind, arg in block.markers:
            assert kind in KNOWN_MARKERS, f"{block.where}: unknown marker {kind!r}"
            if kind == "skip":
                assert re.fullmatch(r"\(.+\)", arg), f"{block.where}: a skip says why: <!-- docs: skip (reason) -->"
        known = RUNNABLE | blocks.DATA | blocks.TEXT
        assert block.lang in known or block.marker("skip") is not None, \
            f"{block.where}: a {block.lang!r} block is not run; mark it <!-- docs: skip (reason) -->"
        _check_quotes(block)
        _check_data(block)


def test_readme_links_into_the_docs_resolve() -> None:
    """README.md is read on the forge, not built: its relative links must name files that exist."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", readme)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def _check_quotes(block: Block) -> None:
    if (path := block.marker("file")) is not None:
        text = (ROOT / path).read_text(encoding="utf-8")
        assert block.text.strip("\n") == text.strip("\n"), f"{block.where}: differs from {path}"
    if (path := block.marker("excerpt")) is not None:
        missing = blocks.excerpt_missing(block.text, (ROOT / path).read_text(encoding="utf-8"))
        assert missing is None, f"{block.where}: this line is not in {path} (in this order): {missing!r}"


def _check_data(block: Block) -> None:
    if block.marker("skip") is not None:
        return
    if block.lang == "yaml":
        yaml.safe_load(block.text)
    elif block.lang == "json":
        json.loads(block.text)
    elif block.lang == "toml":
        tomllib.loads(block.text)


class Page:
    """One page's run: a namespace, its workers, a Python interpreter and a scratch directory that
    sees the repository's files (so examples may write files without touching the checkout)."""

    def __init__(self, settings: MeshSettings, start: Callable[..., subprocess.Popen[bytes]], workdir: Path) -> None:
        self.settings = settings
        self.start = start
        self.workdir = workdir
        self.env = {**mesh_env(settings), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                    "COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}
        self.workers = 0
        self.python: subprocess.Popen[str] | None = None
        for entry in ROOT.iterdir():
            if entry.name not in (".git", "site"):
                (workdir / entry.name).symlink_to(entry)

    def worker(self, args: list[str]) -> None:
        """Start ``mesh worker ARGS`` and wait until it has published its agents."""
        self.start(*args)
        self.workers += 1
        r = redis_client(self.settings.redis_url)
        try:
            wait_for(lambda: r.hlen(Keys(self.settings.namespace).registry_workers) >= self.workers, 60)
        finally:
            close_client(r)

    def run_python(self, block: Block) -> str:
        if self.python is None:
            self.python = subprocess.Popen([sys.executable, str(ROOT / "tests/docs/driver.py")], cwd=self.workdir,
                                           env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.python.stdin is not None and self.python.stdout is not None
        self.python.stdin.write(json.dumps({"code": block.text, "name": block.where}) + "\n")
        self.python.stdin.flush()
        answer = json.loads(self.python.stdout.readline() or '{"ok": false, "out": "", "error": "driver died"}')
        assert answer["ok"], f"{block.where}: the block failed:\n{answer['error']}"
        return str(answer["out"])

    def shell(self, script: str, timeout: float = 180) -> str:
        proc = subprocess.Popen(["bash", "-c", script], cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            return proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the shell and whatever it started
            proc.communicate()
            raise

    def run_console(self, block: Block) -> None:
        """Each command's output and exit status against what the page shows; ``mesh worker ... &``
        starts a worker for the rest of the page."""
        pending: list[blocks.Command] = []
        for command in blocks.console_commands(block.text):
            if match := WORKER_LINE.match(command.command):
                self._console_batch(block, pending)
                pending = []
                self.worker(shlex.split(match.group(1)))
            else:
                pending.append(command)
        self._console_batch(block, pending)

    def _console_batch(self, block: Block, commands: list[blocks.Command]) -> None:
        """Commands run in one shell (so a variable one sets is seen by the next)."""
        if not commands:
            return
        script = "".join(f"{c.command}\nprintf '\\n@@docs-status=%d@@\\n' $?\n" for c in commands)
        chunks = re.split(r"\n@@docs-status=(\d+)@@\n", self.shell(script))
        for n, command in enumerate(commands):
            output, status = chunks[2 * n], int(chunks[2 * n + 1])
            shown = blocks.normalise("\n".join(command.expected), self.settings.namespace)
            got = blocks.normalise(output, self.settings.namespace)
            assert blocks.matches(shown, got) and status == command.status, (
                f"{block.where}: `{command.command}` printed (exit {status}, normalised):\n{got}\n"
                f"--- the page shows (exit {command.status}):\n{shown}")

    def run_shell(self, block: Block) -> None:
        lines = []
        for line in block.text.split("\n"):
            if match := WORKER_LINE.match(line.strip()):
                self.worker(shlex.split(match.group(1)))
            else:
                lines.append(line)
        script = "set -e\n" + "\n".join(lines) + "\nprintf '\\n@@docs-status=0@@\\n'\n"
        output = self.shell(script)
        assert "@@docs-status=0@@" in output, f"{block.where}: the shell block failed:\n{output}"

    def run_pytest(self, block: Block, n: int) -> None:
        module = self.workdir / f"test_docs_block_{n}.py"
        module.write_text(block.text, encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)],
                              cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{block.where}: the test module failed:\n{done.stdout}\n{done.stderr}"

    def close(self) -> None:
        if self.python is not None:
            assert self.python.stdin is not None
            self.python.stdin.close()
            self.python.wait(30)


def _run_block(page: Page, block: Block, following: Block | None, n: int) -> bool:
    """Run one block; True when it used ``following`` as its expected output."""
    for args in (blocks.worker_args(arg) for kind, arg in block.markers if kind == "worker"):
        page.worker(args)
    if block.marker("skip") is not None or block.marker("excerpt") is not None:
        return False  # an excerpt is checked against its file, which its own tests run
    if block.marker("pytest") is not None:
        page.run_pytest(block, n)
    elif block.lang in blocks.PYTHON:
        printed = page.run_python(block)
        if following is not None and following.lang == "text" and not following.markers:
            shown = blocks.normalise(following.text)
            assert blocks.matches(shown, blocks.normalise(printed)), \
                f"{block.where}: printed (normalised):\n{blocks.normalise(printed)}\n--- the page shows:\n{shown}"
            return True
    elif block.lang in blocks.CONSOLE:
        page.run_console(block)
    elif block.lang in blocks.SHELL:
        page.run_shell(block)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _runs(p)], ids=_rel)
def test_page_examples_run_and_print_what_the_page_shows(page: Path, settings: MeshSettings,
                                                         worker_process: Callable[..., Any], tmp_path: Path) -> None:
    run = Page(settings, worker_process, tmp_path)
    try:
        page_blocks = blocks.parse(page)
        used = False
        for n, block in enumerate(page_blocks):
            if used:  # this text block was the output of the Python block before it
                used = False
                continue
            following = page_blocks[n + 1] if n + 1 < len(page_blocks) else None
            used = _run_block(run, block, following, n)
    finally:
        run.close()
