"""What each part of a single-row UPDATE's capture costs, in backend instructions (`make bench-parts`).

Each part is the difference between two variants run by the same single-user backend under
valgrind (callgrind), as in bench/capture_instructions.py: a variant is some SQL run first (a
helper function, a dropped index, a replaced trigger) and then 100 or 300 identical transactions;
(300 - 100) / 200 is one transaction, the set-up excluded. A part measured alone runs inside a
PL/pgSQL function, as capture runs it (cached plans), against a function that does nothing.

The audit store is partitioned by month, as a new install sets it up (BENCH_LAYOUT=plain for
plain tables). Needs valgrind and PostgreSQL's server binaries, as capture_instructions.py does.
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import psycopg

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

from bench.capture import CONTEXT, SETUP, TABLE_ROWS  # noqa: E402
from bench.capture_instructions import (  # noqa: E402
    WARM_TRANSACTIONS,
    count_script,
    pristine_cluster,
    scratch_root,
    valgrind_server,
)
from threadline import ddl  # noqa: E402

CALL = f"BEGIN; SET LOCAL threadline.context = '{CONTEXT}'; SELECT public.part(); COMMIT;"
UPDATE = f"BEGIN; SET LOCAL threadline.context = '{CONTEXT}'; UPDATE items SET a = a + 1 WHERE id = {{id}}; COMMIT;"
# as capture code runs it, a statement of its own before the INSERT that records the changes
LOOKUP = (
    "SELECT t.id INTO k FROM threadline.transactions AS t WHERE t.xid = pg_current_xact_id()"
    " AND t.occurred_at = now() LIMIT 1;"
)
RAW_INSERT = (
    'INSERT INTO threadline.transactions (actor, correlation_id) VALUES (\'{"id":"42","type":"user"}\', \'bench\')'
    " RETURNING id INTO k; m := set_config('threadline.txctx_threadline', '=' || k || '|'"
    " || current_setting('threadline.context'), true);"
)


def shape_check() -> str:
    """The shape check of a short, plain context, as capture and insert_transaction_row() run it."""
    found = re.search(r"jsonb_path_match\(j, ('\$\.v == 1(?:[^']|'')*'), '\{\}', true\)", ddl.install_sql())
    if found is None:
        sys.exit("the install script has no jsonb_path_match shape check: update this benchmark")
    return found.group(1)


SHAPE = shape_check()
# the change INSERT of the capture code, with a constant transaction id: the statement alone
# (a single-row statement's: its old and new row joined as they are)
CHANGE_INSERT = (
    "INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, pk, after, before, changed_fields)"
    " SELECT 1, TG_TABLE_SCHEMA, TG_TABLE_NAME, 'update', jsonb_build_object('id', n.id), n.img, o.img, NULL::text[]"
    " FROM (SELECT to_json(r.*) AS img FROM threadline_old AS r OFFSET 0) AS o,"
    " (SELECT to_json(r.*) AS img, r.id FROM threadline_new AS r OFFSET 0) AS n"
    " WHERE n.img::text IS DISTINCT FROM o.img::text;"
)

# as capture code runs it before an UPDATE's INSERT: one row needs no pairing, more are paired by
# a FULL JOIN on their positions
PAIRING_CHECK = "PERFORM FROM threadline_new LIMIT 1 OFFSET 1; IF NOT FOUND THEN NULL; END IF; "


def function(body: str, declare: str = "") -> str:
    return (
        "CREATE FUNCTION public.part() RETURNS void LANGUAGE plpgsql SECURITY DEFINER"
        f" SET search_path = pg_catalog, pg_temp AS $$ DECLARE k bigint; j jsonb; ok boolean; m text; {declare}"
        f" BEGIN {body} END $$;\n"
    )


def trigger(body: str) -> str:
    return (
        "DROP TRIGGER threadline_capture_update ON public.items;\n"
        "CREATE FUNCTION public.cap() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER"
        f" SET search_path = pg_catalog, pg_temp AS $$ BEGIN {body} RETURN NULL; END $$;\n"
        "CREATE TRIGGER cap AFTER UPDATE ON public.items REFERENCING OLD TABLE AS threadline_old"
        " NEW TABLE AS threadline_new FOR EACH STATEMENT EXECUTE FUNCTION public.cap();\n"
    )


PARSE = "j := current_setting('threadline.context')::jsonb;"
# as capture parses the context: in a block that turns a malformed value into NULL
PARSE_GUARDED = f"BEGIN {PARSE} EXCEPTION WHEN invalid_text_representation THEN j := NULL; END;"
# the insert without the marker; a transaction that inserts a row and sets no marker must not
# fire the commit-time check too, or the parts would count its context merge
RAW_INSERT_ALONE = RAW_INSERT.split(" m := ", 1)[0]
NO_CHECK = "DROP TRIGGER refresh_context ON threadline.transactions;\n"
NO_INDEX = (
    NO_CHECK
    + "".join(
        f"DROP INDEX threadline.transactions_{name}_idx;\n"
        for name in ("actor", "occurred_at", "xid", "correlation_id")
    )
    + "ALTER TABLE threadline.transactions DROP CONSTRAINT transactions_pkey;\n"
)
# what the insert into transactions pays for, each measured by the statement without it
TRANSACTIONS_PARTS = [
    ("the actor index", "DROP INDEX threadline.transactions_actor_idx;\n"),
    ("the BRIN index on transactions.occurred_at", "DROP INDEX threadline.transactions_occurred_at_idx;\n"),
    ("the correlation id index", "DROP INDEX threadline.transactions_correlation_id_idx;\n"),
    ("the xid index", "DROP INDEX threadline.transactions_xid_idx;\n"),
    ("the primary key", "ALTER TABLE threadline.transactions DROP CONSTRAINT transactions_pkey;\n"),
    ("the commit-time check", NO_CHECK),
]
# (name, (prelude, transaction), (baseline prelude, baseline transaction)): the part is the difference
PARTS: list[tuple[str, tuple[str, str], tuple[str, str]]] = [
    (
        "the whole capture",
        ("", UPDATE),
        ("DROP TRIGGER threadline_capture_update ON public.items;\n", UPDATE),
    ),
    (
        "firing a statement-level trigger with two transition tables",
        (trigger(""), UPDATE),
        ("DROP TRIGGER threadline_capture_update ON public.items;\n", UPDATE),
    ),
    ("the capture's INSERT ... SELECT into changes", (trigger(CHANGE_INSERT), UPDATE), (trigger(""), UPDATE)),
    (
        "  of which the BRIN index on changes.captured_at",
        (trigger(CHANGE_INSERT), UPDATE),
        ("DROP INDEX threadline.changes_captured_at_idx;\n" + trigger(CHANGE_INSERT), UPDATE),
    ),
    (
        "  of which the key index on changes (a btree on jsonb_hash(pk))",
        (trigger(CHANGE_INSERT), UPDATE),
        ("DROP INDEX threadline.changes_key_idx;\n" + trigger(CHANGE_INSERT), UPDATE),
    ),
    (
        "the check that chooses how an UPDATE's rows are paired (one row, or more)",
        (trigger(PAIRING_CHECK + CHANGE_INSERT), UPDATE),
        (trigger(CHANGE_INSERT), UPDATE),
    ),
    (
        "the transaction's row, first statement (its id, then insert_transaction_row(id), which capture holds inline)",
        (function("k := threadline.insert_transaction_row(threadline.next_transaction_id());"), CALL),
        (function("k := 1;"), CALL),
    ),
    (
        "  of which the insert into transactions and the marker setting",
        (function(RAW_INSERT), CALL),
        (function("k := 1;"), CALL),
    ),
    *(
        (f"  of which {part}", (function(RAW_INSERT), CALL), (dropped + function(RAW_INSERT), CALL))
        for part, dropped in TRANSACTIONS_PARTS
    ),
    (
        "  of which the marker setting",
        (NO_CHECK + function(RAW_INSERT), CALL),
        (NO_CHECK + function(RAW_INSERT_ALONE), CALL),
    ),
    (
        "  of which the insert statement itself (no index, no check, no marker)",
        (NO_INDEX + function(RAW_INSERT_ALONE), CALL),
        (function("k := 1;"), CALL),
    ),
    ("  of which parsing the context (jsonb)", (function(PARSE), CALL), (function("k := 1;"), CALL)),
    (
        "  of which the exception block around the parse",
        (function(PARSE_GUARDED), CALL),
        (function(PARSE), CALL),
    ),
    (
        "  of which a jsonb_path_match shape check",
        (function(PARSE + f" ok := jsonb_path_match(j, {SHAPE}, '{{}}', true);"), CALL),
        (function(PARSE), CALL),
    ),
    (
        "finding the transaction's row again (each later statement)",
        (function(LOOKUP), CALL),
        (function("k := 1;"), CALL),
    ),
]


def script(prelude: str, transaction: str, n: int) -> str:
    rnd = random.Random(1)
    body = "".join(
        transaction.replace("{id}", str(rnd.randint(WARM_TRANSACTIONS + 1, TABLE_ROWS - 1))) + "\n"
        for _ in range(n)
    )
    return prelude + body


def build(pg: Path, root: Path, partition_by: str | None) -> Path:
    def fill(conn: psycopg.Connection[Any]) -> None:
        conn.execute(SETUP.format(t="items", n=TABLE_ROWS).encode())
        ddl.install(conn, partition_by=partition_by)
        ddl.track(conn, "items")
        for i in range(1, WARM_TRANSACTIONS + 1):  # some history, as a live database has
            conn.execute(UPDATE.replace("{id}", str(i)).encode())

    return pristine_cluster(pg, root, fill)


def per_transaction(pg: Path, pristine: Path, work: Path, prelude: str, transaction: str) -> float:
    low = count_script(pg, pristine, work, script(prelude, transaction, 100))
    high = count_script(pg, pristine, work, script(prelude, transaction, 300))
    return (high - low) / 200


def main() -> None:
    layout = os.environ.get("BENCH_LAYOUT", "month")
    pg = valgrind_server()
    with scratch_root("threadline-parts-") as root:
        pristine = build(pg, root, None if layout == "plain" else layout)
        cache: dict[tuple[str, str], float] = {}

        def measure(variant: tuple[str, str]) -> float:
            if variant not in cache:
                cache[variant] = per_transaction(pg, pristine, root / "data", *variant)
            return cache[variant]

        print(
            f"# What a single-row UPDATE's capture costs ({'plain tables' if layout == 'plain' else 'partitioned by ' + layout})\n"
        )
        print("| part | instructions per transaction |\n|---|---:|")
        for name, variant, baseline in PARTS:
            label = name.replace("  ", "&nbsp;&nbsp;", 1) if name.startswith("  ") else name
            print(f"| {label} | {measure(variant) - measure(baseline):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
