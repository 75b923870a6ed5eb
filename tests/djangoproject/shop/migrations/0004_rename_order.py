from __future__ import annotations

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("shop", "0003_rename_title")]
    operations = [migrations.RenameModel("Order", "Purchase")]
