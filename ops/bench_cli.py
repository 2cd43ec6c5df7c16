"""``mesh bench`` and ``mesh soak``: measure the mesh against raw dramatiq, and run it for long under faults,
each in a namespace and with workers of its own."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from mesh.ops.console import EXIT_FAILED, JsonFlag, client, emit_json, err, out, settings, shell_lines


def bench(
    messages: Annotated[int, typer.Option(min=10, metavar="N", help="Messages (and real steps) per run.")] = 5_000,
    processes: Annotated[int, typer.Option(min=1, metavar="N", help="Worker processes per side.")] = 2,
    threads: Annotated[int, typer.Option(min=1, metavar="N", help="Threads per worker process.")] = 4,
    prefetch: Annotated[str, typer.Option(metavar="N[,N...]", help="Prefetch per consumer, both sides; a "
                                          "comma list runs the throughput pairs and real steps at each; "
                                          "0: 2 x threads.")] = "0",
    pairs: Annotated[int, typer.Option(min=1, metavar="N", help="Alternating mesh/raw throughput pairs.")] = 2,
    latency_samples: Annotated[int, typer.Option(min=1, metavar="N", help="Idle pickup samples per side.")] = 30,
    dlq_entries: Annotated[int, typer.Option(min=10, metavar="N",
                                             help="Entries for the DLQ replay and drain runs.")] = 10_000,
    enqueue_messages: Annotated[int, typer.Option(min=10, metavar="N", help="Messages of the send_many run; "
                                                  "each send() loop sends min(N, 2000).")] = 10_000,
    chain_jobs: Annotated[int, typer.Option(min=1, metavar="N", help="40-step pipelines run one after "
                                            "another for the sequential latency.")] = 5,
    kept_jobs: Annotated[int, typer.Option(min=10, metavar="N", help="Finished one-step jobs (and half as many "
                                           "two-step pipelines) whose storage is measured, on a private "
                                           "redis-server.")] = 2_000,
    floor_jobs: Annotated[int, typer.Option(min=0, metavar="N", help="Jobs of each variant of the writes' floor "
                                            "(a one-step job's writes run alone by purpose-built scripts, "
                                            "beside raw dramatiq's message); 0: skip it.")] = 10_000,
    namespace: Annotated[str | None, typer.Option(metavar="NAME", show_default=False,
                                                  help="Run in this namespace, which must hold no key (it is "
                                                  "deleted at the end); default: a fresh bench-<random> one. "
                                                  "On a Redis Cluster it picks the primary: CLUSTER KEYSLOT "
                                                  "'{NAME}'.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Measure the mesh against raw dramatiq on the configured Redis.

    Runs in a throw-away namespace: throughput and the CPU per message (workers, Redis) at each
    prefetch, Redis commands and round trips per message, real steps (one-step jobs and two-step
    pipelines of a declared agent), the sequential latency of a 40-step pipeline, enqueue rates,
    idle pickup latency, DLQ replay and drain, the writes' floor (what a one-step job's writes cost
    Redis run alone by purpose-built scripts, each kind added in turn); and, on a private
    redis-server, what a finished job keeps in Redis (per job, per pipeline step) and the
    defaults' steady state at 10 jobs/s. On a Redis Cluster its Redis figures sum every
    primary's, and the real steps' are also given per primary."""
    from mesh.ops.bench import BenchConfig, run

    sweep = _prefetches(prefetch)
    s = settings()
    client()  # exits 3 if Redis does not answer
    cfg = BenchConfig(messages=messages, processes=processes, threads=threads, prefetch=sweep, pairs=pairs,
                      latency_samples=latency_samples, dlq_entries=dlq_entries, enqueue_messages=enqueue_messages,
                      chain_jobs=chain_jobs, kept_jobs=kept_jobs, floor_jobs=floor_jobs, namespace=namespace)
    result = run(s, cfg, progress=lambda step: err.print(Text(f"bench: {step}"), style="dim"))
    result["config"]["command"] = (
        f"mesh bench --messages {messages} --processes {processes} --threads {threads} --prefetch {prefetch} "
        f"--pairs {pairs} --latency-samples {latency_samples} --dlq-entries {dlq_entries} "
        f"--enqueue-messages {enqueue_messages} --chain-jobs {chain_jobs} --kept-jobs {kept_jobs} "
        f"--floor-jobs {floor_jobs}"
        + (f" --namespace {namespace}" if namespace else ""))
    if as_json:
        emit_json(result)
        return
    out.print(_bench_table(result))
    cf = result["config"]
    out.print(f"{cf['messages']:,} messages, {cf['processes']} processes x {cf['threads']} threads, "
              f"{cf['pairs']} mesh/raw pairs per prefetch.\nRedis CPU and commands count every client of "
              "that Redis, not only the bench\n(its own polls and INFO left out)"
              + (f"; on a cluster, every primary's summed\n(namespace {result['namespace']} on "
                 f"{result['namespace_primary']})" if result["primaries"] else "") + ". Measured by:")
    out.print(Text(shell_lines(cf["command"])), soft_wrap=True)


