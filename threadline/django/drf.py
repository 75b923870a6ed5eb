"""Django REST framework: the actor from DRF's authentication.

DRF authenticates inside the view, after every middleware ran, so ``ThreadlineMiddleware`` sees
an anonymous request. Put :class:`ActorFromAuthentication` in front of each authentication class::

    from rest_framework.authentication import TokenAuthentication
    from threadline.django.drf import ActorFromAuthentication

    class AuditedTokenAuthentication(ActorFromAuthentication, TokenAuthentication):
        pass

    REST_FRAMEWORK = {"DEFAULT_AUTHENTICATION_CLASSES": ["myapp.auth.AuditedTokenAuthentication"]}

When the class authenticates a user, the actor of the rest of the request is that user
(``user:<pk>``; override :meth:`ActorFromAuthentication.threadline_actor` to say otherwise).
"""

from __future__ import annotations

from typing import Any

from threadline.core.actor import ActorRef
from threadline.django.auth import set_actor

__all__ = ["ActorFromAuthentication"]


class ActorFromAuthentication:
    """Mixin for a DRF authentication class: a successful ``authenticate()`` sets the actor."""

    def authenticate(self, request: Any) -> Any:
        """Authenticate as the class it is mixed into does, then set the actor."""
        result = super().authenticate(request)  # type: ignore[misc]
        if result is not None:
            set_actor(self.threadline_actor(result[0], result[1]))
        return result

    def threadline_actor(self, user: Any, auth: Any) -> ActorRef | str | None:
        """The actor for an authenticated ``user`` (default ``user:<pk>``)."""
        if user is None or not getattr(user, "is_authenticated", False):
            return ActorRef.anonymous()
        return ActorRef.user(str(user.pk))
