"""The worker side of Celery propagation: the context a task message carries, restored as the
task starts (or the one a task with no header runs under), and the :class:`Task` base class that
refuses to run a task whose header was turned down under signature policy ``"reject"``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any, ClassVar

import celery

from threadline.core.actor import ActorRef
from threadline.core.context import AuditContext, _current
from threadline.core.errors import InvalidContext, UntrustedContext
from threadline.propagation import carrier
from threadline.propagation.carrier import HEADER
from threadline.propagation.celery_publish import (
    SignaturePolicy,
    _Installation,
    _safe_id,
    _short,
    binding_subject,
)

ORIGIN = "celery"
"""The ``origin`` of work done inside a Celery task."""
REQUEST = "threadline.propagation.celery_request:Request"
"""threadline's worker request class as Celery names it (``Task.Request``; see celery_request)."""
DEFAULT_REQUEST = "celery.worker.request:Request"
"""Celery's own request class, as ``celery.Task.Request`` names it."""

logger = logging.getLogger("threadline.celery")


def _read_header(request: Any) -> object:
    raw = getattr(request, HEADER, None)
    if raw is None:
        nested = request.headers
        if isinstance(nested, Mapping):
            raw = nested.get(HEADER)
    return raw


class _Frame:
    """One task run whose context this module set: undone by its ``task_postrun``."""

    __slots__ = ("inst", "outer", "rejected", "started", "task_id", "token")

    def __init__(
        self,
        inst: _Installation,
        task_id: object,
        token: Token[AuditContext] | None,
        rejected: str | None,
        outer: _Frame | None,
    ) -> None:
        self.inst = inst
        self.task_id = task_id
        self.token = token
        self.rejected = rejected
        self.outer = outer
        self.started = time.time()


# The task runs in progress in this thread (or task), innermost first: a task applied eagerly
# inside another one stacks on it. Kept in a context variable rather than on Celery's request, so
# that task_postrun and Task.before_start find it without looking the request up again.
_frames: ContextVar[_Frame | None] = ContextVar("threadline_celery_frames", default=None)


def _prerun(inst: _Installation, task: Any, task_id: object) -> None:
    request = task.request
    raw = _read_header(request)
    token: Token[AuditContext] | None = None
    rejected: str | None = None
    if raw is not None or not request.is_eager:  # eager, no header: the caller's context stays as it is
        try:
            ctx, rejected = _incoming_context(inst, task, request, raw)
        except Exception as exc:  # never leave the previous task's context in force
            logger.exception("task %s[%s]: could not restore the audit context", task.name, request.id)
            ctx = AuditContext(
                origin=ORIGIN, incoming_error=_short(f"could not restore the context: {exc!r}")
            )
        token = _current.set(ctx)
    _frames.set(_Frame(inst, task_id, token, rejected, _frames.get()))


