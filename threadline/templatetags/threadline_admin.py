"""Template filters of threadline's admin pages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django import template

from threadline.explore.tracing import format_key

register = template.Library()


@register.filter
def row_key(pk: Mapping[str, Any] | None) -> str:
    """A captured key as ``id=7`` or ``order_id=7,line_no=2``."""
    return format_key(pk)
