"""Management commands as a story of their own: ``manage.py <command>`` (and ``manage.py shell``)
runs under a context with ``origin="cli"``, the command's name in ``meta["command"]`` and a fresh
correlation id, so its writes are attributed and the Celery tasks it enqueues continue its story.

Set when the app registry is ready, in the process ``manage.py`` (or ``django-admin``, or
``python -m django``) started; commands that serve other work (``runserver``, ``test``, Celery's
worker) are left alone. ``THREADLINE["COMMAND_CONTEXT"] = False`` turns it off;
``THREADLINE["COMMAND_ACTOR"]`` (e.g. ``"system:ops"``) gives those writes an actor.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

from threadline.core.actor import ActorRef
from threadline.core.context import AuditContext, current, set_current

__all__ = ["ORIGIN", "SKIPPED_COMMANDS", "command_name", "start_command_context"]

ORIGIN = "cli"
SKIPPED_COMMANDS = frozenset({"runserver", "testserver", "test", "celery", "runworker", "daphne", "uvicorn"})
"""Commands whose process serves requests or tasks, each with its own context."""

_PROGRAMS = ("manage.py", "django-admin", "django-admin.py", "__main__.py")


def command_name(argv: Sequence[str]) -> str | None:
    """The management command ``argv`` runs, or ``None`` when it is not a ``manage.py`` process."""
    if len(argv) < 2 or os.path.basename(argv[0]) not in _PROGRAMS:
        return None
    if os.path.basename(argv[0]) == "__main__.py" and os.path.basename(os.path.dirname(argv[0])) != "django":
        return None
    name = argv[1]
    if not name or name.startswith("-"):
        return None
    return name


def start_command_context(argv: Sequence[str], actor: ActorRef | None = None) -> AuditContext | None:
    """Set the command's context for the rest of this process (when ``argv`` is a command's)."""
    name = command_name(argv)
    if name is None or name in SKIPPED_COMMANDS or not current().is_empty:
        return None
    ctx = AuditContext(
        actor=actor,
        correlation_id=f"cli-{uuid.uuid4()}",
        origin=ORIGIN,
        meta={"command": name[:200]},
    )
    set_current(ctx)
    return ctx
