"""End-to-end demo: install, track, write under a request context, read the audit trail back.

Uses $THREADLINE_DSN (default: the loopback PostgreSQL) and works in a throw-away database that it
drops when it is done.
"""

from __future__ import annotations

import os
import uuid

import psycopg
from psycopg import sql

import threadline
from threadline import ActorRef, ThreadlineConnection, ddl

ADMIN_DSN = os.environ.get("THREADLINE_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def main() -> None:
    name = f"threadline_demo_{uuid.uuid4().hex[:8]}"
    print(f"creating database {name}")
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ddl.install(conn)
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text, card text)")
            ddl.track(conn, "orders", mask=["card"])
            print("installed the audit schema and tracked table orders (card masked)")

        with ThreadlineConnection.connect(dsn) as app:
            with threadline.context(actor=ActorRef.user("alice"), correlation_id="req-42", origin="web"):
                app.execute("INSERT INTO orders VALUES (1, 'new', '4111-1111')")
                app.commit()
            with threadline.context(
                actor=ActorRef.user("alice"), correlation_id="req-42", causation_id="req-42", origin="celery"
            ):
                app.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
                app.commit()

        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                """
                SELECT c.op, c.table_name, c.pk, c.changed_fields, c.after, t.actor, t.origin
                  FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id
                 WHERE t.correlation_id = 'req-42' ORDER BY c.captured_at, c.id
                """
            ).fetchall()
        print("\neverything request req-42 caused:")
        for op, table, pk, changed, after, actor, origin in rows:
            who = f"{actor['type']}:{actor['id']}"
            print(f"  {op:<7} {table}{pk}  by {who} via {origin}  changed={changed}  after={after}")
        assert len(rows) == 2, rows
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        print(f"\ndropped database {name}")


if __name__ == "__main__":
    main()
