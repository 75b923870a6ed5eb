"""``threadline demo``: the whole story on embedded defaults (see :mod:`threadline.demo.runner`)."""

from threadline.demo.runner import DemoError, DemoSettings, run

__all__ = ["DemoError", "DemoSettings", "run"]
