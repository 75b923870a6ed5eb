"""URLs of the test Django project."""

from __future__ import annotations

from django.urls import path

from tests.djangoproject.blog import views

urlpatterns = [
    path("posts/", views.create_post),
    path("atomic/", views.atomic_post),
    path("stream/", views.stream),
]
