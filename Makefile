# labsync: two commands on a fresh machine.
#   make demo  - the main job on embedded defaults (local sandbox APIs + SQLite)
#   make test  - the whole test suite (SQLite and a real PostgreSQL server)
#   make e2e   - labsync on a real Airflow CeleryExecutor cluster (two workers, one killed mid-load)
#   make lint  - ruff, then the mypy type check of etl, dags and schemas
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.labsync-installed
PYTEST_ARGS ?=

.PHONY: venv demo test e2e lint bench clean

$(STAMP): pyproject.toml scripts/bootstrap-venv.sh
	@bash scripts/bootstrap-venv.sh "$(VENV)"
	@touch "$(STAMP)"

venv: $(STAMP)

demo: $(STAMP)
	@bash scripts/demo.sh

test: $(STAMP)
	@bash scripts/ensure-postgres.sh
	@bash scripts/ensure-chromium.sh
	@$(VENV)/bin/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

e2e: $(STAMP)
	@bash scripts/e2e.sh

lint: $(STAMP)
	@$(VENV)/bin/ruff check etl schemas dags tests bench
	@$(VENV)/bin/mypy etl dags schemas

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .labsync .pytest_cache
