"""The ``view_audit_trail`` permission's model (no table: ``managed = False``)."""

from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    """Declare the table-less model that holds the permission."""

    dependencies = [("threadline", "0001_install")]
    operations = [
        migrations.CreateModel(
            name="AuditTrail",
            fields=[("id", models.AutoField(auto_created=True, primary_key=True, serialize=False))],
            options={
                "managed": False,
                "default_permissions": (),
                "permissions": [("view_audit_trail", "Can view the audit trail")],
                "verbose_name": "audit trail",
                "verbose_name_plural": "audit trail",
            },
        )
    ]
