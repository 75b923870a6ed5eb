"""The audit schema, version 7. A later schema version arrives as a new migration; this one never
changes (its SQL is pinned)."""

from __future__ import annotations

from django.db import migrations

from threadline.django.operations import InstallAudit


class Migration(migrations.Migration):
    """Install the threadline audit schema."""

    initial = True
    dependencies = []
    operations = [InstallAudit(version=7)]
