"""Settings of the test Django project; the database comes from ``THREADLINE_TEST_CELERY_DSN``."""

from __future__ import annotations

import json
import os

from psycopg.conninfo import conninfo_to_dict

_db = conninfo_to_dict(os.environ["THREADLINE_TEST_CELERY_DSN"])

SECRET_KEY = "threadline-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tests.djangoproject.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "rest_framework",
    "rest_framework.authtoken",
    "threadline",
    "tests.djangoproject.blog",
    "tests.djangoproject.shop",
]
DATABASE_ROUTERS = ["tests.djangoproject.routers.MigrationsRouter"]
# HeaderAuthenticationMiddleware sets request.user, as AuthenticationMiddleware would
SILENCED_SYSTEM_CHECKS = ["threadline.W002"]
MIDDLEWARE = [
    "tests.djangoproject.auth.HeaderAuthenticationMiddleware",
    "threadline.django.ThreadlineMiddleware",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.get("dbname", ""),
        "USER": _db.get("user", ""),
        "PASSWORD": _db.get("password", ""),
        "HOST": _db.get("host", ""),
        "PORT": _db.get("port", ""),
    }
}
# the same database through server-side parameter binding (psycopg's Cursor, not ClientCursor)
DATABASES["serverside"] = {**DATABASES["default"], "OPTIONS": {"server_side_binding": True}}
# a database of its own for the migration tests (created and dropped by them)
DATABASES["migrations"] = {**DATABASES["default"], "NAME": f"{_db.get('dbname', '')}_mig"}
THREADLINE = {
    "CORRELATION_HEADERS": ["X-Correlation-ID", "X-Request-ID"],
    "MAX_ID_LENGTH": 128,
    # applied after every migrate of the database the model lives in (the migrations alias)
    "TRACK": {"shop.Purchase": {"mask": ["card_number"]}},
    # the management-command tests vary these
    **json.loads(os.environ.get("THREADLINE_TEST_COMMAND_SETTINGS", "{}")),
}
