"""Expressions are bounded at load (length, nesting, macro calls and their nesting: FILE:LINE) and
when they run (time, memory, result size, a crash of the evaluator): an expression past a run-time
limit dead-letters its step, and the process that asked goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.agents.pipelines import (
    ExpressionError,
    Pipeline,
    PipelineError,
    compile_condition,
    engine,
    load_pipeline,
    sandbox,
)
from mesh.agents.pipelines.expr import MAX_EXPR_CHARS, MAX_EXPR_NESTING, MAX_MACRO_DEPTH, MAX_MACROS, ExpressionLimit
from mesh.contracts import ConfigError, JobRecord, State
from tests.conftest import ROOT, sigstop, wait_for
from tests.pipelines.agents import app

#: The review's 930-byte ``when``: a string doubled 34 times (16 GiB).
DOUBLING = "['ab']" + ".map(s, s + s)" * 34 + "[0].size() > 0"
#: The review's 180 KB chain of maps, which compiles and overflows the evaluator's stack.
CHAIN = "[1]" + ".map(x, [x])" * 15_000 + " == []"
#: Within the load limits, and about 10**8 steps over a list of 500.
SLOW = "input.xs.exists(a, input.xs.exists(b, input.xs.exists(c, a + b + c < 0)))"
#: Within the load limits, and 2**8 copies of a 1 MB string.
GREEDY = "[input.s]" + ".map(s, s + s)" * 8 + "[0].size() > 0"


def _configured(timeout_ms: int) -> Iterator[sandbox.ExprLimits]:
    limits = sandbox.ExprLimits(timeout_ms=timeout_ms, memory_mb=128, max_result_bytes=64 * 1024)
    sandbox.configure(limits)
    yield limits
    sandbox.configure(sandbox.ExprLimits())


@pytest.fixture
def tight() -> Iterator[sandbox.ExprLimits]:
    yield from _configured(500)


def refused(tmp_path: Path, when: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\nagents:\n  - id: researcher\n  - id: coder\n    depends_on: [researcher]\n"
                    f"    when: \"{when}\"\n")
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, app)
    return str(caught.value).replace(str(path), "p.yaml")


def test_the_doubling_when_is_refused_at_its_line(tmp_path: Path) -> None:
    assert len(DOUBLING) < 1000
    message = refused(tmp_path, DOUBLING)
    assert message.startswith("p.yaml:6: agents[1].when: condition \"['ab'].map(s, s + s)")
    assert message.endswith(f"calls 34 macros (map, filter, all, exists, exists_one), over the {MAX_MACROS} allowed")


def test_the_long_chain_is_refused_at_its_line_before_it_compiles(tmp_path: Path) -> None:
    assert refused(tmp_path, CHAIN).endswith(f"characters is over the {MAX_EXPR_CHARS} allowed")


@pytest.mark.parametrize(("text", "why"), [
    ("(" * (MAX_EXPR_NESTING + 1) + "1" + ")" * (MAX_EXPR_NESTING + 1) + " == 1", "levels deep"),
    ("[[1]]" + "".join(f".exists(v{i}, [[1]]" for i in range(MAX_MACRO_DEPTH + 1)) + ", true" + ")" *
     (MAX_MACRO_DEPTH + 1), "nests macros"),
])
def test_nesting_and_macro_depth_past_the_limits_are_refused(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        compile_condition(text)


def test_expressions_within_the_limits_compile() -> None:
    compile_condition("[1, 2].exists(a, [3].exists(b, [4].all(c, a + b + c > 0)))")
    compile_condition("(" * MAX_EXPR_NESTING + "true" + ")" * MAX_EXPR_NESTING)


def test_an_expression_past_the_time_limit_is_stopped(tight: sandbox.ExprLimits) -> None:
    with pytest.raises(ExpressionLimit, match=r"ran longer than MESH_EXPR_TIMEOUT_MS \(500\)"):
        compile_condition(SLOW).test({"input": {"xs": list(range(500))}})
    assert compile_condition("input.n > 1").test({"input": {"n": 2}})  # a fresh evaluator answers


@pytest.fixture
def roomy() -> Iterator[sandbox.ExprLimits]:
    """The memory limit of ``tight`` with time enough to reach it on a loaded machine."""
    yield from _configured(10_000)


def test_an_expression_past_the_memory_limit_kills_its_evaluator_only(roomy: sandbox.ExprLimits) -> None:
    with pytest.raises(ExpressionLimit, match="killed its evaluator"):
        compile_condition(GREEDY).test({"input": {"s": "m" * 1_000_000}})
    assert compile_condition("input.n > 1").test({"input": {"n": 2}})


def test_a_value_past_the_result_limit_is_refused(tight: sandbox.ExprLimits) -> None:
    expr = compile_condition("input.xs.map(x, input.s)")
    with pytest.raises(ExpressionLimit, match=r"over MESH_EXPR_MAX_RESULT_BYTES \(65536\)"):
        expr.evaluate({"input": {"xs": list(range(100)), "s": "r" * 1000}})


def test_a_segfault_in_the_evaluator_is_an_expression_limit() -> None:
    # the chain is refused at load; given to the evaluator as it is, it takes the evaluator down
    evaluator = sandbox.Evaluator(sandbox.ExprLimits(timeout_ms=30_000))
    try:
        with pytest.raises(sandbox.EvaluatorLimit, match=r"killed its evaluator \(signal 11"):
            evaluator.evaluate(CHAIN, {})
        assert evaluator.evaluate("1 + 1", {}) == ("ok", 2)
    finally:
        evaluator.close()


def test_an_evaluation_error_is_still_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="cannot evaluate") as caught:
        compile_condition("input.missing > 1").test({"input": {}})
    assert not isinstance(caught.value, ExpressionLimit)


def test_a_when_past_a_limit_dead_letters_its_step_and_the_job(tight: sandbox.ExprLimits) -> None:
    spec = Pipeline("slow").step("researcher", when=SLOW).step("coder", depends_on=["researcher"]).build()
    record = JobRecord(job_id="j", key="k", trace_id="0" * 32, created_at=0, updated_at=0, pipeline="slow",
                       pipeline_digest=spec.digest(), pipeline_input={"goal": "g", "xs": list(range(500))})
    record, messages, events = engine.begin(spec, record, engine.Run(trace_id="0" * 32, deadline=1e10),
                                            engine.Routes(), now=1.0)
    step = record.steps["researcher"]
    assert (step.state, step.failure_class) == (State.DEAD_LETTERED, "invalid_input")
    assert "MESH_EXPR_TIMEOUT_MS" in (step.error or "") and not messages
    assert record.state is State.DEAD_LETTERED
    assert [e["event"] for e in events if e.get("step_id") == "researcher"] == ["input_refused"]


@pytest.mark.parametrize("text", ["input.xs[0] == 1", "input.n / input.zero > 1", "input.n % input.zero == 0",
                                  "input.big * 2 > 0", "input.big + 1 > 0", "uint(input.n - 2) > 0u"])
def test_an_arithmetic_or_index_error_is_an_expression_error_not_a_dead_evaluator(text: str) -> None:
    # CEL raises IndexError, ZeroDivisionError and OverflowError too: an empty list or a zero is
    # ordinary data (its step is dead-lettered invalid_output), not an expression that killed its evaluator
    values = {"input": {"xs": [], "n": 1, "zero": 0, "big": 2**63 - 1}}
    with pytest.raises(ExpressionError, match="cannot evaluate") as caught:
        compile_condition(text).test(values)
    assert not isinstance(caught.value, ExpressionLimit)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command's name (state first), or [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _evaluator_of(pid: int) -> int | None:
    """The pid of ``pid``'s evaluator child."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"evaluator_main.py" in cmdline and _stat(int(entry.name))[1:2] == [str(pid)]:
            return int(entry.name)
    return None


