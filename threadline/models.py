"""The one Django model of threadline: a table-less holder of the ``view_audit_trail``
permission (``threadline | audit trail | Can view the audit trail``), which the admin's audit
history and trace pages require. The audit tables themselves are in the audit schema, managed
by threadline's migrations, not by Django models. (The app having a models module also makes
Django send it ``post_migrate``, which applies ``THREADLINE["TRACK"]``.)"""

from __future__ import annotations

from django.db import models


class AuditTrail(models.Model):
    """Not a table (``managed = False``): the content type the permission belongs to."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [("view_audit_trail", "Can view the audit trail")]
        verbose_name = "audit trail"
        verbose_name_plural = "audit trail"