def _incoming_context(
    inst: _Installation, task: Any, request: Any, raw: object, report: bool = True
) -> tuple[AuditContext, str | None]:
    """The task's context, and the reason to refuse running it (signature policy "reject").

    ``report``: log why an incoming context is not trusted (once per task: not when the worker's
    main process restores it again to handle the task's failure)."""
    log = logger if report else _QUIET
    task_id = _safe_id(request.id)
    root_id = _safe_id(request.root_id) or task_id
    parent_id = _safe_id(request.parent_id)
    retries = request.retries
    job = {
        "name": _task_name(task),
        "id": task_id,
        "retries": retries if type(retries) is int else 0,
        "parent_id": parent_id,
        "root_id": root_id,
    }
    # Celery sets parent_id to the publishing task; a task republishing itself (retry of a root
    # task, replace) names itself, and then the header says what caused it.
    cause = parent_id if parent_id is not None and parent_id != task_id else None
    actor = getattr(task, "threadline_default_actor", None) or inst.default_actor
    if raw is None:
        if inst.keys and (root_id != task_id or cause is not None):
            # With signing keys, Celery's own root and parent ids, which no one signed, do not
            # join another story: a producer without a key could name any.
            reason = _short(
                f"no signed header, yet its Celery ids name another task (root {root_id}, parent"
                f" {parent_id}): they are not trusted"
            )
            job.update(parent_id=None, root_id=task_id)
            rejected = None
            if (getattr(task, "threadline_signature_policy", None) or inst.policy) == "reject" and isinstance(
                task, Task
            ):
                rejected = reason
            log.warning("task %s[%s]: %s", task.name, task_id, reason)
            return _build(correlation_id=task_id, job=job, incoming_error=reason), rejected
        return _build(actor=actor, correlation_id=root_id, causation_id=cause, job=job), None
    try:
        fields = carrier.decode_wire(
            raw,
            keys=inst.keys,
            max_bytes=inst.max_header_bytes,
            message_id=binding_subject(request.id, task.name) if inst.keys else None,
            require_binding=bool(inst.keys) and not inst.accept_unbound,
        )
    except InvalidContext as exc:
        reason = _short(
            f"header {exc.problem}"
            if exc.field == "header"
            else exc.problem
            if exc.field == "sig"
            else str(exc)
        )
        rejected = None
        policy = getattr(task, "threadline_signature_policy", None) or inst.policy
        if isinstance(exc, UntrustedContext) and policy == "reject":
            if isinstance(task, Task):
                rejected = reason
                log.warning("task %s[%s] refused: %s (signature policy 'reject')", task.name, task_id, reason)
            else:
                log.error(
                    "task %s[%s]: %s; signature policy 'reject' needs tasks built on threadline.celery.Task, "
                    "so it runs without the inherited audit context instead",
                    task.name,
                    task_id,
                    reason,
                )
        else:
            log.warning(
                "task %s[%s]: invalid incoming audit context: %s; it runs without the inherited context",
                task.name,
                task_id,
                reason,
            )
        if inst.keys:  # nor do they for a message whose header is not trusted
            job.update(parent_id=None, root_id=task_id)
            return _build(correlation_id=task_id, job=job, incoming_error=reason), rejected
        return _build(correlation_id=root_id, causation_id=cause, job=job, incoming_error=reason), rejected
    if inst.keys and "incoming_error" in fields:
        # the retry of a task whose own message was not trusted: its Celery ids are still those
        # of that message (the retry's signed header carries the story it ran in)
        job.update(parent_id=None, root_id=task_id)
        root_id, cause = task_id, None
    if cause is not None:
        fields["causation_id"] = cause
    if "correlation_id" not in fields:
        if "actor" not in fields and actor is not None and "incoming_error" not in fields:
            # a header that names neither an actor nor a story (only meta, say) is no incoming
            # context: the task's default actor applies, as with no header
            fields["actor"] = actor
        fields["correlation_id"] = root_id
    return AuditContext._unchecked(origin=ORIGIN, job=job, **fields), None  # validated: see _build


class _Quiet:
    """What :func:`_incoming_context` logs to when told not to report."""

    def warning(self, *args: Any) -> None:
        """Log nothing."""

    error = warning


_QUIET = _Quiet()


def _build(**fields: Any) -> AuditContext:
    # Every value here is validated already: header fields by the carrier codec, ids by
    # _safe_id, reasons by _short; skip validating them a second time on every task.
    return AuditContext._unchecked(origin=ORIGIN, **fields)


_names: dict[str, str | None] = {}


def _task_name(task: Any) -> str | None:
    """The task's name as an audit id (validated once per name)."""
    name = task.name
    if not isinstance(name, str):
        return None
    if name not in _names:
        _names[name] = _safe_id(name)
    return _names[name]


class Task(celery.Task):  # type: ignore[misc]
    """Base class of threadline tasks: enforces the ``"reject"`` signature policy.

    ``@threadline.task`` uses it; ``Celery(..., task_cls=threadline.celery.Task)`` makes it the
    base of every task of an app. Per-task policy (class attributes, or options of
    ``@threadline.task``): ``threadline_default_actor`` and ``threadline_signature_policy``.
    """

    threadline_default_actor: ClassVar[ActorRef | None] = None
    threadline_signature_policy: ClassVar[SignaturePolicy | None] = None
    # failures the worker's main process handles (a hard time limit, a lost child, an expired
    # chord member) send their errbacks under the task's context: see celery_request
    Request = REQUEST

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Refuse to run the body when the incoming context was rejected by signature policy."""
        frame = _frames.get()
        problem = frame.rejected if frame is not None and frame.task_id == task_id else None
        if problem:
            raise UntrustedContext(
                f"task {self.name}[{task_id}] was not run: {problem} (signature policy 'reject'); "
                "publish it from an app installed with the same signing_keys"
            )
        super().before_start(task_id, args, kwargs)
