"""What the command line prints for people to read: captured text made safe for a terminal.

Table names, keys, values, task names and database messages come from what applications wrote; a
control character in one (a carriage return, an ANSI escape) would act on the terminal instead of
showing, so every such line goes through :func:`threadline.core.printable.printable`. SQL printed
for a migration (``--print-sql``) and exports are written as they are.
"""

from __future__ import annotations

from typing import Any

import click

from threadline.core.printable import printable

__all__ = ["echo"]


def echo(message: Any = None, **kwargs: Any) -> None:
    """:func:`click.echo` of ``message`` with every character that would act on a terminal
    written as its escape (``\\u001b``)."""
    click.echo(None if message is None else printable(str(message)), **kwargs)
