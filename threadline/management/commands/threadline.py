"""``manage.py threadline ...``: the ``threadline`` command line on a Django database.

Every subcommand and option of the ``threadline`` CLI, with the same output and exit codes; the
database is ``DATABASES["default"]``, or the alias given with ``--database`` (before the
subcommand or after it), and the audit schema the one ``THREADLINE["AUDIT_SCHEMA"]`` names (or
``--audit-schema``). ``manage.py threadline --help`` lists the subcommands.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from threadline import cli
from threadline.core.errors import ConfigurationError
from threadline.django.database import dsn_for
from threadline.propagation.django import load_settings

PROG = "manage.py threadline"


def _split_database(argv: list[str]) -> tuple[str, list[str]]:
    """The ``--database`` alias (default ``default``) and the remaining arguments."""
    alias = "default"
    rest: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--database":
            alias = next(items, "")
            if not alias:
                raise CommandError("--database needs an alias from settings.DATABASES")
        elif item.startswith("--database="):
            alias = item.split("=", 1)[1]
        else:
            rest.append(item)
    return alias, rest


def run(argv: list[str]) -> int:
    """Run the CLI with ``argv`` on the Django database it names; the exit code."""
    try:
        alias, rest = _split_database(argv)
    except CommandError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 2
    wants_database = rest and rest[0] not in ("--help", "-h", "--version") and "--dsn" not in rest
    previous = {name: os.environ.get(name) for name in ("THREADLINE_DSN", "THREADLINE_AUDIT_SCHEMA")}
    try:
        if wants_database:
            os.environ["THREADLINE_DSN"] = dsn_for(alias)
        # the audit schema THREADLINE["AUDIT_SCHEMA"] names, unless --audit-schema names another
        os.environ["THREADLINE_AUDIT_SCHEMA"] = load_settings().audit_schema
        cli.main(rest, prog_name=PROG)
    except ConfigurationError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 2
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return 0


class Command(BaseCommand):
    """threadline's command line on the project's database."""

    help = "threadline's command line (install, track, coverage, timeline, trace, export, purge, ...) on DATABASES"

    def run_from_argv(self, argv: list[str]) -> None:
        """``manage.py threadline <args>``: the CLI parses its own arguments."""
        code = run(list(argv[2:]))
        sys.exit(code)

    def add_arguments(self, parser: Any) -> None:
        """For ``call_command("threadline", ...)``: the alias, then everything is passed through."""
        parser.add_argument("--database", default=None, help="an alias from settings.DATABASES")
        parser.add_argument("args", nargs=argparse.REMAINDER)

    def handle(self, *args: str, **options: Any) -> None:
        """``call_command("threadline", "coverage", "--expect", "shop_order", stdout=out)``: the
        output goes to ``stdout=`` and ``stderr=`` when given."""
        argv = list(args)
        if options.get("database"):
            argv = ["--database", options["database"], *argv]
        with (
            contextlib.redirect_stdout(options.get("stdout") or sys.stdout),
            contextlib.redirect_stderr(options.get("stderr") or sys.stderr),
        ):
            code = run(argv)
        if code:
            raise CommandError(f"threadline {' '.join(argv)} exited with status {code}", returncode=code)
