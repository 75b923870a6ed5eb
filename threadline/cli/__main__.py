"""``python -m threadline.cli``: the ``threadline`` command line."""

from threadline.cli.app import main

if __name__ == "__main__":  # pragma: no cover
    main()
