# The README's two commands are `make run` and `make test`; CI calls `make test` only.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: install chromium run test lint fmt bench clean deploy-configs protos

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The console's dev OpenID Provider (oidc-provider), for `make run` and the browser tests.
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# The console's browser tests drive Debian's chromium (Playwright cannot download browsers).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		|| echo "make: install Debian's chromium for the browser tests (apt-get install chromium)" >&2; }

install: $(STAMP) $(NODE_STAMP) chromium

run: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m authz.demo.run --envoy-config envoy.yaml

test: install lint
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
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
