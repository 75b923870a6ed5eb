"""Erasure that keeps the trail honest: :func:`erase` a person's identifiers or a row's values.

``erase(conn, actor="user:42", ...)`` replaces that actor's id wherever the audit trail records it
as the actor (``transactions``, ``actions``, ``task_runs``), and drops its display name.
``erase(conn, row=("orders", 7), ...)`` replaces the values of that row in every image of its
history (``before`` and ``after`` of each change, and its baseline snapshots). Each value (the
actor id; each column of the row) follows a policy:

- ``erase``: replaced by the tombstone ``"[erased]"``;
- ``pseudonymise``: replaced by ``"pseudo:"`` and a keyed hash (HMAC-SHA-256 with the key given,
  or ``$THREADLINE_ERASURE_KEY``) of the value, so the same value still reads the same everywhere
  (who did what stays linkable) but cannot be turned back without the key;
- ``keep``: left as it is.

A null stays null (nothing was recorded), and a value already erased or pseudonymised stays as it
is, so erasing again keeps pseudonyms linkable. An update keeps naming the columns it changed. The
row's key columns are always kept (they name the row, and its history is found by them).
Everything happens in one transaction, which records a ``threadline.erase`` action (who erased what
and why; the target is named by its pseudonym or as erased, never by the value erased) and, when
sealed transactions were rewritten, a link of kind ``erasure`` in the seal chain holding their new
digests, so :func:`threadline.ops.seal.verify` tells the erasure from tampering. ``dry_run`` counts
what would change and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from threadline.core._run import run
from threadline.core.actor import ActorRef
from threadline.core.erased import PSEUDONYM, TOMBSTONE
from threadline.core.errors import ConfigurationError, InvalidFilter
from threadline.core.fields import check_actor
from threadline.core.records import exact_json
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.explore.actions import record_action
from threadline.explore.tables import normalize_key, resolve_table
from threadline.ops.erasure_rows import check_columns, row_changes
from threadline.ops.partition_migration import refuse_during_migration
from threadline.ops.seal_chain import append_link, chain_head, lock_chain, unsalted
from threadline.propagation.psycopg import transaction

__all__ = ["POLICIES", "TOMBSTONE", "ErasureResult", "erase", "pseudonym"]

POLICIES = ("erase", "pseudonymise", "keep")
KEY_ENV = "THREADLINE_ERASURE_KEY"


@dataclass(frozen=True)
class ErasureResult:
    """What :func:`erase` changed (or, with ``dry_run``, would change)."""

    target: str
    """The target as recorded: its pseudonym, or the row's table and key."""
    transactions: int
    """Audit transactions whose rows were rewritten."""
    changes: int
    """``changes`` rows rewritten."""
    actions: int
    """``actions`` rows rewritten (actor erasure)."""
    task_runs: int
    """``task_runs`` rows rewritten (actor erasure)."""
    sealed: int
    """Sealed transactions among them, whose new digests the erasure link records."""
    applied: bool
    action_id: int | None = None
    exposed: int = 0
    """Sealed transactions among them whose earlier digests a seal of format 1 (before salts)
    recorded: those stay in the chain, testable against guesses of the values erased."""
    head: str | None = None
    """The seal chain's head after the erasure link it appended (hex): keep it outside the
    database in place of the head the last seal printed."""


def _key(key: bytes | str | None) -> bytes:
    found = key if key is not None else os.environ.get(KEY_ENV)
    if not found:
        raise ConfigurationError(
            f"pseudonymising needs a key: pass key=... or set ${KEY_ENV} (keep it secret, and the same "
            "for every erasure, so pseudonyms stay linkable)"
        )
    return found.encode() if isinstance(found, str) else found


def _canonical(value: Any) -> str:
    """``value`` as JSON text, one text per value: a number by its value (``1.50``, ``1.5`` and
    ``Decimal("1.5")`` alike), apart from text that reads the same (``"1.5"``) and from booleans."""
    if value is None or isinstance(value, (bool, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float, Decimal)):
        number = (
            value
            if isinstance(value, Decimal)
            else Decimal(repr(value) if isinstance(value, float) else value)
        )
        if not number.is_finite():
            return json.dumps(str(number))
        text = format(number.normalize(), "f")
        return "0" if text in ("-0", "0") else text
    if isinstance(value, Mapping):
        items = sorted((str(k), v) for k, v in value.items())
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{_canonical(v)}" for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def pseudonym(value: Any, key: bytes | str | None = None, *, label: str = "") -> str:
    """The pseudonym of ``value`` under ``key`` (``label`` keeps columns apart): ``pseudo:<hex>``.

    Numbers are taken by their value (``1.50`` as ``1.5``), apart from text that reads the same."""
    digest = hmac.new(_key(key), f"{label}\x1f{_canonical(value)}".encode(), hashlib.sha256).hexdigest()
    return f"pseudo:{digest[:32]}"


