"""A minimal hook for metrics: subscribe a callback to threadline's operational events.

Every event is also logged under a ``threadline.*`` logger; the hook is for counters and timers
(Prometheus, StatsD, OpenTelemetry) without parsing log lines::

    from threadline.ops import observability

    def record(event: observability.Event) -> None:
        if event.name == "purge.batch":
            PURGED.labels(kind=event.fields["kind"]).inc(event.fields["rows"])

    unsubscribe = observability.on_event(record)

Events emitted (name: fields):

- ``purge.batch``: ``kind`` ("changes", "transactions" or "task runs"), ``rows``, ``seconds``,
  ``audit_schema``.
- ``purge.done``: ``changes``, ``transactions``, ``task_runs``, ``batches``, ``seconds``,
  ``dry_run``, ``audit_schema``.
- ``coverage.checked``: ``tables``, ``tracked``, ``problems``, ``audit_schema``.

A callback runs synchronously in the thread that emitted the event, so keep it cheap. An
exception raised by a callback is logged (``threadline.ops.observability``) and never reaches the
operation that emitted the event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Event", "emit", "on_event"]

logger = logging.getLogger("threadline.observability")


@dataclass(frozen=True)
class Event:
    """One operational event: a dotted ``name`` and its ``fields``."""

    name: str
    fields: Mapping[str, Any] = field(default_factory=dict)


Callback = Callable[[Event], None]

_lock = threading.Lock()
_callbacks: tuple[Callback, ...] = ()


def on_event(callback: Callback) -> Callable[[], None]:
    """Call ``callback(event)`` for every event from now on; returns a function that unsubscribes."""
    global _callbacks
    if not callable(callback):
        raise TypeError("on_event() needs a callable")
    with _lock:
        _callbacks = (*_callbacks, callback)

    def unsubscribe() -> None:
        global _callbacks
        with _lock:
            _callbacks = tuple(c for c in _callbacks if c is not callback)

    return unsubscribe


def emit(name: str, **fields: Any) -> None:
    """Deliver an event to every subscribed callback (a no-op when there are none)."""
    callbacks = _callbacks
    if not callbacks:
        return
    event = Event(name, MappingProxyType(dict(fields)))
    for callback in callbacks:
        try:
            callback(event)
        except Exception:
            logger.exception("metrics callback %r failed on event %s", callback, name)
