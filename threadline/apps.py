"""Django app configuration: ``"threadline"`` in ``INSTALLED_APPS`` turns the ORM bridge on.

Imported by Django only; see :mod:`threadline.propagation.django`.
"""

from __future__ import annotations

from django.apps import AppConfig


class ThreadlineConfig(AppConfig):
    """Installs the Django ORM bridge when the app registry is ready (unless ``ORM_BRIDGE`` is off)."""

    name = "threadline"
    label = "threadline"
    verbose_name = "threadline audit trail"

    def ready(self) -> None:
        """Validate ``settings.THREADLINE`` and install the ORM bridge."""
        from threadline.propagation.django import install_orm_bridge, load_settings

        if load_settings().orm_bridge:
            install_orm_bridge()
