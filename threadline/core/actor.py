"""``ActorRef``: who caused a change."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from threadline.core.errors import InvalidActor

MAX_ID_LENGTH = 256
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
FORBIDDEN_TEXT_RE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
"""Characters no id, origin or actor field may hold: C0 and C1 control characters, the line and
paragraph separators (U+2028, U+2029), the bidi marks, embeddings, overrides and isolates (U+061C,
U+200E, U+200F, U+202A-U+202E, U+2066-U+2069: they make a logged id read as something else), and lone
surrogates (not text: they cannot be encoded as UTF-8, so they could never reach PostgreSQL)."""
FORBIDDEN_TEXT = "control characters or unpaired surrogates (C0, C1 and bidi controls, lone surrogates)"


def _check_text(name: str, value: object, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise InvalidActor(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise InvalidActor(f"{name} must be a string, got {type(value).__name__}")
    if required and value == "":
        raise InvalidActor(f"{name} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidActor(f"{name} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}")
    if FORBIDDEN_TEXT_RE.search(value):
        raise InvalidActor(f"{name} contains {FORBIDDEN_TEXT}")
    return value


@dataclass(frozen=True, slots=True)
class ActorRef:
    """A reference to whoever caused a change: ``ActorRef.user("42")``, ``ActorRef.system("celery")``.

    ``type`` is one of the built-in types (``user``, ``admin``, ``service_account``, ``job``,
    ``system``, ``anonymous``) or an application-defined short lowercase identifier
    (``[a-z][a-z0-9_]{0,31}``). ``id`` is required for every type but ``anonymous``.
    ``display`` is an optional human-readable label; it is recorded but never used for matching.
    """

    type: str
    id: str | None = None
    display: str | None = None

    BUILTIN_TYPES: ClassVar[tuple[str, ...]] = (
        "user",
        "admin",
        "service_account",
        "job",
        "system",
        "anonymous",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not _TYPE_RE.match(self.type):
            raise InvalidActor(
                f"type {self.type!r} is not a short lowercase identifier ([a-z][a-z0-9_]{{0,31}})"
            )
        _check_text("id", self.id, required=self.type != "anonymous")
        _check_text("display", self.display, required=False)

    @classmethod
    def user(cls, id: str | int, display: str | None = None) -> ActorRef:
        """An end user of the application."""
        return cls("user", str(id), display)

    @classmethod
    def admin(cls, id: str | int, display: str | None = None) -> ActorRef:
        """A privileged operator acting through an admin interface."""
        return cls("admin", str(id), display)

    @classmethod
    def service_account(cls, id: str | int, display: str | None = None) -> ActorRef:
        """A machine identity (API client, integration)."""
        return cls("service_account", str(id), display)

    @classmethod
    def job(cls, id: str | int, display: str | None = None) -> ActorRef:
        """A background job acting on its own behalf."""
        return cls("job", str(id), display)

    @classmethod
    def system(cls, id: str | int = "system", display: str | None = None) -> ActorRef:
        """The system itself (scheduler, migration, maintenance)."""
        return cls("system", str(id), display)

    @classmethod
    def anonymous(cls, id: str | int | None = None, display: str | None = None) -> ActorRef:
        """A caller without identity; ``id`` may carry e.g. a session key."""
        return cls("anonymous", None if id is None else str(id), display)

    @classmethod
    def parse(cls, text: str) -> ActorRef:
        """Parse ``"type:id"`` (or ``"anonymous"``), e.g. ``ActorRef.parse("user:42")``."""
        if not isinstance(text, str):
            raise InvalidActor(f"cannot parse {type(text).__name__} as an actor; expected 'type:id'")
        kind, sep, ident = text.partition(":")
        if not sep:
            if kind == "anonymous":
                return cls("anonymous")
            raise InvalidActor(f"{text!r} is not of the form 'type:id' (for example 'user:42')")
        return cls(kind, ident)

    def to_dict(self) -> dict[str, str]:
        """The JSON form: ``{"type": ..., "id": ...}`` (``id``/``display`` only when set)."""
        out = {"type": self.type}
        if self.id is not None:
            out["id"] = self.id
        if self.display is not None:
            out["display"] = self.display
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ActorRef:
        """Rebuild an actor from :meth:`to_dict` output, validating every field."""
        if not isinstance(data, dict):
            raise InvalidActor(f"expected an object, got {type(data).__name__}")
        unknown = set(data) - {"type", "id", "display"}
        if unknown:
            raise InvalidActor(f"unknown keys {sorted(unknown)}")
        return cls(data.get("type"), data.get("id"), data.get("display"))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.type if self.id is None else f"{self.type}:{self.id}"
