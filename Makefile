# The two commands a newcomer needs: `make demo` and `make test`.
.PHONY: demo test bootstrap lint unit integration integration-postgresql e2e format clean reliability

VENV := .venv/bin
PYTEST_ARGS ?=

demo: bootstrap
	$(VENV)/exchange demo --state demo.json

# The integration and end-to-end suites run a second time on PostgreSQL (a throwaway server
# for the session, a database per service; tests/pg.py): what production uses at scale.
test: bootstrap lint
	$(VENV)/python -m pytest $(PYTEST_ARGS)
	EXCHANGE_TEST_DATABASE=postgresql $(VENV)/python -m pytest tests/integration tests/e2e \
		--ignore=tests/e2e/test_viewer.py $(PYTEST_ARGS)

# The reliability and security suite in full (fuzzing, fault injection, isolation, load
# against Orthanc) and one summary table; fails if any count is above 0 (issue 11).
RELIABILITY_DIR ?= reliability-report
reliability: bootstrap
	$(VENV)/python benchmarks/reliability.py --report-dir $(RELIABILITY_DIR) $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

bootstrap:
	@scripts/bootstrap.sh

lint: bootstrap
	$(VENV)/ruff check exchange tests benchmarks
	$(VENV)/ruff format --check exchange tests benchmarks
	$(VENV)/mypy --strict exchange

unit: bootstrap
	$(VENV)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: bootstrap
	$(VENV)/python -m pytest tests/integration tests/e2e $(PYTEST_ARGS)

integration-postgresql: bootstrap
	EXCHANGE_TEST_DATABASE=postgresql $(VENV)/python -m pytest tests/integration tests/e2e $(PYTEST_ARGS)

format: bootstrap
	$(VENV)/ruff format exchange tests benchmarks
	$(VENV)/ruff check --fix exchange tests benchmarks

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache exchange-data demo.json
