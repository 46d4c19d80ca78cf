# The README's two commands are `make run` and `make test`; CI calls `make test` only.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint fmt bench clean deploy-configs protos

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m demo.run --envoy-config envoy.yaml

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

bench: $(STAMP)
	$(BIN)/python -m bench.bench_ratelimit
	$(BIN)/python -m bench.bench_check

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
