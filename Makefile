# The two set-up commands of the README: `make demo` and `make test` create the virtual
# environment and install everything they need on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-cluster check lint docs install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,otlp,docs,openai,anthropic,mcp]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/mesh demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

# PYTHONDONTWRITEBYTECODE (which many container images set) would have every test process, and every
# process a test starts, compile the mesh and the tests from source again: 5 s of CPU per pytest-xdist
# worker for the assertion rewriting alone. With it set, the tests keep their bytecode under
# .pytest_cache/pycache instead (out of the source tree, which the variable keeps clean).
PYTEST := $(if $(PYTHONDONTWRITEBYTECODE),PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(CURDIR)/.pytest_cache/pycache) \
          $(BIN)/pytest

# The whole suite on two processes (pytest-xdist): the slow tier's tests spend most of their time
# waiting (on workers, heartbeats, leases, redis-servers), not computing, and each works in its own
# namespace, on its own ports; on 2 cores two processes overlap those waits.
test: lint
	$(PYTEST) -q -n 2 --durations=25

# The fault tests of claims, fencing, recovery, group commit and settlement, and the pipelines' and the
# dead-letter queue's that stand on them, and those of what once failed only there (a client's kept connection,
# the operator's console, TestContext's Redis), and the CLI's, the stuck steps' and the dead-letter lookup's (quick
# ones that read a job's keys in its shard), on a Redis Cluster (3 primaries, 3 replicas) that each pytest-xdist
# process starts for itself (TEST_REDIS=cluster; its ports from TEST_CLUSTER_PORT, default 7100), their jobs spread
# over 3 shards of their namespace (TEST_SHARDS=3: shards 1 to 3, each job in the shard of its id, each shard a slot
# of its own apart from the fleet-wide keys' `{ns}`, so a script or a transaction mixing two of them fails, and a
# job written or looked for in the wrong shard is never found; TEST_SHARD left at 0, as MESH_SHARD is by default:
# with several shards it does not move the jobs). CI runs it after `make test`, which runs the same tests on a
# single Redis and one shard.
CLUSTER_TESTS := \
	tests/broker/test_claim_owners.py tests/broker/test_fence.py tests/broker/test_fence_redis_cut.py \
	tests/broker/test_fencing.py tests/broker/test_group_commit.py tests/broker/test_recovery.py \
	tests/broker/test_settlement.py tests/broker/test_effectively_once.py tests/broker/test_idempotency.py \
	tests/broker/test_poison_kills.py tests/broker/test_paused_owner.py tests/broker/test_paused_batch.py \
	tests/broker/test_reliability_faults.py tests/broker/test_outbox.py tests/broker/test_routing.py \
	tests/broker/test_failures.py tests/pipelines/test_pipeline_chaos.py tests/pipelines/test_approvals.py \
	tests/pipelines/test_shared_key.py tests/dlq/test_replay_and_export.py tests/test_redis_target.py \
	tests/broker/test_send_connection.py tests/ops/test_console.py tests/ops/test_console_bench.py \
	tests/testing/test_context.py tests/ops/test_worker_shards.py tests/ops/test_cli.py tests/ops/test_stuck.py \
	tests/ops/test_effects_dlq_lookup.py

test-cluster: $(BIN)/.installed
	TEST_REDIS=cluster TEST_SHARDS=3 $(PYTEST) -q -n 2 --durations=10 $(CLUSTER_TESTS)

# The edit-test loop: ruff, mypy and the tests that start no worker and no redis-server of their own
# (tests/tier.py fails a test that does so without @pytest.mark.slow). They are CPU-bound (most of
# their time is `mesh` subprocesses starting), so they run on one process per core (pytest-xdist).
check: lint
	$(PYTEST) -q -m "not slow" -n auto

# The documentation site, in site/: the reference pages are generated from the code; a broken
# link or anchor fails the build (--strict).
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site .mesh .pytest_cache .mypy_cache .ruff_cache *.egg-info
