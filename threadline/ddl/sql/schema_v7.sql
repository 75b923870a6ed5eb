-- threadline audit schema, version 7
CREATE SCHEMA IF NOT EXISTS @audit@;

-- An upgrade or a refresh alters the audit tables, then regenerates the capture code of every
-- tracked table, which locks each table. A writer holds its table and then writes the audit
-- tables: taking the audit tables first would make a deadlock whose victim may be the writer. So
-- every table with capture code of this schema is locked first: the first lock waits (holding
-- nothing); each of the others waits briefly, less than half the deadlock check's delay, so that
-- the wait ends before a writer waiting for a lock held here is checked for a deadlock (a
-- writer's transaction is short: a brief wait finds the table free between two of them, where
-- taking it only if free at once kept failing under steady writes). When a brief wait runs out
-- the script stops with lock_not_available and install() tries again. Only triggers that call a
-- function of this schema count: any role that may create a table could otherwise hold every
-- upgrade back with a trigger of that name on a table it keeps locked.
DO $tracked_first$
DECLARE
    r record;
    first boolean := true;
    wait_for text := current_setting('lock_timeout');
    brief integer := greatest(1, least(50, (extract(epoch FROM current_setting('deadlock_timeout')::interval) * 500)::integer));
BEGIN
    FOR r IN
        SELECT DISTINCT tg.tgrelid FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
          JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
         WHERE tg.tgname = '@audit_name@_capture_insert' AND c.relkind IN ('r', 'p')
           AND pn.nspname = '@audit_name@'
         ORDER BY tg.tgrelid
    LOOP
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', r.tgrelid::regclass);
        IF first THEN
            PERFORM set_config('lock_timeout', brief || 'ms', true);
            first := false;
        END IF;
    END LOOP;
    PERFORM set_config('lock_timeout', wait_for, true);
END
$tracked_first$;

