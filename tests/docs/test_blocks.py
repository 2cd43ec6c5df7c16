"""How the docs check reads blocks and compares outputs: pure functions, no Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs import blocks


def test_markers_above_a_fence_are_read_and_a_blank_line_ends_them(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("<!-- docs: skip (not here) -->\n\n```bash\nls\n```\n"
                    "<!-- docs: worker --app x:app (the app) -->\n<!-- docs: skip (later) -->\n```python\npass\n```\n")
    first, second = blocks.parse(page)
    assert (first.lang, first.markers) == ("bash", [])
    assert second.markers == [("worker", "--app x:app (the app)"), ("skip", "(later)")]
    assert blocks.worker_args(second.marker("worker") or "") == ["--app", "x:app"]


def test_an_unclosed_block_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("```python\npass\n")
    with pytest.raises(ValueError, match="never closed"):
        blocks.parse(page)


def test_console_commands_take_continuations_outputs_and_exit_statuses() -> None:
    commands = blocks.console_commands("$ a \\\n    --b\nout 1\nout 2\n$ c\n[exit 2]\n$ d")
    assert [(c.command, c.expected, c.status) for c in commands] == [
        ("a \\\n    --b", ["out 1", "out 2"], 0), ("c", [], 2), ("d", [], 0)]


def test_normalise_hides_ids_digests_times_and_durations() -> None:
    text = ("job job-7776cbdcea4e599288976d83f87a7653 in 0.003s at 2026-12-06 01:44:06, 12ms\n"
            "id 1598c376-e1f5-4b55-a5a9-c1d81cf86ec5 digest 93eec33fbef6 ns test-abc:x  \n")
    assert blocks.normalise(text, "test-abc") == "job job-… in …s at …, …s\nid … digest … ns <ns>:x"


def test_an_ellipsis_stands_for_text_and_a_line_of_it_for_lines() -> None:
    assert blocks.matches("job …  succeeded\n…\ndone", "job x  succeeded\na\nb\ndone")
    assert blocks.matches("a\n…", "a")
    assert not blocks.matches("job …  succeeded", "job x  failed")
    assert not blocks.matches("a", "a\nb")
    assert not blocks.matches("a … c", "a b\nc")


def test_an_excerpt_keeps_the_files_lines_in_order() -> None:
    source = "a = 1\nb = 2  # two\nc = 3\n"
    assert blocks.excerpt_missing("a = 1\n...\nc = 3  # three", source) is None
    assert blocks.excerpt_missing("c = 3\na = 1", source) == "a = 1"
