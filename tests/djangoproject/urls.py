"""URLs of the test Django project."""

from __future__ import annotations

from django.urls import path

from tests.djangoproject.blog import views
from tests.djangoproject.shop import views as shop_views

urlpatterns = [
    path("posts/", views.create_post),
    path("atomic/", views.atomic_post),
    path("stream/", views.stream),
    path("login/", shop_views.log_in),
    path("alogin/", shop_views.alog_in),
    path("logout/", shop_views.log_out),
    path("api/purchases/", shop_views.Purchases.as_view()),
    path("api/plain-purchases/", shop_views.PlainPurchases.as_view()),
]
