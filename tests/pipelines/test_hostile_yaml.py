"""Hostile pipeline files: an alias bomb, deep nesting, long chains and oversized files are refused
as ``FILE:LINE: message`` (exit 2 from the CLI), never a hang or a RecursionError."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from mesh.agents.pipelines import Pipeline, PipelineError, load_pipeline, order
from mesh.agents.pipelines.loader import MAX_DEPTH, MAX_FILE_BYTES
from mesh.agents.pipelines.spec import MAX_STEPS
from mesh.contracts import ConfigError
from tests.pipelines.agents import app

APP = "tests.pipelines.agents:app"
Cli = Callable[..., CompletedProcess[str]]


def alias_bomb(levels: int) -> str:
    """A pipeline whose ``description`` expands to 10**levels nodes through aliases."""
    lines = ["name: p", "x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join([*lines, "agents:", "  - id: researcher", ""])


def reverse_chain(n: int, *, cycle: bool = False) -> str:
    """``n`` steps, each depending on the one declared after it (the last on the first if ``cycle``), each
    given the one before's output (``hold`` takes and gives a CodeDiff)."""
    steps = [f"  - id: s{i}\n    agent: hold\n    depends_on: [s{i + 1}]" for i in range(n - 1)]
    steps.append(f"  - id: s{n - 1}\n    agent: hold" + ("\n    depends_on: [s0]" if cycle else ""))
    return "name: p\nagents:\n" + "\n".join(steps) + "\n"


def load_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, app)
    return str(caught.value).replace(str(path), "bad.yaml")


@pytest.mark.timeout(60)
def test_an_alias_bomb_is_refused_at_the_alias_line_without_expanding(tmp_path: Path) -> None:
    assert load_error(tmp_path, alias_bomb(9)) == (
        "bad.yaml:3: not valid YAML: aliases (*name) are not allowed in a pipeline file; write the value out")


def test_nesting_past_the_limit_is_a_load_error_at_its_line(tmp_path: Path) -> None:
    text = "name: p\nagents:\n  - id: researcher\ndescription: " + "[" * 600 + "]" * 600 + "\n"
    assert load_error(tmp_path, text) == f"bad.yaml:4: not valid YAML: nested deeper than {MAX_DEPTH} levels"


def test_a_long_reverse_ordered_chain_loads_and_orders(tmp_path: Path) -> None:
    path = tmp_path / "chain.yaml"
    path.write_text(reverse_chain(MAX_STEPS))
    spec = load_pipeline(path, app)
    assert order(spec) == [f"s{i}" for i in reversed(range(MAX_STEPS))]


def test_a_cycle_through_a_long_chain_is_named_not_a_recursion_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, reverse_chain(MAX_STEPS, cycle=True))
    assert message.startswith("bad.yaml:5: depends_on makes a cycle: s0 → s1 → s2")


def test_more_steps_than_the_limit_are_refused_at_the_steps_line(tmp_path: Path) -> None:
    assert load_error(tmp_path, reverse_chain(MAX_STEPS + 1)) == (
        f"bad.yaml:2: agents: {MAX_STEPS + 1} steps, over the {MAX_STEPS} a pipeline may have")
    builder = Pipeline("p")
    for i in range(MAX_STEPS + 1):
        builder.step(f"s{i}", agent="researcher")
    with pytest.raises(ConfigError, match=f"over the {MAX_STEPS} a pipeline may have"):
        builder.build()


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    text = "name: p\nagents:\n  - id: researcher\ndescription: " + "x" * MAX_FILE_BYTES + "\n"
    assert load_error(tmp_path, text).startswith(f"bad.yaml:1: the file is {len(text)} bytes, over the")


def test_order_breaks_ties_by_file_order() -> None:
    spec = (Pipeline("p").step("b", agent="researcher").step("a", agent="researcher")
            .step("c", agent="researcher", depends_on=["a", "b"]).step("d", agent="researcher").build())
    assert order(spec) == ["b", "a", "c", "d"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["bomb", "deep"])
def test_pipeline_validate_exits_2_with_file_line_on_hostile_files(cli: Cli, tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(alias_bomb(9) if kind == "bomb" else "name: p\nagents:\n  - id: " + "[" * 600 + "]" * 600)
    run = cli("pipeline", "validate", str(bad), "--app", APP)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(f"{bad}:3: not valid YAML: ")


def test_a_control_character_is_a_load_error_at_its_line(tmp_path: Path) -> None:
    # found by tests/fuzz/test_pipeline_fuzz.py: PyYAML's reader refused it outside the loader's guard
    assert load_error(tmp_path, "name: p\nagents:\n  - id: researcher\n\x08\n") == (
        "bad.yaml:4: not valid YAML: character 0x0008 is not allowed")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_pipeline_validate_refuses_a_fifo_or_a_device_without_reading_it(cli: Cli, tmp_path: Path, kind: str) -> None:
    # a FIFO's open waits for a writer, and /dev/zero's size is 0 though it never ends: both hung
    # `validate` (the second growing its memory) where a size check before reading was meant to hold
    bad = tmp_path / "bad.yaml"
    if kind == "fifo":
        os.mkfifo(bad)
    else:
        bad.symlink_to("/dev/zero")
    run = cli("pipeline", "validate", str(bad), "--app", APP, timeout=30)
    assert (run.returncode, run.stderr.strip()) == (2, f"{bad}:1: not a regular file: a pipeline file must be a "
                                                       "plain file")


def test_a_file_not_in_utf8_is_a_load_error_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: p\nagents:\n  - id: researcher\ndescription: \xff\n")
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, app)
    assert str(caught.value) == f"{path}:1: not UTF-8: invalid start byte at byte 48"
