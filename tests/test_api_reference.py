"""docs/api.md is what ``python -m threadline._apidoc`` renders from the code: it cannot drift."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_reference_is_current() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    res = subprocess.run(
        [sys.executable, "-m", "threadline._apidoc"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr
    current = (ROOT / "docs" / "api.md").read_text()
    assert res.stdout == current, "docs/api.md is out of date: python -m threadline._apidoc > docs/api.md"


def test_every_public_name_is_in_the_reference() -> None:
    import threadline

    reference = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in threadline.__all__ if not n.startswith("__") and f"threadline.{n}" not in reference]
    assert missing == []