def _prefetches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = (-1,)
    if any(v < 0 for v in values):
        raise typer.BadParameter(f"{text!r}: give whole numbers >= 0, comma-separated (e.g. 8,32,64)",
                                 param_hint="--prefetch")
    return values


def _bench_table(result: dict[str, Any]) -> Table:
    """``mesh bench``'s figures in 80 columns: one group of rows per prefetch, then the rest."""
    table = Table("measure", "mesh", "raw", "mesh/raw")
    steps = {s["prefetch"]: s for s in result["step"]}
    for t in result["throughput"]:
        c, w, r = t["redis_commands_per_message"], t["worker_cpu_us_per_message"], t["redis_cpu_us_per_message"]
        st = steps[t["prefetch"]]
        table.add_row(Text(f"prefetch {t['prefetch']}", style="bold"), "", "", "")
        table.add_row("no-op throughput (msg/s)", f"{t['mesh_msg_s']:,.0f}", f"{t['raw_msg_s']:,.0f}",
                      f"{t['ratio']:.2f}")
        table.add_row("  worker CPU (µs/msg)", f"{w['mesh']:,.0f}", f"{w['raw']:,.0f}", f"{w['ratio']:.2f}")
        table.add_row("  Redis CPU (µs/msg)", f"{r['mesh']:,.0f}", f"{r['raw']:,.0f}", f"{r['ratio']:.2f}")
        table.add_row("  Redis commands per msg", f"{c['mesh']:.1f}", f"{c['raw']:.1f}", f"{c['mesh'] - c['raw']:+.1f}")
        table.add_row("  round trips per msg", f"{t['round_trips_per_message']['mesh']:.2f}",
                      f"{t['round_trips_per_message']['raw']:.2f}", "", end_section=True)
        for kind, label in (("job", "real step, one-step job"), ("pipeline", "real step, 2-step pipeline")):
            _real_rows(table, label, st[kind], st["raw"])
    _floor_rows(table, result.get("floor") or {})
    q = result["sequential"]
    table.add_row(f"{q['steps']}-step pipeline, per step (ms)", f"{q['per_step_ms']:.2f}", "", "")
    table.add_row("  step to step p50 / p99 (ms)", f"{q['step_to_step_p50_ms']:.2f} / {q['step_to_step_p99_ms']:.2f}",
                  "", "", end_section=True)
    e, p, d = result["enqueue"], result["pickup_latency"], result["dlq"]
    table.add_row(f"send_many of {e['send_many_messages']:,} (msg/s)", f"{e['send_many_msg_s']:,.0f}",
                  f"{e['send_loop_msg_s']:,.0f}", f"{e['ratio']:.1f}")
    table.add_row(f"send() loop of {e['loop_messages']:,} (msg/s)", f"{e['mesh_send_loop_msg_s']:,.0f}",
                  f"{e['send_loop_msg_s']:,.0f}", f"{e['mesh_send_ratio']:.2f}")
    table.add_row("idle pickup p50 (ms)", f"{p['mesh']['p50_ms']:.1f}", f"{p['raw']['p50_ms']:.1f}", "")
    table.add_row("idle pickup p99 (ms)", f"{p['mesh']['p99_ms']:.1f}", f"{p['raw']['p99_ms']:.1f}", "")
    table.add_row(f"DLQ replay of {d['entries']:,} (entries/s)", f"{d['replay_entries_s']:,.0f}", "", "")
    table.add_row(f"DLQ drain of {d['entries']:,} (entries/s)", f"{d['drain_entries_s']:,.0f}", "", "")
    table.add_row("DLQ drain peak traced memory (MB)", f"{d['drain_peak_traced_mb']:.1f}", "", "")
    table.add_row("  DLQ drain file (MB)", f"{d['drain_file_mb']:.1f}", "", "")
    table.add_row("already-done keys (msg/s)", f"{result['duplicates']['msg_s']:,.0f}", "", "", end_section=True)
    _storage_rows(table, result.get("storage") or {})
    return table