CREATE TABLE IF NOT EXISTS @audit@.schema_version (
    version integer PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS @audit@.actions (
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

-- A new install is range-partitioned by time (by the period install is given, or not at all
-- when given none): a transaction and its changes share the transaction's start time
-- (occurred_at), so they share a partition, and retention drops whole partitions. An existing
-- install keeps the layout it has (threadline partition --migrate moves a plain one online).
CREATE TABLE IF NOT EXISTS @audit@.partitioning (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    period text NOT NULL CHECK (period IN ('day', 'week', 'month', 'quarter', 'year')),
    ahead integer NOT NULL DEFAULT 3 CHECK (ahead BETWEEN 1 AND 120)
);
COMMENT ON TABLE @audit@.partitioning IS
    'The partition period and how many periods ahead create_partitions() keeps ready (no row: plain tables).';

DO $tables$
DECLARE
    period text := @partition_by@;
    parted boolean := period IS NOT NULL AND to_regclass('@audit@.transactions') IS NULL
                      AND to_regclass('@audit@.changes') IS NULL;
BEGIN
    IF to_regclass('@audit@.transactions') IS NULL THEN
        EXECUTE 'CREATE TABLE @audit@.transactions (
            id bigint GENERATED ALWAYS AS IDENTITY,
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
            context_error text, '
            || CASE WHEN parted THEN 'PRIMARY KEY (id, occurred_at)) PARTITION BY RANGE (occurred_at)'
                    ELSE 'PRIMARY KEY (id))' END;
    END IF;
    -- Keyed by (transaction_id, id): one btree serves "the changes of a transaction, in order" and
    -- uniqueness, and its keys are distinct (a btree on transaction_id alone pays for deduplicating
    -- the equal keys of a bulk statement's rows). Partitioned, a change also carries its
    -- transaction's start time, the partition key.
    IF to_regclass('@audit@.changes') IS NULL THEN
        EXECUTE 'CREATE TABLE @audit@.changes (
            id bigint GENERATED ALWAYS AS IDENTITY,
            transaction_id bigint NOT NULL,
            table_schema text NOT NULL,
            table_name text NOT NULL,
            op text NOT NULL,
            pk jsonb,
            after json,
            before json,
            changed_fields text[],
            captured_at timestamptz NOT NULL DEFAULT clock_timestamp(), '
            || CASE WHEN parted THEN 'occurred_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (transaction_id, id, occurred_at)) PARTITION BY RANGE (occurred_at)'
                    ELSE 'PRIMARY KEY (transaction_id, id))' END;
    END IF;
    IF parted THEN
        INSERT INTO @audit@.partitioning (period) VALUES (period) ON CONFLICT DO NOTHING;
    END IF;
END
$tables$;
COMMENT ON COLUMN @audit@.transactions.context_error IS
    'Why the context set for this transaction was refused (NULL when it was valid or absent).';

-- One row per Celery task attempt, written by the worker when the attempt ends (opt-in, see
-- threadline.celery.install(record_task_runs=...)): the trace names every task and gives each
-- attempt's outcome, also for attempts that wrote nothing or whose writes rolled back.
CREATE TABLE IF NOT EXISTS @audit@.task_runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id text NOT NULL,
    name text,
    attempt integer NOT NULL DEFAULT 0,
    outcome text NOT NULL,
    error text,
    correlation_id text,
    causation_id text,
    parent_id text,
    root_id text,
    actor jsonb,
    worker text,
    started_at timestamptz,
    ended_at timestamptz NOT NULL
);
COMMENT ON COLUMN @audit@.task_runs.outcome IS
    'succeeded, failed, retried, rejected or ignored (Celery''s SUCCESS, FAILURE, RETRY, REJECTED, IGNORED).';
CREATE INDEX IF NOT EXISTS task_runs_correlation_id_idx
    ON @audit@.task_runs (correlation_id) WHERE correlation_id IS NOT NULL;

-- versions before 3 keyed changes by id, with a separate index on transaction_id
DO $upgrade$
BEGIN
    IF (SELECT array_length(conkey, 1) FROM pg_constraint
         WHERE conrelid = '@audit@.changes'::regclass AND contype = 'p') = 1 THEN
        ALTER TABLE @audit@.changes DROP CONSTRAINT changes_pkey,
            ADD PRIMARY KEY (transaction_id, id);
    END IF;
END
$upgrade$;
DROP INDEX IF EXISTS @audit@.changes_transaction_id_idx;
-- Versions before 6 checked op with a CHECK constraint. Only the capture functions (as the owner)
-- write changes, always with one of 'insert', 'update', 'delete', 'truncate'; PostgreSQL rebuilt
-- the check's expression from its stored text for every captured statement.
ALTER TABLE @audit@.changes DROP CONSTRAINT IF EXISTS changes_op_check;

CREATE INDEX IF NOT EXISTS transactions_correlation_id_idx
    ON @audit@.transactions (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS transactions_actor_idx
    ON @audit@.transactions ((actor ->> 'type'), (actor ->> 'id'), occurred_at)
    WHERE actor IS NOT NULL;
CREATE INDEX IF NOT EXISTS transactions_occurred_at_idx
    ON @audit@.transactions USING brin (occurred_at);
-- Capture finds the current transaction's row by its xid, and complete paging
-- (threadline.paging) reads the rows of transactions that committed late by xid.
CREATE INDEX IF NOT EXISTS transactions_xid_idx ON @audit@.transactions (xid, id);
-- A row's changes by its key (history, as_of, erasure, revert): a btree on the key's hash. A hash
-- index on pk costs a little less per change, but it keeps every entry of one key in one bucket
-- chain that each insert walks to its end: a row with 200,000 changes made each of its next
-- changes cost about 530,000 instructions more. The btree finds its place in a few pages however
-- often a row changes. Readers match the hashes, then the keys (two keys may share a hash).
-- Earlier releases had the hash index: the new index is built before the old one goes.
CREATE INDEX IF NOT EXISTS changes_key_idx ON @audit@.changes (pg_catalog.jsonb_hash(pk));
DROP INDEX IF EXISTS @audit@.changes_row_idx;
CREATE INDEX IF NOT EXISTS changes_captured_at_idx
    ON @audit@.changes USING brin (captured_at);
-- Where each truncate change is, by table and time: as_of() and revert look for a truncate
-- between a row's last change and the time asked. A partial index of changes WHERE op = 'truncate'
-- served that before, but PostgreSQL prepares an index's predicate for every statement that
-- inserts into the table (about 7,600 instructions for each captured statement); the capture of a
-- TRUNCATE writes this row beside its change instead. Readers join it to the change by its key, so
-- an entry whose change was purged finds nothing. Filled from the changes once, when created.
DO $truncates$
BEGIN
    IF to_regclass('@audit@.truncates') IS NULL THEN
        CREATE TABLE @audit@.truncates (
            table_schema text NOT NULL,
            table_name text NOT NULL,
            captured_at timestamptz NOT NULL,
            change_id bigint NOT NULL,
            transaction_id bigint NOT NULL,
            occurred_at timestamptz NOT NULL,
            PRIMARY KEY (table_schema, table_name, captured_at, change_id));
        IF EXISTS (SELECT FROM pg_attribute WHERE attrelid = '@audit@.changes'::regclass
                    AND attname = 'occurred_at' AND NOT attisdropped) THEN
            EXECUTE 'INSERT INTO @audit@.truncates
                     SELECT c.table_schema, c.table_name, c.captured_at, c.id, c.transaction_id, c.occurred_at
                       FROM @audit@.changes AS c WHERE c.op = ''truncate''';
        ELSE
            INSERT INTO @audit@.truncates
            SELECT c.table_schema, c.table_name, c.captured_at, c.id, c.transaction_id,
                   coalesce((SELECT t.occurred_at FROM @audit@.transactions AS t WHERE t.id = c.transaction_id),
                            c.captured_at)
              FROM @audit@.changes AS c WHERE c.op = 'truncate';
        END IF;
    END IF;
END
$truncates$;
DROP INDEX IF EXISTS @audit@.changes_truncate_idx;
CREATE INDEX IF NOT EXISTS actions_correlation_id_idx
    ON @audit@.actions (correlation_id) WHERE correlation_id IS NOT NULL;

-- The images are json (the row's text form: cheaper to build than jsonb, and smaller); schemas
-- installed before version 7 keep jsonb columns, which capture code fills just the same.
COMMENT ON COLUMN @audit@.changes.before IS
    'Delete: the whole row. Update: the old values of at least the changed columns (the whole row after a single-row statement; before_row(before, after) gives it always). Excluded columns left out, masked ones replaced.';
COMMENT ON COLUMN @audit@.changes.changed_fields IS
    'Stored only for tables with masked columns (and by versions before 7); otherwise changed_fields(before, after).';

-- The columns an update changed, in column order: the keys whose values differ between the two
-- images (compared as the text capture compared them). What readers use when changed_fields is NULL.
CREATE OR REPLACE FUNCTION @audit@.changed_fields(before json, after json) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(array_agg(b.key ORDER BY b.ord), '{}')
      FROM json_each(before) WITH ORDINALITY AS b(key, value, ord)
     WHERE (after -> b.key)::text IS DISTINCT FROM b.value::text
$fn$;
CREATE OR REPLACE FUNCTION @audit@.changed_fields(before jsonb, after jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(array_agg(b.key ORDER BY b.key), '{}')
      FROM jsonb_each(before) AS b(key, value)
     WHERE (after -> b.key) IS DISTINCT FROM b.value
$fn$;

-- An update's whole row before it. Its before image holds the old values of at least the columns it
-- changed: the whole row when its statement changed one row, only the changed columns when the
-- statement changed more (and in changes recorded before version 7). The other columns come from
-- the after image, in its order. Any other change's before image (or one that is not an object)
-- as it is.
CREATE OR REPLACE FUNCTION @audit@.before_row(before json, after json) RETURNS json
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN before IS NULL OR after IS NULL OR json_typeof(before) <> 'object'
                     OR json_typeof(after) <> 'object' THEN before
                ELSE (SELECT coalesce('{' || string_agg(to_json(coalesce(a.key, b.key))::text || ':'
                                                        || coalesce(b.value, a.value)::text,
                                                        ',' ORDER BY a.ord NULLS LAST, b.ord) || '}', '{}')::json
                        FROM json_each(after) WITH ORDINALITY AS a(key, value, ord)
                        FULL JOIN json_each(before) WITH ORDINALITY AS b(key, value, ord) ON b.key = a.key) END
$fn$;
CREATE OR REPLACE FUNCTION @audit@.before_row(before jsonb, after jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN before IS NULL OR after IS NULL OR jsonb_typeof(before) <> 'object'
                     OR jsonb_typeof(after) <> 'object' THEN before ELSE after || before END
$fn$;

DROP FUNCTION IF EXISTS @audit@.valid_text(jsonb);
-- version 1 decoded the context text in one PL/pgSQL function
DROP FUNCTION IF EXISTS @audit@.decode_context(text);

-- Parse the context text. Never raises: a value that is too large or not JSON yields a reason.
CREATE OR REPLACE FUNCTION @audit@.parse_context(raw text, OUT j jsonb, OUT err text)
LANGUAGE plpgsql IMMUTABLE AS $fn$
BEGIN
    IF raw <> '' THEN
        IF octet_length(raw) > 16384 THEN
            err := 'context is larger than 16384 bytes';
        ELSE
            -- the errors a text that is not acceptable JSON raises (syntax, a \u0000 escape, a
            -- number out of numeric's range, nesting too deep, in a SQL_ASCII database a \u escape
            -- beyond ASCII), and nothing else: an unexpected error must surface. The block costs a
            -- subtransaction, about 6,500 instructions.
            BEGIN
                j := raw::jsonb;
            EXCEPTION WHEN invalid_text_representation OR untranslatable_character OR feature_not_supported
                           OR numeric_value_out_of_range OR character_not_in_repertoire
                           OR statement_too_complex OR program_limit_exceeded THEN
                err := 'context is not valid JSON';
            END;
        END IF;
    END IF;
END
$fn$;

-- Validate a parsed context and split it into the transaction row's fields. A bad value yields
-- NULL fields and a reason in context_error, so it can neither block the write nor become a
-- wrong actor. One SQL statement that PostgreSQL inlines into its caller's cached plan.
CREATE OR REPLACE FUNCTION @audit@.decode_context(j jsonb, parse_error text)
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
                            'job', 'meta', 'incoming_error']) <> '{}'::jsonb
                THEN 'context has unknown fields'
            WHEN NOT coalesce(jsonb_path_match(j,  E'(!exists($.correlation_id) || ($.correlation_id.type() == "string" && $.correlation_id like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.request_id) || ($.request_id.type() == "string" && $.request_id like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.causation_id) || ($.causation_id.type() == "string" && $.causation_id like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.origin) || ($.origin.type() == "string" && $.origin like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.incoming_error) || ($.incoming_error.type() == "string" && $.incoming_error like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$"))', '{}', true), false)
                 OR greatest(length(j ->> 'correlation_id'), length(j ->> 'request_id'),
                             length(j ->> 'causation_id'), length(j ->> 'origin'),
                             length(j ->> 'incoming_error')) > 256
                THEN 'context has an invalid id or origin'
            WHEN NOT coalesce(jsonb_path_match(j, '(!exists($.job) || $.job.type() == "object") && (!exists($.meta) || $.meta.type() == "object")', '{}', true), false)
                THEN 'context job or meta is not an object'
            WHEN NOT coalesce(jsonb_path_match(j,  E'!exists($.actor) || ($.actor.type() == "object" && $.actor.type.type() == "string" && $.actor.type like_regex "^[a-z][a-z0-9_]*$" && (!exists($.actor.id) || ($.actor.id.type() == "string" && $.actor.id like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.actor.display) || ($.actor.display.type() == "string" && $.actor.display like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (exists($.actor.id) || $.actor.type == "anonymous"))', '{}', true), false)
                 OR (j ? 'actor' AND (((j -> 'actor') - ARRAY['type', 'id', 'display']) <> '{}'::jsonb
                                      OR length(j -> 'actor' ->> 'type') > 32
                                      OR greatest(length(j -> 'actor' ->> 'id'),
                                                  length(j -> 'actor' ->> 'display')) > 256))
                THEN 'context actor is invalid'
            END AS err OFFSET 0) AS s
$fn$;

-- Capture code before version 7 read the id of the transaction's row from a transaction-local
-- setting; the setting is no longer written, so this returns NULL and that code falls back to
-- transaction_row(), which finds the row by xid. Kept until every capture function is regenerated.
CREATE OR REPLACE FUNCTION @audit@.cached_transaction_id() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT NULL::bigint
$fn$;

-- The id of the next transactions row, from the identity of transactions.id (whatever its
-- sequence is called: a store moved to partitions has the new table's), as a SQL function that
-- PostgreSQL inlines into its caller's plan; define_next_transaction_id() writes it again when
-- the layout changes. Capture code takes the id first and writes the row only once its statement
-- has recorded a change.
CREATE OR REPLACE FUNCTION @audit@.define_next_transaction_id() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    EXECUTE format('CREATE OR REPLACE FUNCTION @audit@.next_transaction_id() RETURNS bigint'
                   ' LANGUAGE sql VOLATILE AS %L',
                   format('SELECT pg_catalog.nextval(%L::pg_catalog.regclass)',
                          pg_get_serial_sequence('@audit@.transactions', 'id')));
    REVOKE EXECUTE ON FUNCTION @audit@.next_transaction_id() FROM PUBLIC;
END
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.define_next_transaction_id() FROM PUBLIC;
SELECT @audit@.define_next_transaction_id();

-- A new transactions row for the current database transaction, with the id tx (from
-- next_transaction_id()) and the context setting; the row's id and the context text it was built
-- from are kept in a transaction-local setting (txctx: '=<id>|<context>'), which marks that the
-- transaction has its row and serves the commit-time check. Only the schema's owner may call it
-- (EXECUTE is revoked from PUBLIC): the capture functions, and link_action() through
-- transaction_id(), call it as the owner (they are SECURITY DEFINER with a pinned search_path),
-- so an application role that may not write the audit tables still gets its transactions
-- recorded. It is not SECURITY DEFINER itself, and it parses the context inline rather than
-- through parse_context(): each extra PL/pgSQL call and search_path switch is paid once per
-- audited transaction. Callers call it only when that setting is empty or their lookup of the
-- transaction's row by xid found none (see transaction_row()); capture code runs the usual
-- context's path inline and calls it for any other context.
CREATE OR REPLACE FUNCTION @audit@.insert_transaction_row(tx bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY INVOKER AS $fn$
DECLARE
    raw text := coalesce(current_setting('threadline.context', true), '');
    j jsonb;
    err text;
    marker text;
BEGIN
@usual_context(tx)@@long_context(tx)@    IF raw <> '' THEN
        IF octet_length(raw) > 16384 THEN
            err := 'context is larger than 16384 bytes';
        ELSE
            -- the errors a text that is not acceptable JSON raises (syntax, a \u0000 escape, a
            -- number out of numeric's range, nesting too deep, in a SQL_ASCII database a \u escape
            -- beyond ASCII), and nothing else: an unexpected error must surface. The block costs a
            -- subtransaction, about 6,500 instructions.
            BEGIN
                j := raw::jsonb;
            EXCEPTION WHEN invalid_text_representation OR untranslatable_character OR feature_not_supported
                           OR numeric_value_out_of_range OR character_not_in_repertoire
                           OR statement_too_complex OR program_limit_exceeded THEN
                err := 'context is not valid JSON';
            END;
        END IF;
    END IF;
    -- The checks of decode_context() as one condition: a context that passes them all (the usual
    -- case) is stored without building the statement that names the failed check, which costs
    -- more than the checks themselves; any other value goes through decode_context().
    IF err IS NULL AND jsonb_typeof(j) = 'object' AND j -> 'v' = '1'::jsonb
       AND coalesce(jsonb_path_match(j,  E'((!exists($.correlation_id) || ($.correlation_id.type() == "string" && $.correlation_id like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.request_id) || ($.request_id.type() == "string" && $.request_id like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.causation_id) || ($.causation_id.type() == "string" && $.causation_id like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.origin) || ($.origin.type() == "string" && $.origin like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.incoming_error) || ($.incoming_error.type() == "string" && $.incoming_error like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$"))) && ((!exists($.job) || $.job.type() == "object") && (!exists($.meta) || $.meta.type() == "object")) && (!exists($.actor) || ($.actor.type() == "object" && $.actor.type.type() == "string" && $.actor.type like_regex "^[a-z][a-z0-9_]*$" && (!exists($.actor.id) || ($.actor.id.type() == "string" && $.actor.id like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (!exists($.actor.display) || ($.actor.display.type() == "string" && $.actor.display like_regex "^[^\\\\u0001-\\\\u001f\\\\u007f-\\\\u009f\\\\u061c\\\\u200e\\\\u200f\\\\u2028\\\\u2029\\\\u202a-\\\\u202e\\\\u2066-\\\\u2069]+$")) && (exists($.actor.id) || $.actor.type == "anonymous")))', '{}', true), false)
       AND (j - ARRAY['v', 'actor', 'correlation_id', 'request_id', 'causation_id', 'origin',
                      'job', 'meta', 'incoming_error']) = '{}'::jsonb
       AND coalesce(greatest(length(j ->> 'correlation_id'), length(j ->> 'request_id'),
                             length(j ->> 'causation_id'), length(j ->> 'origin'),
                             length(j ->> 'incoming_error')) <= 256, true)
       AND (NOT j ? 'actor'
            OR (((j -> 'actor') - ARRAY['type', 'id', 'display']) = '{}'::jsonb
                AND length(j -> 'actor' ->> 'type') <= 32
                AND coalesce(greatest(length(j -> 'actor' ->> 'id'),
                                      length(j -> 'actor' ->> 'display')) <= 256, true))) THEN
        INSERT INTO @audit@.transactions
            (id, actor, correlation_id, request_id, causation_id, origin, job, meta, context_error)
        OVERRIDING SYSTEM VALUE
        VALUES (tx, j -> 'actor', j ->> 'correlation_id', j ->> 'request_id', j ->> 'causation_id',
                j ->> 'origin', j -> 'job', j -> 'meta', 'incoming: ' || (j ->> 'incoming_error'));
    ELSIF raw = '' THEN
        INSERT INTO @audit@.transactions (id) OVERRIDING SYSTEM VALUE VALUES (tx);
    ELSE
        INSERT INTO @audit@.transactions
            (id, actor, correlation_id, request_id, causation_id, origin, job, meta, context_error)
        OVERRIDING SYSTEM VALUE
        SELECT tx, d.actor, d.correlation_id, d.request_id, d.causation_id, d.origin, d.job, d.meta,
               d.context_error
          FROM @audit@.decode_context(j, err) AS d;
    END IF;
    marker := set_config('threadline.txctx_@audit_name@', '=' || tx || '|' || raw, true);
    RETURN tx;
END
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.insert_transaction_row(bigint) FROM PUBLIC;

-- The same with a new id: what transaction_row() (for link_action()) and capture code of earlier
-- builds call.
CREATE OR REPLACE FUNCTION @audit@.insert_transaction_row() RETURNS bigint
LANGUAGE sql VOLATILE AS $fn$
    SELECT @audit@.insert_transaction_row(@audit@.next_transaction_id())
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.insert_transaction_row() FROM PUBLIC;

-- The current transaction's row, if it has one: the row with the current xid and start time (a
-- row restored from another cluster may carry the same xid, never the same start as well). The
-- first one, should an older release have left two. Capture code inlines this statement.
CREATE OR REPLACE FUNCTION @audit@.current_row() RETURNS bigint
LANGUAGE sql STABLE AS $fn$
    SELECT t.id FROM @audit@.transactions AS t
     WHERE t.xid = pg_current_xact_id() AND t.occurred_at = now() ORDER BY t.xid, t.id LIMIT 1
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.current_row() FROM PUBLIC;

-- The current transaction's row, created on first use. Nothing a session sets can make it
-- another transaction's row (a second row, made by clearing the setting that marks the first, is
-- merged into it at commit).
CREATE OR REPLACE FUNCTION @audit@.transaction_row() RETURNS bigint
LANGUAGE sql VOLATILE AS $fn$
    SELECT coalesce(@audit@.current_row(), @audit@.insert_transaction_row())
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.transaction_row() FROM PUBLIC;

-- The transactions row of the current database transaction, created on first use.
CREATE OR REPLACE FUNCTION @audit@.transaction_id() RETURNS bigint
LANGUAGE sql VOLATILE AS $fn$
    SELECT @audit@.transaction_row()
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.transaction_id() FROM PUBLIC;

-- Capture functions of versions 2 and 3 call this name.
CREATE OR REPLACE FUNCTION @audit@.current_transaction_id() RETURNS bigint
LANGUAGE sql VOLATILE AS $fn$
    SELECT @audit@.transaction_id()
$fn$;

-- At commit, when the check below fails: the last context set before commit wins, and should the
-- transaction have two rows (a session that cleared the setting that marks its row makes the next
-- statement write another one), the later rows' changes move to the first and the later rows
-- go. Only the current transaction's rows (its xid and start time) are touched, as the owner;
-- callable by anyone, since all it can do is what setting the context before the first write
-- would have done.
CREATE OR REPLACE FUNCTION @audit@.apply_context_change(tx bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    raw text := coalesce(current_setting('threadline.context', true), '');
    ids bigint[] := ARRAY(SELECT t.id FROM @audit@.transactions AS t
                           WHERE t.xid = pg_current_xact_id() AND t.occurred_at = now() ORDER BY t.id);
BEGIN
    IF cardinality(ids) = 0 THEN
        RETURN;  -- tx was a later row, merged into the first already
    END IF;
    IF cardinality(ids) > 1 THEN
        UPDATE @audit@.changes AS c SET transaction_id = ids[1] WHERE c.transaction_id = ANY (ids[2:]);
        UPDATE @audit@.truncates AS x SET transaction_id = ids[1] WHERE x.transaction_id = ANY (ids[2:]);
        DELETE FROM @audit@.transactions AS t
         WHERE t.id = ANY (ids[2:]) AND t.xid = pg_current_xact_id() AND t.occurred_at = now();
    END IF;
    UPDATE @audit@.transactions AS t
       SET actor = d.actor, correlation_id = d.correlation_id, request_id = d.request_id,
           causation_id = d.causation_id, origin = d.origin, job = d.job, meta = d.meta,
           context_error = d.context_error
      FROM @audit@.parse_context(raw) AS p, @audit@.decode_context(p.j, p.err) AS d
     WHERE t.id = ids[1] AND t.xid = pg_current_xact_id() AND t.occurred_at = now();
    PERFORM set_config('threadline.txctx_@audit_name@', '=' || ids[1] || '|' || raw, true);
END
$fn$;
GRANT EXECUTE ON FUNCTION @audit@.apply_context_change(bigint) TO PUBLIC;

-- The commit-time check, fired by a deferred trigger: the setting that marks the transaction's row
-- must still name this row and the context it was built from. It runs as the schema's owner, so
-- that the rare repair (the owner's function above) works for a role that may not even look into
-- this schema; it names every function and operator with its schema instead of pinning a
-- search_path (which would cost every transaction a configuration change), so nothing a caller's
-- path resolves runs with the owner's rights.
CREATE OR REPLACE FUNCTION @audit@.refresh_transaction_context() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $fn$
BEGIN
    IF NOT coalesce(pg_catalog.current_setting('threadline.txctx_@audit_name@', true) OPERATOR(pg_catalog.=)
                    pg_catalog.concat('=', NEW.id, '|', pg_catalog.current_setting('threadline.context', true)),
                    false) THEN
        PERFORM @audit@.apply_context_change(NEW.id);
    END IF;
    RETURN NULL;
END
$fn$;
-- A trigger fires whoever may execute its function; only creating one needs EXECUTE. Were this
-- function executable by PUBLIC, a tracked table's owner could point a capture trigger's name at
-- it, and the table's writes would go unrecorded while that name is there.
REVOKE EXECUTE ON FUNCTION @audit@.refresh_transaction_context() FROM PUBLIC;

-- Link an action to the current transaction's row (only that row, only once): what an
-- application role without UPDATE on the audit tables calls to record a linked action.
CREATE OR REPLACE FUNCTION @audit@.link_action(action bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    tx bigint := @audit@.transaction_id();
BEGIN
    UPDATE @audit@.transactions SET action_id = action
     WHERE id = tx AND occurred_at = now() AND action_id IS NULL;
    RETURN tx;
END
$fn$;



-- Partitions. The partitions of a partitioned store: each table's ranges (FROM/TO; MINVALUE and
-- MAXVALUE as -infinity and infinity), the DEFAULT partition with NULL bounds.
CREATE OR REPLACE FUNCTION @audit@.partitions()
RETURNS TABLE (parent text, partition text, range_from timestamptz, range_to timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' AS $fn$
    SELECT p.relname::text, c.relname::text,
           CASE WHEN b.lo = 'MINVALUE' THEN '-infinity' ELSE b.lo END::timestamptz,
           CASE WHEN b.hi = 'MAXVALUE' THEN 'infinity' ELSE b.hi END::timestamptz
      FROM pg_inherits i
      JOIN pg_class p ON p.oid = i.inhparent
      JOIN pg_class c ON c.oid = i.inhrelid
      CROSS JOIN LATERAL pg_get_expr(c.relpartbound, c.oid) AS e(bound)
      CROSS JOIN LATERAL (SELECT (regexp_match(e.bound, 'FROM \(''?([^'')]+)''?\)'))[1] AS lo,
                                 (regexp_match(e.bound, 'TO \(''?([^'')]+)''?\)'))[1] AS hi) AS b
     WHERE p.relnamespace = '@audit@'::regnamespace AND p.relname IN ('transactions', 'changes')
       AND p.relkind = 'p'
     ORDER BY 1, 3 NULLS LAST, 2
$fn$;

-- The period slot [lo, lo + one period) that holds ts (in UTC).
CREATE OR REPLACE FUNCTION @audit@.partition_slot(period text, ts timestamptz, OUT lo timestamptz, OUT hi timestamptz)
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' AS $fn$
    SELECT date_trunc(period, ts),
           date_trunc(period, ts) + CASE period WHEN 'day' THEN interval '1 day' WHEN 'week' THEN interval '1 week'
                                            WHEN 'month' THEN interval '1 month' WHEN 'quarter' THEN interval '3 months'
                                            ELSE interval '1 year' END
$fn$;

-- The name of a table's partition for the period starting at lo: the table's name, '_p' and the
-- period as pg_partman (version 4) names it, so that pg_partman can manage these partitions.
CREATE OR REPLACE FUNCTION @audit@.partition_name(parent text, period text, lo timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' AS $fn$
    SELECT parent || '_p' || to_char(lo, CASE period WHEN 'day' THEN 'YYYY_MM_DD' WHEN 'week' THEN 'IYYY"w"IW'
                                                     WHEN 'month' THEN 'YYYY_MM' WHEN 'quarter' THEN 'YYYY"q"Q'
                                                     ELSE 'YYYY' END)
$fn$;

-- BRIN indexes (transactions.occurred_at, changes.captured_at) with the range that takes new rows
-- left unsummarized. Building a BRIN index summarizes every range, also the last, partly filled one
-- (range 0 of an empty table), and then each row inserted there widens that summary: on the
-- first 128 pages of each new partition, that cost about 18,000 instructions per single-row
-- transaction. An unsummarized range costs an insert nothing beyond finding that out, and readers
-- scan its pages as they scan any range VACUUM has not summarized yet; VACUUM summarizes it once it
-- is full. For rel, or the leaf tables of rel when it is partitioned; run as the owner, it skips an
-- index of another owner (a partition made by hand or by pg_partman) rather than fail. Returns how
-- many indexes it went through.
CREATE OR REPLACE FUNCTION @audit@.unsummarize_brin_tail(rel regclass) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    idx record;
    n integer := 0;
BEGIN
    FOR idx IN
        SELECT i.indexrelid,
               greatest(pg_relation_size(i.indrelid) / current_setting('block_size')::bigint - 1, 0) AS last_block
          FROM (SELECT p.relid FROM pg_partition_tree(rel) AS p WHERE p.isleaf
                UNION SELECT r.oid FROM pg_class AS r WHERE r.oid = rel AND r.relkind = 'r') AS t
          JOIN pg_index AS i ON i.indrelid = t.relid
          JOIN pg_class AS c ON c.oid = i.indexrelid
          JOIN pg_am AS a ON a.oid = c.relam
         WHERE a.amname = 'brin' AND pg_has_role(c.relowner, 'USAGE')
         ORDER BY i.indexrelid
    LOOP
        PERFORM brin_desummarize_range(idx.indexrelid, idx.last_block);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.unsummarize_brin_tail(regclass) FROM PUBLIC;

-- Create the partitions of the current period (or of every period from the one holding since)
-- and of the configured number of periods ahead (partitioning.ahead, or ahead when given), and
-- the DEFAULT partitions, for both tables; a
-- period some partition already covers in part is left alone (partitions made by hand or by
-- pg_partman are respected). Rows the DEFAULT partition holds for a new period are moved into it.
-- Returns how many partitions it created (0 for plain tables). Run by the schema's owner, off the
-- write path: by install, and then periodically (threadline partitions --create, or the Celery
-- beat task threadline.maintain_partitions).
--
-- Attaching a partition locks the table's DEFAULT partition (its rows are checked against the new
-- range), and writers lock the DEFAULT partitions of both tables in either order (a transaction's
-- changes then its row, or its row's lookup then its changes). So, before anything is created,
-- both DEFAULT partitions are locked (and both tables, when a period that has begun is made):
-- the first lock waiting at most lock_timeout, while this transaction holds no table a writer
-- needs, the others without waiting (lock_not_available when a writer holds one; the caller
-- retries). A writer then only ever waits for this function, never the other way round: no
-- deadlock can make an application's write fail, and no row can enter a DEFAULT partition between
-- the move of its rows and the attach that would refuse them.
DROP FUNCTION IF EXISTS @audit@.create_partitions(integer);
CREATE OR REPLACE FUNCTION @audit@.create_partitions(ahead integer DEFAULT NULL, since timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' AS $fn$
DECLARE
    cfg @audit@.partitioning;
    tbl text;
    slot record;
    at timestamptz;
    upto timestamptz;
    part text;
    made integer := 0;
    todo_tables text[] := '{}';
    todo_from timestamptz[] := '{}';
    todo_to timestamptz[] := '{}';
    defaults text[];
BEGIN
    SELECT * INTO cfg FROM @audit@.partitioning;
    IF NOT FOUND OR (SELECT c.relkind FROM pg_class c WHERE c.oid = '@audit@.changes'::regclass) <> 'p' THEN
        RETURN 0;
    END IF;
    IF ahead IS NOT NULL AND (ahead < 0 OR ahead > 120) THEN
        RAISE EXCEPTION 'ahead must be from 0 to 120 periods, got %', ahead USING ERRCODE = '22023';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('threadline partitions @audit_name@'));
    FOREACH tbl IN ARRAY ARRAY['transactions', 'changes'] LOOP
        IF NOT EXISTS (SELECT 1 FROM @audit@.partitions() p WHERE p.parent = tbl AND p.range_from IS NULL) THEN
            EXECUTE format('CREATE TABLE @audit@.%I PARTITION OF @audit@.%I DEFAULT', tbl || '_default', tbl);
            PERFORM @audit@.unsummarize_brin_tail(format('@audit@.%I', tbl || '_default')::regclass);
            made := made + 1;
        END IF;
        at := least(now(), since);
        upto := (@audit@.partition_slot(cfg.period, now())).lo;
        FOR i IN 1 .. coalesce(ahead, cfg.ahead) LOOP
            upto := (@audit@.partition_slot(cfg.period, upto)).hi;
        END LOOP;
        LOOP
            slot := @audit@.partition_slot(cfg.period, at);
            EXIT WHEN slot.lo > upto;
            IF NOT EXISTS (SELECT 1 FROM @audit@.partitions() p
                            WHERE p.parent = tbl AND p.range_from < slot.hi AND p.range_to > slot.lo) THEN
                todo_tables := todo_tables || tbl;
                todo_from := todo_from || slot.lo;
                todo_to := todo_to || slot.hi;
            END IF;
            at := slot.hi;
        END LOOP;
    END LOOP;
    IF cardinality(todo_tables) = 0 THEN
        RETURN made;
    END IF;
    -- each new partition holds its locks until commit: thousands would exhaust the lock table
    IF cardinality(todo_tables) > 480 THEN
        RAISE EXCEPTION 'since % reaches back % partitions to create; at most 480 are created at once',
            since, cardinality(todo_tables)
            USING ERRCODE = '22023',
                  HINT = 'Create them in steps, from a later since back to the earliest, or give a later since.';
    END IF;
    defaults := ARRAY(SELECT format('@audit@.%I', p.partition) FROM @audit@.partitions() p
                       WHERE p.range_from IS NULL ORDER BY p.parent DESC);  -- transactions, then changes
    IF EXISTS (SELECT 1 FROM unnest(todo_from) AS f WHERE f <= now()) THEN
        -- A period that has begun: writers route its rows into the DEFAULT partitions now. One that
        -- routed a row there before the attach and waited for its lock would be refused after it
        -- (the row then belongs to the new partition), so writers wait for the tables themselves,
        -- and route their rows once the new partitions are there.
        LOCK TABLE @audit@.transactions IN SHARE ROW EXCLUSIVE MODE;
        LOCK TABLE @audit@.changes IN SHARE ROW EXCLUSIVE MODE NOWAIT;
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE NOWAIT', array_to_string(defaults, ', '));
    ELSE
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', defaults[1]);
        IF cardinality(defaults) > 1 THEN
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE NOWAIT', defaults[2]);
        END IF;
    END IF;
    FOR i IN 1 .. cardinality(todo_tables) LOOP
        tbl := todo_tables[i];
        part := @audit@.partition_name(tbl, cfg.period, todo_from[i]);
        EXECUTE format('CREATE TABLE @audit@.%I (LIKE @audit@.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       part, tbl);
        EXECUTE format('WITH moved AS (DELETE FROM @audit@.%I WHERE occurred_at >= $1 AND occurred_at < $2'
                       ' RETURNING *) INSERT INTO @audit@.%I SELECT * FROM moved',
                       (SELECT p.partition FROM @audit@.partitions() p WHERE p.parent = tbl AND p.range_from IS NULL),
                       part)
          USING todo_from[i], todo_to[i];
        EXECUTE format('ALTER TABLE @audit@.%I ATTACH PARTITION @audit@.%I FOR VALUES FROM (%L) TO (%L)',
                       tbl, part, todo_from[i], todo_to[i]);
        PERFORM @audit@.unsummarize_brin_tail(format('@audit@.%I', part)::regclass);
        made := made + 1;
    END LOOP;
    RETURN made;
END
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.create_partitions(integer, timestamptz) FROM PUBLIC;


-- Tracking: the registry of tracked tables and the one generator of capture code.
--
-- Every tracked table has a row in tracked_tables: its identity (relid, a regclass, so it follows
-- renames and dump/restore), the options it was tracked with, the columns the code was generated
-- from (by attnum, so renamed columns are recognised) and the fingerprint of the generated DDL.
-- track(), untrack(), sync() and the DDL event triggers all generate capture code through
-- render_capture(), from that row alone.
--
-- Two shapes of capture code, rendered by the same function:
--   typed       columns are read from the transition tables by name; the cheapest, and kept in
--               step with every ALTER TABLE by the event triggers (installed by a superuser).
--   drift_safe  rows are read as jsonb only; an ALTER TABLE can never make it fail, masks and
--               excludes apply by name to columns added later, and while a masked or excluded
--               column no longer has its name (dropped, or renamed) every value of a statement's
--               rows is masked until the table is synced. Used where event triggers cannot be
--               created.

CREATE TABLE IF NOT EXISTS @audit@.tracked_tables (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid regclass NOT NULL,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    function_name text NOT NULL UNIQUE,
    keys text[] NOT NULL DEFAULT '{}',
    exclude text[] NOT NULL DEFAULT '{}',
    mask text[] NOT NULL DEFAULT '{}',
    key_columns text[] NOT NULL DEFAULT '{}',
    columns jsonb NOT NULL DEFAULT '[]',
    mode text NOT NULL,
    capture_version integer NOT NULL,
    fingerprint text NOT NULL,
    tracked_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE @audit@.tracked_tables IS
    'One row per tracked table: the source of truth for its capture code.';
COMMENT ON COLUMN @audit@.tracked_tables.keys IS
    'Key columns given by the user; empty: the table''s primary key (key_columns: as generated).';
COMMENT ON COLUMN @audit@.tracked_tables.columns IS
    'The columns the capture code was generated from: [[attnum, name, type], ...].';
CREATE UNIQUE INDEX IF NOT EXISTS tracked_tables_relid_idx ON @audit@.tracked_tables (relid);

-- Every name a tracked table has had, so history asked under any of them finds all of its changes.
-- Kept when the table is untracked or dropped (its audit rows stay, under those names); a table
-- tracked again under one of them takes its earlier names back.
CREATE TABLE IF NOT EXISTS @audit@.tracked_table_names (
    tracked_id bigint NOT NULL,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tracked_id, table_schema, table_name)
);
CREATE INDEX IF NOT EXISTS tracked_table_names_name_idx
    ON @audit@.tracked_table_names (table_name, table_schema);

-- The masks and excludes of a tracked table that was dropped, by the name it had: a migration
-- that rebuilds a table (a new table under the name, the rows copied, the old one dropped) must
-- not lose them. track() of a table of that name takes them on (for the columns it has), and
-- coverage names such a table while it is not tracked; untrack(forget => true) forgets them. A
-- table that untrack() left in place keeps its own here too (relid set, untracked true), so that
-- tracking it again, under any name, takes them on.
CREATE TABLE IF NOT EXISTS @audit@.dropped_tables (
    table_schema text NOT NULL,
    table_name text NOT NULL,
    exclude text[] NOT NULL,
    mask text[] NOT NULL,
    dropped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name)
);
ALTER TABLE @audit@.dropped_tables ADD COLUMN IF NOT EXISTS relid oid;
ALTER TABLE @audit@.dropped_tables ADD COLUMN IF NOT EXISTS untracked boolean NOT NULL DEFAULT false;
COMMENT ON TABLE @audit@.dropped_tables IS
    'Masks and excludes of dropped or untracked tables, taken on when the table (or one of its name) is tracked.';

-- Columns of a table in order, and whether the capture code may compare them with = in
-- pg_catalog (base or enum types with a default btree operator class there); others are
-- compared by their text form.
CREATE OR REPLACE FUNCTION @audit@.table_columns(rel regclass)
RETURNS TABLE (attnum integer, name text, type text, by_text boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    WITH RECURSIVE cols AS (
        SELECT a.attnum, a.attname, a.atttypid, format_type(a.atttypid, a.atttypmod) AS shown,
               EXISTS (SELECT FROM pg_collation co WHERE co.oid = a.attcollation AND NOT co.collisdeterministic)
                   AS loose_collation
          FROM pg_attribute a
         WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
    ), base AS (
        -- follow domains and arrays down to the type whose equality decides
        SELECT cols.attnum, cols.atttypid AS t, 0 AS depth FROM cols
        UNION ALL
        SELECT b.attnum, CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE ty.typelem END, b.depth + 1
          FROM base b JOIN pg_type ty ON ty.oid = b.t
         WHERE (ty.typtype = 'd' OR (ty.typelem <> 0 AND ty.typlen = -1)) AND b.depth < 8
    )
    -- by_text: compared by their text, where equality is not identity: types without a default
    -- btree class of pg_catalog, the ones whose equal values can be written differently (numeric
    -- 1.0 and 1.00, float 0 and -0, interval 1 day and 24 hours, jsonb numbers), and a column
    -- with a nondeterministic collation
    SELECT c.attnum::integer, c.attname::text, c.shown,
           c.loose_collation OR
           NOT coalesce((SELECT ty.typtype IN ('b', 'e') AND tn.nspname = 'pg_catalog'
                           AND ty.typname NOT IN ('numeric', 'float4', 'float8', 'interval', 'jsonb')
                           AND EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod
                                        WHERE am.amname = 'btree' AND oc.opcdefault
                                          AND (oc.opcintype = ty.oid
                                               OR (ty.typtype = 'e' AND oc.opcintype = 'anyenum'::regtype)))
                           FROM base b JOIN pg_type ty ON ty.oid = b.t
                           JOIN pg_namespace tn ON tn.oid = ty.typnamespace
                          WHERE b.attnum = c.attnum
                          ORDER BY b.depth DESC LIMIT 1), false)
      FROM cols c
     ORDER BY c.attnum
$fn$;

-- The types of a table's columns and every type they hold: below a domain its base type, in an
-- array its element, in a range or multirange its subtype, in a composite its attributes' types.
-- top: the column's own type or a base type of it; inside: held by a type created in the database
-- (oid 16384 and above).
CREATE OR REPLACE FUNCTION @audit@.column_types(rel regclass)
RETURNS TABLE (attnum smallint, t oid, top boolean, inside boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    WITH RECURSIVE walk AS (
        SELECT a.attnum, a.atttypid AS t, 0 AS depth, true AS top, false AS inside
          FROM pg_attribute a
         WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT w.attnum, x.t, w.depth + 1, w.top AND ty.typtype = 'd', w.inside OR w.t >= 16384
          FROM walk w JOIN pg_type ty ON ty.oid = w.t
         CROSS JOIN LATERAL (
               SELECT ty.typbasetype AS t WHERE ty.typtype = 'd'
               UNION ALL
               SELECT ty.typelem WHERE ty.typtype <> 'd' AND ty.typelem <> 0 AND ty.typlen = -1
               UNION ALL
               SELECT r.rngsubtype FROM pg_range r WHERE ty.typtype = 'r' AND r.rngtypid = ty.oid
               UNION ALL
               SELECT r.rngsubtype FROM pg_range r WHERE ty.typtype = 'm' AND r.rngmultitypid = ty.oid
               UNION ALL
               SELECT at.atttypid FROM pg_attribute at
                WHERE ty.typtype = 'c' AND at.attrelid = ty.typrelid AND at.attnum > 0
                  AND NOT at.attisdropped) AS x
         WHERE w.depth < 16
    )
    SELECT w.attnum, w.t, w.top, w.inside FROM walk w
$fn$;

-- The columns of a table whose value may hold a json value (json itself, an array of it, a
-- composite or a domain holding one): jsonb cannot hold every json value, and writes one in a form
-- of its own, so capture stores such a key through json_key() and compares such a column by its
-- text; json has no equality, so revert cannot find a row keyed by one.
CREATE OR REPLACE FUNCTION @audit@.json_columns(rel regclass) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(array_agg(DISTINCT a.attname::text), '{}')
      FROM @audit@.column_types(rel) AS x
      JOIN pg_attribute a ON a.attrelid = rel AND a.attnum = x.attnum
     WHERE x.t = 'json'::regtype
$fn$;

-- Columns of a type created in the database (oid 16384 and above: enums, ranges, composites,
-- extension types, arrays of them), whose owner may have given it a cast to text or json. Capture
-- code runs as the audit schema's owner, and ::text or to_json() would call such a cast with that
-- owner's rights, so it renders these values through their type's output function instead
-- (concat(), which never looks for a cast). in_text: the column's type itself, below its
-- domains (what ::text converts); in_json: a type that to_json() would convert on its own, at
-- any depth of arrays, composites and domains (to_json() looks for casts on those only);
-- container: a composite or array, whose text is never empty, so NULL reads from ''.
CREATE OR REPLACE FUNCTION @audit@.cast_exposed_columns(rel regclass)
RETURNS TABLE (name text, in_text boolean, in_json boolean, container boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT a.attname::text,
           coalesce(bool_or(k.top AND ty.typtype <> 'd' AND k.t >= 16384), false),
           -- a range or multirange counts itself: to_json() converts it whole
           coalesce(bool_or(ty.typtype NOT IN ('d', 'c') AND NOT (ty.typelem <> 0 AND ty.typlen = -1)
                            AND k.t >= 16384), false),
           coalesce(bool_or(k.top AND ty.typtype <> 'd' AND (ty.typtype = 'c' OR (ty.typelem <> 0 AND ty.typlen = -1))), false)
      FROM pg_attribute a
      JOIN @audit@.column_types(rel) AS k ON k.attnum = a.attnum
      JOIN pg_type ty ON ty.oid = k.t
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
     GROUP BY a.attnum, a.attname
    HAVING bool_or(k.t >= 16384)
     ORDER BY a.attnum
$fn$;

-- True when a value of the table may be written with a float's digits (float4, float8, the
-- geometric types, which print floats, and extension types, which may): their text depends on
-- the session's extra_float_digits, which at 0 or below rounds them, so that two different values
-- would compare equal and an image would keep the rounded value. Capture code of such a table
-- sets it to 1 (exact, the default) for itself.
CREATE OR REPLACE FUNCTION @audit@.prints_floats(rel regclass) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT FROM @audit@.column_types(rel) AS k JOIN pg_type ty ON ty.oid = k.t
                    WHERE ty.oid IN ('float4'::regtype, 'float8'::regtype, 'point'::regtype,
                                     'lseg'::regtype, 'line'::regtype, 'box'::regtype,
                                     'path'::regtype, 'polygon'::regtype, 'circle'::regtype)
                       OR (ty.typtype = 'b' AND ty.oid >= 16384 AND ty.typelem = 0))
$fn$;

-- True when a type created in the database holds a date, a time or an interval (in a composite,
-- an array or a range of its own): capture writes such a value as its output text (see
-- cast_exposed_columns()), which prints them as the session's DateStyle and IntervalStyle say,
-- so its capture code sets both for itself.
CREATE OR REPLACE FUNCTION @audit@.prints_dates(rel regclass) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT FROM @audit@.column_types(rel) AS k
                    WHERE k.inside AND k.t IN ('date'::regtype, 'time'::regtype, 'timetz'::regtype,
                                               'timestamp'::regtype, 'timestamptz'::regtype, 'interval'::regtype))
$fn$;

-- True when a column holds a bytea (itself, or in a type that holds one): its text follows the
-- session's bytea_output (hex, or escape, which prints the same bytes otherwise), so one row's
-- key and images would depend on the writer's setting. Capture code of such a table writes hex.
CREATE OR REPLACE FUNCTION @audit@.prints_bytes(rel regclass) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT FROM @audit@.column_types(rel) AS k WHERE k.t = 'bytea'::regtype)
$fn$;

-- Whether any of a table's key columns holds a value whose text depends on the session's time
-- zone (a timestamptz, or a type holding one): capture code then writes the table's values in
-- UTC, so that one row keeps one key whichever zone its writers set.
CREATE OR REPLACE FUNCTION @audit@.keys_follow_timezone(rel regclass, keys text[]) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT FROM @audit@.column_types(rel) AS k
                     JOIN pg_attribute a ON a.attrelid = rel AND a.attnum = k.attnum
                    WHERE a.attname::text = ANY (keys) AND k.t = 'timestamptz'::regtype)
$fn$;

-- Whether any of a table's key columns holds a value of one of the types (or a type holding one):
-- an interval prints as the session's IntervalStyle says, so capture code of a table keyed by one
-- sets it for itself, and one row keeps one key whatever its writers set.
CREATE OR REPLACE FUNCTION @audit@.keys_hold(rel regclass, keys text[], types regtype[]) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT FROM @audit@.column_types(rel) AS k
                     JOIN pg_attribute a ON a.attrelid = rel AND a.attnum = k.attnum
                    WHERE a.attname::text = ANY (keys) AND k.t = ANY (types::oid[]))
$fn$;

-- The SQL text of a value's text through its type's output function (see cast_exposed_columns()).
CREATE OR REPLACE FUNCTION @audit@.output_text_sql(expr text, container boolean) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN container THEN format('nullif(concat(%s), '''')', expr)
                ELSE format('CASE WHEN %1$s IS NULL THEN NULL ELSE concat(%1$s) END', expr) END
$fn$;

CREATE OR REPLACE FUNCTION @audit@.primary_key_columns(rel regclass) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(array_agg(a.attname::text ORDER BY k.ord), '{}')
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary
$fn$;

-- True when this schema's DDL event triggers exist and fire: capture code may then be typed.
CREATE OR REPLACE FUNCTION @audit@.follows_ddl() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT count(*) = 2 FROM pg_event_trigger
     WHERE evtname IN ('@audit_name@_follow_ddl', '@audit_name@_follow_drop') AND evtenabled <> 'D'
$fn$;

-- The select list of a row as capture shows it, its values read from alias: excluded columns left
-- out, masked ones as '[masked]', values of types that may carry a cast (cast_exposed_columns())
-- as their output text, any other column as it is; each under its own name, in column order.
CREATE OR REPLACE FUNCTION @audit@.shown_columns(rel regclass, alias text, mask text[], exclude text[])
RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT string_agg(CASE WHEN c.name = ANY (mask) THEN format('''[masked]''::text AS %I', c.name)
                           WHEN x.in_json THEN format('%s AS %I', @audit@.output_text_sql(format('%s.%I', alias, c.name), x.container), c.name)
                           ELSE format('%s.%I', alias, c.name) END, ', ' ORDER BY c.attnum)
      FROM @audit@.table_columns(rel) AS c
      LEFT JOIN @audit@.cast_exposed_columns(rel) AS x ON x.name = c.name
     WHERE c.name <> ALL (exclude)
$fn$;

-- Whether j holds a \u escape that this database cannot decode (json_escapes_readable() says which).
CREATE OR REPLACE FUNCTION @audit@.json_unreadable(j json) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- in UTF-8 only \u0000 and half a surrogate pair can fail: j holding neither text (each half
    -- of a whole pair counts) is told without the exception block
    IF getdatabaseencoding() = 'UTF8' AND j::text !~ '[[.backslash.]]u(0000|[dD][89a-fA-F])' THEN
        RETURN false;
    END IF;
    PERFORM j -> '';  -- reads every string of j
    RETURN false;
EXCEPTION WHEN untranslatable_character OR invalid_text_representation OR feature_not_supported
               OR character_not_in_repertoire THEN
    RETURN true;
END
$fn$;

-- j with each \u escape that this database cannot decode written as text (an escaped backslash
-- before its "uXXXX"): \u0000, half a surrogate pair, or a character the server's encoding lacks
-- (in SQL_ASCII any beyond ASCII). PostgreSQL's json type stores such escapes, and its JSON
-- functions and jsonb refuse them. j itself when every escape decodes. doubled: each escaped
-- backslash also written as two, so that no two values come out the same (readers compare
-- values so; a key then comes with each backslash doubled). Written without a backslash in a
-- literal, so that standard_conforming_strings cannot change what it matches.
CREATE OR REPLACE FUNCTION @audit@.json_escapes_readable(j json, doubled boolean) RETURNS json
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    -- a surrogate pair is one escape; chr(1) stands for each escaped backslash (JSON text holds
    -- no raw control character), so that only real escapes match
    escape constant text := '[[.backslash.]]u[dD][89abAB][[:xdigit:]]{2}[[.backslash.]]u[dD][c-fC-F][[:xdigit:]]{2}'
                            '|[[.backslash.]]u[[:xdigit:]]{4}';
    backslash constant text := chr(92);
    t text;
    bad text[] := '{}';
    e text;
BEGIN
    IF NOT @audit@.json_unreadable(j) THEN
        RETURN CASE WHEN doubled THEN replace(j::text, backslash || backslash, repeat(backslash, 4))::json ELSE j END;
    END IF;
    t := replace(j::text, backslash || backslash, chr(1));
    FOR e IN SELECT DISTINCT m[1] FROM regexp_matches(t, escape, 'g') AS m LOOP
        IF @audit@.json_unreadable(('"' || e || '"')::json) THEN
            bad := bad || e;
        END IF;
    END LOOP;
    -- each bad escape's backslashes as chr(2): one backslash when written, however doubled
    SELECT string_agg(p.piece || coalesce(CASE WHEN x.e = ANY (bad) THEN replace(x.e, backslash, chr(2)) ELSE x.e END, ''),
                      '' ORDER BY p.n)
      INTO t
      FROM unnest(regexp_split_to_array(t, escape)) WITH ORDINALITY AS p(piece, n)
      LEFT JOIN (SELECT m.match[1] AS e, m.n
                   FROM regexp_matches(t, escape, 'g') WITH ORDINALITY AS m(match, n)) AS x ON x.n = p.n;
    t := replace(t, chr(2), backslash || backslash);
    RETURN replace(t, chr(1), repeat(backslash, CASE WHEN doubled THEN 4 ELSE 2 END))::json;
END
$fn$;

-- json_escapes_readable(j, false), after the cheap test that in UTF-8 tells most j that need
-- nothing: only \u0000 and a surrogate's half can fail there (the text \ud or \uD, which also
-- finds some escapes that decode). Without a pinned search_path (every name carries its schema):
-- setting one would cost each call more than the test saves.
CREATE OR REPLACE FUNCTION @audit@.json_escapes_screened(j json) RETURNS json
LANGUAGE plpgsql IMMUTABLE AS $fn$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.=) 'UTF8'
       AND pg_catalog.strpos(j::pg_catalog.text, E'\\u0000') OPERATOR(pg_catalog.=) 0
       AND pg_catalog.strpos(j::pg_catalog.text, E'\\ud') OPERATOR(pg_catalog.=) 0
       AND pg_catalog.strpos(j::pg_catalog.text, E'\\uD') OPERATOR(pg_catalog.=) 0 THEN
        RETURN j;
    END IF;
    RETURN @audit@.json_escapes_readable(j, false);
END
$fn$;

-- The same for any j, j itself when it holds no \u escape. Without a pinned search_path (every
-- name carries its schema), so that PostgreSQL inlines it into the statement that calls it
-- (drift-safe capture code reads each row's key through it) and prepares only its test for every
-- statement: testing for UTF-8's few failing escapes here too would cost every single-row statement
-- about 13,000 instructions, where the call costs only a row that holds an escape (about 7,000
-- each: Python's json writes every character beyond ASCII as one).
CREATE OR REPLACE FUNCTION @audit@.json_readable(j json) RETURNS json
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE WHEN pg_catalog.strpos(j::text, E'\\u') OPERATOR(pg_catalog.=) 0 THEN j
                ELSE @audit@.json_escapes_screened(j) END
$fn$;

-- A key column's value (a json column, or a type holding one) as jsonb, which cannot hold every
-- json value: its escapes made readable, or, holding a number beyond numeric's range or nested
-- too deep, its JSON text as a string. Typed and drift-safe code give a row the same key.
CREATE OR REPLACE FUNCTION @audit@.json_key(j json) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN @audit@.json_readable(j)::jsonb;
EXCEPTION WHEN numeric_value_out_of_range OR untranslatable_character OR invalid_text_representation
               OR character_not_in_repertoire OR feature_not_supported OR program_limit_exceeded
               OR statement_too_complex THEN
    -- as drift-safe code reads it out of the row's image: escapes made readable, no outer space
    RETURN to_jsonb(btrim(@audit@.json_readable(j)::text, E' \t\n\r'));
END
$fn$;

-- A row image as jsonb for drift-safe capture code that could not convert the row itself (a json
-- column holding an escape this database cannot decode, or a number beyond numeric's range): its
-- escapes made readable (json_readable()) and, for a column whose value jsonb still cannot hold,
-- that value's JSON text as a string. Masks apply by
-- name afterwards, as to any image.
CREATE OR REPLACE FUNCTION @audit@.readable_jsonb(j json) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    k text;
    v json;
    image jsonb := '{}';
BEGIN
    RETURN @audit@.json_readable(j)::jsonb;
EXCEPTION WHEN numeric_value_out_of_range OR untranslatable_character OR invalid_text_representation
               OR character_not_in_repertoire OR feature_not_supported OR program_limit_exceeded
               OR statement_too_complex THEN
    FOR k, v IN SELECT e.key, e.value FROM json_each(@audit@.json_readable(j)) AS e LOOP
        BEGIN
            image := image || jsonb_build_object(k, v::jsonb);
        EXCEPTION WHEN numeric_value_out_of_range OR untranslatable_character OR invalid_text_representation
                       OR character_not_in_repertoire OR feature_not_supported OR program_limit_exceeded
                       OR statement_too_complex THEN
            BEGIN
                image := image || jsonb_build_object(k, v::text);
            EXCEPTION WHEN program_limit_exceeded THEN
                -- longer than a jsonb string may be (256 MB): the write goes on, the value is
                -- named as not recorded
                image := image || jsonb_build_object(
                    k, format('[not recorded: %s bytes, more than a jsonb string holds]', octet_length(v::text)));
            END;
        END;
    END LOOP;
    RETURN image;
END
$fn$;

-- Every value of j masked: what drift-safe code records while a masked, excluded or key column it
-- knew no longer has its name (its value may be under any name now).
CREATE OR REPLACE FUNCTION @audit@.mask_all(j jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce((SELECT jsonb_object_agg(k, '[masked]'::text) FROM jsonb_object_keys(j) AS k), j)
$fn$;

-- The columns of a table as the registry records them: [[attnum, name, type], ...], and for a
-- column of a type created in the database (a composite, a domain, an array of one) the types it
-- holds as a fourth element: ALTER TYPE ... ADD ATTRIBUTE changes no column of the table but what
-- its capture code must know (a value written through its output function, floats), so the
-- event triggers see it as a change of the table.
CREATE OR REPLACE FUNCTION @audit@.columns_snapshot(rel regclass) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(jsonb_agg(
               CASE WHEN a.atttypid < 16384
                    THEN jsonb_build_array(a.attnum, a.attname, format_type(a.atttypid, a.atttypmod))
                    ELSE jsonb_build_array(a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
                                           (SELECT string_agg(DISTINCT format_type(k.t, NULL), ',' ORDER BY format_type(k.t, NULL))
                                              FROM @audit@.column_types(rel) AS k WHERE k.attnum = a.attnum))
               END ORDER BY a.attnum), '[]')
      FROM pg_attribute a WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
$fn$;

-- Column names that look like secrets (documented in docs/capture.md).
CREATE OR REPLACE FUNCTION @audit@.looks_sensitive(col text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT lower(col) ~ '(password|passwd|passphrase|secret|token|api_?key|private_?key|jwt|otp_?seed|(^|_)(pwd|pin|ssn|sin|cvv|cvc|iban|card|salt|credential|credentials)(_|$)|card_?number|social_security)'
$fn$;

-- The complete capture DDL for one table (function and four triggers), and its fingerprint.
-- Deterministic: the same table, options and mode give the same text. Problems (a key column
-- that does not exist, a reserved column name) are returned instead of raised, so callers decide.
CREATE OR REPLACE FUNCTION @audit@.render_capture(
    rel regclass, fn text, keys text[], exclude text[], mask text[], typed boolean,
    OUT ddl text, OUT fingerprint text, OUT columns jsonb, OUT key_columns text[], OUT problem text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    audit constant text := '@audit_name@';
    names text[] := '{}';
    by_text boolean[] := '{}';
    tracked text[] := '{}';
    present_mask text[];
    guard_check text;
    i integer;
    o text := '"threadline old"';
    n text := '"threadline new"';
    pk text;
    pk_parts text[] := '{}';
    pk_old_parts text[] := '{}';
    pk_old text;
    pk_update_parts text[] := '{}';
    pk_update text;
    lateral_ins text := '';
    lateral_del text := '';
    lateral_upd text := '';
    side_columns text;
    one_old text;
    one_new text;
    side text;
    changed text[] := '{}';
    delta text[] := '{}';
    same text;
    diff text;
    before text;
    after_update text;
    image_upd text;
    image_ins text;
    image_del text;
    side_old text;
    side_new text;
    any_changed text;
    body text;
    tbl text;
    tag text := '$threadline$';
    live_schema text;
    live_name text;
    upd text[] := '{}';
    ins text[] := '{}';
    del text[] := '{}';
    k integer := 0;
    pairing text;
    -- an UPDATE's old and new rows, paired: see below
    pairs text;
    cv constant integer := 7;
    txid constant text := '"threadline capture".tx';
    -- the id and the table's names, beside the table's columns in typed code's statements: the
    -- trigger's variables qualified with the function's name, which a column named tg_table_name
    -- would otherwise make ambiguous (and every write fail)
    origin text := format('"threadline capture".tx, %1$I.tg_table_schema, %1$I.tg_table_name', fn);
    dispatch text;
    marker_set text;
    declared text := '';
    usual constant text := $usual$@usual_context(NULL)@@long_context(NULL)@$usual$;
    text_exposed text[] := '{}';
    json_exposed text[] := '{}';
    fallback text;
    row_ref text := '"threadline row".*';
    safe_lateral text := '';
    containers text[] := '{}';
    json_columns text[];
    json_keys text[];
    key_read text;
    raw text := '';
BEGIN
    SELECT array_agg(c.name ORDER BY c.attnum), array_agg(c.by_text ORDER BY c.attnum)
      INTO names, by_text
      FROM @audit@.table_columns(rel) AS c;
    columns := @audit@.columns_snapshot(rel);
    names := coalesce(names, '{}');
    IF typed AND names && ARRAY['threadline old', 'threadline new', 'threadline rn', 'threadline row', 'threadline raw', 'threadline image', 'threadline shown'] THEN
        problem := 'a column name starting with "threadline " is reserved';
        RETURN;
    END IF;
    key_columns := CASE WHEN cardinality(keys) > 0 THEN keys ELSE @audit@.primary_key_columns(rel) END;
    IF cardinality(key_columns) = 0 THEN
        problem := 'no primary key';
        RETURN;
    END IF;
    IF typed AND NOT key_columns <@ names THEN
        problem := 'key column(s) ' || array_to_string(ARRAY(SELECT unnest(key_columns) EXCEPT SELECT unnest(names) ORDER BY 1), ', ') || ' not found';
        RETURN;
    END IF;
    json_columns := @audit@.json_columns(rel);
    json_keys := ARRAY(SELECT u.c FROM unnest(key_columns) AS u(c) WHERE u.c = ANY (json_columns));
    FOR i IN 1 .. cardinality(names) LOOP
        IF names[i] <> ALL (exclude) THEN
            tracked := tracked || names[i];
        END IF;
    END LOOP;
    present_mask := ARRAY(SELECT m FROM unnest(mask) AS m WHERE m = ANY (names) AND m <> ALL (exclude) ORDER BY m COLLATE "C");
    -- The transaction's row, as a variable of the function (tx) that each statement records its
    -- changes with. The setting that marks the row (txctx, transaction-local, never empty once
    -- set) tells whether the transaction has one: while it is empty the code takes a new id from
    -- the sequence without looking (the lookup's executor start-up alone costs more than the rest
    -- of the statement); once it is set, it looks the row up by xid and start time (any row of the
    -- transaction: no ORDER BY, about 8,000 instructions less). With a new id the row is written
    -- after the statement, only if the statement recorded a change, with the usual context's path
    -- inline. A session that clears the setting gets a second row, merged into the first at
    -- commit (apply_context_change()); one that sets it finds no row and takes a new id. Looked up
    -- in a statement of its own rather than as a sub-select of each INSERT, the row costs about
    -- 14,700 instructions less per later statement, and one copy of each INSERT serves both cases.
    marker_set := format('current_setting(%L, true) <> ''''', 'threadline.txctx_' || audit);
    -- An UPDATE's old and new rows are paired by their position in the two transition tables.
    -- PL/pgSQL keeps each statement's plan for the session, planned for the sizes of the transition
    -- tables the first time it runs: a join planned for one row is a nested loop, which a later
    -- bulk UPDATE in the same session would run as well, comparing every old row with every new
    -- one (a 2,000-row UPDATE took 7 s). So a statement that changed at most one row needs no
    -- pairing (its old and new row are joined as they are), any other pairs them with a FULL JOIN,
    -- which is never a nested loop (hash or merge, linear whatever size it was planned for). On
    -- one row the FULL JOIN would cost about 65,000 instructions more, the check that chooses
    -- about 10,000 (a PERFORM and FOUND: 4,000 less than IF NOT EXISTS (...), whose sub-select is
    -- planned under a Result node of its own).
    pairs := concat_ws(E'\n',
        '    PERFORM FROM threadline_new LIMIT 1 OFFSET 1;',
        '    IF NOT FOUND THEN',
        '%s',
        '    ELSE',
        '%s',
        '    END IF;');
    -- An UPDATE of a partitioned table that moves a row to another partition deletes it from one
    -- and inserts it into the other; when a BEFORE INSERT trigger of the new partition skips the
    -- insert (returns NULL), the row is gone, and the old transition table holds a row more than
    -- the new one: paired by position, every later row would take the next one's old image. So
    -- such a table's code looks for a second old row rather than a second new one; a single row
    -- that recorded nothing (unchanged, or moved and skipped) is recorded as deleted when the new
    -- table is empty; and a larger statement whose two tables differ in size is recorded as what
    -- it did: each old row deleted, each new row inserted (a last PERFORM leaves a ROW_COUNT that
    -- says changes were recorded). A single-row update of such a table: about 1,200 instructions
    -- more (of 733,000); other tables' code is unchanged.
    IF (SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = rel) THEN
        pairs := concat_ws(E'\n',
            '    PERFORM FROM threadline_old LIMIT 1 OFFSET 1;',
            '    IF NOT FOUND THEN',
            '%1$s',
            '    IF NOT FOUND THEN',
            '    IF NOT EXISTS (SELECT FROM threadline_new) THEN',
            '%3$s',
            '    END IF;',
            '    END IF;',
            '    ELSIF (SELECT count(*) FROM threadline_old) <> (SELECT count(*) FROM threadline_new) THEN',
            '%3$s',
            '%4$s',
            '    PERFORM FROM threadline_old UNION ALL SELECT FROM threadline_new LIMIT 1;',
            '    ELSE',
            '%2$s',
            '    END IF;');
    END IF;

    -- Images are json (the row's text form, built without jsonb's parsing and key sorting). The
    -- before image of an update is the whole row, so changed fields are derived from the two
    -- images when read (changed_fields() in this schema); only a table with masked columns, whose
    -- images cannot show that a masked value changed, stores changed_fields at write time.
    IF typed THEN
        SELECT coalesce(array_agg(e.name) FILTER (WHERE e.in_text), '{}'),
               coalesce(array_agg(e.name) FILTER (WHERE e.in_json), '{}'),
               coalesce(array_agg(e.name) FILTER (WHERE e.container), '{}')
          INTO text_exposed, json_exposed, containers
          FROM @audit@.cast_exposed_columns(rel) AS e;
        FOR i IN 1 .. cardinality(names) LOOP
            IF names[i] <> ALL (exclude) THEN
                IF names[i] = ANY (text_exposed) THEN
                    diff := format('%s COLLATE "C" IS DISTINCT FROM %s COLLATE "C"',
                                   @audit@.output_text_sql(format('%s.%I', o, names[i]), names[i] = ANY (containers)),
                                   @audit@.output_text_sql(format('%s.%I', n, names[i]), names[i] = ANY (containers)));
                ELSIF by_text[i] THEN
                    diff := format('%1$s.%3$I::text COLLATE "C" IS DISTINCT FROM %2$s.%3$I::text COLLATE "C"', o, n, names[i]);
                ELSE
                    diff := format('%1$s.%3$I IS DISTINCT FROM %2$s.%3$I', o, n, names[i]);
                END IF;
                changed := changed || format('CASE WHEN %s THEN %L END', diff, names[i]);
                delta := delta || format('CASE WHEN %s THEN %L || coalesce(to_json(%s)::text, ''null'') END',
                                         diff, to_json(names[i])::text || ':',
                                         CASE WHEN names[i] = ANY (json_exposed)
                                              THEN @audit@.output_text_sql(format('%s.%I', o, names[i]), names[i] = ANY (containers))
                                              ELSE format('%s.%I', o, names[i]) END);
            END IF;
        END LOOP;
        FOREACH same IN ARRAY key_columns LOOP
            IF same = ANY (mask || exclude) THEN  -- a key that became a hidden column: never its value
                pk_parts := pk_parts || format('%L, ''"[masked]"''::jsonb', same);
                pk_old_parts := pk_old_parts || format('%L, ''"[masked]"''::jsonb', same);
                pk_update_parts := pk_update_parts || format('%L, ''"[masked]"''::jsonb', same);
            ELSIF same = ANY (json_exposed) THEN
                pk_parts := pk_parts || format('%L, %s', same, @audit@.output_text_sql(format('%s.%I', n, same), same = ANY (containers)));
                pk_old_parts := pk_old_parts || format('%L, %s', same, @audit@.output_text_sql(format('%s.%I', o, same), same = ANY (containers)));
                pk_update_parts := pk_update_parts || format('%L, %s', same, @audit@.output_text_sql(format('%s.%I', n, same), same = ANY (containers)));
            ELSIF same = ANY (json_keys) THEN
                pk_parts := pk_parts || format('%L, %I.json_key(to_json(%s.%I))', same, audit, n, same);
                pk_old_parts := pk_old_parts || format('%L, %I.json_key(to_json(%s.%I))', same, audit, o, same);
                pk_update_parts := pk_update_parts || format('%L, %I.json_key(to_json(%s.%I))', same, audit, n, same);
            ELSE
                pk_parts := pk_parts || format('%L, %s.%I', same, n, same);
                pk_old_parts := pk_old_parts || format('%L, %s.%I', same, o, same);
                pk_update_parts := pk_update_parts || format('%L, %s.%I', same, n, same);
            END IF;
        END LOOP;
        pk := 'jsonb_build_object(' || array_to_string(pk_parts, ', ') || ')';
        pk_old := 'jsonb_build_object(' || array_to_string(pk_old_parts, ', ') || ')';
        -- the update's key, read from the paired new row
        pk_update := 'jsonb_build_object(' || array_to_string(pk_update_parts, ', ') || ')';
        IF cardinality(exclude) = 0 AND cardinality(present_mask) = 0 AND NOT tracked && json_exposed THEN
            image_ins := format('to_json(%s)', n);
            image_del := format('to_json(%s)', o);
            image_upd := 'to_json("threadline row".*)';
        ELSE
            -- the row as shown: excluded columns left out, masked ones replaced, values whose type
            -- may have a cast (cast_exposed_columns()) as their type's output text, in a lateral
            -- sub-select whose whole row to_json() writes under the columns' names (about half
            -- the cost of to_jsonb() of the row, its keys removed and replaced, cast back to json)
            lateral_ins := format(' CROSS JOIN LATERAL (SELECT %s) AS "threadline shown"', @audit@.shown_columns(rel, n, present_mask, exclude));
            lateral_del := format(' CROSS JOIN LATERAL (SELECT %s) AS "threadline shown"', @audit@.shown_columns(rel, o, present_mask, exclude));
            lateral_upd := format(' CROSS JOIN LATERAL (SELECT %s) AS "threadline shown"', @audit@.shown_columns(rel, '"threadline row"', present_mask, exclude));
            image_ins := 'to_json("threadline shown".*)';
            image_del := image_ins;
            image_upd := image_ins;
        END IF;
        -- each side's image is built where the transition table is scanned; the columns beside it
        -- serve the key and the comparisons
        -- (all of them with masked columns; the key columns otherwise)
        side_columns := CASE WHEN cardinality(present_mask) > 0 THEN '"threadline row".*'
                     ELSE array_to_string(ARRAY(SELECT format('"threadline row".%I', x) FROM unnest(key_columns) AS x
                                                 WHERE x <> ALL (mask || exclude)), ', ') END;
        side_old := format('(SELECT row_number() OVER () AS "threadline rn", %s AS "threadline image"%s FROM threadline_old AS "threadline row"%s) AS %s',
                           image_upd, CASE WHEN side_columns <> '' THEN ', ' || side_columns ELSE '' END, lateral_upd, o);
        side_new := format('(SELECT row_number() OVER () AS "threadline rn", %s AS "threadline image"%s FROM threadline_new AS "threadline row"%s) AS %s',
                           image_upd, CASE WHEN side_columns <> '' THEN ', ' || side_columns ELSE '' END, lateral_upd, n);
        -- A statement that changed one row needs no pairing: its two transition tables hold a row
        -- each, joined as they are (no row_number(), no join condition: about 27,000 instructions
        -- less per statement). Without masks OFFSET 0 keeps each side's image computed once (both
        -- the comparison and the row use it); with masks the images are used once, in a sub-select
        -- of their own, and the sides are better pulled up (about 2,300 less).
        side := CASE WHEN cardinality(present_mask) > 0 THEN '' ELSE ' OFFSET 0' END;
        one_old := format('(SELECT %s AS "threadline image"%s FROM threadline_old AS "threadline row"%s%s) AS %s',
                          image_upd, CASE WHEN cardinality(present_mask) > 0 THEN ', "threadline row".*' ELSE '' END,
                          lateral_upd, side, o);
        one_new := format('(SELECT %s AS "threadline image"%s FROM threadline_new AS "threadline row"%s%s) AS %s',
                          image_upd, CASE WHEN side_columns <> '' THEN ', ' || side_columns ELSE '' END, lateral_upd, side, n);
        after_update := n || '."threadline image"';
        before := o || '."threadline image"';
        -- with masked columns, what changed is computed here (the images show masked values as
        -- equal); otherwise the images tell, compared as text
        any_changed := 'cardinality(i.changed_fields) > 0';
        FOREACH pairing IN ARRAY ARRAY['one', 'many'] LOOP
            upd := upd || concat_ws(E'\n',
                format('    INSERT INTO %I.changes (transaction_id, table_schema, table_name, op, pk, after, before, changed_fields)', audit),
                CASE WHEN cardinality(present_mask) > 0 THEN concat_ws(E'\n',
                format('    SELECT %s, ''update'', i.pk, i.after, i.before, i.changed_fields', origin),
                format('      FROM (SELECT %s AS pk, %s AS after, %s AS before,', pk_update, after_update, before),
                format('                   array_remove(ARRAY[%s]::text[], NULL) AS changed_fields', array_to_string(changed, ', ')),
                format('              FROM %s OFFSET 0) AS i',
                       CASE WHEN pairing = 'one' THEN one_old || ', ' || one_new
                            ELSE format('%s FULL JOIN %s ON %s."threadline rn" = %s."threadline rn"', side_old, side_new, o, n) END),
                format('     WHERE %s;', any_changed))
                -- A statement that changed more rows stores in before the old values of the changed
                -- columns only: per row, the comparisons and the changed values' text cost a little
                -- less than the old row's whole image (a 10,000-row UPDATE: 3% fewer instructions),
                -- and the change is smaller (232 bytes a row instead of 318, two of eight columns).
                -- On one row the comparisons' set-up would cost more than the image (about 60,000
                -- instructions). Readers take the whole row as after || before (before_row()).
                WHEN pairing = 'many' THEN concat_ws(E'\n',
                format('    SELECT %s, ''update'', i.pk, i.after, (''{'' || i.d || ''}'')::json, NULL::text[]', origin),
                -- (concat_ws() takes at most 99 values; array_to_string() skips NULLs as well)
                format('      FROM (SELECT %s AS pk, %s AS after, %s AS d', pk_update, after_update,
                       CASE WHEN cardinality(delta) < 100 THEN format('concat_ws('','', %s)', array_to_string(delta, ', '))
                            ELSE format('array_to_string(ARRAY[%s]::text[], '','')', array_to_string(delta, ', ')) END),
                format('              FROM (SELECT row_number() OVER () AS "threadline rn", "threadline row".* FROM threadline_old AS "threadline row") AS %s', o),
                format('              FULL JOIN (SELECT row_number() OVER () AS "threadline rn", %s AS "threadline image", "threadline row".*', image_upd),
                format('                           FROM threadline_new AS "threadline row"%s) AS %s ON %s."threadline rn" = %s."threadline rn" OFFSET 0) AS i', lateral_upd, n, o, n),
                '     WHERE i.d <> '''';')
                -- a single row without masks: the two images compared as text
                ELSE concat_ws(E'\n',
                format('    SELECT %s, ''update'', %s, %s, %s, NULL::text[]', origin, pk_update, after_update, before),
                format('      FROM %s, %s', one_old, one_new),
                format('     WHERE %s::text IS DISTINCT FROM %s::text;', after_update, before)) END);
        END LOOP;
        ins := ARRAY[concat_ws(E'\n',
            format('    INSERT INTO %I.changes (transaction_id, table_schema, table_name, op, pk, after)', audit),
            format('    SELECT %s, ''insert'', %s, %s', origin, pk, image_ins),
            format('      FROM threadline_new AS %s%s;', n, lateral_ins))];
        del := ARRAY[concat_ws(E'\n',
            format('    INSERT INTO %I.changes (transaction_id, table_schema, table_name, op, pk, before)', audit),
            format('    SELECT %s, ''delete'', %s, %s', origin, pk_old, image_del),
            format('      FROM threadline_old AS %s%s;', o, lateral_del))];
        dispatch := concat_ws(E'\n',
            '  IF TG_OP = ''UPDATE'' THEN',
            format(pairs, upd[1], upd[2], del[1], ins[1]),
            '  ELSIF TG_OP = ''INSERT'' THEN',
            ins[1],
            '  ELSIF TG_OP = ''DELETE'' THEN',
            del[1]);
        body := 'BEGIN';
    ELSE
        -- drift-safe: every column is read from the row's image (alias.j), by key; OFFSET 0 keeps the
        -- planner from pulling the subquery up, which would compute the image once per use. Without
        -- masks or excludes the image is json and changed fields are derived when read; with them
        -- it is jsonb (masks apply by name), cast to json when stored, and changed_fields is stored.
        FOREACH same IN ARRAY tracked LOOP
            changed := changed || format(CASE WHEN same = ANY (json_columns) AND cardinality(mask) + cardinality(exclude) > 0
                                              THEN 'CASE WHEN (%4$I.json_readable(%1$s.r) -> %3$L)::text'
                                                   ' IS DISTINCT FROM (%4$I.json_readable(%2$s.r) -> %3$L)::text THEN %3$L END'
                                              ELSE 'CASE WHEN (%1$s.j -> %3$L)::text IS DISTINCT FROM (%2$s.j -> %3$L)::text THEN %3$L END' END,
                                         o, n, same, audit);
        END LOOP;
        FOREACH same IN ARRAY key_columns LOOP
            IF same = ANY (mask || exclude) THEN  -- a key that became a hidden column: never its value
                pk_parts := pk_parts || format('%L, ''"[masked]"''::jsonb', same);
                pk_old_parts := pk_old_parts || format('%L, ''"[masked]"''::jsonb', same);
            ELSIF cardinality(mask) + cardinality(exclude) = 0 THEN
                -- the json image, whose JSON functions refuse an escape anywhere in it that this
                -- database cannot decode
                key_read := CASE WHEN same = ANY (json_keys) THEN '%1$I.json_key(%1$I.json_readable(%2$s.j) -> %3$L)'
                                 ELSE '%1$I.json_readable(%2$s.j) -> %3$L' END;
                pk_parts := pk_parts || format('%L, %s', same, format(key_read, audit, n, same));
                pk_old_parts := pk_old_parts || format('%L, %s', same, format(key_read, audit, o, same));
            ELSE
                pk_parts := pk_parts || format('%L, %s.j -> %L', same, n, same);
                pk_old_parts := pk_old_parts || format('%L, %s.j -> %L', same, o, same);
            END IF;
        END LOOP;
        pk := 'jsonb_build_object(' || array_to_string(pk_parts, ', ') || ')';
        pk_old := 'jsonb_build_object(' || array_to_string(pk_old_parts, ', ') || ')';
        -- masks by name, for any column that has the name now (jsonb_set without create)
        image_ins := CASE WHEN cardinality(exclude) > 0 THEN format('(%s.j - %L::text[])', n, exclude) ELSE n || '.j' END;
        image_del := CASE WHEN cardinality(exclude) > 0 THEN format('(%s.j - %L::text[])', o, exclude) ELSE o || '.j' END;
        before := image_del;
        FOREACH same IN ARRAY ARRAY(SELECT DISTINCT (m COLLATE "C") FROM unnest(mask) AS m WHERE m <> ALL (exclude) ORDER BY 1) LOOP
            image_ins := format('jsonb_set(%s, %L, ''"[masked]"'', false)', image_ins, ARRAY[same]);
            image_del := format('jsonb_set(%s, %L, ''"[masked]"'', false)', image_del, ARRAY[same]);
            before := format('jsonb_set(%s, %L, ''"[masked]"'', false)', before, ARRAY[same]);
        END LOOP;
        -- Names alone cannot follow a renamed column: once per statement, the code checks that the
        -- masked and excluded columns it knew still have their names (by attribute number, one
        -- syscache-backed lookup each); when one does not (dropped, or renamed: its value may be
        -- under any name now, the key's included), every value of the statement's rows is masked
        -- until the table is synced. Other columns (added, renamed, dropped) need no check: they
        -- are captured under their names, and none can hold a hidden value.
        IF cardinality(mask) + cardinality(exclude) > 0 THEN
            -- pg_identify_object() reads the attribute from the system cache (about 1 µs; a query
            -- of pg_attribute costs about ten times that); its identity ends with the quoted name
            SELECT string_agg(format('right((pg_catalog.pg_identify_object(''pg_catalog.pg_class''::pg_catalog.regclass,'
                                     ' TG_RELID, %s)).identity, %s) IS DISTINCT FROM %L',
                                     c.attnum, length('.' || quote_ident(c.name)), '.' || quote_ident(c.name)),
                              E'\n             OR ' ORDER BY c.attnum)
              INTO guard_check
              FROM @audit@.table_columns(rel) AS c
             WHERE c.name = ANY (mask || exclude);
            -- (no hidden column present yet, e.g. one a relative masks: the names still mask)
            guard_check := '  drifted := ' || coalesce(guard_check, 'false') || ';';
        END IF;
        same := CASE WHEN guard_check IS NULL THEN 'to_json' ELSE 'to_jsonb' END;
        -- Drift-safe code converts each row whole, which calls a cast to json that a column's type
        -- may carry (see cast_exposed_columns()). Where the DDL event triggers run (they
        -- regenerate this code after every change of the table, as they do typed code: drift-safe
        -- code here is the fallback for a table typed code cannot serve), the row is converted
        -- from a projection of its current columns in which such values are their output text.
        -- Without the event triggers, the code must name no column, and the schema's owner is not
        -- a superuser (see capture.md).
        IF @audit@.follows_ddl() AND EXISTS (SELECT FROM @audit@.cast_exposed_columns(rel) AS x WHERE x.in_json) THEN
            safe_lateral := format(' CROSS JOIN LATERAL (SELECT %s) AS "threadline safe"',
                                   @audit@.shown_columns(rel, '"threadline row"', '{}', '{}'));
            row_ref := '"threadline safe".*';
        END IF;
        -- jsonb writes a json column's value in a form of its own (its spaces, key order, escapes
        -- and number spellings undone): with masks, the row is also read as json (r), whose text
        -- keeps each value as written, for the comparisons
        IF guard_check IS NOT NULL AND tracked && json_columns THEN
            raw := format(', to_json(%s) AS r', row_ref);
        END IF;
        side_old := format('(SELECT row_number() OVER () AS rn, %s(%s) AS j%s FROM threadline_old AS "threadline row"%s) AS %s', same, row_ref, raw, safe_lateral, o);
        side_new := format('(SELECT row_number() OVER () AS rn, %s(%s) AS j%s FROM threadline_new AS "threadline row"%s) AS %s', same, row_ref, raw, safe_lateral, n);
        one_old := format('(SELECT %s(%s) AS j%s FROM threadline_old AS "threadline row"%s OFFSET 0) AS %s', same, row_ref, raw, safe_lateral, o);
        one_new := format('(SELECT %s(%s) AS j%s FROM threadline_new AS "threadline row"%s OFFSET 0) AS %s', same, row_ref, raw, safe_lateral, n);
        -- compared as text: jsonb's = holds for numbers written differently (1.5 and 1.50), its
        -- text (keys in a fixed order) does not
        any_changed := CASE WHEN raw <> '' AND cardinality(exclude) = 0
                            THEN format('%1$s.r::text IS DISTINCT FROM %2$s.r::text', o, n)
                            WHEN cardinality(exclude) > 0
                            THEN format('(%1$s.j - %3$L::text[])::text IS DISTINCT FROM (%2$s.j - %3$L::text[])::text', o, n, exclude)
                                 || CASE WHEN raw = '' THEN '' ELSE array_to_string(ARRAY(
                                        SELECT format(' OR (%1$I.json_readable(%2$s.r) -> %4$L)::text'
                                                      ' IS DISTINCT FROM (%1$I.json_readable(%3$s.r) -> %4$L)::text', audit, o, n, c)
                                          FROM unnest(tracked) AS c WHERE c = ANY (json_columns)), '') END
                            ELSE format('%1$s.j::text IS DISTINCT FROM %2$s.j::text', o, n) END;
        IF guard_check IS NOT NULL THEN
            image_ins := image_ins || '::json';
            image_del := image_del || '::json';
            before := before || '::json';
        END IF;
        -- each statement twice when guarded: as is, and with every value masked (two statements,
        -- not one with a parameter, so each keeps one generic plan instead of being planned again)
        FOR k IN 0 .. CASE WHEN guard_check IS NULL THEN 0 ELSE 1 END LOOP
            IF k = 1 THEN
                image_ins := format('%1$I.mask_all(%2$s)::json', audit, left(image_ins, -6));
                image_del := format('%1$I.mask_all(%2$s)::json', audit, left(image_del, -6));
                before := format('%1$I.mask_all(%2$s)::json', audit, left(before, -6));
                pk := format('%1$I.mask_all(%2$s)', audit, pk);
                pk_old := format('%1$I.mask_all(%2$s)', audit, pk_old);
            END IF;
            FOREACH pairing IN ARRAY ARRAY['one', 'many'] LOOP
                upd := upd || concat_ws(E'\n',
                    format('    INSERT INTO %I.changes (transaction_id, table_schema, table_name, op, pk, after, before, changed_fields)', audit),
                    format('    SELECT %s, TG_TABLE_SCHEMA, TG_TABLE_NAME, ''update'',', txid),
                    format('           %s, %s, %s,', pk, image_ins, before),
                    format('           %s', CASE WHEN guard_check IS NULL THEN 'NULL::text[]'
                                                 ELSE format('array_remove(ARRAY[%s]::text[], NULL)', array_to_string(changed, ', ')) END),
                    CASE WHEN pairing = 'one' THEN format('      FROM %s, %s', one_old, one_new)
                         ELSE format('      FROM %s FULL JOIN %s ON %s.rn = %s.rn', side_old, side_new, o, n) END,
                    format('     WHERE %s;', any_changed));
            END LOOP;
            ins := ins || concat_ws(E'\n',
                format('    INSERT INTO %I.changes (transaction_id, table_schema, table_name, op, pk, after)', audit),
                format('    SELECT %s, TG_TABLE_SCHEMA, TG_TABLE_NAME, ''insert'', %s, %s', txid, pk, image_ins),
                format('      FROM (SELECT %s(%s) AS j FROM threadline_new AS "threadline row"%s OFFSET 0) AS %s;',
                       CASE WHEN guard_check IS NULL THEN 'to_json' ELSE 'to_jsonb' END, row_ref, safe_lateral, n));
            del := del || concat_ws(E'\n',
                format('    INSERT INTO %I.changes (transaction_id, table_schema, table_name, op, pk, before)', audit),
                format('    SELECT %s, TG_TABLE_SCHEMA, TG_TABLE_NAME, ''delete'', %s, %s', txid, pk_old, image_del),
                format('      FROM (SELECT %s(%s) AS j FROM threadline_old AS "threadline row"%s OFFSET 0) AS %s;',
                       CASE WHEN guard_check IS NULL THEN 'to_json' ELSE 'to_jsonb' END, row_ref, safe_lateral, o));
        END LOOP;
        dispatch := concat_ws(E'\n',
            '  IF TG_OP = ''UPDATE'' THEN',
            CASE WHEN guard_check IS NULL THEN format(pairs, upd[1], upd[2], del[1], ins[1])
                 ELSE concat_ws(E'\n', '   IF drifted THEN', format(pairs, upd[3], upd[4], del[2], ins[2]), '   ELSE',
                                format(pairs, upd[1], upd[2], del[1], ins[1]), '   END IF;') END,
            '  ELSIF TG_OP = ''INSERT'' THEN',
            CASE WHEN guard_check IS NULL THEN ins[1]
                 ELSE concat_ws(E'\n', '   IF drifted THEN', ins[2], '   ELSE', ins[1], '   END IF;') END,
            '  ELSIF TG_OP = ''DELETE'' THEN',
            CASE WHEN guard_check IS NULL THEN del[1]
                 ELSE concat_ws(E'\n', '   IF drifted THEN', del[2], '   ELSE', del[1], '   END IF;') END);
        -- With masks or excludes the rows are read as jsonb, which cannot hold a json column's
        -- \u0000 escape or a number beyond numeric's range: a statement that meets one runs again,
        -- reading its rows through readable_jsonb(), in an exception block (a subtransaction per
        -- statement, about 13,000 instructions on this path only; typed code never parses a row).
        fallback := replace(dispatch, format('to_jsonb(%s)', row_ref),
                            format('%I.readable_jsonb(to_json(%s))', audit, row_ref));
        dispatch := CASE WHEN guard_check IS NULL THEN dispatch ELSE concat_ws(E'\n',
            '  IF TG_OP <> ''TRUNCATE'' THEN',
            '   BEGIN',
            dispatch,
            '  END IF;',
            '   EXCEPTION WHEN untranslatable_character OR numeric_value_out_of_range OR invalid_text_representation',
            '                  OR character_not_in_repertoire OR feature_not_supported OR statement_too_complex',
            '                  OR program_limit_exceeded THEN',
            fallback,
            '  END IF;',
            '   END;') END;
        k := 0;
        SELECT nc.nspname, c.relname INTO live_schema, live_name
          FROM pg_class c JOIN pg_namespace nc ON nc.oid = c.relnamespace WHERE c.oid = rel;
        IF guard_check IS NOT NULL THEN
            declared := E'\n  drifted boolean;';
        END IF;
        body := concat_ws(E'\n',
            'BEGIN',
            guard_check,
            -- renamed or moved since the code was generated: keep its names together for history
            format('  IF TG_TABLE_NAME <> %L OR TG_TABLE_SCHEMA <> %L THEN', live_name, live_schema),
            format('    INSERT INTO %1$I.tracked_table_names (tracked_id, table_schema, table_name)'
                   ' SELECT t.id, TG_TABLE_SCHEMA, TG_TABLE_NAME FROM %1$I.tracked_tables AS t'
                   ' WHERE t.function_name = %2$L ON CONFLICT DO NOTHING;', audit, fn),
            '  END IF;');
    END IF;
    body := concat_ws(E'\n',
        '<<"threadline capture">>',
        'DECLARE',
        '  tx bigint;',
        '  fresh boolean;',  -- NULL (taken as false) until this statement takes a new id
        '  n bigint;',
        '  raw text;',
        '  j jsonb;',
        '  marker text;' || declared,
        body,
        format('  IF %s THEN', marker_set),
        format('    SELECT t.id INTO tx FROM %I.transactions AS t', audit),
        '     WHERE t.xid = pg_current_xact_id() AND t.occurred_at = now() LIMIT 1;',
        '  END IF;',
        '  IF tx IS NULL THEN',
        format('    tx := %I.next_transaction_id();', audit),
        '    fresh := true;',
        '  END IF;',
        dispatch,
        '  ELSIF TG_OP = ''TRUNCATE'' THEN',
        format('    WITH c AS (INSERT INTO %I.changes (transaction_id, table_schema, table_name, op)', audit),
        '               VALUES (tx, TG_TABLE_SCHEMA, TG_TABLE_NAME, ''truncate'') RETURNING id, captured_at)',
        format('    INSERT INTO %I.truncates (table_schema, table_name, captured_at, change_id, transaction_id, occurred_at)', audit),
        '    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, c.captured_at, c.id, tx, now() FROM c;',
        '  END IF;',
        '  GET DIAGNOSTICS n = ROW_COUNT;',
        '  IF fresh AND n > 0 THEN',
        '    raw := current_setting(''threadline.context'', true);',
        rtrim(usual, E'\n'),
        format('    n := %I.insert_transaction_row(tx);', audit),
        '  END IF;',
        '  RETURN NULL;',
        'END', '');
    WHILE strpos(body, tag) > 0 LOOP
        k := k + 1;
        tag := '$threadline' || k || '$';
    END LOOP;
    SELECT format('%I.%I', nc.nspname, c.relname) INTO tbl
      FROM pg_class c JOIN pg_namespace nc ON nc.oid = c.relnamespace WHERE c.oid = rel;
    ddl := concat_ws(E';\n',
        format(E'-- threadline capture v%s (%s)\nCREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql\nSECURITY DEFINER SET search_path = pg_catalog, pg_temp%s AS %s\n%s%s',
               cv, CASE WHEN typed THEN 'typed' ELSE 'drift_safe' END, audit, fn,
               -- drift-safe code cannot know the columns a table will have
               CASE WHEN NOT typed OR @audit@.prints_floats(rel) THEN ' SET extra_float_digits = 1' ELSE '' END
               -- values written as their output text (a composite or array holding a type created in
               -- the database, such a range) print their dates and intervals as the session says;
               -- to_json() writes them in ISO whatever it says
               || CASE WHEN (cardinality(json_exposed) > 0 OR safe_lateral <> '') AND @audit@.prints_dates(rel)
                       THEN ' SET DateStyle = ''ISO, MDY'' SET IntervalStyle = ''postgres'''
                       WHEN @audit@.keys_hold(rel, key_columns, ARRAY['interval'::regtype])
                       THEN ' SET IntervalStyle = ''postgres''' ELSE '' END
               || CASE WHEN @audit@.keys_follow_timezone(rel, key_columns) THEN ' SET TimeZone = ''UTC''' ELSE '' END
               || CASE WHEN @audit@.prints_bytes(rel) THEN ' SET bytea_output = ''hex''' ELSE '' END,
               tag, body, tag),
        format('COMMENT ON FUNCTION %I.%I() IS %L', audit, fn,
               format('threadline capture code, generated from %I.tracked_tables', audit)),
        format('REVOKE EXECUTE ON FUNCTION %I.%I() FROM PUBLIC', audit, fn),
        format('CREATE OR REPLACE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS threadline_new FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()', audit || '_capture_insert', tbl, audit, fn),
        format('CREATE OR REPLACE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS threadline_old NEW TABLE AS threadline_new FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()', audit || '_capture_update', tbl, audit, fn),
        format('CREATE OR REPLACE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS threadline_old FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()', audit || '_capture_delete', tbl, audit, fn),
        format('CREATE OR REPLACE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()', audit || '_capture_truncate', tbl, audit, fn)) || E';\n';
    fingerprint := left(encode(sha256(convert_to(ddl, 'UTF8')), 'hex'), 32);
