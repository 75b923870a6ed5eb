"""The ``task_runs`` row of each Celery task attempt: what ran (name, attempt, outcome, error),
under which context and on which worker, handed to the app's
:class:`~threadline.propagation.task_runs.TaskRunRecorder` as the attempt ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from threadline.core import fields
from threadline.core.actor import ActorRef
from threadline.core.context import current
from threadline.propagation.celery_publish import _CACHE_SIZE, _safe_id, _short
from threadline.propagation.celery_worker import _Frame, _task_name
from threadline.propagation.task_runs import OUTCOMES, TaskRunRecorder

logger = logging.getLogger("threadline.celery")


def _record_run(recorder: TaskRunRecorder, frame: _Frame, task: Any, state: object, retval: object) -> None:
    """Queue the ``task_runs`` row of the attempt that just ended (never raises)."""
    try:
        ctx = current()
        job = ctx.job or {}
        task_id = job.get("id")
        if task_id is None or task_id != frame.task_id:  # eager run that kept the caller's context
            task_id, job = _safe_id(frame.task_id), {}
        retries = task.request.retries
        outcome = OUTCOMES.get(state, "failed") if isinstance(state, str) else "failed"
        error = None
        if outcome in ("failed", "retried") and isinstance(retval, BaseException):
            cause = getattr(retval, "exc", None) if outcome == "retried" else None
            shown = cause if isinstance(cause, BaseException) else retval
            error = _short(f"{type(shown).__name__}: {shown}", 500)
        recorder.record(
            (
                task_id or "(no id)",
                _task_name(task),
                retries if type(retries) is int else 0,  # out of range: the recorder bounds it
                outcome,
                error,
                ctx.correlation_id,
                ctx.causation_id,
                job.get("parent_id"),
                job.get("root_id"),
                _actor_json(ctx.actor),
                _hostname(task.request.hostname),
                frame.started,
                time.time(),
            )
        )
    except Exception:  # the record is a convenience: it must never fail the task
        logger.exception("task %s: could not record its run", getattr(task, "name", "?"))


_actor_texts: dict[ActorRef, str] = {}
_hostnames: dict[str, str] = {}


def _actor_json(actor: ActorRef | None) -> str | None:
    """The actor as JSON text (encoded once per actor, as a worker serves few)."""
    if actor is None:
        return None
    text = _actor_texts.get(actor)
    if text is None:
        if len(_actor_texts) >= _CACHE_SIZE:
            _actor_texts.clear()
        text = _actor_texts[actor] = fields.dumps(actor.to_dict())
    return text


def _hostname(name: object) -> str | None:
    if not isinstance(name, str):
        return None
    shown = _hostnames.get(name)
    if shown is None:
        shown = _hostnames[name] = _short(name, 256)
    return shown
