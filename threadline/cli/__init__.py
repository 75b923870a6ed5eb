"""The ``threadline`` command line: :data:`cli` (the click group) and :func:`main`.

One module per command group: ``app`` (the group and the everyday commands), ``connect`` (what
every command that opens a database shares), ``help`` (examples), ``ops`` (purge, coverage),
``partitions``, ``story`` (baseline, as-of, revert), ``trust`` (seal, verify, erase), ``demo``.
"""

from threadline.cli.app import cli, main

__all__ = ["cli", "main"]
