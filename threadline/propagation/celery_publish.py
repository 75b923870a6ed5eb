"""The publishing side of Celery propagation: what :func:`~threadline.propagation.celery.install`
keeps for one app (:class:`_Installation`) and the ``threadline`` header it puts on each message
that app publishes, signed and bound to the message when the app has signing keys.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from threadline.core import fields
from threadline.core.actor import FORBIDDEN_TEXT_RE, ActorRef
from threadline.core.context import AuditContext, current
from threadline.core.errors import InvalidContext
from threadline.propagation import carrier
from threadline.propagation.carrier import HEADER
from threadline.propagation.task_runs import TaskRunRecorder

SignaturePolicy = Literal["strip", "reject"]
"""What a worker does with an untrusted header: run without it (``"strip"``) or refuse the task."""

logger = logging.getLogger("threadline.celery")

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


# every installed app's installation (install() and uninstall() keep it)
_installations: weakref.WeakKeyDictionary[Any, _Installation] = weakref.WeakKeyDictionary()


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


def _before_publish(inst: _Installation, headers: dict[str, Any]) -> None:
    ctx = current()
    if ctx.is_empty:
        if inst.keys and headers.get(HEADER) is not None:
            _bind_given(inst, headers)
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


def _bind_given(inst: _Installation, headers: dict[str, Any]) -> None:
    """Bind to this message a header the sender gave (a beat entry's ``headers`` option) signed
    with the app's key and bound to no message, as ``threadline.inject(..., signing_key=...)``
    writes it (or already bound to this message): a worker trusts a signed header only on the
    message it is bound to. Any other header is sent as it is, for the worker to judge."""
    try:
        given = carrier.decode_wire(
            headers[HEADER],
            keys=inst.keys,
            max_bytes=inst.max_header_bytes,
            message_id=binding_subject(headers.get("id"), headers.get("task")),
            require_binding=False,
        )
        if "incoming_error" in given:  # only a retry sends one, under its task's context
            return
        headers[HEADER] = inst.header_for(
            AuditContext(**given),
            headers.get("id"),
            headers.get("parent_id"),
            headers.get("task"),
            headers.get("eta"),
        )
    except InvalidContext as exc:  # UntrustedContext too: left for the worker to refuse
        logger.warning(
            "task %s[%s] is published with a %s header the worker will not trust: %s",
            headers.get("task"),
            headers.get("id"),
            carrier.HEADER,
            exc,
        )


_safe_id = carrier.safe_id


def _short(text: str, limit: int = 200) -> str:
    """``text`` with the characters an audit field refuses blanked, cut to ``limit``."""
    return FORBIDDEN_TEXT_RE.sub(" ", text)[:limit]
