"""``threadline demo`` end to end: embedded defaults, real services, and Ctrl-C cleanup."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from threadline.demo import filesystem

from . import brokers
from .conftest import ADMIN_DSN


def _leftovers() -> set[str]:
    """Temporary demo directories and processes that a finished demo must not leave behind."""
    dirs = {str(p) for p in Path(tempfile.gettempdir()).glob("threadline-demo-*")}
    procs = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    mine = {line for line in procs if "threadline.demo.app" in line or "threadline-demo-" in line}
    return dirs | mine


def _demo(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "threadline.cli", "demo", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _check_story(out: str) -> None:
    assert "POST /orders as alice -> 201 Created" in out, out
    # five tasks, plus Celery's own chord_unlock on result backends without native chords
    assert re.search(r"8 transactions  8 changes  [56] tasks", out), out
    # every transaction of the story, the worker's included, carries alice
    timeline = out.split("== timeline of", 1)[1].splitlines()[2:]
    rows = [line for line in timeline if line[:2].isdigit()]
    assert len(rows) == 8 and all("user:alice" in r for r in rows), out
    assert sum(" celery " in r for r in rows) == 7 and sum(" web " in r for r in rows) == 1, out
    assert "everything the demo started is stopped and removed" in out


def test_demo_on_embedded_defaults_tells_the_whole_story_and_cleans_up(tmp_path: Path) -> None:
    before = _leftovers()
    proc = _demo(cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "embedded PostgreSQL" in out and f"broker {filesystem.URL}" in out
    _check_story(out)
    assert _leftovers() <= before
    assert list(tmp_path.iterdir()) == []  # nothing written to the working directory


def test_demo_uses_real_services_when_given() -> None:
    brokers.require_server("redis", "the demo's --broker and --backend given as Redis URLs")
    proc = _demo(
        "--dsn", ADMIN_DSN, "--broker", brokers.redis_db_url(13), "--backend", brokers.redis_db_url(14)
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "embedded" not in out and "created database threadline_demo_" in out
    assert "dropped database threadline_demo_" in out
    _check_story(out)


def test_ctrl_c_stops_everything_the_demo_started() -> None:
    before = _leftovers()
    proc = _demo()
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 60
    while "starting a Celery worker" not in seen:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            pytest.fail(f"the demo did not get to its worker:\n{seen}")
        seen += line
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + out
    assert "interrupted" in out
    deadline = time.monotonic() + 10
    while not _leftovers() <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers() <= before
