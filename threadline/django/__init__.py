"""threadline for Django: ``"threadline"`` in ``INSTALLED_APPS`` is the switch.

- ``threadline.django.ThreadlineMiddleware``: the request context (after Django's
  ``AuthenticationMiddleware``).
- ``threadline.django.operations``: migration operations ``InstallAudit``, ``Track`` and
  ``Untrack`` (reversible; the audit schema itself is installed by threadline's own migrations).

See ``docs/django.md``.
"""

from __future__ import annotations

from threadline.propagation.django import ThreadlineMiddleware

__all__ = ["ThreadlineMiddleware"]
