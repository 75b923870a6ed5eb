"""A stand-in for ``AuthenticationMiddleware``: ``request.user`` from the ``X-User`` header."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from threadline import ActorRef
from threadline.django import ThreadlineMiddleware


class HeaderUser:
    """An authenticated user with primary key ``pk``."""

    is_authenticated = True

    def __init__(self, pk: str) -> None:
        self.pk = int(pk)


class Anonymous:
    """What Django's ``AnonymousUser`` looks like to the resolver."""

    is_authenticated = False
    pk = None


class HeaderAuthenticationMiddleware:
    """Sets ``request.user`` like ``AuthenticationMiddleware`` would (no auth tables needed)."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        user = request.headers.get("X-User")
        request.user = HeaderUser(user) if user else Anonymous()
        return self.get_response(request)


class ProjectThreadlineMiddleware(ThreadlineMiddleware):
    """A project's own subclass of threadline's middleware (the system checks know it)."""


def username_actor(request: Any) -> ActorRef:
    """An ``ACTOR_RESOLVER`` that queries the database: ``user:<username>``."""
    from django.contrib.auth import get_user_model

    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return ActorRef.anonymous()
    return ActorRef.user(get_user_model().objects.values_list("username", flat=True).get(pk=user.pk))