def _floor_rows(table: Table, fl: dict[str, Any]) -> None:
    """The writes' floor: each variant's Redis CPU per job beside raw dramatiq's per message, and the real
    one-step job's (the first prefetch's)."""
    if not fl:
        return
    table.add_row(Text(f"writes' floor, {fl['jobs']:,} jobs (µs/job)", style="bold"), "", "", "")
    raw = fl.get("raw_redis_cpu_us") or 0.0  # 0: too few of raw's messages for INFO cpu's 10 ms steps
    for v in fl["variants"]:
        table.add_row(f"  {v['name']}, {v['redis_commands_per_job']:.1f} commands", f"{v['redis_cpu_us_per_job']:,.0f}",
                      f"{raw:,.0f}", _over(v["redis_cpu_us_per_job"], raw))
    table.add_row("  the real one-step job", f"{fl['real_step_redis_cpu_us']:,.0f}", f"{raw:,.0f}",
                  _over(fl["real_step_redis_cpu_us"], raw), end_section=True)


def _storage_rows(table: Table, st: dict[str, Any]) -> None:
    """What a finished job keeps in Redis: once ended, and once compacted (the ``mesh`` column)."""
    if "job" not in st:
        table.add_row("kept per finished job", "skipped", "", str(st.get("skipped", "")))
        return
    table.add_row(Text(f"kept in Redis, {st['jobs']:,} jobs", style="bold"), "compacted", "ended", "")
    for kind, label in (("job", "  per one-step job (bytes)"), ("pipeline", "  per pipeline step (bytes)")):
        table.add_row(label, f"{st[kind]['kept_bytes_per_step']:,.0f}", f"{st[kind]['ended_bytes_per_step']:,.0f}", "")
    ss = st["steady_state"]
    table.add_row(f"  at {ss['rate_jobs_s']} jobs/s, {ss['retention_s'] / 86400:g} days (GB)", f"{ss['gb']:.1f}",
                  f"{ss['gb_uncompacted']:.1f}", "")


def _times(ratio: float | None) -> str:
    """A ratio to raw's as the table prints it: blank when raw's figure read 0 (a run too short to move it)."""
    return "" if ratio is None else f"{ratio:.2f}"


def _over(mesh: float, raw: float) -> str:
    """``mesh`` / ``raw`` as the table prints a ratio to raw's: blank when raw's figure read 0."""
    return _times(mesh / raw if raw else None)


def _real_rows(table: Table, label: str, st: dict[str, Any], raw: dict[str, float]) -> None:
    """A real step's rows, beside raw dramatiq's no-op per message."""
    v = st["vs_raw"]
    table.add_row(f"{label} (steps/s)", f"{st['steps_s']:,.0f}", f"{raw['msg_s']:,.0f}", f"{v['steps_s']:.2f}")
    table.add_row("  worker CPU (µs/step)", f"{st['worker_cpu_us_per_step']:,.0f}",
                  f"{raw['worker_cpu_us_per_message']:,.0f}", _times(v["worker_cpu"]))
    table.add_row("  Redis CPU (µs/step)", f"{st['redis_cpu_us_per_step']:,.0f}",
                  f"{raw['redis_cpu_us_per_message']:,.0f}", _times(v["redis_cpu"]))
    table.add_row("  Redis commands per step", f"{st['redis_commands_per_step']:.1f}",
                  f"{raw['redis_commands_per_message']:.1f}", f"{v['redis_commands']:+.1f}")
    table.add_row("  round trips per step", f"{st['round_trips_per_step']:.2f}",
                  f"{raw['round_trips_per_message']:.2f}", "")
    later, life = st.get("compaction"), st.get("life")
    if later is not None and life is not None:  # the job's compaction, later, and its whole life with it
        table.add_row("  then compacted: worker CPU (µs/step)", f"{later['worker_cpu_us_per_step']:,.0f}", "", "")
        table.add_row("  then compacted: Redis CPU (µs/step)", f"{later['redis_cpu_us_per_step']:,.0f}", "", "")
        table.add_row("  then compacted: Redis commands", f"{later['redis_commands_per_step']:.1f}", "", "")
        for name, label, per in (("worker_cpu_us_per_step", "worker CPU (µs/step)", "worker_cpu_us_per_message"),
                                 ("redis_cpu_us_per_step", "Redis CPU (µs/step)", "redis_cpu_us_per_message")):
            table.add_row(f"  whole life: {label}", f"{life[name]:,.0f}", f"{raw[per]:,.0f}",
                          _over(life[name], raw[per]))
        table.add_row("  whole life: Redis commands per step", f"{life['redis_commands_per_step']:.1f}",
                      f"{raw['redis_commands_per_message']:.1f}",
                      f"{life['redis_commands_per_step'] - raw['redis_commands_per_message']:+.1f}")
    if not st["primaries"]:
        table.add_section()
    for i, node in enumerate(st["primaries"]):  # on a cluster: commands / Redis CPU per step, on each primary
        table.add_row(f"  on {node['node']} (cmd, µs/step)",
                      f"{node['commands_per_step']:.1f}, {node['redis_cpu_us_per_step']:,.0f}", "",
                      f"{node['spread']:+.0%}", end_section=i == len(st["primaries"]) - 1)