END
$fn$;

-- Options of a registry row carried across renamed columns: a column renamed since the code was
-- generated (same attnum, new name) keeps its mask or exclusion under the new name (and the old
-- name stays listed, so a column added later with it is covered too); given keys follow it.
-- The tables that share rows with rel through classic inheritance: its ancestors, whose
-- statements reach its rows, and its descendants, whose rows its statements reach. A statement on
-- a parent is captured by the parent's code alone, with the rows of its children in it; so a
-- column one of them masks or excludes is masked in the others' code too. (A partitioned table's
-- partitions are not relatives: their rows are captured through it, under its own options.)
CREATE OR REPLACE FUNCTION @audit@.inheritance_relatives(rel regclass) RETURNS oid[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    WITH RECURSIVE up(oid) AS (
        SELECT i.inhparent FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
         WHERE i.inhrelid = rel AND p.relkind = 'r'
        UNION
        SELECT i.inhparent FROM up JOIN pg_inherits i ON i.inhrelid = up.oid
          JOIN pg_class p ON p.oid = i.inhparent
         WHERE p.relkind = 'r'
    ), down(oid) AS (
        SELECT i.inhrelid FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
         WHERE i.inhparent = rel AND p.relkind = 'r'
        UNION
        SELECT i.inhrelid FROM down JOIN pg_inherits i ON i.inhparent = down.oid
    )
    SELECT ARRAY(SELECT oid FROM up UNION SELECT oid FROM down ORDER BY 1)
$fn$;

CREATE OR REPLACE FUNCTION @audit@.follow_renamed_columns(
    entry @audit@.tracked_tables, OUT keys text[], OUT exclude text[], OUT mask text[])
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    renames jsonb;
BEGIN
    -- old name -> new name of every column renamed since, all at once (a swap is two renames)
    SELECT coalesce(jsonb_object_agg(old.c ->> 1, now.name), '{}') INTO renames
      FROM jsonb_array_elements(entry.columns) AS old(c)
      JOIN @audit@.table_columns(entry.relid) AS now ON now.attnum = (old.c ->> 0)::integer
     WHERE now.name <> (old.c ->> 1);
    keys := ARRAY(SELECT coalesce(renames ->> k, k) FROM unnest(entry.keys) WITH ORDINALITY AS u(k, i) ORDER BY i);
    -- A column the code knew (by attribute number) is hidden when it was; a column added since,
    -- when its name is listed. A listed name no column has any more stays listed (a column added
    -- later with it is hidden); one that a known column now has (renamed into it) does not.
    WITH old AS (
        SELECT (c ->> 0)::integer AS attnum, c ->> 1 AS name FROM jsonb_array_elements(entry.columns) AS c
    ), cur AS (
        SELECT t.attnum, t.name, o.name AS old_name FROM @audit@.table_columns(entry.relid) AS t
          LEFT JOIN old AS o ON o.attnum = t.attnum
    )
    SELECT ARRAY(SELECT DISTINCT (x COLLATE "C") FROM (
                     SELECT cur.name FROM cur WHERE coalesce(cur.old_name, cur.name) = ANY (entry.exclude)
                     UNION ALL
                     SELECT e FROM unnest(entry.exclude) AS e WHERE e NOT IN (SELECT cur.name FROM cur)) AS u(x)
                 ORDER BY 1),
           ARRAY(SELECT DISTINCT (x COLLATE "C") FROM (
                     SELECT cur.name FROM cur WHERE coalesce(cur.old_name, cur.name) = ANY (entry.mask)
                     UNION ALL
                     SELECT m FROM unnest(entry.mask) AS m WHERE m NOT IN (SELECT cur.name FROM cur)) AS u(x)
                 ORDER BY 1)
      INTO exclude, mask;
END
$fn$;

-- The columns the capture code of rel masks: mask, and every column name that a tracked
-- inheritance relative masks or excludes (see inheritance_relatives), whether rel has it yet. The registry keeps each
-- table's own options; this is applied where the code is rendered.
CREATE OR REPLACE FUNCTION @audit@.effective_mask(rel regclass, exclude text[], mask text[]) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = rel OR i.inhparent = rel)
                THEN mask
                ELSE ARRAY(SELECT DISTINCT (x COLLATE "C") FROM (
                               SELECT unnest(mask)
                               UNION ALL
                               -- also the names this table does not have (yet): drift-safe code
                               -- masks by name whatever columns the table has when it runs
                               SELECT h.name FROM @audit@.tracked_tables o
                                CROSS JOIN LATERAL unnest(o.mask || o.exclude) AS h(name)
                                WHERE o.relid::oid = ANY (@audit@.inheritance_relatives(rel))
                                  AND h.name <> ALL (exclude)) AS u(x)
                           ORDER BY 1)
           END
