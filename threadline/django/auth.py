"""The actor after authentication: the login request, and DRF's authentication.

``ThreadlineMiddleware`` resolves the actor when the request arrives. Two things authenticate
later: Django's ``login()`` (the login request itself, whose ``last_login`` update would
otherwise be ``anonymous``) and Django REST framework, which authenticates inside the view
(token, JWT, session). Both set the actor for the rest of the request with :func:`set_actor`; a
transaction already open takes the new actor at commit (the context set last before commit wins).
"""

from __future__ import annotations

from typing import Any

from threadline.core import fields
from threadline.core.actor import ActorRef
from threadline.core.context import _current, current

__all__ = ["set_actor"]


def set_actor(actor: ActorRef | str | None) -> None:
    """Make ``actor`` the actor of the current context until the request (or task) ends.

    Outside any context it does nothing: there is no request to attribute. The middleware restores
    the context it replaced when the request ends, so the change never outlives the request.
    """
    ctx = current()
    if ctx.is_empty:
        return
    checked = fields.check_actor(actor)
    if checked != ctx.actor:
        _current.set(ctx.merged(actor=checked))


def on_user_logged_in(sender: Any = None, request: Any = None, user: Any = None, **_: Any) -> None:
    """``user_logged_in`` receiver: the login request is the user's from here on (connected by the
    app before Django's own ``update_last_login``, so that write is the user's too)."""
    if request is None or user is None:
        return
    from threadline.propagation.django import load_settings
    from threadline.propagation.web_request import _resolve_actor

    resolver = load_settings().actor_resolver
    set_actor(_resolve_actor(resolver, request) if resolver is not None else None)


def connect_login_receiver() -> None:
    """Connect :func:`on_user_logged_in` ahead of Django's ``update_last_login``."""
    from django.contrib.auth import signals

    signals.user_logged_in.connect(on_user_logged_in, dispatch_uid="threadline.login")
    try:
        from django.contrib.auth.models import update_last_login
    except Exception:  # auth's models cannot be imported: nothing of Django's to reorder
        return
    # Receivers run in the order they were connected: reconnecting Django's after ours puts
    # ours first (a no-op when auth is not installed or threadline's app was ready first).
    if signals.user_logged_in.disconnect(dispatch_uid="update_last_login"):
        signals.user_logged_in.connect(update_last_login, dispatch_uid="update_last_login")