def soak(
    minutes: Annotated[float, typer.Option(min=0, metavar="N", help="How long to send traffic.")] = 10.0,
    seconds: Annotated[float | None, typer.Option(min=1, metavar="N", show_default=False,
                                                  help="How long to send traffic, in seconds (instead of --minutes).")
                       ] = None,
    interval: Annotated[float, typer.Option(min=1, metavar="SECONDS", help="Time between samples.")] = 30.0,
    processes: Annotated[int, typer.Option(min=1, metavar="N", help="Worker processes.")] = 2,
    threads: Annotated[int, typer.Option(min=1, metavar="N", help="Threads per worker process.")] = 4,
    rate: Annotated[float, typer.Option(min=0.1, metavar="N", help="Messages sent per second.")] = 5.0,
    kill_every: Annotated[float, typer.Option(min=0, metavar="SECONDS",
                                              help="SIGKILL and replace a worker this often; 0: never.")] = 60.0,
    as_json: JsonFlag = False,
) -> None:
    """Run mixed traffic with injected faults and report the memory of workers and Redis.

    In a fresh namespace (deleted at the end), with its own workers: whole jobs, note and
    http_post steps (a loopback server answers 200, 429, 503, 400 or too slowly), poison
    pushed raw, and a worker SIGKILLed and replaced every --kill-every seconds. Prints a sample
    every --interval, also while it waits for the work to settle (`up`: the workers heartbeating),
    then a summary. Exits 1 if anything sent was lost."""
    from mesh.ops.soak import SoakConfig
    from mesh.ops.soak import run as run_soak

    s = settings()
    client()  # exits 3 if Redis does not answer
    cfg = SoakConfig(seconds=seconds if seconds is not None else minutes * 60, interval_s=interval,
                     processes=processes, threads=threads, rate=rate, kill_every_s=kill_every)
    show = (lambda line: err.print(Text(line), style="dim")) if as_json else (lambda line: out.print(Text(line)))
    result = run_soak(s, cfg, progress=show)
    if as_json:
        emit_json(result)
    else:
        r, m = result["worker_rss_mb"], result["redis_used_memory_mb"]
        table = Table("measure", "value")
        table.add_row("duration (s)", f"{result['duration_s']:.0f}")
        table.add_row("jobs sent / succeeded / dead-lettered", f"{result['sent']['jobs']} / "
                      f"{result['jobs']['succeeded']} / {result['jobs']['dead_lettered']}")
        table.add_row("poison sent / in the DLQ", f"{result['sent']['poison']} / {result['poison_dead_lettered']}")
        table.add_row("workers killed", str(result["workers"]["killed"]))
        table.add_row("worker RSS MB start / end / max", f"{r['start']} / {r['end']} / {r['max']}")
        table.add_row("Redis used_memory MB start / end / max", f"{m['start']} / {m['end']} / {m['max']}")
        n = result["namespace_memory_mb"]
        table.add_row("its namespace's keys MB start / end / max", f"{n['start']} / {n['end']} / {n['max']}")
        table.add_row("lost", str(result["lost"]))
        out.print(table)
    if result["lost"]:
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add ``bench`` and ``soak`` to the ``mesh`` command."""
    app.command()(bench)
    app.command(epilog="Examples: `mesh soak --minutes 60`, `mesh soak --seconds 30 --kill-every 10 --json`")(soak)
