"""``threadline seal``, ``threadline verify`` and ``threadline erase``: the commands that make the
audit trail trustworthy to an auditor (tamper evidence) and to the people it names (erasure)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from threadline.cli.connect import connect, dsn_option, fail, parse_key
from threadline.cli.help import audit_schema_option, examples
from threadline.cli.output import echo
from threadline.cli.story import actor_option, command_context
from threadline.core.actor import ActorRef
from threadline.core.errors import ConfigurationError, InvalidContext, InvalidFilter, QueryError
from threadline.ops.erasure import POLICIES
from threadline.ops.erasure import erase as erase_audit
from threadline.ops.seal import seal as seal_chain
from threadline.ops.seal import verify as verify_chain

__all__ = ["erase", "seal", "verify"]

logger = logging.getLogger("threadline.seal")


@click.command(epilog=examples("seal"))
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Transactions per seal."
)
@click.option(
    "--log",
    "to_log",
    is_flag=True,
    help="Also write the head hash to the threadline.seal logger (WARNING).",
)
@dsn_option
@audit_schema_option
def seal(batch_size: int, to_log: bool, dsn: str | None, audit_schema: str) -> None:
    """Seal the audit trail's final transactions into the hash chain and print its head.

    Keep the head hash outside the database (a log, a ticket, another system): `threadline
    verify --expect-head` then also catches seals removed from the end of the chain.
    """
    with connect(dsn) as conn:
        result = seal_chain(conn, batch_size=batch_size, audit_schema=audit_schema)
    echo(f"sealed {result.transactions} transaction(s) in {result.seals} seal(s)")
    echo(f"head {result.head or '(no seal yet)'}")
    if result.held_back:
        echo(result.held_back)
    if to_log:
        logging.basicConfig()
        logger.warning(
            "threadline seal head %s (%d transactions sealed now)", result.head, result.transactions
        )


@click.command(epilog=examples("verify"))
@click.option("--expect-head", metavar="HASH", help="The head hash kept outside the database.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@dsn_option
@audit_schema_option
def verify(expect_head: str | None, as_json: bool, dsn: str | None, audit_schema: str) -> None:
    """Recompute the seal chain and every sealed transaction; exit 1 at the first mismatch."""
    with connect(dsn) as conn:
        result = verify_chain(conn, expect_head=expect_head, audit_schema=audit_schema)
    if as_json:
        echo(
            json.dumps(
                {
                    "ok": result.ok,
                    "seals": result.seals,
                    "transactions": result.transactions,
                    "erased": result.erased,
                    "purged": result.purged,
                    "head": result.head,
                    "first_problem": result.first_problem,
                    "problem_transaction": result.problem_transaction,
                    "problems": result.problems,
                    "after_head": result.after_head,
                },
                indent=2,
            )
        )
    else:
        echo(result.render())
    if not result.ok:
        sys.exit(1)


def _columns(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in value:
        column, eq, policy = item.partition("=")
        if not eq or not column or policy not in POLICIES:
            raise click.BadParameter(f"{item!r}: give COLUMN=POLICY with POLICY one of {', '.join(POLICIES)}")
        out[column] = policy
    return out


@click.command(epilog=examples("erase"))
@click.option(
    "--subject", "subject", metavar="TYPE:ID", help="Erase this actor's identifiers (e.g. user:42)."
)
@click.option(
    "--row", nargs=2, metavar="TABLE KEY", help="Erase this row's values in its history (KEY as for history)."
)
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default="erase",
    show_default=True,
    help="What becomes of the actor id, or of each column not named by --column.",
)
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="COL=POLICY",
    callback=_columns,
    help="A column's own policy (repeatable).",
)
@click.option("--reason", required=True, help="Why (recorded with the erasure).")
@click.option("--dry-run", is_flag=True, help="Count what would change, and change nothing.")
@actor_option
@dsn_option
@audit_schema_option
def erase(
    subject: str | None,
    row: tuple[str, str] | None,
    policy: str,
    columns: dict[str, str],
    reason: str,
    dry_run: bool,
    actor: ActorRef,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """Erase a person's identifiers or a row's values from the audit trail, keeping it verifiable.

    Pseudonymising needs a key in $THREADLINE_ERASURE_KEY. The erasure is recorded as a
    threadline.erase action (who, what, why) and, for sealed transactions, as a link of the seal
    chain, so `threadline verify` tells it from tampering.
    """
    if (subject is None) == (row is None):
        raise click.UsageError("name exactly one of --subject or --row")
    if row is not None:
        target: dict[str, Any] = {"row": (row[0], parse_key(row[1]))}
    else:
        try:
            ActorRef.parse(subject or "")
        except InvalidContext as exc:
            raise click.BadParameter(
                f"{subject!r}: give the actor as TYPE:ID (user:42)", param_hint="--subject"
            ) from exc
        target = {"actor": subject}
    with connect(dsn) as conn, command_context("erase", actor):
        try:
            result = erase_audit(
                conn,
                **target,
                policy=policy,
                columns=columns,
                reason=reason,
                dry_run=dry_run,
                audit_schema=audit_schema,
            )
        except InvalidFilter as exc:  # a policy, column or subject that cannot be: exit 2
            raise click.UsageError(str(exc)) from exc
        except (ConfigurationError, QueryError) as exc:
            fail(str(exc))
    verb = "would rewrite" if not result.applied else "rewrote"
    echo(
        f"{result.target}: {verb} {result.transactions} transaction(s), {result.changes} change(s), "
        f"{result.actions} action(s), {result.task_runs} task run(s); {result.sealed} sealed"
    )
    if result.applied:
        echo(f"recorded as action {result.action_id}")
    if result.head:
        echo(f"head {result.head}")
    if result.exposed:
        click.echo(
            f"warning: {result.exposed} of these transaction(s) were sealed before seals were salted"
            " (format 1): their old digests stay in the seal chain, and a low-entropy erased value can"
            " be recovered from them by trying guesses",
            err=True,
        )
