"""``python -m threadline``: the ``threadline`` command line."""

from __future__ import annotations

from threadline.cli import main

if __name__ == "__main__":
    main(prog_name="python -m threadline")
