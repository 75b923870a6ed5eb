"""Login views (sync and async), a logout view and a DRF endpoint, writing through the ORM (``migrations``
database)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import auth
from django.contrib.auth import get_user_model, login, logout
from django.http import HttpRequest, JsonResponse
from rest_framework.authentication import TokenAuthentication
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

import threadline
from tests.djangoproject.shop.models import Purchase
from threadline.django.drf import ActorFromAuthentication


def log_in(request: HttpRequest) -> JsonResponse:
    """Log the named user in (no password: the test is about attribution)."""
    user = get_user_model().objects.get(username=request.POST["username"])
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return JsonResponse({"ctx": threadline.current().to_dict()})


async def alog_in(request: HttpRequest) -> JsonResponse:
    """The async twin of :func:`log_in` (``alogin``; Django 4.2 has none: ``login`` in a thread),
    then a write of the logged-in user's."""
    user = await get_user_model().objects.aget(username=request.POST["username"])
    alogin = getattr(auth, "alogin", None) or sync_to_async(login)
    await alogin(request, user, backend="django.contrib.auth.backends.ModelBackend")
    purchase = await Purchase.objects.acreate(name="alogin", card_number="4111111111111111")
    return JsonResponse({"ctx": threadline.current().to_dict(), "id": purchase.pk})


def log_out(request: HttpRequest) -> JsonResponse:
    """Log the user out, then write: the request is still the user's who asked for it."""
    logout(request)
    purchase = Purchase.objects.create(name="logout", card_number="4111111111111111")
    return JsonResponse({"ctx": threadline.current().to_dict(), "id": purchase.pk})


class AuditedTokenAuthentication(ActorFromAuthentication, TokenAuthentication):
    """DRF's token authentication, setting the actor."""


class Purchases(APIView):
    """POST: record a purchase as the token's user."""

    authentication_classes = [AuditedTokenAuthentication]
    permission_classes = [IsAuthenticated]

    def post(self, request: Request) -> Response:
        purchase = Purchase.objects.create(name="drf", card_number="4111111111111111")
        return Response({"ctx": threadline.current().to_dict(), "id": purchase.pk})


class PlainPurchases(Purchases):
    """The same, with DRF's token authentication as it comes."""

    authentication_classes = [TokenAuthentication]

    def post(self, request: Request) -> Any:
        return super().post(request)