def _replacement(policy: str, value: Any, key: bytes | str | None, label: str) -> Any:
    if policy == "erase":
        return TOMBSTONE
    if policy == "pseudonymise":
        return pseudonym(value, key, label=label)
    return value


def _check_policy(name: str, policy: str) -> str:
    if policy not in POLICIES:
        raise InvalidFilter(f"policy for {name} must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def erase(
    conn: psycopg.Connection[Any],
    *,
    actor: ActorRef | str | None = None,
    row: tuple[str, Any] | None = None,
    policy: str = "erase",
    columns: Mapping[str, str] | None = None,
    reason: str,
    key: bytes | str | None = None,
    dry_run: bool = False,
    audit_schema: str = DEFAULT_SCHEMA,
) -> ErasureResult:
    """Erase an actor's identifiers, or a row's values, from the audit trail (see the module).

    ``policy`` applies to the actor id, or to every non-key column of the row not named in
    ``columns`` (column -> policy). ``reason`` is required and recorded with the erasure.
    """
    check_schema_name(audit_schema)
    if (actor is None) == (row is None):
        raise InvalidFilter("name exactly one of actor or row")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidFilter("reason is required: say why (it is recorded with the erasure)")
    _check_policy("the target", policy)
    for column, value in (columns or {}).items():
        _check_policy(column, value)
    if "pseudonymise" in (policy, *(columns or {}).values()):
        _key(key)
    audit = sql.Identifier(audit_schema)
    with transaction(conn):
        cur = conn.cursor(row_factory=dict_row)
        # one writer of the seal chain at a time (seal() and purge take the same lock)
        lock_chain(cur, audit_schema)
        # a move to partitions copies rows behind it: an erasure now could miss the copies
        refuse_during_migration(conn, audit_schema, "erasure")
        if actor is not None:
            ref = check_actor(actor)
            assert ref is not None
            outcome = _erase_actor(cur, audit, ref, policy, key, dry_run)
        else:
            assert row is not None
            outcome = _erase_row(
                conn, cur, audit, audit_schema, row, policy, dict(columns or {}), key, dry_run
            )
        target, tx_ids, n_changes, n_actions, n_runs = outcome
        sealed = _sealed(cur, audit, tx_ids)
        exposed = unsalted(cur, audit_schema, sealed)
        if dry_run:
            return ErasureResult(
                target, len(tx_ids), n_changes, n_actions, n_runs, len(sealed), False, None, exposed
            )
        action = record_action(
            conn,
            "threadline.erase",
            verb="erase",
            category="threadline",
            reason=reason,
            meta={
                "target": target,
                "policy": policy,
                "columns": dict(columns or {}),
                "transactions": len(tx_ids),
                "changes": n_changes,
            },
            audit_schema=audit_schema,
        )
        head = _link(cur, audit, audit_schema, tx_ids, action.id) if sealed else None
    return ErasureResult(
        target, len(tx_ids), n_changes, n_actions, n_runs, len(sealed), True, action.id, exposed, head
    )


def _erase_actor(
    cur: psycopg.Cursor[Any],
    audit: sql.Identifier,
    ref: ActorRef,
    policy: str,
    key: bytes | str | None,
    dry_run: bool,
) -> tuple[str, list[int], int, int, int]:
    if ref.id is None:
        raise InvalidFilter("an actor without an id identifies no one: name it as type:id")
    replaced = _replacement(policy, ref.id, key, f"actor:{ref.type}")
    new_actor = Jsonb({"type": ref.type, "id": replaced})
    target = f"{ref.type}:{replaced}"
    params = {"type": ref.type, "id": ref.id, "new": new_actor}
    match = "actor ->> 'type' = %(type)s AND actor ->> 'id' = %(id)s"
    tx_ids = [
        r["id"]
        for r in cur.execute(
            sql.SQL("SELECT id FROM {}.transactions WHERE " + match + " ORDER BY id").format(audit), params
        ).fetchall()
    ]
    if policy == "keep":
        return target, [], 0, 0, 0
    counts = []
    for table in ("actions", "task_runs"):
        query = "SELECT count(*) AS n FROM {}.{} WHERE " + match
        found = cur.execute(sql.SQL(query).format(audit, sql.Identifier(table)), params).fetchone()
        counts.append(0 if found is None else found["n"])
    if not dry_run:
        for table in ("transactions", "actions", "task_runs"):
            cur.execute(
                sql.SQL("UPDATE {}.{} SET actor = %(new)s WHERE " + match).format(
                    audit, sql.Identifier(table)
                ),
                params,
            )
    return target, tx_ids, 0, counts[0], counts[1]


