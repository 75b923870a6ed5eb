from __future__ import annotations

from django.db import migrations, models

from threadline.django.operations import Track


class Migration(migrations.Migration):
    initial = True
    dependencies = [("threadline", "0001_install")]
    operations = [
        migrations.CreateModel(
            name="Order",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("title", models.CharField(max_length=200, default="")),
                ("card_number", models.CharField(max_length=32, default="", db_column="card")),
            ],
        ),
        Track("shop.Order", mask=["card_number"]),
    ]
