# gradeflow: `make demo` runs the whole flow, `make test` lints and runs the whole suite.
# Both set up everything on a fresh machine (venv, Python deps, Kafka, Redis)
# and stop the local servers afterwards if they started them.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WITH_SERVERS := deploy/local/with-servers

.PHONY: venv compile up down lint test test-fast demo bench bench-hot schemas clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench,rocksdb,compile]'
	touch $@

# The hot path compiled with mypyc (schemas/compiled.py), rebuilt when one of its sources changed.
# Without a C compiler it warns and everything runs as plain Python, slower.
compile: venv
	$(BIN)/python deploy/compile.py ensure || \
		echo "WARNING: the hot path could not be compiled (see above); it runs as plain Python, slower"

up:
	deploy/local/up

down:
	deploy/local/down

# ruff (pyflakes, bugbear, timezone-aware datetimes) and mypy, as configured in pyproject.toml.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: venv lint compile
	$(WITH_SERVERS) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not broker" $(PYTEST_ARGS)

demo: venv compile
	$(WITH_SERVERS) $(BIN)/python -m streams.tools.demo $(DEMO_ARGS)

bench: venv compile
	$(WITH_SERVERS) $(BIN)/python -m bench.run $(BENCH_ARGS)

bench-hot: venv compile
	$(BIN)/python -m bench.hotpath $(BENCH_ARGS)

schemas: venv
	$(BIN)/python -m schemas.generate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .build
