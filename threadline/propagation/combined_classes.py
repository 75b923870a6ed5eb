"""Subclasses of two classes made once per pair: how threadline's connection and cursor classes
join the ones an application or an ORM already uses."""

from __future__ import annotations

import threading
from typing import Any

_combined_classes: dict[tuple[type[Any], type[Any]], type[Any]] = {}
_combined_lock = threading.Lock()


def _combined(mixin: type[Any], cls: type[Any]) -> type[Any]:
    """``cls`` itself if it is already a ``mixin``, else the subclass of both (made once per pair)."""
    if issubclass(cls, mixin):
        return cls
    with _combined_lock:
        out = _combined_classes.get((mixin, cls))
        if out is None:
            out = type(f"Threadline{cls.__name__}", (mixin, cls), {})
            _combined_classes[(mixin, cls)] = out
        return out
