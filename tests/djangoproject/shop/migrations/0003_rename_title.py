from __future__ import annotations

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_order_note")]
    operations = [migrations.RenameField("order", "title", "name")]
