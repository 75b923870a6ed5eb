"""Removing the audit schema: what reversing an install migration runs, refused while the schema
holds audit records.

Audit records are captured ``changes`` and their ``transactions``, the application's ``actions``,
recorded task attempts (``task_runs``), the ``baselines`` taken, and the seal chain (``seals``),
whose links prove what was sealed and what purges removed. A purge deletes old changes,
transactions and task runs; it keeps actions, baselines and the seal chain, whose rows are
deleted with SQL (or the schema dropped by hand) by whoever means to lose them.
"""

from __future__ import annotations

from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name, with_pinned_search_path

__all__ = ["refuse_with_rows_sql", "uninstall_sql"]

# run alone by the Django integration before a migrate that would reverse an install
_REFUSE_WITH_ROWS = """\
-- remove the audit schema {schema}: refused while it holds audit records
DO $uninstall$
DECLARE
    tbl text;
    held text[] := '{{}}';
    has_rows boolean;
    kept text[];
BEGIN
    IF to_regnamespace('{name}') IS NULL THEN
        RETURN;
    END IF;
    FOREACH tbl IN ARRAY ARRAY['changes', 'transactions', 'actions', 'task_runs', 'baselines', 'seals'] LOOP
        IF to_regclass(format('%I.%I', '{name}', tbl)) IS NOT NULL THEN
            EXECUTE format('SELECT EXISTS (SELECT FROM %I.%I)', '{name}', tbl) INTO has_rows;
            IF has_rows THEN
                held := held || tbl;
            END IF;
        END IF;
    END LOOP;
    IF cardinality(held) > 0 THEN
        kept := ARRAY(SELECT k FROM unnest(held) AS k WHERE k = ANY (ARRAY['actions', 'baselines', 'seals']));
        RAISE EXCEPTION 'threadline: the audit schema {name} holds audit rows; it is not dropped (rows left in %)',
                        array_to_string(held, ', ')
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'purge them first (threadline purge), or drop it by hand: DROP SCHEMA {schema} CASCADE'
                         || CASE WHEN cardinality(kept) > 0
                                 THEN '; a purge keeps ' || array_to_string(kept, ', ')
                                      || ': delete those rows with SQL if you mean to lose them'
                                 ELSE '' END;
    END IF;
END
$uninstall$;
"""
_DROP_SCHEMA = """\
DROP EVENT TRIGGER IF EXISTS {name}_follow_ddl;
DROP EVENT TRIGGER IF EXISTS {name}_follow_drop;
DROP SCHEMA IF EXISTS {schema} CASCADE;
"""


def refuse_with_rows_sql(audit_schema: str = DEFAULT_SCHEMA) -> str:
    """A statement that raises (SQLSTATE ``2BP01``, naming the tables that still hold rows) while
    the audit schema holds audit records, and does nothing otherwise or when there is no such
    schema: the refusal of :func:`uninstall_sql`, which Django runs before unapplying anything."""
    check_schema_name(audit_schema)
    return with_pinned_search_path(_REFUSE_WITH_ROWS.format(schema=f'"{audit_schema}"', name=audit_schema))


def uninstall_sql(audit_schema: str = DEFAULT_SCHEMA) -> str:
    """DDL that removes the audit schema ``schema`` and every capture trigger, refused (the
    statement raises) while the schema holds audit records (captured changes and transactions,
    actions, task runs, baselines or seals): what reversing an install migration runs."""
    check_schema_name(audit_schema)
    return refuse_with_rows_sql(audit_schema) + _DROP_SCHEMA.format(
        schema=f'"{audit_schema}"', name=audit_schema
    )
