"""``threadline demo``: the whole story on embedded defaults, registered on :data:`threadline.cli.cli`."""

from __future__ import annotations

import click

from threadline.demo import DemoError, DemoSettings, run


@click.command(
    epilog="""
\b
Examples:
  threadline demo                                    # embedded PostgreSQL, filesystem broker
  threadline demo --dsn postgresql://postgres@127.0.0.1/postgres --broker redis://127.0.0.1:6379/0

With --dsn (or THREADLINE_DEMO_DSN) the demo creates its own database through that admin DSN and
drops it afterwards. Without it, it needs the embedded PostgreSQL: the 'demo' extra (pip install '.[demo]').
"""
)
@click.option(
    "--dsn", envvar="THREADLINE_DEMO_DSN", help="Admin DSN of a PostgreSQL to use instead of an embedded one."
)
@click.option(
    "--broker", envvar="THREADLINE_DEMO_BROKER", help="Celery broker URL (default: threadline-filesystem://)."
)
@click.option("--backend", envvar="THREADLINE_DEMO_BACKEND", help="Celery result backend (default: file://).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for each step.",
)
def demo(dsn: str | None, broker: str | None, backend: str | None, timeout: float) -> None:
    """Run the whole story: a web request by alice, a Celery chain and chord, the trace and timeline.

    Starts everything it needs (PostgreSQL, broker, a worker subprocess), says what it is doing,
    and stops and removes all of it at the end, also on Ctrl-C or error.
    """
    try:
        run(DemoSettings(dsn=dsn, broker=broker, backend=backend, timeout=timeout), say=click.echo)
    except DemoError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        click.echo("interrupted; everything the demo started was stopped and removed", err=True)
        raise SystemExit(130) from None
