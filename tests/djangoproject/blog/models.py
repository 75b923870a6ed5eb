"""An audited model (table ``public.dj_posts``, created and tracked by the tests)."""

from __future__ import annotations

from django.db import models


class Post(models.Model):
    """A blog post."""

    title = models.CharField(max_length=200)
    note = models.TextField(null=True)

    class Meta:
        db_table = "dj_posts"
        app_label = "blog"


class Place(models.Model):
    """A parent of multi-table inheritance (no table: only the system checks look at it)."""

    address = models.CharField(max_length=200)

    class Meta:
        db_table = "dj_places"
        app_label = "blog"


class Shop(Place):
    """A child of :class:`Place`: ``address`` is a column of ``dj_places``, not of ``dj_shops``."""

    owner = models.CharField(max_length=200)

    class Meta:
        db_table = "dj_shops"
        app_label = "blog"
