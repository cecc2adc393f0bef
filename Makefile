# SendKit: `make run` to try it, `make test` to check it. Nothing else needs installing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
DEV_STAMP := $(VENV)/.installed-dev-$(shell cat requirements-dev.lock pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install install-dev run test check lint typecheck bench clean lock

install: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

install-dev: $(DEV_STAMP)

$(DEV_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@ $(STAMP)

## Serve the API on http://127.0.0.1:8000 with the embedded SQLite database and the
## sandbox inbox; the first run creates a demo account and prints its key.
run: install
	$(BIN)/sendkit serve --init-demo

## The whole suite, on SQLite and PostgreSQL. pytest's exit code 5 (no tests collected)
## would mean the suite itself is broken, so it fails here too.
test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: install-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install-dev
	$(BIN)/mypy

check: lint typecheck

bench: install-dev
	$(BIN)/python bench/run.py $(if $(QUICK),--quick,)
	$(if $(QUICK),,$(BIN)/python bench/readme_table.py)

lock:
	$(BIN)/uv pip compile pyproject.toml -o requirements.lock -q --python-version 3.11
	$(BIN)/uv pip compile pyproject.toml --extra dev -o requirements-dev.lock -q --python-version 3.11

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