$fn$;

-- Bring one registry row's capture code in step with its table: follow renamed columns and a
-- renamed table, regenerate when the DDL would differ (or a trigger or the function is missing).
-- typed NULL: typed when the event triggers follow DDL. repair false: leave a table whose triggers
-- are not all there alone (what the event trigger does: a restore creates them after its ALTERs).
-- Returns 'orphaned', 'incomplete', 'unchanged' or 'regenerated'; raises when the code cannot be
-- generated (e.g. the key column was dropped).
CREATE OR REPLACE FUNCTION @audit@.regenerate(entry_id bigint, typed boolean DEFAULT NULL, repair boolean DEFAULT true) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    entry @audit@.tracked_tables;
    opts record;
    r record;
    live record;
    complete boolean;
    locked boolean := false;
    states record;
BEGIN
    -- Rendered first without a lock: the event triggers run this for every tracked table after
    -- any DDL of the database, and most of those find nothing changed, which must not lock the
    -- table (a DDL statement that takes a weaker lock than threadline's would then block
    -- writers, or deadlock with them). Only a change takes the lock and renders again under it:
    -- the table first, then the registry row, as track() does, so a DDL statement (which holds the
    -- table) never waits for a registry row that a track() waiting for the table holds.
    LOOP
        SELECT * INTO entry FROM @audit@.tracked_tables WHERE id = entry_id;
        IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = entry.relid AND c.relkind IN ('r', 'p')) THEN
            RETURN 'orphaned';
        END IF;
        IF locked THEN
            SELECT * INTO entry FROM @audit@.tracked_tables WHERE id = entry_id FOR UPDATE;
            IF NOT FOUND THEN
                RETURN 'orphaned';
            END IF;
        END IF;
        SELECT n.nspname::text AS table_schema, c.relname::text AS table_name INTO live
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = entry.relid AND c.relkind IN ('r', 'p');
        IF NOT FOUND THEN
            RETURN 'orphaned';
        END IF;
        SELECT * INTO opts FROM @audit@.follow_renamed_columns(entry);
        -- a primary key that was dropped: keep identifying rows by the columns last used
        SELECT * INTO r FROM @audit@.render_capture(
            entry.relid, entry.function_name,
            CASE WHEN cardinality(opts.keys) = 0 AND cardinality(@audit@.primary_key_columns(entry.relid)) = 0
                 THEN entry.key_columns ELSE opts.keys END,
            opts.exclude, @audit@.effective_mask(entry.relid, opts.exclude, opts.mask),
            coalesce(typed, @audit@.follows_ddl()));
        IF r.problem IS NOT NULL THEN
            RAISE EXCEPTION 'threadline: cannot generate capture for %.%: %', live.table_schema, live.table_name, r.problem
                USING ERRCODE = 'invalid_table_definition',
                      HINT = 'fix the table, or track it again with --keys naming existing columns';
        END IF;
        SELECT count(*) = 4 INTO complete FROM pg_trigger tg
          JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
         WHERE tg.tgrelid = entry.relid AND pn.nspname = '@audit_name@' AND p.proname = entry.function_name
           AND tg.tgname IN ('@audit_name@_capture_insert', '@audit_name@_capture_update',
                             '@audit_name@_capture_delete', '@audit_name@_capture_truncate');
        IF NOT complete AND NOT repair THEN
            RETURN 'incomplete';
        END IF;
        IF r.fingerprint = entry.fingerprint AND complete AND opts.keys = entry.keys
           AND opts.exclude = entry.exclude AND opts.mask = entry.mask
           AND live.table_schema = entry.table_schema AND live.table_name = entry.table_name THEN
            IF r.columns IS NOT DISTINCT FROM entry.columns THEN
                RETURN 'unchanged';
            ELSIF locked THEN
                -- the same code for other columns (int to bigint): the registry follows, so that
                -- the next DDL of the database does not find the table changed again
                UPDATE @audit@.tracked_tables SET columns = r.columns, updated_at = now() WHERE id = entry_id;
                RETURN 'unchanged';
            END IF;
        END IF;
        EXIT WHEN locked;
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', entry.relid);
        locked := true;
    END LOOP;
    -- the capture triggers a user set to fire always, on replicas only, or not at all keep that
    SELECT coalesce(array_agg(tg.tgname::text ORDER BY tg.tgname) FILTER (WHERE tg.tgenabled = 'A'), '{}') AS always,
           coalesce(array_agg(tg.tgname::text ORDER BY tg.tgname) FILTER (WHERE tg.tgenabled = 'R'), '{}') AS replica,
           coalesce(array_agg(tg.tgname::text ORDER BY tg.tgname) FILTER (WHERE tg.tgenabled = 'D'), '{}') AS disabled
      INTO states
      FROM pg_trigger tg
     WHERE tg.tgrelid = entry.relid
       AND tg.tgname IN ('@audit_name@_capture_insert', '@audit_name@_capture_update',
                         '@audit_name@_capture_delete', '@audit_name@_capture_truncate');
    EXECUTE r.ddl;
    UPDATE @audit@.tracked_tables
       SET table_schema = live.table_schema, table_name = live.table_name, keys = opts.keys,
           exclude = opts.exclude, mask = opts.mask, key_columns = r.key_columns, columns = r.columns,
           mode = CASE WHEN coalesce(typed, @audit@.follows_ddl()) THEN 'typed' ELSE 'drift_safe' END,
           capture_version = 7, fingerprint = r.fingerprint, updated_at = now()
     WHERE id = entry_id;
    INSERT INTO @audit@.tracked_table_names (tracked_id, table_schema, table_name)
    VALUES (entry_id, live.table_schema, live.table_name) ON CONFLICT DO NOTHING;
    -- after the registry is up to date: each ALTER TABLE fires the event triggers, which then find
    -- the table unchanged
    PERFORM @audit@.set_trigger_states(entry.relid, states.always, 'ENABLE ALWAYS');
    PERFORM @audit@.set_trigger_states(entry.relid, states.replica, 'ENABLE REPLICA');
    PERFORM @audit@.set_trigger_states(entry.relid, states.disabled, 'DISABLE');
    RETURN 'regenerated';
