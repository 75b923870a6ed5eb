"""The audit schema: tables, indexes, the context decoder and the per-transaction functions.

:func:`install_sql` renders the whole, idempotent script (for migrations and ``--print-sql``);
:func:`install` applies it to a database under an advisory lock and records the version.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from threadline.ddl.names import (
    CONTEXT_SETTING,
    DEFAULT_SCHEMA,
    check_schema_name,
    context_cache_setting,
    transaction_cache_setting,
)
from threadline.errors import SchemaError

SCHEMA_VERSION = 1
"""Version of the audit schema this release installs."""

_SCRIPT = """\
-- threadline audit schema, version {version}
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {schema}.schema_version (
    version integer PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS {schema}.actions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    actor jsonb,
    status text NOT NULL DEFAULT 'ok',
    verb text,
    category text,
    reason text,
    comment text,
    correlation_id text,
    request_id text,
    job_id text,
    meta jsonb,
    inserted_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS {schema}.transactions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    occurred_at timestamptz NOT NULL DEFAULT now(),
    actor jsonb,
    correlation_id text,
    request_id text,
    causation_id text,
    origin text,
    job jsonb,
    action_id bigint,
    meta jsonb,
    context_error text
);
COMMENT ON COLUMN {schema}.transactions.context_error IS
    'Why the context set for this transaction was refused (NULL when it was valid or absent).';

