# The two set-up commands of the README: `make demo` and `make test` create the virtual
# environment and install everything they need on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test check lint docs install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,otlp,docs]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/mesh demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

# The whole suite on two processes (pytest-xdist): the slow tier's tests spend most of their time
# waiting (on workers, heartbeats, leases, redis-servers), not computing, and each works in its own
# namespace, on its own ports; on 2 cores two processes overlap those waits.
test: lint
	$(BIN)/pytest -q -n 2 --durations=25

# The edit-test loop: ruff, mypy and the tests that start no worker and no redis-server of their own
# (tests/tier.py fails a test that does so without @pytest.mark.slow). They are CPU-bound (most of
# their time is `mesh` subprocesses starting), so they run on one process per core (pytest-xdist).
check: lint
	$(BIN)/pytest -q -m "not slow" -n auto

# The documentation site, in site/: the reference pages are generated from the code; a broken
# link or anchor fails the build (--strict).
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site .mesh .pytest_cache .mypy_cache .ruff_cache *.egg-info
