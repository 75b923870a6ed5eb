"""Celery task of the test Django project: updates a post through the ORM."""

from __future__ import annotations

from typing import Any

import threadline
from tests.djangoproject.blog.models import Post


@threadline.task
def touch(post_id: int, note: str) -> dict[str, Any]:
    """``QuerySet.update()`` in autocommit mode, in the worker; returns the context it saw."""
    Post.objects.filter(pk=post_id).update(note=note)
    return threadline.current().to_dict()
