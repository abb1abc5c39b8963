# gradeflow: `make demo` runs the whole flow, `make test` the whole suite.
# Both set up everything on a fresh machine (venv, Python deps, Kafka, Redis)
# and stop the local servers afterwards if they started them.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WITH_SERVERS := deploy/local/with-servers

.PHONY: venv up down test test-fast demo bench bench-hot schemas clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench,rocksdb]'
	touch $@

up:
	deploy/local/up

down:
	deploy/local/down

test: venv
	$(WITH_SERVERS) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not broker" $(PYTEST_ARGS)

demo: venv
	$(WITH_SERVERS) $(BIN)/python -m streams.demo $(DEMO_ARGS)

bench: venv
	$(WITH_SERVERS) $(BIN)/python -m bench.run $(BENCH_ARGS)

bench-hot: venv
	$(BIN)/python -m bench.hotpath $(BENCH_ARGS)

schemas: venv
	$(BIN)/python -m schemas.generate

clean:
	rm -rf $(VENV) .pytest_cache
