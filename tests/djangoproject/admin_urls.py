"""URLs of the admin test server: the admin, and a login shortcut for the headless browser."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import get_user_model, login
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import path


def log_in_for_the_browser(request: HttpRequest, username: str) -> HttpResponseRedirect:
    """Test server only: log ``username`` in and go to ``?next=`` (the browser cannot type)."""
    user = get_user_model().objects.get(username=username)
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return HttpResponseRedirect(request.GET.get("next", "/admin/"))


urlpatterns = [
    path("test-login/<str:username>/", log_in_for_the_browser),
    path("admin/", admin.site.urls),
]
