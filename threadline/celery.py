"""``threadline.celery``: Celery propagation (an alias of :mod:`threadline.propagation.celery`).

``threadline.celery.install(app)``, ``threadline.celery.uninstall(app)``, ``@threadline.task`` and
the :class:`Task` base class. See ``docs/celery.md``.
"""

from threadline.propagation.celery import (
    HEADER,
    ORIGIN,
    SignaturePolicy,
    Task,
    install,
    installed,
    task,
    uninstall,
)

__all__ = ["HEADER", "ORIGIN", "SignaturePolicy", "Task", "install", "installed", "task", "uninstall"]
