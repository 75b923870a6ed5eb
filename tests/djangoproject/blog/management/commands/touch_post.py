"""``manage.py touch_post``: create a post, and have the test worker touch it."""

from __future__ import annotations

import json
import os
from typing import Any

from django.core.management.base import BaseCommand

import threadline
from tests.celery_app.tasks import make_app
from tests.djangoproject.blog.models import Post
from tests.djangoproject.blog.tasks import touch


class Command(BaseCommand):
    help = "Create a post and enqueue its touch task (on the worker named by the test environment)."

    def handle(self, *args: Any, **options: Any) -> None:
        post = Post.objects.create(title="from a command")
        app = make_app(
            os.environ["THREADLINE_TEST_CELERY_BROKER"],
            os.environ["THREADLINE_TEST_CELERY_BACKEND"],
            os.environ["THREADLINE_TEST_CELERY_QUEUE"],
        )
        app.tasks[touch.name].delay(post.pk, "from-command")
        self.stdout.write(json.dumps({"post": post.pk, "ctx": threadline.current().to_dict()}))
