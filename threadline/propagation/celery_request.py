"""The context of a task's failure handled by the worker's main process.

A prefork worker's main process, not the child that ran the task, records some failures: a hard
time limit, a child killed (``WorkerLostError``), a task that expired or was revoked before it
ran. Celery then marks the result and, from there, sends the task's errbacks (``link_error``) and
its chord's error callback, or calls an old-style errback in place. No task runs in that process,
so no context is in force: the errbacks' messages would carry none, and an old-style errback's
writes would have no actor. :class:`Request`, Celery's extension point for such handling
(``Task.Request``), runs these handlers under the context the task's own message carried, restored
as the task itself restores it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from celery.app.task import Context
from celery.worker.request import Request as CeleryRequest

from threadline.core.context import AuditContext, _current, current
from threadline.propagation.celery_publish import _installations, _short
from threadline.propagation.celery_worker import (
    DEFAULT_REQUEST,
    ORIGIN,
    REQUEST,
    _incoming_context,
    _read_header,
)

__all__ = ["DEFAULT_REQUEST", "REQUEST", "Request"]

logger = logging.getLogger("threadline.celery")


class Request(CeleryRequest):  # type: ignore[misc]
    """Celery's worker request, whose failure handling runs under the task's context."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """As Celery's, under the task's context (a hard limit sends the errbacks from here)."""
        with _task_context(self):
            super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        """As Celery's, under the task's context (a lost child's failure is recorded here)."""
        with _task_context(self):
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    # Celery's revoked() runs for every message; only the announcement of one that was revoked or
    # expired sends anything. A private method, the same from Celery 5.3 to 5.7 (the matrix runs both).
    def _announce_revoked(self, reason: str, terminated: bool, signum: Any, expired: bool) -> None:
        with _task_context(self):
            super()._announce_revoked(reason, terminated, signum, expired)


@contextlib.contextmanager
def _task_context(request: Any) -> Iterator[None]:
    if not current().is_empty:  # in the task's own thread (threads pool, solo): already there
        yield
        return
    ctx = _restored(request)
    if ctx is None:
        yield
        return
    token = _current.set(ctx)
    try:
        yield
    finally:
        _current.reset(token)


def _restored(request: Any) -> AuditContext | None:
    """The context the task ran (or would have run) under, or ``None`` when its app is not
    installed."""
    task = request.task
    inst = _installations.get(getattr(task, "_app", None))
    if inst is None:
        return None
    try:
        context = Context(request.request_dict)
        # the task's own run reported an untrusted context already (or will, if it runs)
        ctx, _ = _incoming_context(inst, task, context, _read_header(context), report=False)
        return ctx
    except Exception as exc:  # never let the context fail Celery's own failure handling
        logger.exception("task %s[%s]: could not restore the audit context", task.name, request.id)
        return AuditContext(origin=ORIGIN, incoming_error=_short(f"could not restore the context: {exc!r}"))
