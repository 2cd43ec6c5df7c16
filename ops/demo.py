"""``mesh demo``: a real job through real worker processes and real Redis queues, shown as it happens."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.markup import escape as markup_escape
from rich.text import Text

from mesh.agents.tools import read_note
from mesh.broker import MeshClient, MeshSettings
from mesh.broker.connection import masked_url
from mesh.contracts import TERMINAL, JobRecord, State, StepRecord
from mesh.ops.console import fitted, shell_lines, wrapped

from .local_redis import ensure_redis

DEMO_NAMESPACE = "mesh-demo"


def run_demo(goal: str, timeout_s: float, out: Console) -> int:
    env_settings = MeshSettings.from_env()
    url = ensure_redis(env_settings, private=True)  # a demo runs anywhere, Redis or not
    namespace = os.environ.get("MESH_NAMESPACE", DEMO_NAMESPACE)
    env = {**os.environ, "MESH_REDIS_URL": url, "MESH_NAMESPACE": namespace}
    tls = {"redis_ca_file": None, "redis_cert_file": None, "redis_key_file": None}
    if url != env_settings.redis_url:  # the private server speaks plain TCP
        env = {k: v for k, v in env.items() if k.lower().removeprefix("mesh_") not in tls}
    settings = env_settings.model_copy(update={"redis_url": url, "namespace": namespace,
                                               **(tls if url != env_settings.redis_url else {})})
    for line in fitted([f"Redis {masked_url(url)}, namespace {namespace!r};", "starting 2 worker processes",
                        "(planner, researcher, executor)"], " ", out.size.width):
        out.print(Text(line), highlight=False)
    workers = subprocess.Popen(
        [sys.executable, "-m", "mesh.ops.cli", "worker", "--processes", "2", "--threads", "4"],
        env=env, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        client = MeshClient(settings)
        ref = client.submit(goal, key=f"demo-{uuid.uuid4().hex[:12]}")
        submitted, *trace = fitted([f"submitted job {ref.id}", f"(trace {ref.trace_id})"], " ", out.size.width)
        out.print(Text.assemble("submitted job ", (ref.id, "bold"), submitted.removeprefix(f"submitted job {ref.id}")))
        for line in [*trace, *wrapped(f"goal: {goal}", out.size.width, "      ")]:
            out.print(Text(line), highlight=False)
        record = _follow(client, ref.id, timeout_s, out)
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        try:
            workers.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(workers.pid, signal.SIGKILL)
    from .jobs_cli import steps_table

    out.print()
    out.print(f"job {record.job_id}: [bold]{record.state}[/bold]")
    # The steps that ran: the plan and the items (a for_each step's own record holds its join).
    out.print(steps_table(record.model_copy(update={"steps": _ran(record)})))
    _show_effects(client, record, out)
    if url == env_settings.redis_url:
        out.print("\nInspect it again with:")  # a command that pastes as one, in lines that fit 80 columns
        out.print(Text(shell_lines(f"MESH_REDIS_URL={masked_url(url)} MESH_NAMESPACE={namespace} {mesh_command()} "
                                   f"status {record.job_id}")), highlight=False)
    else:  # the private server stops with this process, and its data with it
        out.print()
        for line in wrapped(f"No Redis answered at {masked_url(env_settings.redis_url)}, so this demo ran on a "
                             "private one that stops now, with its data: the job cannot be inspected afterwards. To "
                             "keep jobs, start a Redis there (e.g. redis-server) and run the demo again; then: "
                             f"{mesh_command()} status {record.job_id}", out.size.width):
            out.print(Text(line), highlight=False)
    return 0 if record.state is State.SUCCEEDED else 1


def mesh_command() -> str:
    """How the reader's shell reaches this ``mesh``: ``mesh`` when ``PATH`` finds this one, else its path.

    ``make demo`` runs ``.venv/bin/mesh`` from a shell where the venv is not active, so a hint that
    says ``mesh status`` would answer "command not found"."""
    script = Path(sys.executable).parent / "mesh"
    found = shutil.which("mesh")
    if not script.is_file() or (found is not None and Path(found).resolve() == script.resolve()):
        return "mesh"
    try:
        return str(script.relative_to(Path.cwd()))  # e.g. .venv/bin/mesh: a slash, so not looked up on PATH
    except ValueError:
        return str(script)


def _follow(client: MeshClient, job_id: str, timeout_s: float, out: Console) -> JobRecord:
    """Print each step's state changes as they happen, until the job ends (a succeeded step with
    effects says whether they are verified or only the tool's word)."""
    from mesh.ops.dag import shown_state

    seen: dict[str, str] = {}
    started = time.monotonic()
    while True:
        record = client.status(job_id)
        for step in _ran(record).values():
            if seen.get(step.step_id) != step.state:
                seen[step.step_id] = step.state
                note = f" ({step.error})" if step.error else ""
                out.print(f"  {time.monotonic() - started:6.2f}s  {step.step_id:<5} {step.agent:<10} "
                          f"{shown_state(step)}{note}", highlight=False, markup=False)
        if record.state in TERMINAL:
            return record
        if time.monotonic() - started > timeout_s:
            out.print(f"[red]job still {record.state} after {timeout_s:g}s[/red]")
            return record
        time.sleep(0.05)


def _ran(record: JobRecord) -> dict[str, StepRecord]:
    """The job's steps that run an agent: the built-in pipeline's ``for_each`` steps' own records
    (each holds its items' join) left out."""
    from mesh.agents.builtin import PIPELINE

    fanned = {s.id for s in PIPELINE.steps if s.for_each is not None}
    return {sid: s for sid, s in record.steps.items() if sid not in fanned}


def _show_effects(client: MeshClient, record: JobRecord, out: Console) -> None:
    for step in record.steps.values():
        result = step.result or {}
        if step.agent == "researcher":
            for finding in result.get("findings", []):
                out.print(f"  [dim]{step.step_id} cites {markup_escape(finding['source'])}[/dim]")
        if result.get("tool") == "note":
            note = read_note(client.redis, client.keys_of(record.job_id), result["effect_id"])
            if note:
                said, *title = fitted([f"note {note['note_id']} read back from Redis:", note["title"]], " ",
                                      out.size.width)
                out.print()
                out.print(Text(said) if title else Text.assemble(said.removesuffix(note["title"]),
                                                                 (note["title"], "bold")), highlight=False)
                for line in title:
                    out.print(Text(line, style="bold"), highlight=False)
                for f in note["findings"]:
                    for line in wrapped(f"- {f['question']}: {f['summary']}", out.size.width, "    ", "  "):
                        out.print(Text(line), highlight=False)
