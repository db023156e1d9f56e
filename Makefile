# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast test-flow lint bench screenshots clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch where none is present: a bare `torch` requirement can pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Headless Chromium for the browser test (tests/test_ui_browser.py): Debian's package, where missing.
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "note: chromium is missing and needs root + apt-get to install; the browser test will be skipped"; fi; }
	# PostgreSQL 15 for the team stack and its tests (finpipe.services.postgres): Debian's package, where missing.
	@test -x /usr/lib/postgresql/15/bin/postgres || command -v postgres >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15; \
	  else echo "note: postgresql-15 is missing and needs root + apt-get to install; the team-stack tests will fail"; fi; }
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	FINPIPE_HOME="$${FINPIPE_HOME:-$(CURDIR)/.finpipe}" $(BIN)/finpipe demo

# Every tier (README, "Tests"), on TEST_WORKERS pytest-xdist workers; the server, crash and
# browser tests run one at a time on one of them (--dist loadgroup). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
TEST_PARALLEL = -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# --durations: the run ends with its 20 slowest test phases, the place to look when it slows down.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(TEST_PARALLEL) --durations=20

# The unit tier alone: pure functions, no Prefect, no MLflow store, no child process.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m unit $(TEST_PARALLEL)

# The flow tier alone: real Prefect local mode, MLflow on SQLite, small data.
test-flow: $(STAMP)
	$(BIN)/python -m pytest -m flow $(TEST_PARALLEL)

bench: $(STAMP)
	$(BIN)/python -m benchmarks --domain all

# Re-take the README's screenshots of the Prefect and MLflow UIs (docs/screenshots/).
screenshots: $(STAMP)
	FINPIPE_UPDATE_SCREENSHOTS=1 $(BIN)/python -m pytest -q tests/test_ui_browser.py

clean:
	rm -rf $(VENV) .finpipe