def _cpu_ticks(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0


@pytest.mark.timeout(180)
def test_a_process_killed_mid_evaluation_leaves_no_evaluator_running() -> None:
    # the parent kills its evaluator at the time limit; a parent SIGKILLed (or OOM-killed) cannot,
    # and the evaluator ran the expression on for hours as an orphan. The limit is 2 s: the orphan
    # then spends about 4 s of CPU before its own limit ends it (5 s cost 7 s, on a machine the
    # whole fast tier shares), and 2 s is still ten times the 0.2 s of CPU the parent is killed after
    script = ("from mesh.agents.pipelines import compile_condition, sandbox\n"
              "sandbox.configure(sandbox.ExprLimits(timeout_ms=2000))\n"
              "sandbox.evaluator().evaluate('1', {})\n"
              "print('asking', flush=True)\n"
              f"compile_condition({SLOW!r}).test({{'input': {{'xs': list(range(3000))}}}})\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = None
    try:
        assert parent.stdout is not None and parent.stdout.readline() == b"asking\n"
        child = _evaluator_of(parent.pid)
        assert child is not None
        started = _cpu_ticks(child)
        wait_for(lambda: _cpu_ticks(child) > started + 20, timeout_s=60)  # it is evaluating
        parent.kill()
        parent.wait()
        assert _stat(child)[:1] not in ([], ["Z"]), "the parent was killed before its time limit stopped the evaluator"
        wait_for(lambda: _stat(child)[:1] in ([], ["Z"]), timeout_s=60)
    finally:
        parent.kill()
        parent.wait()
        if child is not None and _stat(child)[:1] not in ([], ["Z"]):
            os.kill(child, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_a_stopped_evaluator_does_not_block_the_writer_and_a_fresh_one_answers_instead(
        tight: sandbox.ExprLimits) -> None:
    # a request larger than the pipe, to an evaluator that does not read: the write blocked for
    # ever, holding the lock every other thread of the worker waits on. Now the write gives up at
    # the time limit, and as the stopped evaluator spent no CPU on it, a fresh one is asked instead
    evaluator = sandbox.evaluator()
    assert evaluator.evaluate("1 + 1", {}) == ("ok", 2)
    assert evaluator._proc is not None
    stopped = evaluator._proc.pid
    sigstop(stopped)  # it reads nothing more
    outcome: list[object] = []

    def ask() -> None:
        try:
            outcome.append(compile_condition("size(input.s) > 0").test({"input": {"s": "x" * 300_000}}))
        except ExpressionLimit as exc:
            outcome.append(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    wait_for(lambda: outcome, timeout_s=30)
    assert outcome == [True]
    assert evaluator._proc is not None and evaluator._proc.pid != stopped



def test_compiling_and_evaluating_loads_cel_without_its_repl() -> None:
    # cel/__init__.py imports its REPL (cel.cli: typer, rich, prompt_toolkit, pygments), 0.16 s of
    # CPU in every worker, evaluator and `mesh` process; neither the mesh nor its evaluator needs it,
    # and an `import cel.cli` of one's own still gets the real module
    script = ("import sys\n"
              "from mesh.agents.pipelines import compile_condition\n"
              "assert compile_condition('input.n > 1').test({'input': {'n': 2}})\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cel', 'typer', 'prompt_toolkit')))\n"
              "import cel.cli\n"
              "print(callable(cel.cli.cli_entry))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['cel', 'cel.cel', 'cel.stdlib']", "True"]