END
$fn$;

-- Set the named triggers of a table to a firing state again (what regenerating its capture code,
-- which replaces its triggers, would otherwise reset).
CREATE OR REPLACE FUNCTION @audit@.set_trigger_states(rel regclass, triggers text[], state text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t text;
BEGIN
    IF state NOT IN ('ENABLE ALWAYS', 'ENABLE REPLICA', 'DISABLE') THEN
        RAISE EXCEPTION 'threadline: unknown trigger state %', state USING ERRCODE = '22023';
    END IF;
    FOREACH t IN ARRAY triggers LOOP
        EXECUTE format('ALTER TABLE %s %s TRIGGER %I', rel, state, t);
    END LOOP;
END
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.set_trigger_states(regclass, text[], text) FROM PUBLIC;

-- The SQL API: track a table, or change its options. Options left NULL keep what is stored;
-- mask and exclude add columns, unmask and include remove them (the only ways to reveal a column
-- again); keys replaces the key columns ('{}': back to the primary key). strict refuses a column
-- whose name looks secret and is neither masked nor excluded (a WARNING names them otherwise).
CREATE OR REPLACE FUNCTION @audit@.track(
    target regclass, keys text[] DEFAULT NULL, exclude text[] DEFAULT NULL, mask text[] DEFAULT NULL,
    unmask text[] DEFAULT NULL, include text[] DEFAULT NULL, strict boolean DEFAULT false)
RETURNS TABLE (table_schema text, table_name text, action text, key_columns text[],
               exclude_columns text[], mask_columns text[], previous_keys text[],
               previous_exclude text[], previous_mask text[], unprotected text[], mode text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    entry @audit@.tracked_tables;
    live record;
    names text[];
    new_keys text[];
    new_exclude text[];
    new_mask text[];
    bad text[];
    r record;
    fn text;
    typed boolean := @audit@.follows_ddl();
    existed boolean;
    k integer := 0;
    carried record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('threadline track @audit_name@'));
    SELECT n.nspname::text AS s, c.relname::text AS t, c.relkind INTO live
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target;
    IF live.relkind IN ('r', 'p') THEN  -- the table before its registry row (see regenerate())
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', target);
    END IF;
    IF live.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'threadline: %.% is not a table (only plain and partitioned tables can be tracked)', live.s, live.t
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF live.s = '@audit_name@' THEN
        RAISE EXCEPTION 'threadline: %.% belongs to the audit schema; audit tables are never tracked', live.s, live.t
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    names := ARRAY(SELECT c.name FROM @audit@.table_columns(target) AS c);
    SELECT * INTO entry FROM @audit@.tracked_tables AS e WHERE e.relid = target FOR UPDATE;
    existed := FOUND;
    IF existed THEN
        SELECT * INTO r FROM @audit@.follow_renamed_columns(entry);
        entry.keys := r.keys;
        entry.exclude := r.exclude;
        entry.mask := r.mask;
    ELSE
        entry.keys := '{}';
        entry.exclude := '{}';
        entry.mask := '{}';
        -- a tracked table of this name that was dropped (a migration that rebuilt it) hands its
        -- masks and excludes on, for the columns this one has: from its record, or from its
        -- registry row where no event trigger recorded the drop
        SELECT x.exclude, x.mask INTO carried FROM (
            SELECT d.exclude, d.mask, 0 AS o FROM @audit@.dropped_tables d
             WHERE d.relid = target::oid AND d.untracked
            UNION ALL
            SELECT d.exclude, d.mask, 1 AS o FROM @audit@.dropped_tables d
             WHERE d.table_schema = live.s AND d.table_name = live.t
            UNION ALL
            SELECT e.exclude, e.mask, 2 FROM @audit@.tracked_tables e
             WHERE e.table_schema = live.s AND e.table_name = live.t
               AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = e.relid)) AS x
         ORDER BY x.o LIMIT 1;
        IF FOUND THEN
            entry.exclude := ARRAY(SELECT x FROM unnest(carried.exclude) AS x WHERE x = ANY (names) ORDER BY x COLLATE "C");
            entry.mask := ARRAY(SELECT x FROM unnest(carried.mask) AS x
                                 WHERE x = ANY (names) AND x <> ALL (entry.exclude) ORDER BY x COLLATE "C");
            IF cardinality(entry.exclude) + cardinality(entry.mask) > 0 THEN
                RAISE NOTICE 'threadline: %.% takes on the masks (%) and excludes (%) it or the tracked table of this name had when it was untracked or dropped',
                    live.s, live.t, array_to_string(entry.mask, ', '), array_to_string(entry.exclude, ', ');
            END IF;
        END IF;
        DELETE FROM @audit@.dropped_tables d
         WHERE (d.table_schema = live.s AND d.table_name = live.t) OR (d.relid = target::oid AND d.untracked);
    END IF;
    -- every named column must exist (a typo must not leave a column unmasked)
    bad := ARRAY(SELECT x FROM unnest(coalesce(keys, '{}') || coalesce(exclude, '{}') || coalesce(mask, '{}')) AS x
                  WHERE x <> ALL (names) ORDER BY x);
    IF cardinality(bad) > 0 THEN
        RAISE EXCEPTION 'threadline: column(s) % not found in %.% (columns: %)', array_to_string(bad, ', '), live.s, live.t,
                        array_to_string(ARRAY(SELECT unnest(names) ORDER BY 1), ', ')
            USING ERRCODE = 'undefined_column';
    END IF;
    bad := ARRAY(SELECT unnest(coalesce(exclude, '{}')) INTERSECT SELECT unnest(coalesce(mask, '{}')) ORDER BY 1);
    IF cardinality(bad) > 0 THEN
        RAISE EXCEPTION 'threadline: column(s) % named both to exclude and to mask; pick one', array_to_string(bad, ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    bad := ARRAY(SELECT x FROM unnest(coalesce(unmask, '{}')) AS x WHERE x <> ALL (entry.mask) ORDER BY x);
    IF cardinality(bad) > 0 THEN
        RAISE EXCEPTION 'threadline: cannot unmask %: not masked on %.% (masked: %)', array_to_string(bad, ', '), live.s, live.t,
                        coalesce(nullif(array_to_string(entry.mask, ', '), ''), 'none')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    bad := ARRAY(SELECT x FROM unnest(coalesce(include, '{}')) AS x WHERE x <> ALL (entry.exclude) ORDER BY x);
    IF cardinality(bad) > 0 THEN
        RAISE EXCEPTION 'threadline: cannot include %: not excluded on %.% (excluded: %)', array_to_string(bad, ', '), live.s, live.t,
                        coalesce(nullif(array_to_string(entry.exclude, ', '), ''), 'none')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    new_keys := coalesce(keys, entry.keys);
    -- a column moves between mask and exclude when named for the other (either way it stays hidden)
    new_mask := ARRAY(SELECT DISTINCT (x COLLATE "C") FROM unnest(entry.mask || coalesce(mask, '{}')) AS x
                       WHERE x <> ALL (coalesce(unmask, '{}') || coalesce(exclude, '{}')) ORDER BY 1);
    new_exclude := ARRAY(SELECT DISTINCT (x COLLATE "C") FROM unnest(entry.exclude || coalesce(exclude, '{}')) AS x
                          WHERE x <> ALL (coalesce(include, '{}') || coalesce(mask, '{}')) ORDER BY 1);
    bad := ARRAY(SELECT unnest(CASE WHEN cardinality(new_keys) > 0 THEN new_keys ELSE @audit@.primary_key_columns(target) END)
                 INTERSECT SELECT unnest(new_exclude || new_mask) ORDER BY 1);
    IF cardinality(bad) > 0 THEN
        RAISE EXCEPTION 'threadline: key column(s) % cannot be excluded or masked', array_to_string(bad, ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    unprotected := ARRAY(SELECT x FROM unnest(names) AS x
                          WHERE @audit@.looks_sensitive(x) AND x <> ALL (new_mask || new_exclude)
                            AND x <> ALL (CASE WHEN cardinality(new_keys) > 0 THEN new_keys ELSE @audit@.primary_key_columns(target) END)
                          ORDER BY x);
    IF cardinality(unprotected) > 0 THEN
        IF strict THEN
            RAISE EXCEPTION 'threadline: column(s) % of %.% look secret and are neither masked nor excluded',
                            array_to_string(unprotected, ', '), live.s, live.t
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'mask or exclude them, or track without strict mode to record them in clear';
        END IF;
        RAISE WARNING 'threadline: column(s) % of %.% look secret and are neither masked nor excluded',
                      array_to_string(unprotected, ', '), live.s, live.t;
    END IF;
    fn := entry.function_name;
    IF NOT existed THEN
        -- named after the table's name; a name another tracked table still uses (it was renamed
        -- away) is not taken over: the next candidate is
        LOOP
            fn := 'capture_' || left(encode(sha256(convert_to(
                      live.s || chr(1) || live.t || CASE WHEN k > 0 THEN chr(1) || k ELSE '' END, 'UTF8')), 'hex'), 16);
            EXIT WHEN NOT EXISTS (SELECT 1 FROM @audit@.tracked_tables AS e JOIN pg_class c ON c.oid = e.relid
                                   WHERE e.function_name = fn);
            k := k + 1;
        END LOOP;
    END IF;
    SELECT * INTO r FROM @audit@.render_capture(target, fn, new_keys, new_exclude,
                                                @audit@.effective_mask(target, new_exclude, new_mask), typed);
    IF r.problem = 'no primary key' THEN
        RAISE EXCEPTION 'threadline: %.% has no primary key', live.s, live.t
            USING ERRCODE = 'TL001', HINT = 'add one, or name the columns that identify a row with keys';
    ELSIF r.problem IS NOT NULL THEN
        RAISE EXCEPTION 'threadline: cannot track %.%: %', live.s, live.t, r.problem USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT existed THEN
        -- a registry row left by a dropped table of the same name (orphaned) gives way
        DELETE FROM @audit@.tracked_tables AS e WHERE e.function_name = fn;
        INSERT INTO @audit@.tracked_tables (relid, table_schema, table_name, function_name, mode, capture_version, fingerprint)
        VALUES (target, live.s, live.t, fn, '', 0, '')
        RETURNING * INTO entry;
        -- the names of every dropped table that had this name come to it (once each: two dropped
        -- tables may have shared a name)
        WITH moved AS (
            DELETE FROM @audit@.tracked_table_names AS nm
             WHERE nm.tracked_id IN (SELECT old.tracked_id FROM @audit@.tracked_table_names AS old
                                      WHERE old.table_schema = live.s AND old.table_name = live.t
                                        AND NOT EXISTS (SELECT 1 FROM @audit@.tracked_tables AS x WHERE x.id = old.tracked_id))
            RETURNING nm.table_schema, nm.table_name, nm.first_seen)
        INSERT INTO @audit@.tracked_table_names (tracked_id, table_schema, table_name, first_seen)
        SELECT entry.id, m.table_schema, m.table_name, min(m.first_seen) FROM moved AS m
         GROUP BY m.table_schema, m.table_name
        ON CONFLICT DO NOTHING;
    ELSE
        previous_keys := entry.key_columns;
        previous_exclude := entry.exclude;
        previous_mask := entry.mask;
    END IF;
    UPDATE @audit@.tracked_tables AS e SET keys = new_keys, exclude = new_exclude, mask = new_mask WHERE e.id = entry.id;
    action := CASE WHEN NOT existed THEN 'tracked' ELSE @audit@.regenerate(entry.id, typed) END;
    IF action = 'tracked' THEN
        PERFORM @audit@.regenerate(entry.id, typed);
    END IF;
    -- its inheritance relatives mask what it hides (see inheritance_relatives)
    PERFORM @audit@.regenerate(o.id, typed) FROM @audit@.tracked_tables o
      WHERE o.relid::oid = ANY (@audit@.inheritance_relatives(entry.relid)) ORDER BY o.id;
    SELECT e.table_schema, e.table_name, e.key_columns, e.exclude, e.mask, e.mode
      INTO table_schema, table_name, key_columns, exclude_columns, mask_columns, mode
      FROM @audit@.tracked_tables AS e WHERE e.id = entry.id;
    RETURN NEXT;
END
$fn$;

-- Remove capture from a table (the audit rows stay). Returns false when it was not tracked. Its
-- masks and excludes are kept (dropped_tables), so that tracking it again hides what it hid;
-- forget => true drops them, and those a dropped table of its name left.
DROP FUNCTION IF EXISTS @audit@.untrack(regclass);
CREATE OR REPLACE FUNCTION @audit@.untrack(target regclass, forget boolean DEFAULT false) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    entry @audit@.tracked_tables;
    tbl text := format('%I.%I', (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target),
                       (SELECT c.relname FROM pg_class c WHERE c.oid = target));
    op text;
    had_triggers boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('threadline track @audit_name@'));
    SELECT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgrelid = target
                      AND tgname IN ('@audit_name@_capture_insert', '@audit_name@_capture_update',
                                     '@audit_name@_capture_delete', '@audit_name@_capture_truncate'))
      INTO had_triggers;
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', '@audit_name@_capture_' || op, tbl);
    END LOOP;
    DELETE FROM @audit@.tracked_tables AS e WHERE e.relid = target RETURNING * INTO entry;
    IF entry.id IS NOT NULL THEN
        -- its options under the names its columns have now (drift-safe code follows a renamed
        -- column by its number only when the code is generated again)
        SELECT f.exclude, f.mask INTO entry.exclude, entry.mask FROM @audit@.follow_renamed_columns(entry) AS f;
    END IF;
    IF forget THEN
        -- nor is it to take on the options of a dropped table of its name
        DELETE FROM @audit@.dropped_tables AS d
         WHERE (d.relid = target::oid AND d.untracked)
            OR (d.table_schema, d.table_name) = (SELECT n.nspname::text, c.relname::text
                                                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                                  WHERE c.oid = target);
    ELSIF cardinality(entry.exclude) + cardinality(entry.mask) > 0 THEN
        INSERT INTO @audit@.dropped_tables AS x (table_schema, table_name, exclude, mask, relid, untracked)
        SELECT n.nspname::text, c.relname::text, entry.exclude, entry.mask, target::oid, true
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target
        ON CONFLICT (table_schema, table_name)
        DO UPDATE SET exclude = EXCLUDED.exclude, mask = EXCLUDED.mask, relid = EXCLUDED.relid,
                      untracked = true, dropped_at = now();
    END IF;
    IF entry.id IS NOT NULL THEN
        -- its name now joins the names its history is found under
        INSERT INTO @audit@.tracked_table_names (tracked_id, table_schema, table_name)
        SELECT entry.id, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = target
        ON CONFLICT DO NOTHING;
        EXECUTE format('DROP FUNCTION IF EXISTS %I.%I()', '@audit_name@', entry.function_name);
        -- the baseline no longer describes the table once its changes stop being captured
        UPDATE @audit@.baselines AS x SET ended_at = now() WHERE x.tracked_id = entry.id AND x.ended_at IS NULL;
        -- its inheritance relatives no longer mask what it hid
        PERFORM @audit@.regenerate(o.id) FROM @audit@.tracked_tables o
          WHERE o.relid::oid = ANY (@audit@.inheritance_relatives(target)) ORDER BY o.id;
    END IF;
    RETURN entry.id IS NOT NULL OR had_triggers;
