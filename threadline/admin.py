"""Registers the admin index's "Audit trail" (see :mod:`threadline.django.admin`)."""

from __future__ import annotations

from django.contrib import admin

from threadline.django.admin import AuditTrailAdmin
from threadline.models import AuditTrail

admin.site.register(AuditTrail, AuditTrailAdmin)
