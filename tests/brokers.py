"""Which Celery brokers and result backend the suite runs against: the configured servers, else a
server-less fallback.

Two broker kinds: ``redis`` (``THREADLINE_TEST_REDIS``, default a per-session database number on
127.0.0.1:6379) and ``amqp`` (``THREADLINE_TEST_AMQP``, default RabbitMQ on loopback). Each kind
uses its server when it answers (checked once per session, 2 s connect timeout). Otherwise — on a
machine with no Redis or no RabbitMQ — it falls back to a server-less filesystem transport
(``threadline-filesystem://`` from :mod:`threadline.demo.filesystem`: kombu's ``filesystem://``,
publishing each message atomically).
The result backend (chords need one) is the configured Redis when it answers, else Celery's
``file://`` backend. Both fallbacks live in one temporary folder for the session, removed at exit
and exported to worker subprocesses through ``THREADLINE_TEST_CELERY_FS_ROOT``. The choice is
printed in pytest's header.

Importing this module checks nothing (it only registers the fallback's URL scheme with kombu, by
importing :mod:`threadline.demo.filesystem`):
:func:`choice` decides on first use, in the pytest process; worker subprocesses only call
:func:`transport_options`.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from threadline.demo import filesystem

CONFIGURED = {
    "redis": os.environ.get("THREADLINE_TEST_REDIS") or f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}",
    "amqp": os.environ.get("THREADLINE_TEST_AMQP") or "amqp://guest:guest@127.0.0.1:5672//",
}
SERVER_NAMES = {"redis": "Redis", "amqp": "RabbitMQ"}
FS_ROOT_ENV = "THREADLINE_TEST_CELERY_FS_ROOT"
FILESYSTEM = filesystem.URL
CONNECT_TIMEOUT = 2.0


def transport_options(broker: str) -> dict[str, Any]:
    """Transport options for ``broker``: the session's folders for the fallback, else none."""
    if not broker.startswith(FILESYSTEM):
        return {}
    return filesystem.transport_options(os.environ[FS_ROOT_ENV])


def connection(broker: str) -> Connection:
    """A kombu connection to ``broker`` (with its transport options)."""
    return Connection(broker, connect_timeout=5, transport_options=transport_options(broker))


def _answers(url: str) -> bool:
    try:
        with Connection(url, connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CONNECT_TIMEOUT)
            conn.default_channel  # noqa: B018 - Redis answers a PING only when a channel opens
        return True
    except Exception:
        return False


@dataclass(frozen=True)
class Broker:
    """The broker one kind uses this session."""

    kind: str
    configured: str
    url: str

    @property
    def fallback(self) -> bool:
        return self.url.startswith(FILESYSTEM)

    @property
    def server(self) -> str:
        return SERVER_NAMES[self.kind]

    def describe(self) -> str:
        if self.fallback:
            return f"filesystem fallback {self.url} (no server answered at {maybe_sanitize_url(self.configured)})"
        return f"configured {maybe_sanitize_url(self.url)}"


@dataclass(frozen=True)
class Choice:
    """The session's brokers by kind and the result backend they share."""

    brokers: dict[str, Broker]
    backend: str

    @property
    def backend_fallback(self) -> bool:
        return self.backend.startswith("file://")

    def describe_backend(self) -> str:
        if self.backend_fallback:
            where = maybe_sanitize_url(CONFIGURED["redis"])
            return f"filesystem fallback {self.backend} (no server answered at {where})"
        return f"configured {maybe_sanitize_url(self.backend)}"


def _fallback_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="threadline-test-celery-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.environ[FS_ROOT_ENV] = str(root)  # inherited by worker subprocesses
    filesystem.transport_options(root, create=True)
    (root / "results").mkdir()
    return root


@functools.cache
def choice() -> Choice:
    """Decide once per session: each configured server if it answers, else the filesystem fallback."""
    answers = {kind: _answers(url) for kind, url in CONFIGURED.items()}
    root = _fallback_root() if not all(answers.values()) else None
    brokers = {
        kind: Broker(kind, url, url if answers[kind] else FILESYSTEM) for kind, url in CONFIGURED.items()
    }
    backend = CONFIGURED["redis"] if answers["redis"] else f"file://{root}/results"
    return Choice(brokers, backend)


def broker(kind: str) -> Broker:
    """The broker of ``kind`` (``"redis"`` or ``"amqp"``) for this session."""
    return choice().brokers[kind]


def require_server(kind: str, why: str) -> Broker:
    """Skip the calling test, naming the missing server, when ``kind`` runs on the fallback."""
    import pytest  # not imported by worker subprocesses, which only need transport_options()

    chosen = broker(kind)
    if chosen.fallback:
        pytest.skip(
            f"needs a real {chosen.server} ({why}): no server answered at "
            f"{maybe_sanitize_url(chosen.configured)}, the suite runs on the filesystem fallback"
        )
    return chosen


def redis_db_url(db: int) -> str:
    """The configured Redis server with database number ``db``."""
    parts = urlsplit(CONFIGURED["redis"])
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def report() -> list[str]:
    """Lines for pytest's header."""
    chosen = choice()
    return [
        f"threadline Celery {b.kind} ({b.server}): broker {b.describe()}; result backend {chosen.describe_backend()}"
        for b in chosen.brokers.values()
    ]
