"""What of a trace an admin user may see: the changes of the tables whose Django model they may
view (or change), found through the app registry. Tables no installed model maps to, and actions
(which name no table), are for superusers only.

A transaction left with no change the user may see is left out whole (its actor and time too),
and so is a request or task with nothing left in it or under it (its actor, task errors and
actions). The page says how many changes and actions were left out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from threadline.explore.tracing import Trace, TraceNode, TraceTransaction

__all__ = ["VisibleTrace", "visible_trace"]


@dataclass(frozen=True)
class VisibleTrace:
    """The part of a trace a user may see, and how much was left out."""

    trace: Trace
    hidden_changes: int
    hidden_actions: int


def _models_by_table() -> dict[str, list[Any]]:
    from django.apps import apps

    tables: dict[str, list[Any]] = {}
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.proxy:
            continue
        table = meta.db_table
        tables.setdefault(table, []).append(model)
        if "." in table:  # "schema"."table" spellings: the bare name too
            tables.setdefault(table.rsplit(".", 1)[1].strip('"'), []).append(model)
    return tables


def _table_visibility(user: Any) -> Any:
    from django.contrib.auth import get_permission_codename

    tables = _models_by_table()
    seen: dict[str, bool] = {}

    def may_see(table: str) -> bool:
        if table not in seen:
            seen[table] = any(
                user.has_perm(f"{m._meta.app_label}.{get_permission_codename(action, m._meta)}")
                for m in tables.get(table, ())
                for action in ("view", "change")
            )
        return seen[table]

    return may_see


def visible_trace(user: Any, found: Trace) -> VisibleTrace:
    """``found`` as ``user`` may see it (all of it for a superuser)."""
    if getattr(user, "is_superuser", False):
        return VisibleTrace(found, 0, 0)
    may_see = _table_visibility(user)
    hidden = {"changes": 0, "actions": 0}

    def node(item: TraceNode) -> TraceNode | None:
        transactions = []
        for tx in item.transactions:
            changes = tuple(c for c in tx.changes if may_see(c.table_name))
            hidden["changes"] += len(tx.changes) - len(changes)
            if changes:
                transactions.append(TraceTransaction(tx.transaction, changes))
        children = tuple(c for c in (node(child) for child in item.children) if c is not None)
        hidden["actions"] += len(item.actions)
        if not transactions and not children:
            return None
        return replace(item, transactions=tuple(transactions), children=children, actions=())

    roots = tuple(r for r in (node(root) for root in found.roots) if r is not None)
    hidden["actions"] += len(found.actions)
    kept = [tx for root in roots for n in root.walk() for tx in n.transactions]
    visible = replace(
        found,
        roots=roots,
        actions=(),
        transaction_count=len(kept),
        change_count=sum(len(tx.changes) for tx in kept),
    )
    return VisibleTrace(visible, hidden["changes"], hidden["actions"])
