"""Installing Celery propagation on an app and taking it off again: :func:`install`,
:func:`uninstall` and :func:`installed`, the signal receivers and the ``send_task`` wrapper they
connect, and the hook that installs every app shared ``@threadline.task`` tasks reach.

Celery's private ``celery._state`` (the current app, the apps alive, the finalize hook) is read
here and nowhere else in threadline.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, cast, get_args

import celery
from celery import _state as celery_state
from celery import signals

from threadline.core import fields
from threadline.core.actor import ActorRef
from threadline.core.context import _current, current
from threadline.core.errors import ConfigurationError
from threadline.propagation import carrier
from threadline.propagation.celery_publish import (
    SignaturePolicy,
    _before_publish,
    _Installation,
    _installations,
)
from threadline.propagation.celery_request import DEFAULT_REQUEST, REQUEST
from threadline.propagation.celery_run_record import _record_run
from threadline.propagation.celery_worker import _frames, _prerun
from threadline.propagation.task_runs import TaskRunRecorder

_MIN_HEADER_BYTES = 256
_MAX_HEADER_BYTES = 65536

_publishing: ContextVar[_Installation | None] = ContextVar("threadline_celery_publishing", default=None)
_lock = threading.RLock()
_shared_hook_connected = False
# Apps uninstalled by hand: the hook that @threadline.task shared tasks register (it installs every
# app as it is finalized) leaves them alone until install() is called for them again.
_uninstalled: weakref.WeakSet[Any] = weakref.WeakSet()


def install(
    app: celery.Celery,
    default_actor: ActorRef | str | None = None,
    signing_keys: Iterable[str | bytes] | None = None,
    signature_policy: SignaturePolicy = "strip",
    max_header_bytes: int = carrier.DEFAULT_MAX_BYTES,
    signature_ttl: float = carrier.DEFAULT_SIGNATURE_TTL,
    accept_unbound_signatures: bool = False,
    record_task_runs: str | Callable[[], Any] | None = None,
    audit_schema: str = "threadline",
) -> celery.Celery:
    """Carry the audit context through every task ``app`` publishes and runs. Idempotent.

    - ``default_actor``: the actor of a task started with no incoming context (beat, a producer
      without threadline); a task's own ``@threadline.task(default_actor=...)`` wins.
    - ``signing_keys``: HMAC-SHA256 keys; the first signs every header, all of them verify (list
      the new key first and keep the old one until no message signed with it is left). With
      keys, an unsigned or forged header is never trusted, and every header is bound to its
      message (the task id) and expires: copied onto another message, or consumed later than
      ``signature_ttl`` seconds after it was due (default a week), it is not trusted either.
    - ``accept_unbound_signatures``: also trust signed headers that carry no binding, as
      producers of releases before the binding sign them; only while upgrading workers ahead of
      producers (such a header can be copied onto another message).
    - ``signature_policy``: ``"strip"`` (default: run without the inherited context, mark the
      transactions, log a warning) or ``"reject"`` (the task fails with
      :class:`~threadline.core.errors.UntrustedContext` and its body does not run; this needs tasks
      built on :class:`Task`, e.g. ``@threadline.task`` or ``Celery(task_cls=threadline.celery.Task)``).
    - ``max_header_bytes``: cap of the header's encoding (default 8 KiB); a context over it
      raises :class:`~threadline.core.errors.InvalidContext` where the task is sent.
    - ``record_task_runs``: a DSN, or a function returning a new psycopg connection: the worker
      then records every task attempt (name, attempt, outcome, error, context, timings) in
      ``<audit_schema>.task_runs``, written in the background in batches (see
      :mod:`threadline.propagation.task_runs`), so :func:`threadline.trace` names every task and
      gives each attempt's outcome. Off by default: it needs to know where to write.

    Calling it again updates the options; handlers are connected only once. Returns ``app``.
    """
    actor = fields.check_actor(default_actor)
    keys = carrier.check_signing_keys(signing_keys)
    policy = _check_policy(signature_policy)
    if policy == "reject" and not keys:
        raise ConfigurationError("signature_policy='reject' needs signing_keys: pass the keys to verify with")
    if (
        not isinstance(max_header_bytes, int)
        or isinstance(max_header_bytes, bool)
        or not _MIN_HEADER_BYTES <= max_header_bytes <= _MAX_HEADER_BYTES
    ):
        raise ConfigurationError(
            f"max_header_bytes must be an integer from {_MIN_HEADER_BYTES} to {_MAX_HEADER_BYTES}, "
            f"got {max_header_bytes!r}"
        )
    if (
        isinstance(signature_ttl, bool)
        or not isinstance(signature_ttl, (int, float))
        or not 60 <= signature_ttl <= 10**9
    ):
        raise ConfigurationError(
            f"signature_ttl must be a number of seconds of at least 60, got {signature_ttl!r}"
        )
    ttl = int(signature_ttl)
    recorder = None if record_task_runs is None else TaskRunRecorder(record_task_runs, audit_schema)
    with _lock:
        _uninstalled.discard(app)
        inst = _installations.get(app)
        if inst is not None:
            inst.default_actor, inst.keys, inst.policy = actor, keys, policy
            inst.max_header_bytes, inst.signature_ttl = max_header_bytes, ttl
            inst.accept_unbound = bool(accept_unbound_signatures)
            inst.cache.clear()
            previous, inst.recorder = inst.recorder, recorder
            if previous is not None:
                previous.close()
            return app
        inst = _Installation(weakref.ref(app), actor, keys, policy, max_header_bytes, signature_ttl=ttl)
        inst.accept_unbound = bool(accept_unbound_signatures)
        inst.recorder = recorder
        _connect(app, inst)
        _use_request_class(app, REQUEST)
        _installations[app] = inst
    return app


def _use_request_class(app: celery.Celery, wanted: str) -> None:
    """Make the app's task base class handle failures with ``wanted`` (threadline's request class
    on install, Celery's own on uninstall), unless it names a request class of the app's own."""
    base = app.Task
    if base.Request in (DEFAULT_REQUEST, REQUEST):
        base.Request = wanted
    if wanted == DEFAULT_REQUEST and app.finalized:
        _use_request_class_per_task(app, wanted)


def _use_request_class_per_task(app: celery.Celery, wanted: str) -> None:
    """The same for each task of the app whose base class is not the app's (``base=`` a class of
    the application's own) and names no request class of its own: set on the task itself, as the
    worker reads it when it starts consuming."""
    for task in list(app.tasks.values()):
        if wanted == REQUEST and task.Request == DEFAULT_REQUEST:
            task.Request = REQUEST
        elif wanted == DEFAULT_REQUEST and vars(task).get("Request") == REQUEST:
            del task.Request


def uninstall(app: celery.Celery) -> bool:
    """Undo :func:`install`: disconnect exactly the receivers it connected for ``app``.

    Returns ``False`` when ``app`` was not installed. A task running at that moment keeps its
    context until it ends; its ``task_postrun`` is no longer handled, so uninstall between tasks.
    The app stays uninstalled: shared ``@threadline.task`` tasks no longer install it when it is
    finalized; only :func:`install` does.
    """
    with _lock:
        _uninstalled.add(app)
        found = _installations.pop(app, None)
        if found is None:
            return False
        inst: _Installation = found
        for signal, receiver in inst.receivers:
            signal.disconnect(receiver, dispatch_uid=_uid(signal, inst))
        wrapper = app.__dict__.get("send_task")
        if getattr(wrapper, "__threadline_installation__", None) is inst:
            del app.send_task
        inst.original_send_task = None  # a wrapper someone put around ours now passes straight through
        _use_request_class(app, DEFAULT_REQUEST)
        inst.receivers.clear()
        inst.cache.clear()
        if inst.recorder is not None:
            inst.recorder.close()
            inst.recorder = None
    return True


def installed(app: celery.Celery) -> bool:
    """True when :func:`install` is in force for ``app``."""
    return app in _installations


def _ensure_installed(app: celery.Celery) -> None:
    """Install with default options unless the app is installed already (keeps its options) or
    was uninstalled by hand."""
    with _lock:
        if app not in _installations and app not in _uninstalled:
            install(app)


def _check_policy(policy: object) -> SignaturePolicy:
    if policy not in get_args(SignaturePolicy):
        raise ConfigurationError(f"signature_policy must be 'strip' or 'reject', got {policy!r}")
    return cast(SignaturePolicy, policy)


def _uid(signal: Any, inst: _Installation) -> str:
    return f"threadline.{signal.name}.{id(inst)}"


def _connect(app: celery.Celery, inst: _Installation) -> None:
    original = app.send_task

    @functools.wraps(original)
    def send_task(*args: Any, **kwargs: Any) -> Any:
        if inst.original_send_task is None:  # uninstalled while someone else's wrapper kept ours
            return original(*args, **kwargs)
        ctx = current()
        if not ctx.is_empty:
            # Encode here, in the caller: an error raised in a publish receiver is swallowed.
            # Inside a task the sender is the running task (the context's job), as Celery's parent_id
            # will say: the receiver then finds this very header in the cache.
            # (a signed header's binding has a fixed size, whatever the id it will be bound to)
            inst.header_for(
                ctx, kwargs.get("task_id") or "", kwargs.get("parent_id"), args[0] if args else None
            )
        token = _publishing.set(inst)
        try:
            return original(*args, **kwargs)
        finally:
            _publishing.reset(token)

    send_task.__threadline_installation__ = inst  # type: ignore[attr-defined]
    inst.original_send_task = original
    app.send_task = send_task

    def on_publish(sender: Any = None, headers: Any = None, **_: Any) -> None:
        publishing = _publishing.get()
        if publishing is None:  # not sent through an installed app's send_task
            # The signal does not say which app publishes: the current one (per thread), or the
            # only app installed, whatever thread sends.
            if _current_app() is not inst.app() and len(_installations) != 1:
                return
        elif publishing is not inst:
            return
        if isinstance(headers, dict):
            _before_publish(inst, headers)

    def on_prerun(sender: Any = None, task_id: Any = None, task: Any = None, **_: Any) -> None:
        if task is not None and getattr(task, "_app", None) is inst.app():
            _prerun(inst, task, task_id)

    def on_postrun(
        sender: Any = None,
        task_id: Any = None,
        task: Any = None,
        state: Any = None,
        retval: Any = None,
        **_: Any,
    ) -> None:
        frame = _frames.get()
        if frame is not None and frame.inst is inst and frame.task_id == task_id:
            _frames.set(frame.outer)
            recorder = inst.recorder
            if recorder is not None:
                _record_run(recorder, frame, task, state, retval)
            if frame.token is not None:
                _current.reset(frame.token)

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        # after the worker imported the task modules, before it reads each task's request class
        if getattr(sender, "app", None) is inst.app():
            _use_request_class_per_task(sender.app, REQUEST)

    def on_process_shutdown(**_: Any) -> None:
        recorder = inst.recorder
        if recorder is not None:
            recorder.flush()

    for signal, receiver in (
        (signals.before_task_publish, on_publish),
        (signals.task_prerun, on_prerun),
        (signals.task_postrun, on_postrun),
        (signals.worker_init, on_worker_init),
        (signals.worker_process_shutdown, on_process_shutdown),
        (signals.worker_shutdown, on_process_shutdown),
    ):
        signal.connect(receiver, weak=False, dispatch_uid=_uid(signal, inst))
        inst.receivers.append((signal, receiver))


def _current_app() -> Any:
    """Celery's current app, without creating a default one as ``current_app`` would."""
    return getattr(celery_state._tls, "current_app", None) or celery_state.default_app


def _install_on_every_app() -> None:
    """Make every app (finalized now or later) install threadline, as shared tasks reach them all."""
    global _shared_hook_connected
    with _lock:
        if not _shared_hook_connected:
            celery_state.connect_on_app_finalize(_ensure_installed)
            _shared_hook_connected = True
        for app in list(celery_state._get_active_apps()):
            if app.finalized:
                _ensure_installed(app)
