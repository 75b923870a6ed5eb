"""The admin of the test shop: the purchase's audit trail beside its change page."""

from __future__ import annotations

from django.contrib import admin

from tests.djangoproject.shop.models import Purchase
from threadline.django.admin import AuditHistoryMixin


@admin.register(Purchase)
class PurchaseAdmin(AuditHistoryMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "name")
    threadline_history_limit = 1  # so the test sees the note about older changes
