# Two commands do all the setup on a fresh machine:
#   make demo   - create .venv, install what the demo needs (torch from the local 2.13.0 CPU wheel), run the main job
#   make test   - create .venv, install everything the tests need (llama-cpp-python compiles), run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
WS      ?= workspace
SUM     := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
STAMP   := $(VENV)/.installed-test-$(SUM)
DEMO_STAMP := $(VENV)/.installed-demo-$(SUM)
PYTEST_ARGS ?=
# pytest-xdist workers: each test runs on one OpenMP thread (tests/conftest.py), so two workers keep two cores busy;
# tests are sent one at a time, longest first (tests/conftest.py: MEASURED_SECONDS, ONE_WORKER_FILES)
TEST_WORKERS ?= 2

.PHONY: install demo test bench clean chromium

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0

# the demo needs neither the LLM extra (llama-cpp-python compiles from source for minutes) nor the test tools
$(DEMO_STAMP): pyproject.toml $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e ".[serve]"
	touch $@

$(STAMP): pyproject.toml $(VENV)/bin/python
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install -q -e ".[dev,llm,serve,ray]"
	touch $(DEMO_STAMP) $@

install: $(STAMP)

DEMO_CFG ?= configs/demo.yaml

# The main job on the embedded defaults (DuckDB, a simulated world, packaged models), `assay run`:
# simulate -> ingest -> mine -> label requests -> teachers -> calibrate -> annotate -> agreement -> curriculum ->
# train -> click baseline -> export-index -> evaluate; it ends with the headline table and the report's path.
# A step whose inputs and config did not change is skipped, so a second `make demo` only prints the table.
demo: $(DEMO_STAMP)
	$(BIN)/assay run --workspace $(WS) --config $(DEMO_CFG)

# The search page's browser test drives Debian's Chromium headless: installed here where apt can (as root),
# otherwise that one test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium >/dev/null; } || echo "chromium could not be installed: the search page's browser test will skip"

# Each test file runs whole on one worker (its module fixtures are built once); the session's worlds, mined and
# labeled workspaces and trained judges are built once and shared by both workers (tests/conftest.py built_once).
test: install chromium
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_ingest.py

clean:
	rm -rf $(VENV) $(WS) .pytest_cache
