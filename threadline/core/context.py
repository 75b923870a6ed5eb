"""The audit context: who is acting and which request/job the work belongs to.

The current :class:`AuditContext` lives in a :class:`contextvars.ContextVar`, so it follows the
code through threads started with ``contextvars.copy_context()`` and through asyncio tasks, and
nested use always restores the previous value exactly.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any, TypeVar, cast

from threadline.core import fields
from threadline.core.actor import ActorRef
from threadline.core.errors import InvalidContext

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, eq=True)
class AuditContext:
    """Immutable audit context. Every field is optional.

    - ``actor``: who acts (:class:`ActorRef`; ``"user:42"`` text is accepted and parsed).
    - ``correlation_id``: the id shared by everything one request (or root job) caused.
    - ``request_id``: the id of the web request that is being served.
    - ``causation_id``: the id of the request or task that directly caused this unit of work.
    - ``origin``: where the work runs (``web``, ``celery``, ``cli``, ``sql``...).
    - ``job``: background-job details (task name, id, retries, parent/root ids).
    - ``meta``: small, JSON-serialisable application data (default cap 4 KiB encoded).
    - ``incoming_error``: why a context received from outside (a Celery header, a carrier) was
      refused; set by the receiving side, it marks the database transactions of the work as
      having had an invalid incoming context (``transactions.context_error``).
    """

    actor: ActorRef | None = None
    correlation_id: str | None = None
    request_id: str | None = None
    causation_id: str | None = None
    origin: str | None = None
    job: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] | None = None
    incoming_error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "actor", fields.check_actor(self.actor))
        for name in fields.TEXT_FIELDS:
            fields.check_text(name, getattr(self, name))
        for name in fields.MAPPING_FIELDS:
            plain = fields.check_mapping(name, getattr(self, name))
            object.__setattr__(self, name, None if plain is None else MappingProxyType(plain))

    @classmethod
    def _unchecked(cls, **values: Any) -> AuditContext:
        """Build from values that are valid already: the fast path for carriers that validated
        every field themselves (``job``/``meta`` must be plain JSON-compatible dicts)."""
        ctx = object.__new__(cls)
        state = ctx.__dict__
        for name in fields.ALL_FIELDS:
            state[name] = values.get(name)
        for name in fields.MAPPING_FIELDS:
            if state[name] is not None:
                state[name] = MappingProxyType(state[name])
        return ctx

    def __hash__(self) -> int:
        return hash(fields.dumps(self.to_dict()))

    @cached_property
    def is_empty(self) -> bool:
        """True when no field is set."""
        return all(getattr(self, name) is None for name in fields.ALL_FIELDS)

    def merged(self, **changes: Any) -> AuditContext:
        """A copy with ``changes`` layered on top (``None`` clears a field)."""
        unknown = set(changes) - set(fields.ALL_FIELDS)
        if unknown:
            raise InvalidContext(sorted(unknown)[0], "is not an audit context field")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The canonical dict form (see :mod:`threadline.core.codec`): ``v`` and the fields set."""
        out: dict[str, Any] = {"v": fields.VERSION}
        if self.actor is not None:
            out["actor"] = self.actor.to_dict()
        for name in fields.TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in fields.MAPPING_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = dict(value)
        return out

    def to_json(self) -> str:
        """The canonical JSON text (see :mod:`threadline.core.codec`)."""
        return self._encoded

    @cached_property
    def _encoded(self) -> str:
        # Encoded once per context object: it is applied to every transaction opened under it.
        try:
            text = fields.dumps(self.to_dict())
        except (TypeError, ValueError) as exc:
            raise InvalidContext("context", f"cannot be encoded as JSON: {exc}") from exc
        size = len(text.encode())
        cap = fields.limits().max_encoded_bytes
        if size > cap:
            raise InvalidContext("context", f"encodes to {size} bytes; the limit is {cap}")
        return text

    @classmethod
    def from_dict(cls, data: Any) -> AuditContext:
        """Rebuild and validate a context from its dict form (as :meth:`to_dict` gives it)."""
        if not isinstance(data, Mapping):
            raise InvalidContext("context", f"must be a JSON object, got {type(data).__name__}")
        version = data.get("v")
        if version != fields.VERSION or isinstance(version, bool):
            raise InvalidContext(
                "v", f"unsupported version {version!r}; this release reads version {fields.VERSION}"
            )
        unknown = set(data) - {"v", *fields.ALL_FIELDS}
        if unknown:
            raise InvalidContext("context", f"unknown fields {sorted(unknown)[:5]}")
        return cls(
            actor=ActorRef.from_dict(data["actor"]) if data.get("actor") is not None else None,
            **{name: data.get(name) for name in (*fields.TEXT_FIELDS, *fields.MAPPING_FIELDS)},
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> AuditContext:
        """Parse and validate canonical JSON text."""
        if isinstance(text, bytes):
            try:
                text = text.decode()
            except UnicodeDecodeError as exc:
                raise InvalidContext("context", "is not valid UTF-8") from exc
        if not isinstance(text, str):
            raise InvalidContext("context", f"must be JSON text, got {type(text).__name__}")
        cap = fields.limits().max_encoded_bytes
        if len(text.encode()) > cap:
            raise InvalidContext("context", f"is larger than {cap} bytes")
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as exc:
            raise InvalidContext("context", f"is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


EMPTY = AuditContext()
_current: ContextVar[AuditContext] = ContextVar("threadline_context", default=EMPTY)
# the restore points of the context() layers entered here: (layer, token), innermost last
_entries: ContextVar[tuple[tuple[object, Token[AuditContext]], ...]] = ContextVar(
    "threadline_entries", default=()
)


def current() -> AuditContext:
    """The audit context in force here (an empty context when none was set)."""
    return _current.get()


def set_current(ctx: AuditContext) -> Token[AuditContext]:
    """Make ``ctx`` current and return the token that :func:`reset_current` takes.

    Low-level: prefer :func:`context` or :func:`use_context`, which always restore.
    """
    if not isinstance(ctx, AuditContext):
        raise TypeError(f"expected an AuditContext, got {type(ctx).__name__}")
    return _current.set(ctx)


def reset_current(token: Token[AuditContext]) -> None:
    """Restore the context that was current before the matching :func:`set_current`."""
    _current.reset(token)


@contextmanager
def use_context(ctx: AuditContext | None) -> Iterator[AuditContext]:
    """Replace the current context with ``ctx`` (``None``: the empty one) for the block."""
    token = set_current(EMPTY if ctx is None else ctx)
    try:
        yield current()
    finally:
        _current.reset(token)


class context:  # noqa: N801 - used like a function: ``with threadline.context(...)``
    """Layer fields over the current context, as a context manager or a decorator.

    ``with threadline.context(actor=ActorRef.user("42"), correlation_id="req-1"): ...``

    On exit (also on an exception) the previous context is restored exactly. As a decorator it
    applies anew on every call, for plain and ``async`` functions alike. Fields are validated when
    the layer is built, so a bad value fails here, not later at a database or broker boundary.
    One object may be entered many times at once (nested in itself, or by several asyncio tasks
    or threads): each entry's restore point is kept in the entering context, not on the object.
    """

    __slots__ = ("_changes",)

    def __init__(self, **fields: Any) -> None:
        EMPTY.merged(**fields)  # validate now: fail where the bad value was written
        self._changes = fields

    def __enter__(self) -> AuditContext:
        ctx = _current.get().merged(**self._changes) if self._changes else _current.get()
        token = _current.set(ctx)
        _entries.set((*_entries.get(), (self, token)))
        return ctx

    def __exit__(self, *exc_info: object) -> None:
        entries = _entries.get()
        for i in range(len(entries) - 1, -1, -1):
            if entries[i][0] is self:
                _entries.set(entries[:i] + entries[i + 1 :])
                _current.reset(entries[i][1])
                return
        raise RuntimeError("threadline.context exited where it was not entered (another thread or task?)")

    def __call__(self, func: F) -> F:
        changes = self._changes
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with context(**changes):
                    return await func(*args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with context(**changes):
                return func(*args, **kwargs)

        return cast(F, wrapper)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
