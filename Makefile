# The two commands a newcomer needs: `make demo` and `make test`.
.PHONY: demo test bootstrap lint unit integration e2e format clean

VENV := .venv/bin
PYTEST_ARGS ?=

demo: bootstrap
	$(VENV)/exchange demo --state demo.json

test: bootstrap lint
	$(VENV)/python -m pytest $(PYTEST_ARGS)

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

format: bootstrap
	$(VENV)/ruff format exchange tests benchmarks
	$(VENV)/ruff check --fix exchange tests benchmarks

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache exchange-data demo.json
