# The README's two commands are `make run` and `make test`; CI calls `make test` only.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint fmt bench bench-quick bench-memory bench-micro wrk clean deploy-configs protos

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m authz.demo.run --envoy-config envoy.yaml

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python deploy/render.py --check

# proto/ -> authz/api/gen/ (modules and the descriptor set Envoy's JSON transcoder reads);
# the derived Envoy configs embed that descriptor, so they are rendered again too.
protos: $(STAMP)
	$(BIN)/python -m authz.api.codegen
	$(BIN)/python deploy/render.py

deploy-configs: $(STAMP)
	$(BIN)/python deploy/render.py

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Through a real Envoy with wrk (installed from Debian when missing); see README "Performance".
WRK := $(shell command -v wrk)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

wrk:
ifeq ($(WRK),)
	$(SUDO) apt-get install -y wrk || { $(SUDO) apt-get update && $(SUDO) apt-get install -y wrk; }
endif

bench: $(STAMP) wrk
	$(BIN)/python -m bench.envoy_bench

bench-quick: $(STAMP) wrk
	$(BIN)/python -m bench.envoy_bench --quick

bench-memory: $(STAMP)
	$(BIN)/python -m bench.envoy_bench --memory

# In-process micro-benchmarks of the limiter and the servicer (no Envoy, no network).
bench-micro: $(STAMP)
	$(BIN)/python -m bench.bench_ratelimit
	$(BIN)/python -m bench.bench_check

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
