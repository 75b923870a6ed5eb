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
