# genesis_pgflow: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' 2>/dev/null && echo python3.12 || echo python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install lock system-deps run test test-unit bench soak lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# the versions of requirements-dev.lock (constraints: pyproject.toml says what, the lock which version)
$(BIN)/.installed: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements-dev.lock -e '.[test]'
	touch $@

install: $(BIN)/.installed ## create .venv and install the project with its test tools

lock: ## re-resolve requirements-dev.lock from pyproject.toml (the newest versions allowed), then reinstall
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/python -m uv pip compile pyproject.toml --extra test --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu --no-header --annotation-style line -o requirements-dev.lock
	rm -f $(BIN)/.installed
	$(MAKE) install

system-deps: ## install the system packages the sandbox and analysers need (bubblewrap, elixir, node tools)
	bash scripts/system-deps.sh

run: install ## set up the sandbox and toolchains, then run the consumer (no DSN: the embedded PostgreSQL); ARGS="--drain" etc.
	@bash scripts/system-deps.sh || echo "make run: the sandbox and toolchains could not be installed (needs root or sudo); the consumer says at start what works"
	$(BIN)/genesis-consume $(ARGS)

test: install system-deps ## run every test tier (unit, conformance, integration, acceptance)
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: install system-deps ## only the tests that need no database and no sandbox
	$(BIN)/pytest tests/unit -m "not db and not sandbox" $(PYTEST_ARGS)

bench: install ## issue 9 benchmark: throughput vs the raw pgmq floor, latency, costs, memory, scaling; ARGS="--long" adds RSS over 200,000 msgs
	$(BIN)/python -m benchmarks.run $(ARGS)

soak: install ## minutes of random kills, restarts and network faults (not CI); prints throughput, retries, memory; ARGS="--minutes 10"
	$(BIN)/python -m benchmarks.soak $(ARGS)

lint: install ## ruff, mypy and the import layers contract
	$(BIN)/ruff check genesis_pgflow tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache *.egg-info
