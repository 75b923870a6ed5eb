"""The actor after authentication: the login request, and DRF's authentication.

``ThreadlineMiddleware`` resolves the actor when the request arrives. Two things authenticate
later: Django's ``login()`` and ``alogin()`` (the login request itself, whose ``last_login`` update
would otherwise be ``anonymous``) and Django REST framework, which authenticates inside the view
(token, JWT, session). Both set the actor for the rest of the request with :func:`set_actor`; a
transaction already open takes the new actor at commit (the context set last before commit wins).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from asgiref.sync import markcoroutinefunction

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


def _login_actor(request: Any) -> ActorRef | str | None:
    from threadline.propagation.django import load_settings
    from threadline.propagation.web_request import _resolve_actor

    resolver = load_settings().actor_resolver
    return _resolve_actor(resolver, request) if resolver is not None else None


# On the request, between the two receivers of one login: the user when the sync receiver ran first
# (login(), Signal.send), _ASYNC_FIRST when the async one did (alogin(), Signal.asend).
_FIRST = "_threadline_login_first"
_ASYNC_FIRST = object()
_async_receiver = {"connected": False}


def _mark(request: Any, value: Any) -> None:
    try:
        if value is None:
            delattr(request, _FIRST)
        else:
            setattr(request, _FIRST, value)
    except AttributeError:  # a request that takes no attributes: each receiver resolves the actor
        pass


def on_user_logged_in(sender: Any = None, request: Any = None, user: Any = None, **_: Any) -> None:
    """``user_logged_in`` receiver: the login request is the user's from here on (connected by the
    app before Django's own ``update_last_login``, so that write is the user's too)."""
    if request is None or user is None:
        return
    set_actor(_login_actor(request))
    if getattr(request, _FIRST, None) is _ASYNC_FIRST:
        _mark(request, None)  # alogin(): the view's context has the actor already
    elif _async_receiver["connected"]:
        _mark(request, user)  # login(): the async receiver, next, has nothing to do


def on_user_logged_in_async(
    sender: Any = None, request: Any = None, user: Any = None, **_: Any
) -> Awaitable[None]:
    """The same, for ``alogin()`` (Django 5.0 and later): a receiver Django sees as async.

    ``Signal.asend()`` runs the sync receivers in a thread, and awaits each async one's
    coroutine, all in tasks of their own (``asyncio.gather``): an actor set there would stay in
    that task's copy of the context, and the rest of the view would be ``anonymous``. Django calls
    this one in the view's own context to get its awaitable, so it sets the actor then and returns
    one with nothing left to do. It runs in the event loop: a custom ``ACTOR_RESOLVER`` must not
    query the database there (``request.user`` is the user logging in). Under ``login()``
    (``Signal.send()``, which calls it after the sync receivers) it does nothing.
    """
    if request is not None and user is not None:
        if getattr(request, _FIRST, None) is user:
            _mark(request, None)  # login(): on_user_logged_in set the actor in this context
        else:
            set_actor(_login_actor(request))
            _mark(request, _ASYNC_FIRST)
    return _done()


async def _done() -> None:
    return None


markcoroutinefunction(on_user_logged_in_async)


def connect_login_receiver() -> None:
    """Connect :func:`on_user_logged_in` ahead of Django's ``update_last_login``, and, where
    signals have ``asend()`` (Django 5.0 and later), :func:`on_user_logged_in_async` after it."""
    from django.contrib.auth import signals

    signals.user_logged_in.connect(on_user_logged_in, dispatch_uid="threadline.login")
    if hasattr(signals.user_logged_in, "asend"):
        signals.user_logged_in.connect(on_user_logged_in_async, dispatch_uid="threadline.alogin")
        _async_receiver["connected"] = True
    try:
        from django.contrib.auth.models import update_last_login
    except Exception:  # auth's models cannot be imported: nothing of Django's to reorder
        return
    # Receivers run in the order they were connected: reconnecting Django's after ours puts
    # ours first (a no-op when auth is not installed or threadline's app was ready first).
    if signals.user_logged_in.disconnect(dispatch_uid="update_last_login"):
        signals.user_logged_in.connect(update_last_login, dispatch_uid="update_last_login")
