from __future__ import annotations

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY: PostgreSQL refuses it inside a transaction block
    atomic = False
    dependencies = [("shop", "0005_remove_note")]
    operations = [
        AddIndexConcurrently("purchase", models.Index(fields=["name"], name="shop_purchase_name_idx")),
    ]