def _erase_row(
    conn: psycopg.Connection[Any],
    cur: psycopg.Cursor[Any],
    audit: sql.Identifier,
    audit_schema: str,
    row: tuple[str, Any],
    policy: str,
    columns: dict[str, str],
    key: bytes | str | None,
    dry_run: bool,
) -> tuple[str, list[int], int, int, int]:
    table, pk = row
    ref = run(conn, resolve_table(table, audit_schema))
    key_values = normalize_key(ref, pk)
    found = row_changes(cur, audit, ref, key_values)
    target = f"{ref} ({', '.join(f'{k}={v}' for k, v in key_values.items())})"
    check_columns(cur, ref, key_values, columns, found)
    rewrites = []
    for change in found:
        patches = [
            _patch(change[side], key_values, policy, columns, key, f"{ref}") for side in ("after", "before")
        ]
        if patches != [None, None]:
            rewrites.append((change, patches))
    tx_ids = sorted({change["transaction_id"] for change, _ in rewrites})
    if dry_run:
        return target, tx_ids, len(rewrites), 0, 0
    for change, patches in rewrites:
        # the images keep their column order; an update whose changed columns were computed
        # from its images keeps them as they were before the values were replaced
        cur.execute(
            sql.SQL(
                "UPDATE {a}.changes SET after = {after}, before = {before},"
                " changed_fields = CASE WHEN op = 'update' AND changed_fields IS NULL THEN ARRAY("
                "   SELECT b.key FROM json_each(before::json) WITH ORDINALITY AS b(key, value, ord)"
                "    WHERE (after::json -> b.key)::text IS DISTINCT FROM b.value::text ORDER BY b.ord)"
                "   ELSE changed_fields END"
                " WHERE transaction_id = %(t)s AND id = %(i)s"
            ).format(a=audit, after=_patched("after", "a"), before=_patched("before", "b")),
            {"a": patches[0], "b": patches[1], "t": change["transaction_id"], "i": change["id"]},
        )
    return target, tx_ids, len(rewrites), 0, 0


def _patch(
    text: str | None,
    key_values: dict[str, Any],
    policy: str,
    columns: dict[str, str],
    key: bytes | str | None,
    label: str,
) -> Jsonb | None:
    """The replacements for one image (``None`` when nothing in it changes)."""
    image = exact_json(text) if text else None
    patch: dict[str, Any] = {}
    if isinstance(image, dict):
        for column, value in image.items():
            if column in key_values:
                continue
            rule = columns.get(column, policy)
            if _left_as_is(rule, value):
                continue
            patch[column] = _replacement(rule, value, key, f"{label}.{column}")
    return Jsonb(patch) if patch else None


def _sealed(cur: psycopg.Cursor[Any], audit: sql.Identifier, tx_ids: list[int]) -> list[int]:
    """Those of ``tx_ids`` that a seal covers (at or before the chain's position)."""
    if not tx_ids:
        return []
    rows = cur.execute(
        sql.SQL(
            "SELECT t.id FROM {a}.transactions t,"
            " (SELECT s.last_xid, s.last_id FROM {a}.seals s ORDER BY s.id DESC LIMIT 1) AS p"
            " WHERE t.id = ANY (%(ids)s) AND (t.xid, t.id) <= (p.last_xid, p.last_id) ORDER BY t.xid, t.id"
        ).format(a=audit),
        {"ids": tx_ids},
    ).fetchall()
    return [r["id"] for r in rows]


def _left_as_is(rule: str, value: Any) -> bool:
    """Whether ``value`` stays under ``rule``: nothing recorded, masked, already erased, or (when
    pseudonymising) already a pseudonym."""
    if rule == "keep" or value is None or value in (TOMBSTONE, "[masked]"):
        return True
    return rule == "pseudonymise" and isinstance(value, str) and bool(PSEUDONYM.match(value))


def _patched(column: str, param: str) -> sql.Composable:
    """``column`` with the values of the jsonb parameter ``param`` put in, in its column order."""
    return sql.SQL(
        "CASE WHEN {p}::jsonb IS NULL THEN {c} ELSE (SELECT json_object_agg(e.key,"
        " CASE WHEN {p}::jsonb ? e.key THEN ({p}::jsonb -> e.key)::json ELSE e.value END ORDER BY e.ord)"
        " FROM json_each({c}::json) WITH ORDINALITY AS e(key, value, ord)) END"
    ).format(p=sql.Placeholder(param), c=sql.Identifier(column))


def _link(
    cur: psycopg.Cursor[Any], audit: sql.Identifier, audit_schema: str, tx_ids: list[int], action_id: int
) -> str | None:
    """Append an erasure link (the new digests of the sealed transactions rewritten); returns the
    chain's new head."""
    rows = cur.execute(
        sql.SQL("SELECT id, xid::text AS xid FROM {}.transactions WHERE id = ANY (%s)").format(audit),
        [tx_ids],
    ).fetchall()
    append_link(cur, audit_schema, "erasure", [(r["id"], r["xid"]) for r in rows], action_id)
    return chain_head(cur, audit_schema, "erasure")