END
$fn$;

-- The state of every tracked table (and of every capture function or trigger whose table or
-- registry row is gone): installed, outdated, disabled, missing or orphaned, with what restores it.
CREATE OR REPLACE FUNCTION @audit@.tracking_status()
RETURNS TABLE (tracked_id bigint, table_schema text, table_name text, status text, detail text,
               key_columns text[], exclude_columns text[], mask_columns text[], mode text,
               fingerprint text, relid oid, function_name text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    e @audit@.tracked_tables;
    live record;
    opts record;
    r record;
    trig record;
    missing text[];
    hidden_keys text[];
    follows boolean := @audit@.follows_ddl();
BEGIN
    FOR e IN SELECT t.* FROM @audit@.tracked_tables AS t ORDER BY t.table_schema, t.table_name, t.id LOOP
        tracked_id := e.id; key_columns := e.key_columns; exclude_columns := e.exclude;
        mask_columns := e.mask; mode := e.mode; fingerprint := e.fingerprint;
        relid := e.relid; function_name := e.function_name;
        SELECT n.nspname::text AS s, c.relname::text AS t INTO live
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = e.relid AND c.relkind IN ('r', 'p');
        IF NOT FOUND THEN
            table_schema := e.table_schema; table_name := e.table_name;
            status := 'orphaned'; detail := 'the table is gone; threadline sync removes its capture function';
            RETURN NEXT;
            CONTINUE;
        END IF;
        table_schema := live.s; table_name := live.t;
        -- a capture trigger counts when it calls the table's capture function (a trigger of the
        -- same name that calls another function records nothing)
        SELECT count(*) FILTER (WHERE p.proname = e.function_name AND pn.nspname = '@audit_name@') AS n,
               count(*) FILTER (WHERE tg.tgenabled IN ('D', 'R')) AS off,
               EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace pn ON pn.oid = p.pronamespace
                        WHERE pn.nspname = '@audit_name@' AND p.proname = e.function_name) AS fn
          INTO trig
          FROM pg_trigger tg
          JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
         WHERE tg.tgrelid = e.relid
           AND tg.tgname IN ('@audit_name@_capture_insert', '@audit_name@_capture_update',
                             '@audit_name@_capture_delete', '@audit_name@_capture_truncate');
        IF trig.n < 4 OR NOT trig.fn THEN
            status := 'missing';
            detail := CASE WHEN trig.fn THEN (4 - trig.n) || ' of 4 capture triggers are missing or call another function'
                           ELSE 'the capture function is missing' END;
        ELSIF trig.off > 0 THEN
            status := 'disabled';
            detail := trig.off || ' capture trigger(s) do not fire (ALTER TABLE ... ENABLE TRIGGER restores them)';
        ELSE
            SELECT * INTO opts FROM @audit@.follow_renamed_columns(e);
            SELECT * INTO r FROM @audit@.render_capture(
                e.relid, e.function_name,
                CASE WHEN cardinality(opts.keys) = 0 AND cardinality(@audit@.primary_key_columns(e.relid)) = 0
                     THEN e.key_columns ELSE opts.keys END,
                opts.exclude, @audit@.effective_mask(e.relid, opts.exclude, opts.mask), e.mode = 'typed');
            missing := ARRAY(SELECT unnest(CASE WHEN cardinality(opts.keys) > 0 THEN opts.keys
                                                WHEN cardinality(@audit@.primary_key_columns(e.relid)) > 0
                                                THEN @audit@.primary_key_columns(e.relid)
                                                ELSE e.key_columns END)
                             EXCEPT SELECT c.name FROM @audit@.table_columns(e.relid) AS c);
            hidden_keys := ARRAY(SELECT unnest(CASE WHEN cardinality(opts.keys) > 0 THEN opts.keys
                                                    ELSE @audit@.primary_key_columns(e.relid) END)
                                 INTERSECT SELECT unnest(opts.mask || opts.exclude));
            IF cardinality(hidden_keys) > 0 THEN
                status := 'outdated';
                detail := format('key column(s) %s are masked or excluded, so rows are recorded with a masked key: track the table with keys naming other columns',
                                 array_to_string(hidden_keys, ', '));
            ELSIF cardinality(missing) > 0 THEN
                status := 'outdated';
                detail := format('key column(s) %s no longer exist: track the table again with keys naming existing columns',
                                 array_to_string(missing, ', '));
            ELSIF r.problem IS NOT NULL THEN
                status := 'outdated';
                detail := 'capture cannot be regenerated: ' || r.problem;
            ELSIF e.capture_version <> 7 THEN
                status := 'outdated'; detail := 'generated by an older release';
            ELSIF live.s <> e.table_schema OR live.t <> e.table_name THEN
                status := 'outdated'; detail := format('renamed from %I.%I', e.table_schema, e.table_name);
            ELSIF r.fingerprint <> e.fingerprint THEN
                status := 'outdated'; detail := 'the table''s columns changed since its capture code was generated';
            ELSIF e.mode = 'typed' AND NOT follows THEN
                status := 'outdated'; detail := 'typed capture code without the DDL event triggers that keep it in step';
            ELSE
                status := 'installed'; detail := NULL;
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
    -- capture functions no registry row names, and capture triggers on tables not in the registry
    tracked_id := NULL; key_columns := NULL; exclude_columns := NULL; mask_columns := NULL; mode := NULL;
    fingerprint := NULL; relid := NULL;
    FOR r IN
        SELECT p.proname::text AS fn FROM pg_proc p JOIN pg_namespace pn ON pn.oid = p.pronamespace
         WHERE pn.nspname = '@audit_name@' AND p.proname ~ '^capture_[0-9a-f]{16}$'
           AND NOT EXISTS (SELECT 1 FROM @audit@.tracked_tables t WHERE t.function_name = p.proname)
         ORDER BY 1
    LOOP
        table_schema := NULL; table_name := NULL; function_name := r.fn;
        SELECT n.nspname::text, c.relname::text INTO table_schema, table_name
          FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
          JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE pn.nspname = '@audit_name@' AND p.proname = r.fn LIMIT 1;
        status := 'orphaned';
        detail := CASE WHEN table_name IS NULL THEN format('capture function %I.%I has no table; threadline sync removes it', '@audit_name@', r.fn)
                       ELSE 'capture triggers without a registry row; threadline track restores it, threadline sync removes them' END;
        RETURN NEXT;
    END LOOP;
