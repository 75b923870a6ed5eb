"""threadline for Django: ``"threadline"`` in ``INSTALLED_APPS`` is the switch.

- ``threadline.django.ThreadlineMiddleware``: the request context (after Django's
  ``AuthenticationMiddleware``).
- ``threadline.django.operations``: migration operations ``InstallAudit``, ``Track`` and
  ``Untrack`` (reversible; the audit schema itself is installed by threadline's own migrations).

See ``docs/django.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ThreadlineMiddleware"]


def __getattr__(name: str) -> Any:
    # imported on first use: threadline.propagation.django itself imports from this package
    if name == "ThreadlineMiddleware":
        from threadline.propagation.django import ThreadlineMiddleware

        return ThreadlineMiddleware
    raise AttributeError(f"module 'threadline.django' has no attribute {name!r}")
