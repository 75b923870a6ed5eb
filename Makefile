# One command each: `make demo`, `make test`, `make bench`. Each sets up its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench clean

$(BIN)/threadline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/threadline

venv: $(BIN)/threadline

demo: venv
	$(BIN)/python examples/demo.py

lint: venv
	$(BIN)/ruff check threadline tests bench examples
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: venv
	$(BIN)/python bench/capture.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

.PHONY: bench-celery
bench-celery: venv
	$(BIN)/python bench/celery.py

bench-ops: venv
	$(BIN)/python bench/retention.py
	$(BIN)/python bench/load.py

.PHONY: bench-web
bench-web: venv
	$(BIN)/python bench/web.py

.PHONY: bench-query
bench-query: venv
	$(BIN)/python bench/query.py
