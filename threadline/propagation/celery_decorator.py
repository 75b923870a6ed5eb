"""The ``@threadline.task`` decorator: declares a Celery task built on :class:`Task`, with its own
default actor and signature policy, and installs threadline on the app(s) the task is registered on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import celery

from threadline.core import fields
from threadline.core.actor import ActorRef
from threadline.propagation.celery_install import (
    _check_policy,
    _ensure_installed,
    _install_on_every_app,
)
from threadline.propagation.celery_publish import SignaturePolicy
from threadline.propagation.celery_worker import DEFAULT_REQUEST, REQUEST, Task

F = TypeVar("F", bound=Callable[..., Any])


def task(
    *args: Any,
    app: celery.Celery | None = None,
    default_actor: ActorRef | str | None = None,
    signature_policy: SignaturePolicy | None = None,
    **options: Any,
) -> Any:
    """Declare a Celery task that runs under the audit context it was sent with.

    Works like ``shared_task`` (no ``app``: the task is registered on every app) or
    ``app.task`` (``app=...``), with or without parentheses, and takes the same options
    (``bind``, ``max_retries``, ``autoretry_for``...). It installs threadline on the app(s) with
    default options unless :func:`install` already configured them, and accepts per-task policy:

    - ``default_actor``: the actor when the task is started with no incoming context (beat);
    - ``signature_policy``: ``"strip"`` or ``"reject"``, overriding the app's.

    A ``base`` that is not a :class:`Task` is combined with it; a ``Request`` class it names
    stays the task's request class (it should subclass threadline's, see ``docs/celery.md``).
    """
    actor = fields.check_actor(default_actor)
    policy = None if signature_policy is None else _check_policy(signature_policy)

    def decorate(fun: F) -> Any:
        opts = dict(options)
        base = opts.get("base")
        if base is None:
            opts["base"] = Task
        elif not isinstance(base, type):
            raise TypeError(f"base must be a Task class, got {base!r}")
        elif not issubclass(base, Task):
            attrs: dict[str, Any] = {"__module__": base.__module__}
            request = getattr(base, "Request", DEFAULT_REQUEST)
            if request not in (DEFAULT_REQUEST, REQUEST):  # a request class of its own stays
                attrs["Request"] = request
            opts["base"] = type(base.__name__, (Task, base), attrs)
        if actor is not None:
            opts["threadline_default_actor"] = actor
        if policy is not None:
            opts["threadline_signature_policy"] = policy
        if app is not None:
            _ensure_installed(app)
            return app.task(**opts)(fun)
        _install_on_every_app()
        return celery.shared_task(**opts)(fun)

    if len(args) == 1 and callable(args[0]) and not isinstance(args[0], type):
        return decorate(args[0])
    if args:
        raise TypeError("threadline.task takes options as keywords: @threadline.task(bind=True)")
    return decorate
