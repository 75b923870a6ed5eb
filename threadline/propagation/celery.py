"""Celery propagation: the audit context travels in every task message and is restored around it.

Set-up::

    app = Celery("shop", broker=..., backend=...)
    threadline.celery.install(app, default_actor=ActorRef.system("celery"))   # idempotent

    @threadline.task(bind=True, max_retries=3)     # same options as app.task / shared_task
    def charge(self, order_id): ...

How it works (see ``docs/celery.md``):

- ``before_task_publish`` adds the header ``threadline`` (the canonical JSON text of the context
  dict, version field ``v``) to **every** message the app publishes: ``delay``/``apply_async``,
  ``send_task``, chain steps, group and chord members, chord callbacks, links, errbacks, retries,
  replacements.
- ``task_prerun`` restores it (from the request attribute, else ``request.headers``) with
  ``origin="celery"``, ``job`` = {name, id, retries, parent_id, root_id} and ``causation_id`` =
  the publishing task (Celery's ``parent_id``) or the web request; ``task_postrun`` resets it
  with its token. Celery publishes follow-on work (chain steps, link and chord callbacks) after
  the body returns but before ``task_postrun``, so that work still carries the context.
- A task with no header (beat, a producer without threadline) runs with ``origin="celery"``,
  the default actor (per task, else per app; may be none) and ``correlation_id`` = the Celery
  root id. A header that is malformed, unsigned or forged is never trusted: the task runs with
  no inherited context, its transactions record ``context_error = 'incoming: <reason>'`` and one
  warning is logged (signature policy ``"reject"`` instead fails the task before its body runs).
- In eager mode (``Task.apply()``, ``task_always_eager``) nothing is published: a task run with
  no header keeps the caller's context untouched.

Limits: encoding is checked in the caller. ``install()`` wraps the app's ``send_task`` (every
publish of the app goes through it) so that a context that cannot be encoded (over
``max_header_bytes``) raises :class:`~threadline.core.errors.InvalidContext` where the task is sent;
Celery itself swallows exceptions raised in ``before_task_publish`` receivers, so a message
published some other way (``app.amqp.send_task_message`` directly) that cannot carry its context
gets an error marker instead, which marks the worker's transactions and is logged. Only task
message protocol 2 (Celery's default) is supported.

This module is the one to import from; the parts live in
:mod:`~threadline.propagation.celery_install` (install, uninstall, the receivers),
:mod:`~threadline.propagation.celery_publish` (the header each message gets),
:mod:`~threadline.propagation.celery_worker` (the context restored around a task, :class:`Task`),
:mod:`~threadline.propagation.celery_run_record` (the ``task_runs`` row of each attempt) and
:mod:`~threadline.propagation.celery_decorator` (``@threadline.task``).
"""

from __future__ import annotations

from threadline.propagation.carrier import HEADER
from threadline.propagation.celery_decorator import task
from threadline.propagation.celery_install import _uid as _uid
from threadline.propagation.celery_install import install, installed, uninstall
from threadline.propagation.celery_publish import SignaturePolicy
from threadline.propagation.celery_publish import _installations as _installations
from threadline.propagation.celery_publish import binding_subject as binding_subject
from threadline.propagation.celery_worker import ORIGIN, Task

# Also reachable here, though not public: _installations, _uid and binding_subject, which the tests
# and benchmarks inspect.
__all__ = [
    "HEADER",
    "ORIGIN",
    "SignaturePolicy",
    "Task",
    "install",
    "installed",
    "task",
    "uninstall",
]
