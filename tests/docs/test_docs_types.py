"""The Python blocks of the docs type-check with the project's mypy settings, as the code does: a
block names a method, argument or field that does not exist, and this fails before a reader does.

Each page's blocks (run in one interpreter by the docs check) become one module, in order; a block
quoting a whole module (``<!-- docs: file PATH -->``) is imported from it, so later blocks importing
the same names see the same types. Pages may define a name twice to show alternatives
(``no-redef`` is off). Errors are reported at their line in the page.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.docs import blocks
from tests.docs.blocks import Block

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


def _checked(block: Block) -> bool:
    return block.lang in blocks.PYTHON and block.marker("skip") is None and block.marker("excerpt") is None


def _module(page: Path) -> tuple[str, list[tuple[int, Block]]]:
    """The page's Python as one module, and where each block starts in it (0-based line)."""
    lines: list[str] = []
    starts: list[tuple[int, Block]] = []
    for block in filter(_checked, blocks.parse(page)):
        quoted = block.marker("file")
        text = f"from {quoted.removesuffix('.py').replace('/', '.')} import *  # noqa: F403" if quoted else block.text
        starts.append((len(lines), block))
        lines += [*text.split("\n"), ""]
    return "\n".join(lines), starts


def _where(line: int, starts: list[tuple[int, Block]]) -> str:
    """``page.md:LINE`` for a module line (1-based): the block it falls in, and its line there."""
    start, block = max((s for s in starts if s[0] < line), key=lambda s: s[0])
    return f"{block.path.relative_to(ROOT)}:{block.line + line - start}"


def test_python_blocks_type_check(tmp_path: Path) -> None:
    modules: dict[str, list[tuple[int, Block]]] = {}
    for n, page in enumerate(PAGES):
        source, starts = _module(page)
        if starts:
            name = f"docs_page_{n}.py"
            (tmp_path / name).write_text(source, encoding="utf-8")
            modules[name] = starts
    assert modules
    # A cache of its own: these options differ from `make lint`'s, and sharing .mypy_cache made each
    # run throw away the other's (5 s of CPU each, every `make check`).
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(ROOT / ".mypy_cache" / "docs-blocks"),
                           "--disable-error-code", "no-redef", "--no-error-summary",
                           *(str(tmp_path / m) for m in modules)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    errors = []
    for line in done.stdout.splitlines():
        if m := re.match(r"^.*?(docs_page_\d+\.py):(\d+): (.*)$", line):
            errors.append(f"{_where(int(m.group(2)), modules[m.group(1)])}: {m.group(3)}")
        else:
            errors.append(line)
    assert done.returncode == 0 and not errors, "\n".join(errors) or done.stderr
