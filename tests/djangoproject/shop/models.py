"""A model whose whole life is in migrations (tests/djangoproject/shop/migrations): created and
tracked, a field added, one renamed, the model renamed, a field removed, an index added
concurrently."""

from __future__ import annotations

from django.db import models


class Purchase(models.Model):
    """The model as the last migration leaves it."""

    name = models.CharField(max_length=200, default="")
    card_number = models.CharField(max_length=32, default="", db_column="card")

    class Meta:
        app_label = "shop"
        indexes = [models.Index(fields=["name"], name="shop_purchase_name_idx")]
