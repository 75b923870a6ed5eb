# One command each: `make demo`, `make test`; benchmarks with `make bench` and `make bench-all`.
# Every target sets up its own virtualenv (.venv) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-django-lts lint docs bench bench-instructions bench-all bench-celery bench-web bench-query bench-ops clean

$(BIN)/threadline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/threadline

venv: $(BIN)/threadline

demo: venv
	$(BIN)/threadline demo

lint: venv
	$(BIN)/ruff check threadline tests bench
	$(BIN)/ruff format --check threadline tests bench
	$(BIN)/mypy

docs: venv
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

test: lint docs
	$(BIN)/pytest
	$(MAKE) test-django-lts

# The Django tests again on the oldest supported Django (4.2 LTS), with psycopg2 installed beside
# psycopg 3 as in a project that moves to threadline.
LTS := .venv-django42
$(LTS)/bin/pytest: pyproject.toml
	$(PYTHON) -m venv $(LTS)
	$(LTS)/bin/pip install -q --upgrade pip
	$(LTS)/bin/pip install -q -e ".[test]" "django>=4.2,<4.3" psycopg2-binary
	touch $(LTS)/bin/pytest

test-django-lts: $(LTS)/bin/pytest
	$(LTS)/bin/pytest -q -p no:cacheprovider tests/test_django.py tests/test_django_migrations.py tests/test_django_admin.py tests/test_django_docs.py

bench: venv
	$(BIN)/python bench/capture.py

bench-instructions: venv
	$(BIN)/python bench/capture_instructions.py

bench-celery: venv
	$(BIN)/python bench/celery_propagation.py

bench-web: venv
	$(BIN)/python bench/web.py

bench-query: venv
	$(BIN)/python bench/query.py

bench-ops: venv
	$(BIN)/python bench/retention.py
	$(BIN)/python bench/load.py

bench-all: bench bench-celery bench-web bench-query bench-ops

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
