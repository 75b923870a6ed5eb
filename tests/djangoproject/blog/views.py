"""Views of the test Django project."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse

import threadline
from tests.djangoproject.blog.models import Post
from tests.djangoproject.blog.tasks import touch

CELERY: list[Any] = [None]  # the client app (set by the tests)


def _enqueue(post_id: int) -> None:
    CELERY[0].tasks[touch.name].delay(post_id, "from-worker")


def create_post(request: HttpRequest) -> JsonResponse:
    """Autocommit ORM insert, then a task that updates the row."""
    post = Post.objects.create(title=request.headers.get("X-Title", "t"))
    if request.headers.get("X-Enqueue"):
        _enqueue(post.pk)
    return JsonResponse({"id": post.pk, "ctx": threadline.current().to_dict()})


def atomic_post(request: HttpRequest) -> JsonResponse:
    """One atomic() block: create, raw SQL, a nested savepoint; the task is sent on commit."""
    with transaction.atomic():
        post = Post.objects.create(title="atomic")
        with connection.cursor() as cur:
            cur.execute("UPDATE dj_posts SET title = %s WHERE id = %s", ["atomic-raw", post.pk])
        with transaction.atomic():
            Post.objects.filter(pk=post.pk).update(title="atomic-nested")
        transaction.on_commit(lambda: _enqueue(post.pk))
    return JsonResponse({"id": post.pk})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    """A streaming response whose chunks report the context they run under."""

    def chunks() -> Iterator[str]:
        for _ in range(3):
            yield (threadline.current().correlation_id or "-") + "\n"

    return StreamingHttpResponse(chunks())
