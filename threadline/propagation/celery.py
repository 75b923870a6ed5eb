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
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal, TypeVar, cast, get_args

import celery
from celery import _state as celery_state
from celery import signals

from threadline.core import fields
from threadline.core.actor import FORBIDDEN_TEXT_RE, ActorRef
from threadline.core.context import AuditContext, _current, current
from threadline.core.errors import ConfigurationError, InvalidContext, UntrustedContext
from threadline.propagation import carrier
from threadline.propagation.carrier import HEADER
from threadline.propagation.task_runs import OUTCOMES, TaskRunRecorder

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

SignaturePolicy = Literal["strip", "reject"]
ORIGIN = "celery"
"""The ``origin`` of work done inside a Celery task."""

logger = logging.getLogger("threadline.celery")

F = TypeVar("F", bound=Callable[..., Any])

_MIN_HEADER_BYTES = 256
_MAX_HEADER_BYTES = 65536
_CACHE_SIZE = 1024


@dataclass(eq=False)
class _Installation:
    """What :func:`install` set up on one app: its options and the receivers it connected."""

    app: weakref.ReferenceType[Any]
    default_actor: ActorRef | None
    keys: tuple[bytes, ...]
    policy: SignaturePolicy
    max_header_bytes: int
    original_send_task: Callable[..., Any] | None = None
    receivers: list[tuple[Any, Callable[..., None]]] = field(default_factory=list)
    signature_ttl: int = carrier.DEFAULT_SIGNATURE_TTL
    accept_unbound: bool = False
    recorder: TaskRunRecorder | None = None
    # id(ctx) -> (ctx, causation, same task, header (unsigned installs), body); the context
    # object is kept alive with it
    cache: dict[int, tuple[AuditContext, str | None, bool, str | None, dict[str, Any]]] = field(
        default_factory=dict
    )

    def header_for(
        self,
        ctx: AuditContext,
        message_id: object,
        parent_id: object,
        task_name: object = None,
        eta: object = None,
    ) -> str:
        """The header value for a message with these ids, published under ``ctx``.

        ``causation_id`` in the header is what the consumer uses when Celery's ``parent_id`` does
        not name another task: the running task's own cause when it republishes itself (retry,
        replace), the publishing task, or else the web request being served.
        """
        job = ctx.job
        same_task = message_id is not None and job is not None and job.get("id") == message_id
        causation = ctx.causation_id if same_task else (_safe_id(parent_id) or carrier.sender_id(ctx))
        hit = self.cache.get(id(ctx))
        if hit is not None and hit[0] is ctx and hit[1] == causation and hit[2] == same_task:
            if hit[3] is not None:
                return hit[3]
            body = hit[4]
        else:
            body = carrier.wire_dict(ctx, keep_incoming_error=same_task)
            if causation is None:
                body.pop("causation_id", None)
            else:
                body["causation_id"] = causation
            header = (
                None
                if self.keys
                else carrier.encode_wire(body, signing_key=None, max_bytes=self.max_header_bytes)
            )
            if len(self.cache) >= _CACHE_SIZE:
                self.cache.clear()
            self.cache[id(ctx)] = (ctx, causation, same_task, header, body)
            if header is not None:
                return header
        # signed: bound to this message (its task id and task name) and valid for signature_ttl
        # from when it is due, so signed once per message
        return carrier.encode_wire(
            body,
            signing_key=self.keys[0],
            max_bytes=self.max_header_bytes,
            message_id=binding_subject(message_id, task_name),
            ttl=self.signature_ttl,
            not_before=_due(eta),
        )


def binding_subject(task_id: object, task_name: object) -> str | None:
    """What a signed header is bound to: the task id and the task name (a message that reuses an
    id for another task does not match)."""
    if not isinstance(task_id, str):
        return None
    return f"{task_id}\x1f{task_name if isinstance(task_name, str) else ''}"


def _due(eta: object) -> float | None:
    """When a message with Celery's ``eta`` header (ISO 8601 text) is due, as Unix time."""
    if not isinstance(eta, str):
        return None
    try:
        moment = datetime.fromisoformat(eta)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


