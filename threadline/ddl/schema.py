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
from threadline.errors import PrivilegeError, SchemaError

SCHEMA_VERSION = 6
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

-- Keyed by (transaction_id, id): one btree serves "the changes of a transaction, in order" and
-- uniqueness, and its keys are distinct (a btree on transaction_id alone pays for deduplicating
-- the equal keys of a bulk statement's rows).
CREATE TABLE IF NOT EXISTS {schema}.changes (
    id bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id bigint NOT NULL,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    op text NOT NULL,
    pk jsonb,
    after jsonb,
    before jsonb,
    changed_fields text[],
    captured_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (transaction_id, id)
);
-- versions before 3 keyed changes by id, with a separate index on transaction_id
DO $upgrade$
BEGIN
    IF (SELECT array_length(conkey, 1) FROM pg_constraint
         WHERE conrelid = '{schema}.changes'::regclass AND contype = 'p') = 1 THEN
        ALTER TABLE {schema}.changes DROP CONSTRAINT changes_pkey,
            ADD PRIMARY KEY (transaction_id, id);
    END IF;
END
$upgrade$;
DROP INDEX IF EXISTS {schema}.changes_transaction_id_idx;
-- Versions before 6 checked op with a CHECK constraint. Only the capture functions (as the owner)
-- write changes, always with one of 'insert', 'update', 'delete', 'truncate'; PostgreSQL rebuilt
-- the check's expression from its stored text for every captured statement.
ALTER TABLE {schema}.changes DROP CONSTRAINT IF EXISTS changes_op_check;

CREATE INDEX IF NOT EXISTS transactions_correlation_id_idx
    ON {schema}.transactions (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS transactions_actor_idx
    ON {schema}.transactions ((actor ->> 'type'), (actor ->> 'id'), occurred_at)
    WHERE actor IS NOT NULL;
CREATE INDEX IF NOT EXISTS transactions_occurred_at_idx
    ON {schema}.transactions USING brin (occurred_at);
CREATE INDEX IF NOT EXISTS changes_row_idx
    ON {schema}.changes USING hash (pk);
CREATE INDEX IF NOT EXISTS changes_captured_at_idx
    ON {schema}.changes USING brin (captured_at);
-- as_of() looks for a truncate between a row's last change and the time asked; only truncate
-- changes enter this index, so capture of ordinary rows does not pay for it
CREATE INDEX IF NOT EXISTS changes_truncate_idx
    ON {schema}.changes (table_schema, table_name, captured_at) WHERE op = 'truncate';
CREATE INDEX IF NOT EXISTS actions_correlation_id_idx
    ON {schema}.actions (correlation_id) WHERE correlation_id IS NOT NULL;

DROP FUNCTION IF EXISTS {schema}.valid_text(jsonb);
-- version 1 decoded the context text in one PL/pgSQL function
DROP FUNCTION IF EXISTS {schema}.decode_context(text);

-- Parse the context text. Never raises: a value that is too large or not JSON yields a reason.
CREATE OR REPLACE FUNCTION {schema}.parse_context(raw text, OUT j jsonb, OUT err text)
LANGUAGE plpgsql IMMUTABLE AS $fn$
BEGIN
{parse_block}
END
$fn$;

-- Validate a parsed context and split it into the transaction row's fields. A bad value yields
-- NULL fields and a reason in context_error, so it can neither block the write nor become a
-- wrong actor. One SQL statement that PostgreSQL inlines into its caller's cached plan.
CREATE OR REPLACE FUNCTION {schema}.decode_context(j jsonb, parse_error text)
RETURNS TABLE (actor jsonb, correlation_id text, request_id text, causation_id text, origin text,
               job jsonb, meta jsonb, context_error text)
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT CASE WHEN s.err IS NULL THEN s.j -> 'actor' END,
           CASE WHEN s.err IS NULL THEN s.j ->> 'correlation_id' END,
           CASE WHEN s.err IS NULL THEN s.j ->> 'request_id' END,
           CASE WHEN s.err IS NULL THEN s.j ->> 'causation_id' END,
           CASE WHEN s.err IS NULL THEN s.j ->> 'origin' END,
           CASE WHEN s.err IS NULL THEN s.j -> 'job' END,
           CASE WHEN s.err IS NULL THEN s.j -> 'meta' END,
           -- the application refused a context it received (a Celery header, another carrier):
           -- the work ran without it, and its transactions say so
           CASE WHEN s.err IS NULL AND s.j ? 'incoming_error'
                THEN 'incoming: ' || (s.j ->> 'incoming_error') ELSE s.err END
      FROM (SELECT j, CASE
            WHEN parse_error IS NOT NULL THEN parse_error
            WHEN j IS NULL THEN NULL
            WHEN jsonb_typeof(j) <> 'object' THEN 'context is not a JSON object'
            WHEN j -> 'v' IS DISTINCT FROM '1'::jsonb THEN 'context version is missing or unsupported'
            WHEN (j - ARRAY['v', 'actor', 'correlation_id', 'request_id', 'causation_id', 'origin',
                            'job', 'meta', 'incoming_error']) <> '{{}}'::jsonb
                THEN 'context has unknown fields'
            WHEN NOT coalesce(jsonb_path_match(j, {ids_path}, '{{}}', true), false)
                 OR greatest(length(j ->> 'correlation_id'), length(j ->> 'request_id'),
                             length(j ->> 'causation_id'), length(j ->> 'origin'),
                             length(j ->> 'incoming_error')) > 256
                THEN 'context has an invalid id or origin'
            WHEN NOT coalesce(jsonb_path_match(j, {maps_path}, '{{}}', true), false)
                THEN 'context job or meta is not an object'
            WHEN NOT coalesce(jsonb_path_match(j, {actor_path}, '{{}}', true), false)
                 OR (j ? 'actor' AND (((j -> 'actor') - ARRAY['type', 'id', 'display']) <> '{{}}'::jsonb
                                      OR length(j -> 'actor' ->> 'type') > 32
                                      OR greatest(length(j -> 'actor' ->> 'id'),
                                                  length(j -> 'actor' ->> 'display')) > 256))
                THEN 'context actor is invalid'
            END AS err OFFSET 0) AS s
$fn$;

-- The id cached by this transaction's first capture, parsed from "<id>/<xid>", or NULL when the
-- setting is unset, malformed or names another transaction's xid. Never raises. The capture code
-- still checks the row (id and xid) before using it, so a value set by hand cannot attach changes
-- to another transaction's row or to none.
CREATE OR REPLACE FUNCTION {schema}.cached_transaction_id() RETURNS bigint
LANGUAGE sql VOLATILE AS $fn$
    SELECT CASE WHEN split_part(current_setting({tx_setting}, true), '/', 2) = pg_current_xact_id()::text
                 AND split_part(current_setting({tx_setting}, true), '/', 1) ~ '^[0-9]+$'
                 AND length(split_part(current_setting({tx_setting}, true), '/', 1)) <= 18
                THEN split_part(current_setting({tx_setting}, true), '/', 1)::bigint END
$fn$;

-- A new transactions row for the current database transaction, from the context setting, with
-- "<id>/<xid>" cached in a transaction-local setting for the statements that follow. Only the
-- schema's owner may call it (EXECUTE is revoked from PUBLIC): the capture functions, and
-- link_action() through transaction_id(), call it as the owner (they are SECURITY DEFINER with a
-- pinned search_path), so
-- an application role that may not write the audit tables still gets its transactions recorded.
-- It is not SECURITY DEFINER itself, and it parses the context inline rather than through
-- parse_context(): each extra PL/pgSQL call and search_path switch is paid once per audited
-- transaction. The capture functions call it only after their own lookup of the cached row found
-- none; anything else calls transaction_id().
CREATE OR REPLACE FUNCTION {schema}.transaction_row() RETURNS bigint
LANGUAGE plpgsql SECURITY INVOKER AS $fn$
DECLARE
    raw text := coalesce(current_setting({context_setting}, true), '');
    j jsonb;
    err text;
    new_id bigint;
BEGIN
{parse_block}
    -- The checks of decode_context() as one condition: a context that passes them all (the usual
    -- case) is stored without building the statement that names the failed check, which costs
    -- more than the checks themselves; any other value goes through decode_context().
    IF err IS NULL AND jsonb_typeof(j) = 'object' AND j -> 'v' = '1'::jsonb
       AND coalesce(jsonb_path_match(j, {valid_path}, '{{}}', true), false)
       AND (j - ARRAY['v', 'actor', 'correlation_id', 'request_id', 'causation_id', 'origin',
                      'job', 'meta', 'incoming_error']) = '{{}}'::jsonb
       AND coalesce(greatest(length(j ->> 'correlation_id'), length(j ->> 'request_id'),
                             length(j ->> 'causation_id'), length(j ->> 'origin'),
                             length(j ->> 'incoming_error')) <= 256, true)
       AND (NOT j ? 'actor'
            OR (((j -> 'actor') - ARRAY['type', 'id', 'display']) = '{{}}'::jsonb
                AND length(j -> 'actor' ->> 'type') <= 32
                AND coalesce(greatest(length(j -> 'actor' ->> 'id'),
                                      length(j -> 'actor' ->> 'display')) <= 256, true))) THEN
        INSERT INTO {schema}.transactions
            (actor, correlation_id, request_id, causation_id, origin, job, meta, context_error)
        VALUES (j -> 'actor', j ->> 'correlation_id', j ->> 'request_id', j ->> 'causation_id',
                j ->> 'origin', j -> 'job', j -> 'meta', 'incoming: ' || (j ->> 'incoming_error'))
        RETURNING id INTO new_id;
    ELSIF raw = '' THEN
        INSERT INTO {schema}.transactions DEFAULT VALUES RETURNING id INTO new_id;
    ELSE
        INSERT INTO {schema}.transactions
            (actor, correlation_id, request_id, causation_id, origin, job, meta, context_error)
        SELECT d.actor, d.correlation_id, d.request_id, d.causation_id, d.origin, d.job, d.meta,
               d.context_error
          FROM {schema}.decode_context(j, err) AS d
        RETURNING id INTO new_id;
    END IF;
    PERFORM set_config({tx_setting}, new_id::text || '/' || pg_current_xact_id()::text, true),
            set_config({ctx_cache_setting}, raw, true);
    RETURN new_id;
END
$fn$;
REVOKE EXECUTE ON FUNCTION {schema}.transaction_row() FROM PUBLIC;

-- The transactions row of the current database transaction, created on first use; the id cached
-- by an earlier statement is used only after checking the row (id and xid), so a value set by
-- hand cannot attach changes to another transaction's row.
CREATE OR REPLACE FUNCTION {schema}.transaction_id() RETURNS bigint
LANGUAGE plpgsql SECURITY INVOKER AS $fn$
DECLARE
    found_id bigint;
BEGIN
    SELECT t.id INTO found_id FROM {schema}.transactions AS t
     WHERE t.id = {schema}.cached_transaction_id() AND t.xid = pg_current_xact_id();
    IF FOUND THEN
        RETURN found_id;
    END IF;
    RETURN {schema}.transaction_row();
END
$fn$;
REVOKE EXECUTE ON FUNCTION {schema}.transaction_id() FROM PUBLIC;

-- Capture functions of versions 2 and 3 call this name.
CREATE OR REPLACE FUNCTION {schema}.current_transaction_id() RETURNS bigint
LANGUAGE sql VOLATILE AS $fn$
    SELECT {schema}.transaction_id()
$fn$;

-- At commit: if the context was changed after the transaction row was written, the last value
-- set wins. Rewrites the current transaction's row only (its id and xid must match), as the owner;
-- callable by anyone, since all it can do is what setting the context before the first write
-- would have done.
CREATE OR REPLACE FUNCTION {schema}.apply_context_change(tx bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    raw text := coalesce(current_setting({context_setting}, true), '');
BEGIN
    UPDATE {schema}.transactions AS t
       SET actor = d.actor, correlation_id = d.correlation_id, request_id = d.request_id,
           causation_id = d.causation_id, origin = d.origin, job = d.job, meta = d.meta,
           context_error = d.context_error
      FROM {schema}.parse_context(raw) AS p, {schema}.decode_context(p.j, p.err) AS d
     WHERE t.id = tx AND t.xid = pg_current_xact_id();
    PERFORM set_config({ctx_cache_setting}, raw, true);
END
$fn$;
GRANT EXECUTE ON FUNCTION {schema}.apply_context_change(bigint) TO PUBLIC;

-- The commit-time check, fired by a deferred trigger as the committing role. It only compares two
-- settings, so it needs neither the owner's rights nor a pinned search_path (whatever a caller's
-- path resolves here runs with the caller's own rights); the rare rewrite is the owner's function
-- above.
CREATE OR REPLACE FUNCTION {schema}.refresh_transaction_context() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER AS $fn$
BEGIN
    IF coalesce(current_setting({context_setting}, true), '')
           IS DISTINCT FROM current_setting({ctx_cache_setting}, true) THEN
        PERFORM {schema}.apply_context_change(NEW.id);
    END IF;
    RETURN NULL;
END
$fn$;

-- Link an action to the current transaction's row (only that row, only once): what an
-- application role without UPDATE on the audit tables calls to record a linked action.
CREATE OR REPLACE FUNCTION {schema}.link_action(action bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    tx bigint := {schema}.transaction_id();
BEGIN
    UPDATE {schema}.transactions SET action_id = action WHERE id = tx AND action_id IS NULL;
    RETURN tx;
END
$fn$;

DROP TRIGGER IF EXISTS refresh_context ON {schema}.transactions;
CREATE CONSTRAINT TRIGGER refresh_context AFTER INSERT ON {schema}.transactions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION {schema}.refresh_transaction_context();

INSERT INTO {schema}.schema_version (version) VALUES ({version}) ON CONFLICT DO NOTHING;
"""


# Parses the text in `raw` into `j` (jsonb), or leaves `j` NULL and says why in `err`; never raises.
# Shared by parse_context() and, inline, by transaction_row(). An empty or NULL text is no context.
_PARSE_BLOCK = """\
    IF raw <> '' THEN
        IF octet_length(raw) > 16384 THEN
            err := 'context is larger than 16384 bytes';
        ELSE
            BEGIN
                j := raw::jsonb;
            EXCEPTION WHEN others THEN
                err := 'context is not valid JSON';
            END;
        END IF;
    END IF;"""

# Validation of the decoded context as JSON path predicates: each is one call that PostgreSQL runs
# in C, which keeps the per-transaction cost of decoding small. A text value is a non-empty string
# without control characters (its length, at most 256, is checked in SQL: a bounded repetition
# such as {0,255} made each regular expression match cost about 10 µs).
_TEXT = '($.{0}.type() == "string" && $.{0} like_regex "^[^\\u0001-\\u001f\\u007f]+$")'
_OPTIONAL_TEXT = "(!exists($.{0}) || " + _TEXT + ")"
_IDS_PATH = " && ".join(
    _OPTIONAL_TEXT.format(f)
    for f in ("correlation_id", "request_id", "causation_id", "origin", "incoming_error")
)
_MAPS_PATH = " && ".join(f'(!exists($.{f}) || $.{f}.type() == "object")' for f in ("job", "meta"))
_ACTOR_PATH = (
    '!exists($.actor) || ($.actor.type() == "object" && $.actor.type.type() == "string"'
    ' && $.actor.type like_regex "^[a-z][a-z0-9_]*$"'
    f" && {_OPTIONAL_TEXT.format('actor.id')} && {_OPTIONAL_TEXT.format('actor.display')}"
    ' && (exists($.actor.id) || $.actor.type == "anonymous"))'
)
# decode_context()'s three JSON path checks as one (part of transaction_row()'s valid-context test)
_VALID_PATH = f"({_IDS_PATH}) && ({_MAPS_PATH}) && ({_ACTOR_PATH})"


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


_PRIVILEGES = """\
-- least privilege for the application role {role}: read the audit tables, record actions,
-- never change or remove an audit row (capture runs as the owner: SECURITY DEFINER functions)
REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role};
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};
GRANT INSERT ON {schema}.actions TO {role};
GRANT EXECUTE ON FUNCTION {schema}.link_action(bigint) TO {role};
"""


def privileges_sql(app_role: str, schema: str = DEFAULT_SCHEMA) -> str:
    """The grants that let ``app_role`` read the audit tables (and insert actions) but never
    insert, update, delete or truncate ``transactions`` and ``changes`` (idempotent)."""
    check_schema_name(schema)
    if not isinstance(app_role, str) or not app_role or len(app_role) > 63:
        raise PrivilegeError(f"app role name {app_role!r} is not a role name")
    return (
        sql.SQL(_PRIVILEGES)
        .format(schema=sql.Identifier(schema), role=sql.Identifier(app_role))
        .as_string(None)
    )


def grant_app_role(conn: psycopg.Connection, app_role: str, schema: str = DEFAULT_SCHEMA) -> None:
    """Apply :func:`privileges_sql` for an existing role (not a superuser, not the schema's owner)."""
    text = privileges_sql(app_role, schema)
    row = conn.execute(
        "SELECT r.rolsuper, pg_has_role(r.oid, n.nspowner, 'USAGE')"
        "  FROM pg_roles r LEFT JOIN pg_namespace n ON n.nspname = %s WHERE r.rolname = %s",
        [schema, app_role],
    ).fetchone()
    if row is None:
        raise PrivilegeError(f"role {app_role!r} does not exist: create it first (CREATE ROLE ... LOGIN)")
    if row[0]:
        raise PrivilegeError(f"role {app_role!r} is a superuser: privileges cannot restrict it")
    if row[1]:
        raise PrivilegeError(
            f"role {app_role!r} owns (or is a member of the owner of) schema {schema!r}: an owner can "
            "always change its tables; install as another role"
        )
    conn.execute(text.encode())


def install_sql(schema: str = DEFAULT_SCHEMA, *, app_role: str | None = None) -> str:
    """The complete, idempotent DDL of the audit schema named ``schema``, as text.

    Needs no database: paste it into an Alembic or Django migration, or pipe it to ``psql``.
    With ``app_role``, the grants of :func:`privileges_sql` follow.
    """
    check_schema_name(schema)
    grants = "" if app_role is None else privileges_sql(app_role, schema)
    composed = sql.SQL(_SCRIPT).format(
        schema=sql.Identifier(schema),
        ids_path=sql.Literal(_IDS_PATH),
        maps_path=sql.Literal(_MAPS_PATH),
        actor_path=sql.Literal(_ACTOR_PATH),
        valid_path=sql.Literal(_VALID_PATH),
        version=sql.Literal(SCHEMA_VERSION),
        tx_setting=sql.Literal(transaction_cache_setting(schema)),
        ctx_cache_setting=sql.Literal(context_cache_setting(schema)),
        context_setting=sql.Literal(CONTEXT_SETTING),
        parse_block=sql.SQL(_PARSE_BLOCK),
    )
    return composed.as_string(None) + grants


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


def install(
    conn: psycopg.Connection, schema: str = DEFAULT_SCHEMA, *, app_role: str | None = None
) -> InstallResult:
    """Create or upgrade the audit schema in one transaction; a no-op when it is current.

    With ``app_role``, that role may then read the audit tables and record actions but never
    write, change or remove an audit row (:func:`grant_app_role`; applied even when the schema
    was already current).
    """
    check_schema_name(schema)
    if app_role is not None:
        privileges_sql(app_role, schema)
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
        if app_role is not None:
            grant_app_role(conn, app_role, schema)
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
