"""The test project as a real admin site (``runserver`` in the admin tests): sessions, the
admin, and every table in the ``migrations`` database."""

from __future__ import annotations

import os

from tests.djangoproject.settings import *  # noqa: F403
from tests.djangoproject.settings import DATABASES, INSTALLED_APPS

DEBUG = True  # runserver serves the admin's static files
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    *INSTALLED_APPS,
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "threadline.django.ThreadlineMiddleware",
]
ROOT_URLCONF = "tests.djangoproject.admin_urls"
DATABASES = {"default": DATABASES["migrations"], "migrations": DATABASES["migrations"]}
# the admin tests' variant of several databases: the shop's and auth's models read through the
# ``migrations`` alias (the same database), threadline's through ``default``
DATABASE_ROUTERS: list[str] = (
    ["tests.djangoproject.routers.MigrationsRouter"] if os.environ.get("ADMIN_TEST_ROUTED") else []
)
SILENCED_SYSTEM_CHECKS: list[str] = []
STATIC_URL = "/static/"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