_installations: weakref.WeakKeyDictionary[Any, _Installation] = weakref.WeakKeyDictionary()
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
        _installations[app] = inst
    return app


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
            if _current_app() is not inst.app():
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

    def on_process_shutdown(**_: Any) -> None:
        recorder = inst.recorder
        if recorder is not None:
            recorder.flush()

    for signal, receiver in (
        (signals.before_task_publish, on_publish),
        (signals.task_prerun, on_prerun),
        (signals.task_postrun, on_postrun),
        (signals.worker_process_shutdown, on_process_shutdown),
        (signals.worker_shutdown, on_process_shutdown),
    ):
        signal.connect(receiver, weak=False, dispatch_uid=_uid(signal, inst))
        inst.receivers.append((signal, receiver))


def _current_app() -> Any:
    """Celery's current app, without creating a default one as ``current_app`` would."""
    return getattr(celery_state._tls, "current_app", None) or celery_state.default_app


def _before_publish(inst: _Installation, headers: dict[str, Any]) -> None:
    ctx = current()
    if ctx.is_empty:
        return
    try:
        headers[HEADER] = inst.header_for(
            ctx, headers.get("id"), headers.get("parent_id"), headers.get("task"), headers.get("eta")
        )
    except InvalidContext as exc:
        # Only reachable when the message bypassed the app's send_task: never publish silently
        # without the context, mark it so the worker records why.
        logger.error(
            "task %s[%s] is published without its audit context: %s",
            headers.get("task"),
            headers.get("id"),
            exc,
        )
        headers[HEADER] = fields.dumps({"v": fields.VERSION, carrier.ERROR_FIELD: _short(str(exc))})


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
    inst: _Installation, task: Any, request: Any, raw: object
) -> tuple[AuditContext, str | None]:
    """The task's context, and the reason to refuse running it (signature policy "reject")."""
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
    if raw is None:
        actor = getattr(task, "threadline_default_actor", None) or inst.default_actor
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
                logger.warning(
                    "task %s[%s] refused: %s (signature policy 'reject')", task.name, task_id, reason
                )
            else:
                logger.error(
                    "task %s[%s]: %s; signature policy 'reject' needs tasks built on threadline.celery.Task, "
                    "so it runs without the inherited audit context instead",
                    task.name,
                    task_id,
                    reason,
                )
        else:
            logger.warning(
                "task %s[%s]: invalid incoming audit context: %s; it runs without the inherited context",
                task.name,
                task_id,
                reason,
            )
        return _build(correlation_id=root_id, causation_id=cause, job=job, incoming_error=reason), rejected
    if cause is not None:
        fields["causation_id"] = cause
    if "correlation_id" not in fields:
        fields["correlation_id"] = root_id
    return AuditContext._unchecked(origin=ORIGIN, job=job, **fields), None  # validated: see _build


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
                retries if type(retries) is int else 0,
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


def _build(**fields: Any) -> AuditContext:
    # Every value here is validated already: header fields by the carrier codec, ids by
    # _safe_id, reasons by _short; skip validating them a second time on every task.
    return AuditContext._unchecked(origin=ORIGIN, **fields)


_safe_id = carrier.safe_id
_names: dict[str, str | None] = {}


def _task_name(task: Any) -> str | None:
    """The task's name as an audit id (validated once per name)."""
    name = task.name
    if not isinstance(name, str):
        return None
    if name not in _names:
        _names[name] = _safe_id(name)
    return _names[name]


def _short(text: str, limit: int = 200) -> str:
    return FORBIDDEN_TEXT_RE.sub(" ", text)[:limit]


class Task(celery.Task):  # type: ignore[misc]
    """Base class of threadline tasks: enforces the ``"reject"`` signature policy.

    ``@threadline.task`` uses it; ``Celery(..., task_cls=threadline.celery.Task)`` makes it the
    base of every task of an app. Per-task policy (class attributes, or options of
    ``@threadline.task``): ``threadline_default_actor`` and ``threadline_signature_policy``.
    """

    threadline_default_actor: ClassVar[ActorRef | None] = None
    threadline_signature_policy: ClassVar[SignaturePolicy | None] = None

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

    A ``base`` that is not a :class:`Task` is combined with it.
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
            opts["base"] = type(base.__name__, (Task, base), {"__module__": base.__module__})
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