CREATE TABLE IF NOT EXISTS {schema}.changes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id bigint NOT NULL,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    op text NOT NULL CHECK (op IN ('insert', 'update', 'delete', 'truncate')),
    pk jsonb,
    after jsonb,
    before jsonb,
    changed_fields text[],
    captured_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX IF NOT EXISTS transactions_correlation_id_idx
    ON {schema}.transactions (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS transactions_actor_idx
    ON {schema}.transactions ((actor ->> 'type'), (actor ->> 'id'), occurred_at)
    WHERE actor IS NOT NULL;
CREATE INDEX IF NOT EXISTS transactions_occurred_at_idx
    ON {schema}.transactions USING brin (occurred_at);
CREATE INDEX IF NOT EXISTS changes_transaction_id_idx
    ON {schema}.changes (transaction_id);
CREATE INDEX IF NOT EXISTS changes_row_idx
    ON {schema}.changes USING hash (pk);
CREATE INDEX IF NOT EXISTS changes_captured_at_idx
    ON {schema}.changes USING brin (captured_at);
CREATE INDEX IF NOT EXISTS actions_correlation_id_idx
    ON {schema}.actions (correlation_id) WHERE correlation_id IS NOT NULL;

CREATE OR REPLACE FUNCTION {schema}.valid_text(v jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT v IS NULL OR (jsonb_typeof(v) = 'string'
        AND length(v #>> ARRAY[]::text[]) BETWEEN 1 AND 256
        AND (v #>> ARRAY[]::text[]) !~ '[[:cntrl:]]')
$fn$;

-- Decode and validate the context text. Never raises: a bad value yields NULL fields and a
-- reason in context_error, so it can neither block the write nor become a wrong actor.
CREATE OR REPLACE FUNCTION {schema}.decode_context(
    raw text,
    OUT actor jsonb, OUT correlation_id text, OUT request_id text, OUT causation_id text,
    OUT origin text, OUT job jsonb, OUT meta jsonb, OUT context_error text)
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    j jsonb;
    a jsonb;
BEGIN
    IF raw IS NULL OR raw = '' THEN
        RETURN;
    END IF;
    IF octet_length(raw) > 16384 THEN
        context_error := 'context is larger than 16384 bytes';
        RETURN;
    END IF;
    BEGIN
        j := raw::jsonb;
    EXCEPTION WHEN others THEN
        context_error := 'context is not valid JSON';
        RETURN;
    END;
    IF jsonb_typeof(j) <> 'object' THEN
        context_error := 'context is not a JSON object';
    ELSIF j -> 'v' IS DISTINCT FROM '1'::jsonb THEN
        context_error := 'context version is missing or unsupported';
    ELSIF (j - ARRAY['v', 'actor', 'correlation_id', 'request_id', 'causation_id', 'origin',
                     'job', 'meta', 'incoming_error']) <> '{{}}'::jsonb THEN
        context_error := 'context has unknown fields';
    ELSIF NOT ({schema}.valid_text(j -> 'correlation_id') AND {schema}.valid_text(j -> 'request_id')
               AND {schema}.valid_text(j -> 'causation_id') AND {schema}.valid_text(j -> 'origin')
               AND {schema}.valid_text(j -> 'incoming_error')) THEN
        context_error := 'context has an invalid id or origin';
    ELSIF jsonb_typeof(j -> 'job') IS DISTINCT FROM 'object' AND j ? 'job'
          OR jsonb_typeof(j -> 'meta') IS DISTINCT FROM 'object' AND j ? 'meta' THEN
        context_error := 'context job or meta is not an object';
    ELSE
        a := j -> 'actor';
        IF a IS NOT NULL AND NOT (
            jsonb_typeof(a) = 'object'
            AND (a - ARRAY['type', 'id', 'display']) = '{{}}'::jsonb
            AND jsonb_typeof(a -> 'type') = 'string'
            AND (a ->> 'type') ~ '^[a-z][a-z0-9_]{{0,31}}$'
            AND {schema}.valid_text(a -> 'id') AND {schema}.valid_text(a -> 'display')
            AND (a ? 'id' OR a ->> 'type' = 'anonymous')) THEN
            context_error := 'context actor is invalid';
            RETURN;
        END IF;
        actor := a;
        correlation_id := j ->> 'correlation_id';
        request_id := j ->> 'request_id';
        causation_id := j ->> 'causation_id';
        origin := j ->> 'origin';
        job := j -> 'job';
        meta := j -> 'meta';
        -- The application refused a context it received (a Celery header, another carrier):
        -- the work ran without it, and its transactions say so.
        IF j ? 'incoming_error' THEN
            context_error := 'incoming: ' || (j ->> 'incoming_error');
        END IF;
    END IF;
END
$fn$;

-- The transactions row of the current database transaction, created on first use: the context
-- setting is read once per transaction and the id is cached in a transaction-local setting.
CREATE OR REPLACE FUNCTION {schema}.transaction_id() RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    cached text := current_setting({tx_setting}, true);
    raw text;
    c record;
    new_id bigint;
BEGIN
    IF cached <> '' THEN
        -- Trust the cache only if it names this transaction's own row: a forged setting must
        -- not attach changes to another transaction's context.
        PERFORM 1 FROM {schema}.transactions t
         WHERE t.id = cached::bigint AND t.xid = pg_current_xact_id();
        IF FOUND THEN
            RETURN cached::bigint;
        END IF;
    END IF;
    raw := coalesce(current_setting({context_setting}, true), '');
    c := {schema}.decode_context(raw);
    INSERT INTO {schema}.transactions
        (actor, correlation_id, request_id, causation_id, origin, job, meta, context_error)
    VALUES (c.actor, c.correlation_id, c.request_id, c.causation_id, c.origin, c.job, c.meta,
            c.context_error)
    RETURNING id INTO new_id;
    PERFORM set_config({tx_setting}, new_id::text, true);
    PERFORM set_config({ctx_cache_setting}, raw, true);
    RETURN new_id;
END
$fn$;

-- At commit: if the context was changed after the transaction row was written, the last value
-- set wins.
CREATE OR REPLACE FUNCTION {schema}.refresh_transaction_context() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    raw text := coalesce(current_setting({context_setting}, true), '');
    c record;
BEGIN
    IF raw IS DISTINCT FROM current_setting({ctx_cache_setting}, true) THEN
        c := {schema}.decode_context(raw);
        UPDATE {schema}.transactions
           SET actor = c.actor, correlation_id = c.correlation_id, request_id = c.request_id,
               causation_id = c.causation_id, origin = c.origin, job = c.job, meta = c.meta,
               context_error = c.context_error
         WHERE id = NEW.id;
    END IF;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS refresh_context ON {schema}.transactions;
CREATE CONSTRAINT TRIGGER refresh_context AFTER INSERT ON {schema}.transactions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION {schema}.refresh_transaction_context();

INSERT INTO {schema}.schema_version (version) VALUES ({version}) ON CONFLICT DO NOTHING;
"""


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` did."""

    schema: str
    previous_version: int | None
    version: int

    @property
    def changed(self) -> bool:
        """True when the database was changed (a fresh install or an upgrade)."""
        return self.previous_version != self.version


def install_sql(schema: str = DEFAULT_SCHEMA) -> str:
    """The complete, idempotent DDL of the audit schema named ``schema``, as text.

    Needs no database: paste it into an Alembic or Django migration, or pipe it to ``psql``.
    """
    check_schema_name(schema)
    composed = sql.SQL(_SCRIPT).format(
        schema=sql.Identifier(schema),
        version=sql.Literal(SCHEMA_VERSION),
        tx_setting=sql.Literal(transaction_cache_setting(schema)),
        ctx_cache_setting=sql.Literal(context_cache_setting(schema)),
        context_setting=sql.Literal(CONTEXT_SETTING),
    )
    return composed.as_string(None)


def installed_version(conn: psycopg.Connection, schema: str = DEFAULT_SCHEMA) -> int | None:
    """The audit schema version recorded in the database, or ``None`` if it is not installed."""
    check_schema_name(schema)
    row = conn.execute(
        "SELECT to_regclass(format('%%I.schema_version', %s::text)) IS NOT NULL", [schema]
    ).fetchone()
    if not row or not row[0]:
        return None
    found = conn.execute(
        sql.SQL("SELECT max(version) FROM {}.schema_version").format(sql.Identifier(schema))
    ).fetchone()
    return None if found is None else found[0]


def install(conn: psycopg.Connection, schema: str = DEFAULT_SCHEMA) -> InstallResult:
    """Create or upgrade the audit schema in one transaction; a no-op when it is current."""
    check_schema_name(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('threadline install ' || %s))", [schema])
        previous = installed_version(conn, schema)
        if previous is not None and previous > SCHEMA_VERSION:
            raise SchemaError(
                f"schema {schema!r} is at version {previous}, newer than this release's "
                f"{SCHEMA_VERSION}: upgrade the threadline package"
            )
        if previous != SCHEMA_VERSION:
            conn.execute(install_sql(schema).encode())
    return InstallResult(schema, previous, SCHEMA_VERSION)


def require_installed(conn: psycopg.Connection, schema: str = DEFAULT_SCHEMA) -> None:
    """Raise :class:`SchemaError` unless the audit schema is installed at this release's version."""
    version = installed_version(conn, schema)
    if version is None:
        raise SchemaError(f"audit schema {schema!r} is not installed: run `threadline install` first")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"audit schema {schema!r} is at version {version}, this release needs "
            f"{SCHEMA_VERSION}: run `threadline install` to upgrade"
        )