END
$fn$;

-- Bring every tracked table to its stored configuration (renames, columns, this release's capture
-- code, the typed or drift-safe shape) and, with prune, remove what belongs to no tracked table.
CREATE OR REPLACE FUNCTION @audit@.sync(prune boolean DEFAULT true)
RETURNS TABLE (table_schema text, table_name text, action text, detail text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    s record;
    op text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('threadline track @audit_name@'));
    FOR s IN SELECT * FROM @audit@.tracking_status() LOOP
        table_schema := s.table_schema; table_name := s.table_name; detail := s.detail;
        IF s.status = 'orphaned' THEN
            IF NOT prune THEN
                action := 'orphaned (kept)';
            ELSE
                IF s.tracked_id IS NOT NULL THEN
                    -- a dropped table's masks and excludes go on to a table tracked under one of its
                    -- names (a migration that rebuilt it), as when the event triggers record the drop
                    INSERT INTO @audit@.dropped_tables AS x (table_schema, table_name, exclude, mask)
                    SELECT DISTINCT n.s, n.t, e.exclude, e.mask
                      FROM @audit@.tracked_tables e
                     CROSS JOIN LATERAL (SELECT e.table_schema AS s, e.table_name AS t
                                         UNION SELECT k.table_schema, k.table_name
                                           FROM @audit@.tracked_table_names k WHERE k.tracked_id = e.id) AS n
                     WHERE e.id = s.tracked_id AND cardinality(e.exclude) + cardinality(e.mask) > 0
                    ON CONFLICT ON CONSTRAINT dropped_tables_pkey
                    DO UPDATE SET exclude = EXCLUDED.exclude, mask = EXCLUDED.mask, relid = NULL,
                                  untracked = false, dropped_at = now();
                    DELETE FROM @audit@.tracked_tables WHERE id = s.tracked_id;
                ELSIF s.table_name IS NOT NULL THEN
                    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
                        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I.%I', '@audit_name@_capture_' || op,
                                       s.table_schema, s.table_name);
                    END LOOP;
                END IF;
                EXECUTE format('DROP FUNCTION IF EXISTS %I.%I()', '@audit_name@', s.function_name);
                action := 'pruned';
            END IF;
        ELSIF s.status = 'disabled' THEN
            action := 'disabled (kept)';
        ELSE
            BEGIN
                action := @audit@.regenerate(s.tracked_id);
            EXCEPTION WHEN others THEN
                -- typed code that cannot be generated: drift-safe code never fails a write
                detail := SQLERRM;
                BEGIN
                    action := @audit@.regenerate(s.tracked_id, false) || ' (drift-safe)';
                EXCEPTION WHEN others THEN
                    action := 'failed';
                END;
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$fn$;

