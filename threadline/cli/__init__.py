"""The ``threadline`` command line: :data:`cli` (the click group) and :func:`main`.

One module per command group: ``app`` (the group; install, track, untrack, sync), ``read``
(timeline, history, trace, actions), ``export``, ``ops`` (purge, coverage), ``partitions``,
``story`` (baseline, as-of, revert), ``trust`` (seal, verify, erase) and ``demo``; ``connect``
(what every command that opens a database shares), ``reading`` (what the commands that read the
audit trail share) and ``help`` (examples).
"""

from threadline.cli.app import cli, main

__all__ = ["cli", "main"]
