"""Django app configuration: ``"threadline"`` in ``INSTALLED_APPS`` turns the ORM bridge and the
system checks on, and brings the audit schema's migrations.

Imported by Django only; see :mod:`threadline.propagation.django`.
"""

from __future__ import annotations

import sys

from django.apps import AppConfig


class ThreadlineConfig(AppConfig):
    """Installs the Django ORM bridge when the app registry is ready (unless ``ORM_BRIDGE`` is off)."""

    name = "threadline"
    label = "threadline"
    default_auto_field = "django.db.models.AutoField"
    verbose_name = "threadline audit trail"

    def ready(self) -> None:
        """Validate ``settings.THREADLINE``, install the ORM bridge, register the system checks and
        the refusal of a ``migrate`` that would drop an audit schema holding rows."""
        from django.apps import apps
        from django.core import checks

        from threadline.django.checks import check_database, check_setup
        from threadline.propagation.django import install, load_settings

        conf = load_settings()
        if conf.orm_bridge:
            install()
        if conf.command_context:
            from threadline.django.commands import start_command_context

            start_command_context(sys.argv, conf.command_actor)
        if conf.track and conf.track_on_migrate:
            from django.db.models.signals import post_migrate

            from threadline.django.tracking import on_post_migrate

            post_migrate.connect(on_post_migrate, sender=self, dispatch_uid="threadline.track")
        from django.db.models.signals import pre_migrate

        from threadline.django.uninstall import refuse_uninstall_with_rows

        pre_migrate.connect(refuse_uninstall_with_rows, sender=self, dispatch_uid="threadline.uninstall")
        checks.register(check_setup, checks.Tags.compatibility)
        checks.register(check_database, checks.Tags.database)
        if apps.is_installed("django.contrib.auth"):
            from threadline.django.auth import connect_login_receiver

            connect_login_receiver()