-- Every name a table is or was recorded under, for queries: the registry row whose table has the
-- name now, else the rows that had it before; falls back to the name itself.
CREATE OR REPLACE FUNCTION @audit@.table_names(schema_name text, rel_name text)
RETURNS TABLE (table_schema text, table_name text, valid_from timestamptz, valid_until timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    WITH live AS (
        SELECT t.id FROM @audit@.tracked_tables t
          JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relname = rel_name AND n.nspname = schema_name
    ), ids AS (
        SELECT id FROM live
        UNION
        SELECT nm.tracked_id FROM @audit@.tracked_table_names nm
         WHERE nm.table_name = rel_name AND nm.table_schema = schema_name AND NOT EXISTS (SELECT FROM live)
    ), mine AS (
        SELECT m.table_schema, m.table_name, min(m.first_seen) AS first_seen
          FROM (SELECT nm.table_schema, nm.table_name, nm.first_seen FROM @audit@.tracked_table_names nm
                 WHERE nm.tracked_id IN (SELECT id FROM ids)
                UNION ALL
                SELECT n.nspname::text, c.relname::text, NULL FROM @audit@.tracked_tables t
                  JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE t.id IN (SELECT id FROM ids)) AS m
         GROUP BY 1, 2
    )
    -- a name another tracked table had before (or took later) counts for this one only from when
    -- this one took it (until the other took it)
    SELECT m.table_schema, m.table_name,
           CASE WHEN EXISTS (SELECT 1 FROM @audit@.tracked_table_names o
                              WHERE o.table_schema = m.table_schema AND o.table_name = m.table_name
                                AND o.tracked_id NOT IN (SELECT id FROM ids)
                                AND o.first_seen < coalesce(m.first_seen, 'infinity'))
                THEN coalesce(m.first_seen, now()) END,
           (SELECT min(o.first_seen) FROM @audit@.tracked_table_names o
             WHERE o.table_schema = m.table_schema AND o.table_name = m.table_name
               AND o.tracked_id NOT IN (SELECT id FROM ids)
               AND o.first_seen > coalesce(m.first_seen, '-infinity'))
      FROM mine m
    UNION ALL
    SELECT schema_name, rel_name, NULL, NULL WHERE NOT EXISTS (SELECT FROM ids)
$fn$;

-- DDL event triggers (created when the installing role may: a superuser). After any ALTER of a
-- tracked table (directly or through a parent, a type or another ALTER form), and after any DROP
-- that removed one of its columns (DROP TYPE ... CASCADE), its capture code is regenerated in the
-- DDL's own transaction; after a tracked table is dropped, its registry row and capture function
-- go too. A table whose typed code cannot be regenerated gets drift-safe code and a WARNING; if
-- even that fails, the DDL statement is refused rather than leave code that would fail writes.
-- What both event triggers do for a table a statement changed: typed code again; drift-safe code,
-- with a WARNING, when typed code cannot be generated; the statement refused when neither can
-- (capture code that no longer fits the table would fail every later write).
CREATE OR REPLACE FUNCTION @audit@.follow_table(entry_id bigint, shown text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    failure text;
BEGIN
    PERFORM @audit@.regenerate(entry_id, NULL, false);
EXCEPTION WHEN others THEN
    failure := SQLERRM;
    BEGIN
        PERFORM @audit@.regenerate(entry_id, false, false);
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'threadline: the capture code of % cannot follow this statement: %', shown, SQLERRM
            USING HINT = 'retry it; or untrack the table first (threadline untrack) and track it again afterwards';
    END;
    RAISE WARNING 'threadline: capture of % now uses drift-safe code: %', shown, failure;
END
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.follow_table(bigint, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @audit@.follow_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    r record;
BEGIN
    IF to_regclass('@audit_name@.tracked_tables') IS NULL THEN
        RETURN;
    END IF;
    -- the tables the statement names, and every tracked table whose columns or name no longer
    -- are what its code was generated from (a change that recursed to inheritance children or
    -- partitions, ALTER TYPE ... CASCADE on a typed table, a rename through ALTER VIEW or INDEX)
    FOR r IN
        SELECT t.id, t.table_schema, t.table_name FROM @audit@.tracked_tables t
         WHERE t.relid::oid IN (SELECT d.objid FROM pg_event_trigger_ddl_commands() AS d
                                 WHERE d.classid = 'pg_class'::regclass)
            -- a table that now inherits (or is inherited by) a tracked one takes its masks
            OR t.relid::oid IN (SELECT unnest(@audit@.inheritance_relatives(d.objid::regclass))
                                  FROM pg_event_trigger_ddl_commands() AS d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0
                                   AND d.object_type = 'table')
            OR NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE c.oid = t.relid AND n.nspname = t.table_schema AND c.relname = t.table_name)
            OR @audit@.columns_snapshot(t.relid) IS DISTINCT FROM t.columns
         ORDER BY t.id
    LOOP
        PERFORM @audit@.follow_table(r.id, format('%I.%I', r.table_schema, r.table_name));
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION @audit@.follow_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    r record;
BEGIN
    IF to_regclass('@audit_name@.tracked_tables') IS NULL THEN
        RETURN;
    END IF;
    FOR r IN
        SELECT t.id, t.function_name, t.exclude, t.mask, d.schema_name, d.object_name
          FROM @audit@.tracked_tables t
          JOIN pg_event_trigger_dropped_objects() AS d
            ON d.objid = t.relid::oid AND d.classid = 'pg_class'::regclass AND d.objsubid = 0
    LOOP
        INSERT INTO @audit@.tracked_table_names (tracked_id, table_schema, table_name)
        VALUES (r.id, r.schema_name, r.object_name) ON CONFLICT DO NOTHING;
        -- under every name it had: a migration renames the old table away before it drops it
        INSERT INTO @audit@.dropped_tables AS x (table_schema, table_name, exclude, mask)
        SELECT n.table_schema, n.table_name, r.exclude, r.mask
          FROM @audit@.tracked_table_names n WHERE n.tracked_id = r.id
        ON CONFLICT (table_schema, table_name)
        DO UPDATE SET exclude = EXCLUDED.exclude, mask = EXCLUDED.mask, dropped_at = now();
        DELETE FROM @audit@.tracked_tables WHERE id = r.id;
        EXECUTE format('DROP FUNCTION IF EXISTS %I.%I()', '@audit_name@', r.function_name);
    END LOOP;
    -- columns dropped by something other than ALTER TABLE (DROP TYPE/DOMAIN/EXTENSION ... CASCADE,
    -- or a column dropped from a parent): as after any other DDL
    FOR r IN
        SELECT DISTINCT t.id, t.table_schema, t.table_name
          FROM @audit@.tracked_tables t
         WHERE @audit@.columns_snapshot(t.relid) IS DISTINCT FROM t.columns
           AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.relid)
    LOOP
        PERFORM @audit@.follow_table(r.id, format('%I.%I', r.table_schema, r.table_name));
    END LOOP;
END
$fn$;

REVOKE EXECUTE ON FUNCTION @audit@.follow_ddl() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION @audit@.follow_drop() FROM PUBLIC;
-- changing what is tracked is the owner's job (an application role could not create the code
-- anyway); reading the status is anyone's
REVOKE EXECUTE ON FUNCTION @audit@.track(regclass, text[], text[], text[], text[], text[], boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION @audit@.untrack(regclass, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION @audit@.sync(boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION @audit@.regenerate(bigint, boolean, boolean) FROM PUBLIC;

-- Baselines: every row a table holds when its baseline is taken, recorded once as a 'snapshot'
-- change of one transaction row, so history and as_of know rows that have not changed since.
-- Taken in batches, each its own transaction in key order, so no lock is held longer than a batch;
-- last_key is where the last committed batch stopped, so an interrupted baseline resumes there
-- (a batch that did not commit left neither snapshots nor progress). tracked_since: when the
-- tracking the baseline belongs to began; a change captured before it (the table was untracked in
-- between, its rows may have changed unseen) is outdated by the baseline. ended_at: the table was
-- untracked (or dropped), so from then on the baseline no longer describes it.
CREATE TABLE IF NOT EXISTS @audit@.baselines (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tracked_id bigint NOT NULL,
    tracked_since timestamptz NOT NULL,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    transaction_id bigint NOT NULL,
    key_columns text[] NOT NULL,
    last_key jsonb,
    rows_done bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    ended_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS baselines_current_idx
    ON @audit@.baselines (tracked_id) WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS baselines_table_idx ON @audit@.baselines (table_name, table_schema);

-- A registry row that goes (untrack, DROP TABLE, sync) ends its table's baseline.
CREATE OR REPLACE FUNCTION @audit@.end_baseline() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    UPDATE @audit@.baselines AS x SET ended_at = now() WHERE x.tracked_id = OLD.id AND x.ended_at IS NULL;
    RETURN NULL;
END
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.end_baseline() FROM PUBLIC;
CREATE OR REPLACE TRIGGER end_baseline AFTER DELETE ON @audit@.tracked_tables
    FOR EACH ROW EXECUTE FUNCTION @audit@.end_baseline();
-- also in sessions with session_replication_role = replica, like the event triggers
ALTER TABLE @audit@.tracked_tables ENABLE ALWAYS TRIGGER end_baseline;

-- One batch of a table's baseline: starts it (the current transaction's row becomes the baseline's
-- transaction) or continues it after the last key recorded. Images follow the table's masks and
-- excludes as capture does. Returns the rows recorded by this batch and whether the baseline is
-- complete; a complete baseline is left as it is (untrack and track again for a new one).
CREATE OR REPLACE FUNCTION @audit@.baseline_batch(
    target regclass, batch_size integer DEFAULT 10000,
    OUT baseline_id bigint, OUT batch_rows integer, OUT total_rows bigint, OUT finished boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
-- the text of the values, as capture code writes it whatever the session prints (see render_capture)
SET extra_float_digits = 1 SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC'
SET bytea_output = 'hex'
-- a row-level security policy that applies to the caller makes the read fail instead of hiding
-- rows from the baseline, and its expression (the table owner's code) never runs with the rights
-- of the caller, the schema's owner
SET row_security = off AS $fn$
DECLARE
    e @audit@.tracked_tables;
    b @audit@.baselines;
    opts record;
    live_schema text;
    live_name text;
    hidden_keys text[];
    present_mask text[];
    image text;
    pk text;
    key_list text;
    key_defs text;
    last_row text;
    last jsonb;
    parted boolean := (SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = '@audit@.changes'::regclass);
    shown text := '';
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1, got %', batch_size USING ERRCODE = '22023';
    END IF;
    SELECT * INTO e FROM @audit@.tracked_tables AS t WHERE t.relid = target;
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not tracked', target
            USING ERRCODE = '55000', HINT = 'Track the table first; its baseline records the rows it holds then.';
    END IF;
    -- one batch of a table at a time; a second taker waits for the batch, then continues after it
    PERFORM pg_advisory_xact_lock(hashtext('threadline baseline @audit_name@'), e.id::integer);
    -- a move to partitions copies rows behind it and would miss snapshots written meanwhile: it
    -- creates its tables under this lock, so the test below holds until this batch ends
    PERFORM pg_advisory_xact_lock(hashtext('threadline seal @audit_name@'));
    IF to_regclass('@audit_name@.transactions_partitioned') IS NOT NULL THEN
        RAISE EXCEPTION 'a baseline is refused while the audit store of schema % is being moved to the partitioned layout',
            '@audit_name@'
            USING ERRCODE = '55000', HINT = 'finish the move first (threadline partitions --migrate), then take the baseline';
    END IF;
    SELECT * INTO b FROM @audit@.baselines AS x WHERE x.tracked_id = e.id AND x.ended_at IS NULL;
    IF FOUND AND b.finished_at IS NOT NULL THEN
        baseline_id := b.id; batch_rows := 0; total_rows := b.rows_done; finished := true;
        RETURN;
    END IF;
    SELECT nc.nspname, c.relname INTO live_schema, live_name
      FROM pg_class c JOIN pg_namespace nc ON nc.oid = c.relnamespace WHERE c.oid = target;
    SELECT * INTO opts FROM @audit@.follow_renamed_columns(e);
    -- A batch after the first reads the last key back as constants of the key's types, a domain
    -- key as its base type: making a value a domain checks it, and its checks' expressions (the
    -- domain owner's code) would run with the rights of the caller, the schema's owner. A
    -- domain inside a key's type (an array, a composite or a range of it) cannot be so avoided.
    IF EXISTS (SELECT FROM @audit@.column_types(target) AS k
                 JOIN pg_attribute a ON a.attrelid = target AND a.attnum = k.attnum
                 JOIN pg_type ty ON ty.oid = k.t
                WHERE a.attname::text = ANY (coalesce(b.key_columns, e.key_columns))
                  AND ty.typtype = 'd' AND NOT k.top) THEN
        RAISE EXCEPTION 'a key column of % holds a domain inside an array, a composite or a range', target
            USING ERRCODE = '55000',
                  HINT = 'A baseline would check the domain''s constraints as the schema''s owner: track the table with keys of other types.';
    END IF;
    IF b.id IS NULL THEN
        hidden_keys := ARRAY(SELECT unnest(e.key_columns) INTERSECT SELECT unnest(opts.mask || opts.exclude));
        IF cardinality(hidden_keys) > 0 THEN
            RAISE EXCEPTION 'key column(s) % of % are masked or excluded, so its rows cannot be told apart',
                array_to_string(hidden_keys, ', '), target
                USING ERRCODE = '55000', HINT = 'Track the table with keys naming other columns.';
        END IF;
        -- rows are read in key order, a batch after the last key: keys two rows share could be
        -- split across a batch boundary and skipped, and so would a row whose key holds a NULL
        -- (compared with it, the next key is neither greater nor smaller), which a unique index
        -- over a column that may be NULL lets any number of rows share
        IF NOT EXISTS (SELECT 1 FROM pg_index i
                        WHERE i.indrelid = target AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
                          AND i.indexprs IS NULL
                          AND ARRAY(SELECT a.attname::text FROM pg_attribute a
                                     WHERE a.attrelid = target AND a.attnum = ANY (i.indkey::int2[])) <@ e.key_columns
                          AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                                           WHERE a.attrelid = target AND a.attnum = ANY (i.indkey::int2[])
                                             AND NOT a.attnotnull)) THEN
            RAISE EXCEPTION 'the key column(s) % of % are not unique (no unique index or primary key on NOT NULL columns among them)',
                array_to_string(e.key_columns, ', '), target
                USING ERRCODE = '55000', HINT = 'A baseline reads rows in key order and needs a unique key: track the table with NOT NULL keys a unique index covers.';
        END IF;
        INSERT INTO @audit@.baselines (tracked_id, tracked_since, table_schema, table_name, transaction_id, key_columns)
        VALUES (e.id, e.tracked_at, live_schema, live_name, @audit@.transaction_row(), e.key_columns)
        RETURNING * INTO b;
        UPDATE @audit@.transactions AS t
           SET meta = coalesce(t.meta, '{}') || jsonb_build_object('baseline', format('%I.%I', live_schema, live_name))
         WHERE t.id = b.transaction_id AND t.occurred_at = now();
    END IF;
    present_mask := ARRAY(SELECT m FROM unnest(@audit@.effective_mask(target, opts.exclude, opts.mask)) AS m
                           WHERE m IN (SELECT c.name FROM @audit@.table_columns(target) AS c)
                             AND m <> ALL (opts.exclude) ORDER BY m COLLATE "C");
    -- the table's alias is one no column can shadow, and its whole row is named as such (a
    -- column called like the alias would otherwise stand for the row)
    image := 'to_json("threadline row".*)';
    -- the row as typed capture shows it: masked columns replaced, excluded ones left out, and
    -- values of types created in the database through their output function (see
    -- cast_exposed_columns(): a cast such a type carries never runs as the caller), in a lateral
    -- sub-select whose whole row to_json() writes (never through jsonb, which cannot hold every
    -- json value)
    IF cardinality(opts.exclude) > 0 OR cardinality(present_mask) > 0
       OR EXISTS (SELECT FROM @audit@.cast_exposed_columns(target) AS x WHERE x.in_json) THEN
        shown := format(' CROSS JOIN LATERAL (SELECT %s) AS "threadline shown"',
                        @audit@.shown_columns(target, '"threadline row"', present_mask, opts.exclude));
        image := 'to_json("threadline shown".*)';
    END IF;
    pk := 'jsonb_build_object(' || array_to_string(ARRAY(
              SELECT format('%L, %s', k, CASE WHEN x.in_json THEN @audit@.output_text_sql(format('"threadline row".%I', k), x.container)
                                              ELSE format('"threadline row".%I', k) END)
                FROM unnest(b.key_columns) WITH ORDINALITY AS u(k, ord)
                LEFT JOIN @audit@.cast_exposed_columns(target) AS x ON x.name = u.k ORDER BY u.ord), ', ') || ')';
    key_list := array_to_string(ARRAY(SELECT format('"threadline row".%I', k) FROM unnest(b.key_columns) AS k), ', ');
    IF b.last_key IS NOT NULL THEN
        -- The last key recorded, as constants of the key columns' types: a condition the key's
        -- index serves, so a batch starts where the last one stopped rather than reading the rows
        -- before it. Only the key columns are read back from it (no other column is involved).
        SELECT string_agg(format('%I %s', a.attname, t.name), ', ' ORDER BY k.ord),
               string_agg(format('quote_nullable(%s) || %L',
                                 -- through the output function: ::text could call a cast
                                 CASE WHEN x.in_text THEN @audit@.output_text_sql(format('l.%I', a.attname), x.container)
                                      ELSE format('l.%I', a.attname) END,
                                 '::' || t.name), ' || '', '' || ' ORDER BY k.ord)
          INTO key_defs, last_row
          FROM unnest(b.key_columns) WITH ORDINALITY AS k(name, ord)
          JOIN pg_attribute a ON a.attrelid = target AND a.attname = k.name AND a.attnum > 0 AND NOT a.attisdropped
          LEFT JOIN @audit@.cast_exposed_columns(target) AS x ON x.name = k.name
         CROSS JOIN LATERAL (
               WITH RECURSIVE down(t, m) AS (
                   SELECT a.atttypid, a.atttypmod
                   UNION ALL
                   SELECT ty.typbasetype, CASE WHEN down.m <> -1 THEN down.m ELSE ty.typtypmod END
                     FROM down JOIN pg_type ty ON ty.oid = down.t WHERE ty.typtype = 'd')
               SELECT format_type(down.t, down.m) FROM down JOIN pg_type ty ON ty.oid = down.t
                WHERE ty.typtype <> 'd') AS t(name);
        EXECUTE format('SELECT %s FROM jsonb_to_record($1) AS l(%s)', last_row, key_defs)
          INTO last_row USING b.last_key;
    END IF;
    EXECUTE format(
        'WITH batch AS (SELECT %1$s AS pk, %2$s AS image, row_number() OVER (ORDER BY %4$s) AS n'
        '                 FROM %3$s AS "threadline row"%8$s%5$s ORDER BY %4$s LIMIT $1),'
        ' recorded AS (INSERT INTO @audit@.changes (transaction_id, table_schema, table_name, op, pk, after%6$s)'
        '              SELECT $2, $3, $4, ''snapshot'', batch.pk, batch.image%7$s FROM batch)'
        ' SELECT count(*)::integer, (array_agg(batch.pk ORDER BY batch.n DESC))[1] FROM batch',
        pk, image, target, key_list,
        CASE WHEN b.last_key IS NULL THEN '' ELSE format(' WHERE (%s) > (%s)', key_list, last_row) END,
        -- partitioned, the snapshots go to the partition of the baseline's transaction
        CASE WHEN parted THEN ', occurred_at' ELSE '' END,
        CASE WHEN parted THEN ', (SELECT t.occurred_at FROM @audit@.transactions t WHERE t.id = $2)' ELSE '' END,
        shown)
      INTO batch_rows, last
      USING batch_size, b.transaction_id, live_schema, live_name;
    UPDATE @audit@.baselines AS x
       SET rows_done = x.rows_done + batch_rows, last_key = coalesce(last, x.last_key),
           finished_at = CASE WHEN batch_rows < batch_size THEN clock_timestamp() END
     WHERE x.id = b.id
    RETURNING x.id, x.rows_done, x.finished_at IS NOT NULL INTO baseline_id, total_rows, finished;
END
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.baseline_batch(regclass, integer) FROM PUBLIC;

-- A whole baseline from SQL: CALL threadline.take_baseline('orders'). Commits after every batch,
-- so it must be called outside a transaction block (not from a migration that runs in one).
CREATE OR REPLACE PROCEDURE @audit@.take_baseline(target regclass, batch_size integer DEFAULT 10000)
LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
BEGIN
    LOOP
        SELECT * INTO r FROM @audit@.baseline_batch(target, batch_size);
        COMMIT;
        EXIT WHEN r.finished;
    END LOOP;
END
$fn$;
REVOKE EXECUTE ON PROCEDURE @audit@.take_baseline(regclass, integer) FROM PUBLIC;

DO $events$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        DROP EVENT TRIGGER IF EXISTS @audit_name@_follow_ddl;
        DROP EVENT TRIGGER IF EXISTS @audit_name@_follow_drop;
        CREATE EVENT TRIGGER @audit_name@_follow_ddl ON ddl_command_end
            WHEN TAG IN ('ALTER TABLE', 'ALTER VIEW', 'ALTER FOREIGN TABLE', 'ALTER INDEX', 'ALTER SEQUENCE',
                         'ALTER MATERIALIZED VIEW', 'ALTER TYPE', 'ALTER DOMAIN')
            EXECUTE FUNCTION @audit@.follow_ddl();
        CREATE EVENT TRIGGER @audit_name@_follow_drop ON sql_drop EXECUTE FUNCTION @audit@.follow_drop();
        -- also in sessions with session_replication_role = replica (restores, replication)
        ALTER EVENT TRIGGER @audit_name@_follow_ddl ENABLE ALWAYS;
        ALTER EVENT TRIGGER @audit_name@_follow_drop ENABLE ALWAYS;
    ELSE
        RAISE NOTICE 'threadline: % may not create event triggers; capture code is drift-safe and threadline coverage reports tables whose columns changed', current_user;
    END IF;
END
$events$;

-- Tamper evidence. A seal covers the next transactions in (xid, id) order, each with its changes,
-- once they are final: every transaction with an xid below the oldest one still running in this
-- database (pg_stat_activity.backend_xid, prepared transactions) has ended, so no row can join them afterwards (a baseline still being taken holds the seal back at
-- its transaction, whose snapshots are still arriving). Each seal stores the transactions' ids, the
-- digest of each (to name the first one that no longer matches) and a hash over them and the
-- previous link's hash, so the seals form a chain: editing, deleting or inserting
-- an audit row in a sealed range, or a seal, breaks it. The head hash kept outside the database
-- catches the removal of the latest seals. An erasure (kind 'erasure') or a purge (kind 'purge')
-- is a link of the same chain that records the new digests of the sealed transactions it rewrote
-- (all zero bytes for one it deleted) and keeps the position of the seal before it.
CREATE TABLE IF NOT EXISTS @audit@.seals (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text NOT NULL DEFAULT 'seal',
    format integer NOT NULL DEFAULT 1,
    last_xid xid8,
    last_id bigint,
    transaction_ids bigint[] NOT NULL,
    digests bytea NOT NULL,
    changes bigint NOT NULL,
    prev_hash bytea,
    hash bytea NOT NULL,
    action_id bigint,
    sealed_at timestamptz NOT NULL DEFAULT now()
);
-- in the hash of a link of format 2: what it says it did (a purge: its cut-off and tables, as
-- JSON), and, for a seal, the start time of each transaction it covers, in the order of
-- transaction_ids (verify checks that a purge removed only transactions older than its cut-off)
ALTER TABLE @audit@.seals ADD COLUMN IF NOT EXISTS detail text;
ALTER TABLE @audit@.seals ADD COLUMN IF NOT EXISTS started timestamptz[];
COMMENT ON COLUMN @audit@.seals.digests IS
    'The 32-byte digest of each transaction (its row and its changes), in the order of transaction_ids.';
COMMENT ON COLUMN @audit@.seals.format IS
    '1: digests of the transactions as they are (seals made before salts); 2: each digest is salted with its transaction''s salt in seal_salts.';

-- Format 2: the digest a link records for a transaction is sha256(salt || its digest), the salt
-- drawn at random when the transaction is first sealed and kept here, readable by the owner only.
-- An erasure or a purge deletes the salt of each sealed transaction it rewrites or removes (and
-- draws a new one for the new digest it records), so the digest of the erased values can no
-- longer be tested against guesses, by anyone. verify reads the salts through salted_digests().
CREATE TABLE IF NOT EXISTS @audit@.seal_salts (
    transaction_id bigint PRIMARY KEY,
    salt bytea NOT NULL
);
REVOKE ALL ON @audit@.seal_salts FROM PUBLIC;

-- The hash of a link of the chain: the previous link's hash, what the link is, the position it
-- leaves the chain at, and its contents.
DROP FUNCTION IF EXISTS @audit@.seal_hash(text, bytea, bigint[], bytea, bigint);
CREATE OR REPLACE FUNCTION @audit@.seal_hash(kind text, prev_hash bytea, last_xid xid8, last_id bigint,
                                              ids bigint[], digests bytea, action_id bigint)
RETURNS bytea LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT sha256(coalesce(prev_hash, ''::bytea)
                  || convert_to(format('threadline %s 1;%s;%s;%s;%s;', kind, coalesce(action_id::text, ''),
                                       coalesce(last_xid::text, ''), coalesce(last_id::text, ''),
                                       array_to_string(ids, ',')), 'UTF8')
                  || digests)
$fn$;
-- The hash of a link of either format: format 1 as above; format 2 also hashes the format itself
-- (so a salted link cannot pass for an unsalted one), the link's detail and its start times (as
-- microseconds since the epoch, whatever the session's time zone).
DROP FUNCTION IF EXISTS @audit@.seal_hash(text, integer, bytea, xid8, bigint, bigint[], bytea, bigint, text);
CREATE OR REPLACE FUNCTION @audit@.seal_hash(kind text, format integer, prev_hash bytea, last_xid xid8,
                                              last_id bigint, ids bigint[], digests bytea, action_id bigint,
                                              detail text, started timestamptz[])
RETURNS bytea LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT sha256(coalesce(prev_hash, ''::bytea)
                  || convert_to(format('threadline %s %s;%s;%s;%s;%s;', kind, format, coalesce(action_id::text, ''),
                                       coalesce(last_xid::text, ''), coalesce(last_id::text, ''),
                                       array_to_string(ids, ','))
                                || CASE WHEN format = 1 THEN '' ELSE
                                       quote_nullable(detail) || ';'
                                       || coalesce((SELECT string_agg((extract(epoch FROM u.at) * 1000000)::bigint::text,
                                                                      ',' ORDER BY u.o)
                                                      FROM unnest(started) WITH ORDINALITY AS u(at, o)), '') || ';'
                                   END, 'UTF8')
                  || digests)
$fn$;

-- The salted digest of each of the transactions given with their digest (as range_digests() gives
-- them): none for a transaction without a salt. For verify, run by any role allowed to read the
-- audit tables: it only salts digests it is given, and a salt that an erasure deleted is gone.
CREATE OR REPLACE FUNCTION @audit@.salted_digests(ids bigint[], digests bytea[])
RETURNS TABLE (id bigint, digest bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT u.id, sha256(s.salt || u.d)
      FROM unnest(ids, digests) AS u(id, d) JOIN @audit@.seal_salts s ON s.transaction_id = u.id
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.salted_digests(bigint[], bytea[]) FROM PUBLIC;


-- One step of a hash chain: what digest_chain() folds its inputs with. Schema-qualified throughout
-- instead of a SET search_path, which would make every step of a large transaction pay for it.
CREATE OR REPLACE FUNCTION @audit@.digest_step(state bytea, item bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT pg_catalog.sha256(state OPERATOR(pg_catalog.||) item)
$fn$;
-- The digests given, in the aggregate's order, folded into one (the empty bytea for none): memory
-- stays flat however many changes a transaction holds.
CREATE OR REPLACE AGGREGATE @audit@.digest_chain(bytea) (
    SFUNC = @audit@.digest_step, STYPE = bytea, INITCOND = ''
);

-- @layout: what depends on the tables' layout, applied again when a store moves to partitions.
DROP TRIGGER IF EXISTS refresh_context ON @audit@.transactions;
CREATE CONSTRAINT TRIGGER refresh_context AFTER INSERT ON @audit@.transactions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION @audit@.refresh_transaction_context();
-- the new table's identity, once a store has moved to partitions
SELECT @audit@.define_next_transaction_id();

-- The functions that read a transaction's changes find them by its id and, in a partitioned store,
-- by its start time too, so that only its own partition is searched: their text is completed for
-- the store's layout.
DO $layout$
DECLARE
    parted boolean := (SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = '@audit@.changes'::regclass);
BEGIN
    EXECUTE replace(replace(replace($def$
-- The digest of one transaction row and its changes (format 1): every column, NULLs told apart
-- from values, times in UTC, the changes' digests chained in id order. Independent of the
-- session's settings, so seal and verify agree wherever they run.
CREATE OR REPLACE FUNCTION @audit@.transaction_digest(tx @audit@.transactions) RETURNS bytea
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $fn$
    SELECT sha256(convert_to(concat_ws(',',
        quote_nullable(tx.id::text), quote_nullable(tx.xid::text), quote_nullable(tx.occurred_at::text),
        quote_nullable(tx.actor::text), quote_nullable(tx.correlation_id), quote_nullable(tx.request_id),
        quote_nullable(tx.causation_id), quote_nullable(tx.origin), quote_nullable(tx.job::text),
        quote_nullable(tx.action_id::text), quote_nullable(tx.meta::text), quote_nullable(tx.context_error),
        (SELECT encode(@audit@.digest_chain(sha256(convert_to(concat_ws(',',
                     quote_nullable(c.id::text), quote_nullable(c.table_schema), quote_nullable(c.table_name),
                     quote_nullable(c.op), quote_nullable(c.pk::text), quote_nullable(c.after::text),
                     quote_nullable(c.before::text), quote_nullable(c.changed_fields::text),
                     quote_nullable(c.captured_at::text)), 'UTF8')) ORDER BY c.id), 'hex')
           FROM @audit@.changes c WHERE c.transaction_id = tx.id@same_start:tx@)), 'UTF8'))
$fn$;

-- The digests of the transactions after (after_xid, after_id) up to and including (upto_xid,
-- upto_id), in order: what a seal covered, recomputed now. Every name and operator is qualified
-- instead of a SET search_path, so the function is inlined into the query that calls it: run as
-- a function of its own it read a partitioned store about fifty times slower.
CREATE OR REPLACE FUNCTION @audit@.range_digests(after_xid xid8, after_id bigint, upto_xid xid8, upto_id bigint)
RETURNS TABLE (id bigint, digest bytea, changes bigint)
LANGUAGE sql STABLE AS $fn$
    SELECT t.id, @audit@.transaction_digest(t),
           (SELECT pg_catalog.count(*) FROM @audit@.changes c
             WHERE c.transaction_id OPERATOR(pg_catalog.=) t.id@same_start:t:qualified@)
      FROM @audit@.transactions t
     -- one range condition (no OR), so the (xid, id) index serves it under a generic plan too
     WHERE (t.xid, t.id) OPERATOR(pg_catalog.>) (coalesce(after_xid, '0'::pg_catalog.xid8), coalesce(after_id, 0))
       AND (t.xid, t.id) OPERATOR(pg_catalog.<=) (upto_xid, upto_id)
     ORDER BY t.xid, t.id
$fn$;

-- One seal of at most batch_size final transactions (none: sealed = 0). Run by the schema's owner,
-- outside the write path (threadline seal, or a periodic job).
CREATE OR REPLACE FUNCTION @audit@.seal(batch_size integer DEFAULT 1000,
    OUT seal_id bigint, OUT sealed integer, OUT head text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    prev @audit@.seals;
    snap pg_snapshot := pg_current_snapshot();
    horizon xid8;
    held xid8;
    ids bigint[];
    full_digests bytea;
    n_changes bigint;
    top_xid xid8;
    top_id bigint;
    starts timestamptz[];
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1, got %', batch_size USING ERRCODE = '22023';
    END IF;
    -- one sealer at a time
    PERFORM pg_advisory_xact_lock(hashtext('threadline seal @audit_name@'));
    -- The oldest transaction still running in this database (or prepared in it): it may yet write
    -- audit rows under its xid. Every xid below it has ended here; one assigned later is higher.
    -- A backend's xid is read from pg_stat_activity, whatever the transaction did with it so far:
    -- one that took its xid before writing (SELECT pg_current_xact_id()) holds no lock in this
    -- database yet, and must hold sealing back all the same. backend_xid is shown to every role.
    -- Transactions of other databases do not hold sealing back. A running transaction missing
    -- from the view has ended since the snapshot, and the rows it wrote are visible below.
    PERFORM pg_stat_clear_snapshot();  -- the view as it is now, not as read earlier in this transaction
    SELECT coalesce(min(x), pg_snapshot_xmax(snap)) INTO horizon
      FROM pg_snapshot_xip(snap) AS x
     WHERE xid(x) IN (SELECT a.backend_xid FROM pg_stat_activity a
                       WHERE a.datid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database()))
        OR xid(x) IN (SELECT p.transaction FROM pg_prepared_xacts p WHERE p.database = current_database());
    SELECT * INTO prev FROM @audit@.seals ORDER BY id DESC LIMIT 1;
    SELECT min(t.xid) INTO held FROM @audit@.baselines b JOIN @audit@.transactions t ON t.id = b.transaction_id
     WHERE b.finished_at IS NULL AND b.ended_at IS NULL;
    WITH next AS (
        SELECT t.id, t.xid, t.occurred_at, @audit@.transaction_digest(t) AS d,
               (SELECT count(*) FROM @audit@.changes c WHERE c.transaction_id = t.id@same_start:t@) AS n
          FROM @audit@.transactions t
         WHERE (t.xid, t.id) > (coalesce(prev.last_xid, '0'::xid8), coalesce(prev.last_id, 0))
           AND t.xid < horizon AND (held IS NULL OR t.xid < held)
         ORDER BY t.xid, t.id
         LIMIT batch_size
    ), salted AS (
        -- each transaction's salt (format 2): 122 random bits, from the core's generator
        INSERT INTO @audit@.seal_salts AS s (transaction_id, salt)
        SELECT next.id, uuid_send(gen_random_uuid()) FROM next
        ON CONFLICT (transaction_id) DO UPDATE SET salt = excluded.salt
        RETURNING s.transaction_id, s.salt
    )
    SELECT array_agg(n.id ORDER BY n.xid, n.id), string_agg(sha256(x.salt || n.d), ''::bytea ORDER BY n.xid, n.id),
           sum(n.n), (array_agg(n.xid ORDER BY n.xid DESC, n.id DESC))[1],
           (array_agg(n.id ORDER BY n.xid DESC, n.id DESC))[1], array_agg(n.occurred_at ORDER BY n.xid, n.id)
      INTO ids, full_digests, n_changes, top_xid, top_id, starts
      FROM next n JOIN salted x ON x.transaction_id = n.id;
    IF ids IS NULL THEN
        seal_id := prev.id; sealed := 0; head := encode(prev.hash, 'hex');
        RETURN;
    END IF;
    INSERT INTO @audit@.seals (kind, format, last_xid, last_id, transaction_ids, digests, changes, prev_hash, hash,
                               started)
    VALUES ('seal', 2, top_xid, top_id, ids, full_digests, n_changes, prev.hash,
            @audit@.seal_hash('seal', 2, prev.hash, top_xid, top_id, ids, full_digests, NULL, NULL, starts), starts)
    RETURNING id, cardinality(ids), encode(hash, 'hex') INTO seal_id, sealed, head;
END
$fn$;
$def$, '@same_start:tx@', CASE WHEN parted THEN ' AND c.occurred_at = tx.occurred_at' ELSE '' END),
        '@same_start:t@', CASE WHEN parted THEN ' AND c.occurred_at = t.occurred_at' ELSE '' END),
        '@same_start:t:qualified@',
        CASE WHEN parted THEN ' AND c.occurred_at OPERATOR(pg_catalog.=) t.occurred_at' ELSE '' END);
END
$layout$;
REVOKE EXECUTE ON FUNCTION @audit@.seal(integer) FROM PUBLIC;
-- New salts for the sealed transactions given (replacing any they had), and their salted digests
-- as they are now; for a seal, an erasure or a purge, run by the owner.
CREATE OR REPLACE FUNCTION @audit@.new_salts(ids bigint[])
RETURNS TABLE (id bigint, digest bytea)
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
    WITH salted AS (
        INSERT INTO @audit@.seal_salts AS s (transaction_id, salt)
        SELECT t.id, uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())
          FROM @audit@.transactions t WHERE t.id = ANY (ids)
        ON CONFLICT (transaction_id) DO UPDATE SET salt = excluded.salt
        RETURNING s.transaction_id, s.salt
    )
    SELECT t.id, sha256(x.salt || @audit@.transaction_digest(t))
      FROM salted x JOIN @audit@.transactions t ON t.id = x.transaction_id
$fn$;
REVOKE EXECUTE ON FUNCTION @audit@.new_salts(bigint[]) FROM PUBLIC;
-- the tables' BRIN indexes as unsummarize_brin_tail() leaves them, also those built by an earlier
-- release or by a move to partitions
SELECT @audit@.unsummarize_brin_tail('@audit@.transactions'), @audit@.unsummarize_brin_tail('@audit@.changes');
-- @layout end

-- Tables tracked before version 7 (options recorded in their capture function's comment) enter
-- the registry; then every tracked table gets this release's capture code.
DO $adopt$
DECLARE
    r record;
    cfg jsonb;
BEGIN
    FOR r IN
        SELECT tg.tgrelid AS relid, n.nspname::text AS s, c.relname::text AS t, p.proname::text AS fn,
               obj_description(p.oid, 'pg_proc') AS comment
          FROM pg_trigger tg
          JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
         WHERE tg.tgname = '@audit_name@_capture_insert' AND pn.nspname = '@audit_name@'
           AND NOT EXISTS (SELECT 1 FROM @audit@.tracked_tables x WHERE x.relid = tg.tgrelid)
    LOOP
        BEGIN
            cfg := r.comment::jsonb;
        EXCEPTION WHEN others THEN
            cfg := '{}';
        END;
        INSERT INTO @audit@.tracked_tables (relid, table_schema, table_name, function_name, keys, exclude, mask,
                                            mode, capture_version, fingerprint)
        VALUES (r.relid, r.s, r.t, r.fn,
                CASE WHEN (cfg ->> 'keys_given')::boolean THEN ARRAY(SELECT jsonb_array_elements_text(cfg -> 'keys')) ELSE '{}' END,
                ARRAY(SELECT x FROM jsonb_array_elements_text(coalesce(cfg -> 'exclude', '[]')) AS x ORDER BY x COLLATE "C"),
                ARRAY(SELECT x FROM jsonb_array_elements_text(coalesce(cfg -> 'mask', '[]')) AS x ORDER BY x COLLATE "C"),
                '', 0, '')
        ON CONFLICT (function_name) DO NOTHING;
    END LOOP;
    FOR r IN SELECT id FROM @audit@.tracked_tables ORDER BY id LOOP
        BEGIN
            PERFORM @audit@.regenerate(r.id);
        EXCEPTION WHEN others THEN
            PERFORM @audit@.regenerate(r.id, false);
        END;
    END LOOP;
END
$adopt$;

SELECT @audit@.create_partitions();

INSERT INTO @audit@.schema_version (version) VALUES (7) ON CONFLICT DO NOTHING;
-- Which build's script this is: install runs the script again on a store at this version whose
-- comment differs (an earlier build's functions, capture code and indexes are then replaced).
COMMENT ON TABLE @audit@.schema_version IS '@script_comment@';
