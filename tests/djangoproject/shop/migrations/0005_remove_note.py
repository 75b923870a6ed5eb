from __future__ import annotations

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("shop", "0004_rename_order")]
    operations = [migrations.RemoveField("purchase", "note")]
